"""``attnsteer eval pope | chair | mmlu | speed`` and ``attnsteer compare``."""

from __future__ import annotations

import importlib

from ._common import Parser, missing_subcommand, subparser

# name -> module under attnsteer.cli exposing add_arguments(parser) and run(args) -> int
EVAL_COMMANDS = ("pope", "chair", "mmlu", "speed")
EVAL_EXAMPLE = (
    "attnsteer eval mmlu --model smollm2 --tasks attnsteer_mc_demo --recipe none --recipe act-default "
    "--recipe softplus-gentle"
)


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
        module = importlib.import_module(f"attnsteer.cli.eval_{name}")
        p = subparser(esub, name, module.HELP, module.EXAMPLE, description=module.DESCRIPTION, needs=module.NEEDS)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def add_compare(sub) -> None:
    from . import compare

    p = subparser(sub, "compare", compare.HELP, compare.EXAMPLE, description=compare.DESCRIPTION, needs=compare.NEEDS)
    compare.add_arguments(p)
    p.set_defaults(func=compare.run)
