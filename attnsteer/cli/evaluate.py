"""``attnsteer eval pope | chair | mmlu | speed`` and ``attnsteer compare``."""

from __future__ import annotations

from ._common import NOT_IMPLEMENTED, Parser, missing_subcommand, not_implemented, subparser

# name -> module under attnsteer.cli exposing add_arguments(parser) and run(args) -> int
EVAL_COMMANDS = ("pope", "chair", "mmlu", "speed")
EVAL_EXAMPLE = (
    "attnsteer eval mmlu --model smollm2 --tasks attnsteer_mc_demo --recipe none --recipe act-default "
    "--recipe softplus-gentle"
)


def _eval_module(name: str):
    """The module of ``attnsteer eval NAME``, or None if it is not part of this install."""
    import importlib

    module_name = f"attnsteer.cli.eval_{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None


def add_eval(sub) -> None:
    parser = subparser(
        sub,
        "eval",
        "benchmarks, baseline vs recipes: pope | chair | mmlu (lm-eval) | speed",
        EVAL_EXAMPLE,
        description="Evaluate the unsteered model (--recipe none) and each recipe on one loaded model, with results "
        "(results.json + samples.jsonl) in a run directory that a rerun resumes. Subcommands: pope, chair (vision-"
        "language models), mmlu (any lm-eval task; attnsteer_mc_demo runs offline on CPU), speed. Under `accelerate "
        "launch` the items are shared out over the processes.",
    )
    parser.set_defaults(func=lambda args: missing_subcommand(parser))
    esub = parser.add_subparsers(
        title="eval commands", metavar="{" + ",".join(EVAL_COMMANDS) + "}", parser_class=Parser
    )
    for name in EVAL_COMMANDS:
        module = _eval_module(name)
        if module is None:
            p = subparser(
                esub,
                name,
                f"{name} (not available in this install)",
                f"attnsteer eval {name} --help",
                description=f"attnsteer eval {name}: {NOT_IMPLEMENTED}.",
            )
            p.set_defaults(func=lambda args, n=name: not_implemented(f"eval {n}"), _accepts_extra=True)
            continue
        help_text = getattr(module, "HELP", f"{name} benchmark")
        example = getattr(module, "EXAMPLE", f"attnsteer eval {name} --model smollm2")
        p = subparser(
            esub,
            name,
            help_text,
            example,
            description=getattr(module, "DESCRIPTION", None),
            needs=getattr(module, "NEEDS", None),
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def add_compare(sub) -> None:
    from . import compare

    p = subparser(sub, "compare", compare.HELP, compare.EXAMPLE, description=compare.DESCRIPTION, needs=compare.NEEDS)
    compare.add_arguments(p)
    p.set_defaults(func=compare.run)
