"""What every ``attnsteer`` subcommand shares: the parser class, exit codes, small helpers."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..errors import UsageError
from ..evals.paths import check_writable
from ._args import (  # re-exported for the subcommand modules
    BACKEND_CHOICES,  # noqa: F401
    BACKEND_HELP,  # noqa: F401
    example_epilog,
    positive_int,  # noqa: F401
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# A usage problem: printed as one paragraph, exit code 2, no traceback. The library raises
# UsageError (and its EvalError) for bad arguments; the CLI adds its own under the same class.
CLIError = UsageError


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` (caught in :func:`attnsteer.cli.main`) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: {message}. Fix: see `{self.prog} --help` for the flags and an example")


def subparser(
    sub, name: str, help_text: str, example: str, description: str | None = None, needs: str | None = None
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description or help_text, 79),
        epilog=example_epilog(example, needs),
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


def output_file(path: str, default_name: str, flag: str = "--output_path") -> Path:
    """``path`` if it names a .json file, else ``path/default_name``, checked writable up front
    (:func:`check_writable`; call it before any work). Nothing is created: make ``out.parent`` when
    writing."""
    if Path(path).expanduser().suffix.lower() == ".json":
        return check_writable(path, flag, folder=False)
    folder = check_writable(path, flag, folder=True)
    check_writable(folder / default_name, flag, folder=False)
    return folder / default_name


def check_prompts(prompts, flag: str = "--prompt") -> None:
    """Refuse an empty or whitespace-only prompt (nothing to generate from)."""
    for i, prompt in enumerate([prompts] if isinstance(prompts, str) else list(prompts)):
        if not str(prompt).strip():
            which = f" (prompt {i + 1})" if not isinstance(prompts, str) and len(prompts) > 1 else ""
            raise CLIError(
                f"{flag} {prompt!r}{which}: the prompt is empty (or only whitespace). Fix: pass the text to answer, e.g. "
                f'{flag} "What is the capital of France?"'
            )


def check_image_file(value, flag: str = "--image") -> Path:
    """``value`` as an image file PIL can read: a clear error (before any model loads) for a
    missing path, a folder or a file that is not an image. Reads the header only."""
    path = Path(str(value)).expanduser()
    fix = "Fix: pass the path of an image file (PNG, JPEG, ...)"
    if path.is_dir():
        raise CLIError(f"{flag} {str(value)!r}: that is a folder, not an image file. {fix}")
    if not path.is_file():
        raise CLIError(f"{flag} {str(value)!r}: no such file. {fix}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise CLIError(f"{flag}: reading images needs Pillow. Fix: pip install pillow (or attnsteer[eval])") from None
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CLIError(
            f"{flag} {str(value)!r}: not an image PIL can read ({type(exc).__name__}: {exc}). {fix}"
        ) from None
    return path


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
