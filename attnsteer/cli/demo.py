"""``attnsteer demo``: the offline tour on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

from ..recipe import load_labelled_recipes
from ._common import BACKEND_CHOICES, BACKEND_HELP, CLIError, positive_int, subparser


def add_demo(sub) -> None:
    from ..demo import DEMO_MAX_NEW_TOKENS, DEMO_RECIPES

    p = subparser(
        sub,
        "demo",
        "offline tour on the embedded SmolLM2-135M-Instruct (start here)",
        "attnsteer demo --max_new_tokens 24",
        description="Offline, no download: on a few built-in prompts, show the hidden attention sinks ACT finds, "
        f"the baseline vs steered answers ({', '.join(DEMO_RECIPES)}) and the time each took. The first run "
        "de-quantises the embedded model once (~25 s).",
    )
    p.add_argument(
        "--prompts",
        "--prompt",
        dest="prompts",
        action="extend",
        nargs="+",
        metavar="TEXT",
        help="your own prompts instead of the 3 built-in ones",
    )
    p.add_argument(
        "--recipe",
        dest="recipes",
        action="extend",
        nargs="+",
        metavar="R",
        help=f"recipes to compare (default: {' '.join(DEMO_RECIPES)})",
    )
    p.add_argument(
        "--max_new_tokens", type=positive_int, default=DEMO_MAX_NEW_TOKENS, help=f"default: {DEMO_MAX_NEW_TOKENS}"
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .. import demo
    from ..errors import AttnsteerError

    recipes = args.recipes or list(demo.DEMO_RECIPES)
    load_labelled_recipes(recipes)  # a bad --recipe fails before the model loads, naming the flag
    try:
        return demo.run_demo(args.prompts, recipes, max_new_tokens=args.max_new_tokens, backend=args.backend)
    except AttnsteerError as exc:
        raise CLIError(f"demo: {exc}") from None
