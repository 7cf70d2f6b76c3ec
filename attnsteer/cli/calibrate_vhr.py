"""``attnsteer calibrate vhr --fixed-heads``: the flags of
:class:`attnsteer.calibrate.vhr.VhrCalibrationConfig`, the calibration, and its table."""

from __future__ import annotations

import sys

from ..errors import UsageError
from .calibrate_var import add_common_arguments


def add_arguments(p) -> None:
    p.add_argument(
        "--fixed-heads",
        "--fixed_heads",
        dest="fixed_heads",
        action="store_true",
        help="write one fixed head set (selection: fixed) from the heads per-prompt VHR selects; required",
    )
    add_common_arguments(
        p,
        recipe_help="base per-prompt VHR recipe (built-in name or YAML path); default: vhr-llava15 for llava / "
        "llava_next, vhr-instructblip for instructblip, else VHR with its defaults",
        share_help="keep per layer the heads selected in at least this share of the prompts (default: 0.5)",
        name_suffix="fixed",
    )


def run(args, loaded=None) -> int:
    """The command; ``loaded``: an already loaded ``(processor, model)`` for ``--model``."""
    from ..calibrate.vhr import VhrCalibrationConfig, calibrate, format_vhr_table
    from .calibrate import config_from_args, log_line, print_notes

    if not args.fixed_heads:
        raise UsageError(
            "attnsteer calibrate vhr: --fixed-heads is missing. This command writes one fixed head set (the variant "
            "selection: fixed); the paper's per-prompt VHR needs no calibration. Fix: add --fixed-heads"
        )
    result = calibrate(config_from_args(VhrCalibrationConfig, args), loaded=loaded, progress=log_line)
    print(format_vhr_table(result.stats))
    print_notes(result.notes)
    print(
        f"wrote {result.path} ({result.fixed_heads} fixed heads in {len(result.stats.heads)} layers)", file=sys.stderr
    )
    return 0
