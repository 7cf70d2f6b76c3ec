"""``attnsteer compare RUN_DIR...``: the flags, and the printing around
:func:`attnsteer.evals.compare.compare` (which reads the runs and writes compare.md / compare.png)."""

from __future__ import annotations

import argparse
import sys

from ..evals.compare import BASELINE

HELP = "Markdown table + PNG chart of eval runs: baseline vs recipes, with deltas"
EXAMPLE = "attnsteer compare attnsteer_runs/mmlu-smollm2-* --output_path compare"
NEEDS = "the run folders of earlier `attnsteer eval` runs"
DESCRIPTION = (
    "Read the results of one or more run folders written by `attnsteer eval pope|chair|mmlu` (results.json) or "
    "`attnsteer eval speed` (its .json files, one per prompt length), or of such JSON files, and print a Markdown "
    "table of the headline metrics, baseline vs each recipe with the difference, and draw every run and metric as a "
    "PNG chart (one panel per run and metric, each on its own scale). Both are written to --output_path "
    "(compare.md, compare.png)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders of `attnsteer eval pope|chair|mmlu|speed` (or their results JSON files)",
    )
    p.add_argument(
        "--output_path",
        default="attnsteer_compare",
        help="folder for compare.md and compare.png (default: ./attnsteer_compare)",
    )
    p.add_argument("--baseline", default=BASELINE, help=f"label of the reference column (default: {BASELINE})")
    p.add_argument("--metrics", nargs="+", default=None, metavar="M", help="only these metrics (default: headline)")
    p.add_argument("--no_plot", action="store_true", help="skip the PNG chart")


def run(args: argparse.Namespace) -> int:
    """Print the tables to stdout; the notes and the files written to stderr."""
    from ..evals.compare import compare

    result = compare(args.runs, args.output_path, baseline=args.baseline, metrics=args.metrics, draw=not args.no_plot)
    print(result["markdown"])
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {', '.join(map(str, result['files']))}", file=sys.stderr)
    return 0
