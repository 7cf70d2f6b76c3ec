"""Flags and steps shared by ``attnsteer eval pope|chair|mmlu`` (lm-eval-style names).

Import-light on purpose (argparse and the standard library only): the CLI builds every eval
sub-parser at start-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_RUNS_DIR = "attnsteer_runs"
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


def _limit(text: str) -> float:
    """lm-eval's --limit: an item count (int >= 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 100) or a fraction (e.g. 0.1), got {text!r}"
        ) from None
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}")
    return int(value) if value >= 1 else value


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
        type=_limit,
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


def apply_limit(items: Sequence, limit) -> list:
    """First ``limit`` items (a count), or ``ceil(limit * n)`` for a fraction."""
    items = list(items)
    if limit is None:
        return items
    n = limit if isinstance(limit, int) else math.ceil(limit * len(items))
    return items[:n]


def slug(text: str) -> str:
    text = text.rstrip("/").split("/")[-1] if "/" in text else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def short_hash(data: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def check_writable(value, flag: str, *, folder: bool) -> Path:
    """``value`` as a path this process can write: a folder (``folder=True``: an existing folder, or
    one that can be created) or a file (an existing file is overwritten, a missing one created).
    Creates nothing; raises :class:`~attnsteer.errors.UsageError` naming ``flag``, the value and the
    fix -- so a command refuses an unusable output path before it loads a model or runs anything."""
    from ..errors import UsageError

    path = Path(str(value)).expanduser()
    shown = f"{flag} {str(value)!r}"
    fix = f"Fix: pass a {'folder' if folder else 'file path'} you can write to"
    if folder and path.exists() and not path.is_dir():
        raise UsageError(
            f"{shown}: that is an existing file, and a folder is expected here. {fix} (it is created if missing), or "
            "move the file away"
        )
    if not folder and path.is_dir():
        raise UsageError(f"{shown}: that is an existing folder, and a file is expected here. {fix}")
    if not folder and path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"{shown}: the file exists and cannot be written (permission denied). {fix}")
        return path
    first = path if folder else path.parent  # the folder that must exist or be created
    existing = first
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(
            f"{shown}: {str(existing)!r} is a file, so no folder can be created under it. Fix: pass a "
            f"{'folder' if folder else 'file path'} that is not under a file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == first else f"{str(existing)!r}, the existing folder it would go in,"
        raise UsageError(f"{shown}: {what} cannot be written (permission denied or a read-only file system). {fix}")
    return path


def check_output_path(args) -> None:
    """``--output_path``, when given, checked writable at the start of a command (before data or
    model loading); :func:`output_dir` checks the default run directory."""
    if getattr(args, "output_path", None):
        check_writable(args.output_path, "--output_path", folder=True)


def output_dir(args, task: str, model_id: str, identity: dict) -> Path:
    """``--output_path`` or the default ``./attnsteer_runs/<task>-<model>-<hash of identity>`` (the
    same command lands in the same folder, so it resumes); checked writable (:func:`check_writable`)."""
    if args.output_path:
        return check_writable(args.output_path, "--output_path", folder=True)
    default = Path(DEFAULT_RUNS_DIR) / f"{task}-{slug(model_id)}-{short_hash(identity)}"
    return check_writable(default, "--output_path (default)", folder=True)


def model_identity(model_id: str, kwargs: dict) -> dict:
    """The parts of --model/--model_args that can change outputs (not the device)."""
    out: dict = {"model": model_id}
    for key in ("dtype", "attn_implementation", "revision", "trust_remote_code"):
        if key in kwargs:
            out[key] = str(kwargs[key]).removeprefix("torch.")
    return out


def summarize_seeds(by_seed: dict) -> tuple[dict, dict]:
    """Mean over seeds of every numeric metric, and the sample std (empty with one seed)."""
    names: list[str] = []
    for metrics in by_seed.values():
        names += [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    names = list(dict.fromkeys(names))
    mean, std = {}, {}
    for name in names:
        values = [m[name] for m in by_seed.values() if isinstance(m.get(name), (int, float))]
        if not values:
            continue
        mu = sum(values) / len(values)
        mean[name] = mu
        if len(values) > 1:
            std[name] = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
    return mean, std


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


def print_table(markdown: str) -> None:
    print(markdown, flush=True)


def config_dataclass(name: str, add_arguments, doc: str):
    """A dataclass with one field per option ``add_arguments(parser)`` defines -- same names and
    defaults as the command line, the option's help in each field's metadata -- so a benchmark has
    one definition of its settings that both the CLI (which parses into it) and Python callers
    (``evaluate(model, processor, recipes, config)``) use."""
    import dataclasses

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    fields, lines = [], []
    for action in parser._actions:  # argparse's list of the options it defines
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        default = action.default
        meta = {"help": action.help or "", "flag": action.option_strings[0] if action.option_strings else ""}
        if isinstance(default, list):
            value = dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
        else:
            value = dataclasses.field(default=default, metadata=meta)
        fields.append((action.dest, Any, value))
        lines.append(f"    {action.dest}: {action.help or ''} (default: {default!r})")
    cls = dataclasses.make_dataclass(name, fields)
    cls.__doc__ = doc + "\n\nFields (the command line's options of the same names):\n" + "\n".join(lines)
    return cls


def loaded_model_identity(model, model_id: str | None) -> tuple[str, dict]:
    """(model id, model kwargs) for a model the caller already loaded (the Python API)."""
    name = model_id or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return str(name), {}
