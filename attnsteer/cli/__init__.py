"""The ``attnsteer`` command line.

One module per subcommand (``recipes``, ``generate``, ``demo``, ``evaluate`` for ``eval`` and
``compare``); each has an ``add_<command>`` function that builds its parser and a ``cmd_<command>``
function that runs it. :data:`COMMANDS` lists them in the order ``attnsteer --help`` shows them,
so a new subcommand is one module and one entry. The CLI only parses arguments and prints: the
work is done by the library (``attnsteer.models``, ``attnsteer.plan``, ``attnsteer.evals``).
Flag names follow lm-eval where they apply (``--model``, ``--model_args``, ``--batch_size``, ``--seed``, ``--output_path``).

Exit codes: 0 success, 2 usage error (bad flag, recipe, model or ``--model_args``; the message
names the flag, the value and the fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ._common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError, Parser
from .calibrate import add_calibrate
from .demo import add_demo
from .evaluate import add_compare, add_eval
from .generate import add_generate
from .inspect import add_inspect
from .recipes import add_recipes

COMMANDS: list[Callable] = [add_demo, add_generate, add_recipes, add_eval, add_compare, add_calibrate, add_inspect]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="attnsteer",
        description="Training-free attention interventions (ACT, softplus re-weighting, ...) for Hugging Face models.",
        epilog="example:\n  attnsteer demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"attnsteer {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _print_error(message: str) -> None:
    """One paragraph: line breaks inside wrapped library messages become spaces."""
    import re

    print("attnsteer: error: " + re.sub(r"\s*\n\s*", " ", message.strip()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 usage error, 130 interrupted)."""
    import attnsteer

    if hasattr(sys.stdout, "reconfigure"):
        try:  # generated text may not fit a non-UTF-8 terminal; never crash on printing it
            sys.stdout.reconfigure(errors="replace")
        except (ValueError, OSError):  # pragma: no cover - detached or exotic streams
            pass
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "_accepts_extra", False):
            prog = getattr(args, "_prog", parser.prog)
            raise CLIError(
                f"{prog}: unrecognized arguments: {' '.join(extra)}. Fix: see `{prog} --help` for the flags and an "
                "example"
            )
    except CLIError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ..console import quiet_transformers

    try:
        with quiet_transformers():
            return args.func(args)
    except CLIError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except attnsteer.AttnsteerError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnsteer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `attnsteer recipes list | head`: the reader left; stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - no real file descriptor
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
