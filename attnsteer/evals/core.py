"""The evaluation core: one :func:`run` for every benchmark.

``run(model, processor_or_tokenizer, task, recipes, config)`` evaluates the unsteered model
(``"none"``) and each recipe on one loaded model: each recipe is applied once around its own pass
and removed after it, so the baseline is the untouched model. It owns

- the recipe x seed loop, and the warnings each recipe raises (attnsteer's are recorded in the
  results' ``notes``; others are shown as usual);
- the run directory (:mod:`attnsteer.evals.results`): every finished item is appended at once,
  finished items are skipped on resume, a stopped session is recorded with how to resume;
- sharding under ``accelerate launch``: with sharded requests each process takes the items with
  ``index % world_size == rank`` and writes its own samples file; the main process merges them and
  scores the merged samples -- the same numbers as one process;
- the results schema (``results.json``): config, recipes (with the layers and heads they
  steered), seeds, data hashes, metrics, timings, steering counts, notes, sessions.

The task (:mod:`attnsteer.evals.task`) says what the items are, how they are answered and scored.
Nothing here parses arguments or prints: progress is a tqdm bar (``RunConfig.progress``) and
one-line notes go to ``RunConfig.log``.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import RunConfig
from .dist import Dist
from .paths import loaded_model_identity, model_identity, output_dir
from .results import RunDir, now_iso, sample_key, write_json_atomic
from .specs import RecipeSpec, check_recipes_fit, parse_recipes
from .task import Requests, RunContext, Samples, Task, TaskData


class Results(Mapping):
    """A run's results record (``results.json``), read like a dict, with the run directory.

    ``results["metrics"][label]["summary"]``: the mean over seeds of every metric of the recipe
    ``label`` (``"baseline"`` for the unsteered model); :meth:`markdown`: the comparison table."""

    def __init__(self, record: dict, path: Path):
        self.record, self.path = record, Path(path)

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def notes(self) -> list[str]:
        return list(self.record.get("notes", []))

    def markdown(self) -> str:
        """The baseline-vs-recipes table of the headline metrics (what the command line prints)."""
        from .compare import run_markdown

        return run_markdown(self.record, str(self.path))


def run(
    model,
    processor_or_tokenizer,
    task: Task,
    recipes: Sequence = ("none",),
    config: RunConfig | None = None,
) -> Results | None:
    """Evaluate ``model`` unsteered and with each recipe on ``task``.

    Args:
        model: a loaded transformers model (left as it was when this returns).
        processor_or_tokenizer: the model's processor (vision-language tasks) or tokenizer (text tasks).
        task: a task object, e.g. ``PopeTask(PopeConfig(pope_dir=..., coco_dir=...))``.
        recipes: ``"none"`` (the baseline), built-in names, YAML paths, hub repos, dicts or
            ``attnsteer.Recipe`` objects, in column order.
        config: how the run runs (seeds, limit, batch size, backend, run directory, progress).

    Returns:
        the results record (also in ``<run directory>/results.json``) on the main process; None on
        the other processes of an ``accelerate launch`` run.
    """
    config = config or RunConfig()
    specs = parse_recipes(recipes)
    data = task.prepared(config.limit)
    if config.model_id is not None:
        model_id, kwargs = config.model_id, config.model_kwargs
    else:
        model_id, kwargs = loaded_model_identity(model, None)
    dist = Dist()
    if len(config.seeds) > 1 and not data.identity.get("decoding", {}).get("do_sample", True) and dist.is_main:
        config.note("note: decoding is greedy, so every seed gives the same outputs; seeds matter with sampling")
    identity = {**model_identity(model_id, kwargs), **data.identity}
    out = output_dir(config.output_path, task.name, model_id, identity)
    run_dir = RunDir(
        out, task.name, identity, data=data.data_files, rank=dist.rank, world_size=dist.world_size, is_main=dist.is_main
    )
    recorded = {"task": task.name, "model": model_id, "model_args": config.model_args, **data.config}
    recorded.update(limit=config.limit, n_items=len(data.items))
    run_dir.open({"config": recorded, "recipes": _recipes_json(specs), "seeds": config.seeds})
    log = config.note if dist.is_main else None
    with run_dir.guard(log):  # a stop (Ctrl-C, an error) is recorded in results.json with how to resume
        dist.barrier()
        if dist.is_main:
            config.note(f"run directory: {out}")
            if data.description:
                config.note(f"{data.description}; recipes {', '.join(s.label for s in specs)}; seeds {config.seeds}")
            for name, content in data.extra_files.items():
                write_json_atomic(out / name, content)
        started, t0 = now_iso(), time.perf_counter()
        notes = data.notes + check_recipes_fit(model, specs, model_id, images=task.images)
        context = RunContext(model, processor_or_tokenizer, model_id, config, dist, out)
        requests = task.requests(context)
        answered = _answer_all(
            model, task, requests, data.items, specs, run_dir, config, dist, desc=_desc(task, model_id)
        )
        dist.barrier()
        if not dist.is_main:
            return None
        run_dir.merge_shards()
        scored = task.score(Samples(run_dir, data.items, specs, config.seeds))
        recorded.update(scored.pop("config", {}))
        recorded.update(requests.describe(data.items), batch_size=config.batch_size, backend=config.backend)
        payload = {
            "config": recorded,
            "recipes": _recipes_json(specs),  # now with the layers and heads that ran
            "seeds": config.seeds,
            "data": data.config.get("data"),
            **scored,
            "timings": {
                "total_s": round(time.perf_counter() - t0, 3),
                "per_recipe": answered["per_recipe"],
                "items_this_session": answered["items_this_session"],
            },
            "steering": answered["steering"],
            "notes": list(dict.fromkeys(notes + answered["notes"])),
            "session": {"started": started, "world_size": dist.world_size, "batch_size": config.batch_size},
        }
        record = run_dir.write_results(payload)
    return Results(record, out)


def _recipes_json(specs: Sequence[RecipeSpec]) -> dict:
    return {s.label: s.to_json() for s in specs}


def _desc(task: Task, model_id: str) -> str:
    return f"{task.name} {model_id.rstrip('/').split('/')[-1]}"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="item",
        disable=not enabled or total == 0,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        mininterval=0.5,
    )


def _answer_all(
    model,
    task: Task,
    requests: Requests,
    items: Sequence,
    specs: Sequence[RecipeSpec],
    run_dir: RunDir,
    config: RunConfig,
    dist: Dist,
    desc: str,
) -> dict:
    """Answer every (recipe, seed, item) not yet in ``run_dir`` (this process's share), appending
    each finished item; returns timings, steering counts and attnsteer's warnings."""
    mine = dist.shard(items) if requests.sharded else list(items)
    done = run_dir.finished()
    todo = {
        (spec.label, seed): [it for it in mine if sample_key(it.id, spec.hash, seed) not in done]
        for spec in specs
        for seed in config.seeds
    }
    total = sum(len(t) for t in todo.values())
    skipped = len(mine) * len(specs) * len(config.seeds) - total
    if skipped and dist.is_main:
        config.note(
            f"resuming {run_dir.path}: {skipped} finished item(s) are kept, {total} to go"
            + (" on this process" if dist.distributed else "")
        )
    timings, steering, notes = {}, {}, []
    bar = _progress(total, desc, config.progress and dist.is_main)
    try:
        for spec in specs:
            if not any(todo[(spec.label, seed)] for seed in config.seeds):
                continue
            bar.set_postfix_str(spec.label, refresh=False)
            t0 = time.perf_counter()
            with _recorded_warnings() as caught:
                n, counts = _answer_recipe(model, task, requests, spec, todo, run_dir, config, bar)
            notes += caught
            if counts is not None:
                steering[spec.label] = counts
            elapsed = time.perf_counter() - t0
            timings[spec.label] = {
                "items": n,
                "s": round(elapsed, 3),
                "items_per_s": round(n / elapsed, 4) if elapsed > 0 else None,
            }
    finally:
        bar.close()
        run_dir.close()
    return {"per_recipe": timings, "notes": notes, "steering": steering, "items_this_session": total}


def _answer_recipe(model, task, requests, spec, todo, run_dir, config, bar) -> tuple[int, dict | None]:
    """One recipe's pass: apply it, answer its items of every seed, count what it steered, remove it."""
    import attnsteer

    handle = None
    n = 0
    try:
        if not spec.is_baseline:
            handle = attnsteer.apply(model, spec.recipe, backend=config.backend, **requests.apply_kwargs)
        for seed in config.seeds:
            for batch in requests.batches(todo[(spec.label, seed)]):
                for item, answer in zip(batch, requests.answer(batch, spec, seed, handle)):
                    _write_sample(task, run_dir, item, answer, spec, seed)
                n += len(batch)
                bar.update(len(batch))
        counts = None
        if handle is not None:
            stats = handle.stats()
            counts = {
                "sites": len(stats),
                "calls": sum(s["calls"] for s in stats),
                "fired": sum(s["fired"] for s in stats),
                "rows_modified": sum(s.get("rows_modified", 0) for s in stats),
            }
        return n, counts
    finally:
        if handle is not None:
            handle.remove()


def _write_sample(task: Task, run_dir: RunDir, item, answer: dict, spec: RecipeSpec, seed: int) -> None:
    answer = dict(answer)
    extra = answer.pop("_records", [])
    record = {
        "key": sample_key(item.id, spec.hash, seed),
        "item_id": item.id,
        "recipe": spec.label,
        "recipe_hash": spec.hash,
        "seed": seed,
    }
    record.update(task.record(item, answer))
    record.update(answer)
    for line in extra:
        run_dir.append(line)
    run_dir.append(record)


@contextlib.contextmanager
def _recorded_warnings() -> Iterator[list[str]]:
    """Inside: attnsteer's warnings are collected into the yielded list (always, even repeats);
    other warnings are shown as usual when the block ends."""
    import attnsteer

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", attnsteer.AttnsteerWarning)
        try:
            yield notes
        finally:
            shown = [w for w in record if not issubclass(w.category, attnsteer.AttnsteerWarning)]
            notes += [str(w.message) for w in record if issubclass(w.category, attnsteer.AttnsteerWarning)]
    for w in shown:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


__all__ = ["Results", "RunConfig", "TaskData", "run"]
