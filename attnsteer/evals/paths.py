"""Where a run's files go, what identifies a run, and the small pure helpers every benchmark shares."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

DEFAULT_RUNS_DIR = "attnsteer_runs"


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


def output_dir(output_path, task: str, model_id: str, identity: dict) -> Path:
    """``output_path`` or the default ``./attnsteer_runs/<task>-<model>-<hash of identity>`` (the
    same settings land in the same folder, so a rerun resumes); checked writable (:func:`check_writable`)."""
    if output_path:
        return check_writable(output_path, "--output_path", folder=True)
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


def loaded_model_identity(model, model_id: str | None) -> tuple[str, dict]:
    """(model id, model kwargs) for a model the caller already loaded (the Python API)."""
    name = model_id or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return str(name), {}
