"""What a benchmark is to the evaluation core: a task object.

A task holds its typed config (a hand-written dataclass of its own settings: data, prompt,
decoding, parsing) and answers four questions for :func:`attnsteer.evals.run`:

- :meth:`Task.prepare`: its items, and what identifies and describes the run (:class:`TaskData`);
- :meth:`Task.requests`: how the model answers an item (generation through a processor, or
  log-likelihoods through lm-eval) -- a :class:`Requests`;
- :meth:`Task.record`: the task's fields of one item's sample line (parsed answer, correctness);
- :meth:`Task.score`: the metrics of every recipe and seed from the samples (:class:`Samples`).

The core owns everything else: the recipe x seed loop, the run directory and resume, sharding
over ``accelerate launch`` processes, warnings, the results schema.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .config import RunConfig
from .dist import Dist
from .paths import summarize_seeds
from .results import RunDir, sample_key
from .specs import RecipeSpec


@dataclass
class TaskData:
    """A prepared task.

    Attributes:
        items: what the model answers, in order; each has a stable ``id`` (the resume key).
        identity: the settings that change outputs (prompt, decoding, data source); with the model's,
            they name the default run directory, and a rerun with other values is refused.
        config: the task's settings as ``results.json`` records them (under ``config``).
        data_files: data file name -> SHA-256 (or another fingerprint); a resumed run must agree.
        extra_files: file name -> JSON content the main process writes into the run directory.
        description: one line saying what runs (logged at the start).
        notes: what the results should say about how the task was set up (e.g. a fallback lemmatiser).
    """

    items: list
    identity: dict
    config: dict
    data_files: dict = field(default_factory=dict)
    extra_files: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunContext:
    """What a task's :class:`Requests` may use: the model, its processor or tokenizer, the run's
    settings and directory, and this process."""

    model: Any
    processor: Any
    model_id: str
    run: RunConfig
    dist: Dist
    path: Path


class Requests(Protocol):
    """How the model answers items of one task.

    ``sharded``: each ``accelerate launch`` process takes its share of the items (True), or every
    process runs every item and the harness underneath shares the work out (False; only the main
    process's answers are written). ``apply_kwargs``: extra arguments to ``attnsteer.apply`` (the
    processor, for methods that read images or prompt text)."""

    sharded: bool
    apply_kwargs: dict

    def batches(self, items: Sequence) -> list[list]:
        """``items`` in the groups one call answers."""

    def answer(self, batch: Sequence, spec: RecipeSpec, seed: int, handle) -> list[dict]:
        """One dict per item of ``batch`` (fields of its sample line: the output, token counts,
        ...); an empty list on processes that write nothing. ``handle``: the steering handle of
        ``spec`` (None for the baseline). A dict's ``"_records"`` entry, when present, is a list
        of complete extra sample lines (per-document logs) written as they are."""

    def describe(self, items: Sequence) -> dict:
        """Settings ``results.json`` records for these requests (e.g. a formatted prompt)."""


class Task(ABC):
    """One benchmark, configured. Subclasses set ``name`` and ``images`` and take their config in
    ``__init__``."""

    name: ClassVar[str]
    # whether the inputs carry image tokens (checked against each recipe's methods); None: unknown
    images: ClassVar[bool | None] = None

    def __init__(self, config):
        self.config = config
        self._prepared: dict = {}

    def prepared(self, limit: int | float | None = None) -> TaskData:
        """:meth:`prepare`, once per ``limit`` (a caller may prepare before loading the model, so
        missing data is reported before minutes of loading; the run then reuses it)."""
        if limit not in self._prepared:
            self._prepared[limit] = self.prepare(limit)
        return self._prepared[limit]

    @abstractmethod
    def prepare(self, limit: int | float | None) -> TaskData:
        """Load and check the data (errors say what to download); ``limit``: :attr:`RunConfig.limit`."""

    @abstractmethod
    def requests(self, context: RunContext) -> Requests:
        """How the model answers this task's items."""

    def record(self, item, answer: dict) -> dict:
        """The task's fields of ``item``'s sample line, given the model's ``answer``."""
        return {}

    @abstractmethod
    def score(self, samples: Samples) -> dict:
        """``{"metrics": {label: {...}}, "headline": [...], ...}`` from the samples; an optional
        ``"config"`` entry adds settings learnt while running (recorded under ``config``)."""


class Samples:
    """The finished sample lines of a run, by recipe and seed, in item order."""

    def __init__(self, run_dir: RunDir, items: Sequence, specs: Sequence[RecipeSpec], seeds: Sequence[int]):
        self.run_dir, self.items, self.specs, self.seeds = run_dir, list(items), list(specs), list(seeds)

    def records(self, spec: RecipeSpec, seed: int) -> list[dict]:
        """The sample lines of every item for (spec, seed); an error if some are missing (an
        interrupted run: rerunning finishes it)."""
        from ..errors import EvalError

        keys = [sample_key(it.id, spec.hash, seed) for it in self.items]
        records = list(self.run_dir.records(keys))
        if len(records) != len(keys):
            raise EvalError(
                f"{self.run_dir.path}: {len(keys) - len(records)} of {len(keys)} items of recipe {spec.label!r} seed "
                f"{seed} have no sample yet (the run was interrupted). Fix: rerun the same command to finish them"
            )
        return records

    def per_seed(self, score_one: Callable[[list[dict]], tuple[dict, dict | None]]) -> dict:
        """Metrics of every recipe: ``score_one(records)`` -> (flat metrics, details or None) per
        seed; the entry holds the mean over seeds (``summary``), their sample std (``summary_std``),
        ``by_seed`` and, when given, ``details`` by seed."""
        metrics = {}
        for spec in self.specs:
            by_seed, details = {}, {}
            for seed in self.seeds:
                flat, detail = score_one(self.records(spec, seed))
                by_seed[str(seed)] = flat
                if detail is not None:
                    details[str(seed)] = detail
            entry = self.summarized(spec, by_seed)
            if details:
                entry["details"] = details
            metrics[spec.label] = entry
        return metrics

    @staticmethod
    def summarized(spec: RecipeSpec, by_seed: dict[str, dict]) -> dict:
        """A recipe's metrics entry from its flat metrics by seed: their mean (``summary``), sample
        std (``summary_std``, empty with one seed) and ``by_seed``."""
        mean, std = summarize_seeds(by_seed)
        return {"recipe_hash": spec.hash, "summary": mean, "summary_std": std, "by_seed": by_seed}
