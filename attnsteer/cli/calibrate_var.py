"""``attnsteer calibrate var``: the flags of :class:`attnsteer.calibrate.var.VarCalibrationConfig`
(the prompt-set flags shared with ``calibrate vhr`` first), the calibration, and its table."""

from __future__ import annotations

import argparse
import sys

from ._args import add_model_arguments, positive_int


def min_share(text: str) -> float:
    """argparse type: a share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], e.g. 0.5; got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], e.g. 0.5; got {text!r}")
    return value


def add_common_arguments(p, *, recipe_help: str, share_help: str, name_suffix: str = "calibrated") -> None:
    """--model, --model_args, --prompts, --images, --out, --recipe, --min-share, --limit, --name, --no_progress."""
    from ..calibrate.var import PROMPTS_FORMAT

    add_model_arguments(p, "hub id or local folder of a vision-language model (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument("--prompts", required=True, metavar="FILE", help=PROMPTS_FORMAT)
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="folder of images (or one image file): JSONL 'image' paths are read relative to it (default: relative "
        "to the JSONL file); prompts without an image (text-file lines) run on every image of it",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the recipe (a .yaml file or a folder)")
    p.add_argument("--recipe", default=None, metavar="BASE", help=recipe_help)
    p.add_argument(
        "--min-share", "--min_share", dest="min_share", type=min_share, default=0.5, metavar="S", help=share_help
    )
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N prompts")
    p.add_argument("--name", default=None, help=f"name of the written recipe (default: <base name>-{name_suffix})")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_arguments(p) -> None:
    from ..calibrate.var import DEFAULT_BASE

    add_common_arguments(
        p,
        recipe_help=f"base VAR recipe (built-in name or YAML path); default: {DEFAULT_BASE} for llava / llava_next, "
        "else VAR with the paper's defaults",
        share_help="freeze the dims found in at least this share of the prompts (default: 0.5)",
    )
    p.add_argument(
        "--tau", type=float, default=None, help="massive-activation threshold (default: the base recipe's tau)"
    )


def run(args, loaded=None) -> int:
    """The command; ``loaded``: an already loaded ``(processor, model)`` for ``--model``."""
    from ..calibrate.var import VarCalibrationConfig, calibrate, format_var_table
    from .calibrate import config_from_args, log_line, print_notes

    result = calibrate(config_from_args(VarCalibrationConfig, args), loaded=loaded, progress=log_line)
    print(format_var_table(result.stats))
    print_notes(result.notes)
    print(f"wrote {result.path} (sink_dims {sorted(result.stats.sink_dims)})", file=sys.stderr)
    return 0
