"""How a run runs, for every benchmark: seeds, item limit, batch size, backend, where the run lives,
what the model is called in the results, and how the run reports progress.

A benchmark's own settings (data, prompt, decoding, parsing) are its task's config
(:mod:`attnsteer.evals.tasks`); :func:`attnsteer.evals.run` takes one of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError


@dataclass
class RunConfig:
    """Settings of one run that do not change what is measured.

    Attributes:
        seeds: one pass per seed (greedy decoding gives the same outputs for every seed).
        limit: only the first N items (an int >= 1) or a fraction in (0, 1) of them; None: all.
        batch_size: items per forward / generate call, left-padded.
        backend: ``attnsteer.apply``'s backend ("auto", "chunked", "flash", "triton", "reference").
        output_path: the run directory (results.json + samples.jsonl); None: ``./attnsteer_runs/
            <task>-<model>-<settings hash>``. A rerun with the same settings resumes it.
        model_id: the model's name in the results and the default run directory; None: the loaded
            model's ``config._name_or_path``.
        model_args: the loading arguments as given (recorded); ``model_kwargs``: the parsed ones whose
            values change outputs (dtype, attn_implementation, revision, trust_remote_code) are part of
            the run's identity.
        progress: a tqdm progress bar on stderr while items run.
        log: receives one-line notes (the run directory, resuming, a stopped run and how to resume
            it); None: silent.
    """

    seeds: Sequence[int] = (0,)
    limit: int | float | None = None
    batch_size: int = 1
    backend: str = "auto"
    output_path: str | Path | None = None
    model_id: str | None = None
    model_args: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    progress: bool = True
    log: Callable[[str], None] | None = None

    def __post_init__(self):
        from ..attention.router import CHOICES

        seeds = [self.seeds] if isinstance(self.seeds, int) else list(self.seeds or [0])
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UsageError(f"RunConfig.seeds {self.seeds!r}: expected integers. Fix: e.g. seeds=[0, 1, 2]")
        self.seeds = list(dict.fromkeys(seeds))
        try:
            self.limit = checked_limit(self.limit)
        except ValueError:
            raise UsageError(
                f"RunConfig.limit {self.limit!r}: expected a count >= 1 or a fraction in (0, 1). Fix: e.g. limit=100 "
                "or 0.1"
            ) from None
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"RunConfig.batch_size {self.batch_size!r}: expected an integer >= 1")
        if self.backend not in CHOICES:
            raise UsageError(f"RunConfig.backend {self.backend!r}: expected one of {', '.join(CHOICES)}")

    def note(self, line: str) -> None:
        """Pass ``line`` to :attr:`log` (nothing when None)."""
        if self.log is not None:
            self.log(line)


def checked_limit(limit: int | float | None) -> int | float | None:
    """``limit`` as a run takes it: None, an item count (an int >= 1; 100.0 becomes 100) or a fraction
    in (0, 1); a ValueError for anything else (0, negatives, 1.5, nan, inf, booleans)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(limit)
    if limit < 1:
        return limit
    if not float(limit).is_integer():
        raise ValueError(limit)
    return int(limit)


def apply_limit(items: Sequence, limit: int | float | None) -> list:
    """The first ``limit`` items (a count), or ``ceil(limit * n)`` of them for a fraction."""
    items = list(items)
    if limit is None:
        return items
    n = limit if isinstance(limit, int) else math.ceil(limit * len(items))
    return items[:n]
