"""What every ``attnsteer`` subcommand shares: the parser class, exit codes, small helpers."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..errors import UsageError
from ..evals._cli import positive_int  # noqa: F401  (re-exported for the subcommand modules)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
NOT_IMPLEMENTED = "not implemented yet in this version"

# A usage problem: printed as one paragraph, exit code 2, no traceback. The library raises
# UsageError (and its EvalError) for bad arguments; the CLI adds its own under the same class.
CLIError = UsageError


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` (caught in :func:`attnsteer.cli.main`) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: {message}. Fix: see `{self.prog} --help` for the flags and an example")


def subparser(sub, name: str, help_text: str, example: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description or help_text, 79),
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(_prog=parser.prog, _accepts_extra=False)
    return parser


def missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def seed_everything(seed: int) -> None:
    """Seed python's and torch's generators."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def output_file(path: str, default_name: str) -> Path:
    """``path`` if it names a .json file, else ``path/default_name``; parent folders are created."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".json":
        out = out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def not_implemented(name: str) -> int:
    print(f"attnsteer {name}: {NOT_IMPLEMENTED}.", file=sys.stderr)
    return EXIT_USAGE


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--model_args``, as every command that loads a model takes them."""
    from .. import models

    p.add_argument(
        "--model", default=None, help="hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--model_args",
        default=None,
        help="key=value,... e.g. dtype=bfloat16,device=cpu; keys: " + ", ".join(models.MODEL_ARG_KEYS),
    )


def add_recipe_argument(p: argparse.ArgumentParser) -> None:
    """``--recipe R [R ...]`` (repeatable), required."""
    p.add_argument(
        "--recipe",
        action="extend",
        nargs="+",
        required=True,
        metavar="R",
        help="built-in name, YAML path or hub repo; repeat for several",
    )
