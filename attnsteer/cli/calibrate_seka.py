"""``attnsteer calibrate seka``: the flags of :class:`attnsteer.calibrate.seka.SekaCalibrationConfig`,
the projections' build, and their table."""

from __future__ import annotations

import sys

from ._args import add_model_arguments, positive_int


def add_arguments(p) -> None:
    from ..calibrate.seka import DATA_FORMAT

    add_model_arguments(p, "hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, metavar="FILE", help=DATA_FORMAT)
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the recipe to write (X.yaml gets X.seka.safetensors beside it; a folder gets recipe.yaml and "
        "seka-projections.safetensors)",
    )
    p.add_argument("--layers", default="-10:", help="layers to build projections for (default: -10:, the last ten)")
    p.add_argument("--top-pct", "--top_pct", dest="top_pct", type=float, default=0.9, help="singular-value share kept")
    p.add_argument(
        "--min-diff", "--min_diff", dest="min_diff", type=float, default=0.2, help="heads moving less get no projection"
    )
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--no-negative", "--no_negative", dest="negative", action="store_false", help="build P+ only")
    p.add_argument("--g-pos", "--g_pos", dest="g_pos", type=float, default=0.8, help="the recipe's g_pos (0.8)")
    p.add_argument("--g-neg", "--g_neg", dest="g_neg", type=float, default=0.2, help="the recipe's g_neg (0.2)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N examples")
    p.add_argument("--name", default=None, help="name of the written recipe (default: seka-<model name>)")


def run(args, loaded=None) -> int:
    """The command; ``loaded``: an already loaded ``(tokenizer, model)`` for ``--model``."""
    from ..calibrate.seka import SekaCalibrationConfig, calibrate, format_table
    from .calibrate import config_from_args, log_line

    result = calibrate(config_from_args(SekaCalibrationConfig, args), loaded=loaded, progress=log_line)
    print(format_table(result.projections))
    print(
        f"wrote {result.path} and {result.projections_path} ({result.projected_heads} projected heads)",
        file=sys.stderr,
    )
    return 0
