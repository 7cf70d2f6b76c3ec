"""Flags shared by the commands (lm-eval-style names) and the argparse types they parse with.

Import-light on purpose (argparse and the standard library only): the CLI builds every sub-parser at
start-up. The library never parses arguments; the commands map these flags to typed configs.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..evals.config import checked_limit
from ..evals.paths import DEFAULT_RUNS_DIR

# attnsteer.apply's backends (attnsteer.attention.router.CHOICES; listed here: this module stays import-light)
BACKEND_CHOICES = ("auto", "fused", "reference", "chunked", "flash", "triton")
BACKEND_HELP = (
    "steering backend: auto (the fastest that runs each call: triton on CUDA, flash on CPU, else chunked; fused is "
    "its old name); chunked / flash / triton: that one for every call (an error when it cannot run one); reference: "
    "the float32 eager oracle"
)


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, else an error saying ``what`` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def example_epilog(example: str, needs: str | None = None) -> str:
    """A ``--help`` epilog: the example command, and what it needs beyond this install (data, a
    GPU, a 7B model, the network) when it cannot run offline as it is."""
    return f"example (needs {needs}):\n  {example}" if needs else f"example:\n  {example}"


def parse_limit(text: str) -> float:
    """lm-eval's --limit: an item count (int >= 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 100) or a fraction (e.g. 0.1), got {text!r}"
        ) from None
    try:
        return checked_limit(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    from ..models import MODEL_ARG_KEYS

    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--model_args",
        default=None,
        help="key=value,... e.g. dtype=bfloat16,device=cuda; keys: " + ", ".join(MODEL_ARG_KEYS),
    )


def add_run_arguments(
    p: argparse.ArgumentParser,
    *,
    batch_default: int = 1,
    limit_help: str | None = None,
    samples_help: str | None = None,
) -> None:
    """--recipe, --seed, --limit, --batch_size, --output_path, --log_samples, --backend, --no_progress."""
    p.add_argument(
        "--recipe",
        action="extend",
        nargs="+",
        metavar="R",
        default=None,
        help="recipe to compare: 'none' (the unsteered baseline), a built-in name, a YAML path or a hub "
        "repo; repeat for several, all run on the one loaded model (default: none)",
    )
    p.add_argument(
        "--seed",
        action="extend",
        nargs="+",
        type=int,
        metavar="N",
        default=None,
        help="seed(s); repeat for several (default: 0). Greedy decoding gives the same output for every "
        "seed; seeds matter with sampling",
    )
    p.add_argument(
        "--limit",
        type=parse_limit,
        default=None,
        help=limit_help or "only the first N items (or a fraction < 1) -- for quick checks, not for reported numbers",
    )
    p.add_argument(
        "--batch_size",
        type=positive_int,
        default=batch_default,
        help=f"items per forward/generate call, left-padded (default: {batch_default})",
    )
    p.add_argument(
        "--output_path",
        default=None,
        help=f"run directory for results.json + samples.jsonl (default: ./{DEFAULT_RUNS_DIR}/<task>-<model>-"
        "<settings hash>); rerunning the same command there resumes it",
    )
    p.add_argument(
        "--log_samples",
        action="store_true",
        help=samples_help or "accepted for lm-eval compatibility: samples.jsonl is always written (resuming needs it)",
    )
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help=BACKEND_HELP,
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_decoding_arguments(group, max_new_tokens: int, max_help: str) -> None:
    """--max_new_tokens, --do_sample, --temperature, --top_p, --num_beams (generation benchmarks)."""
    group.add_argument("--max_new_tokens", type=positive_int, default=max_new_tokens, help=max_help)
    group.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    group.add_argument("--temperature", type=float, default=1.0, help="with --do_sample (default: 1.0)")
    group.add_argument("--top_p", type=float, default=1.0, help="with --do_sample (default: 1.0)")
    group.add_argument("--num_beams", type=positive_int, default=1, help="beam search width (default: 1)")


def seeds_of(args) -> list[int]:
    return list(dict.fromkeys(args.seed)) if args.seed else [0]


def hub_offline_if_unreachable() -> bool:
    """Set the Hugging Face offline switches when the hub cannot be reached (so a missing dataset
    fails at once instead of retrying for minutes). Returns True when offline."""
    from .. import hub

    truthy = ("1", "true", "yes", "on")
    offline = (
        os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
        or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in truthy
    )
    if not offline and not hub.reachable():
        offline = True
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        for mod_name, attr in (
            ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
            ("datasets.config", "HF_HUB_OFFLINE"),
            ("datasets.config", "HF_DATASETS_OFFLINE"),
        ):
            mod = sys.modules.get(mod_name)
            if mod is not None and hasattr(mod, attr):
                setattr(mod, attr, True)
    return offline
