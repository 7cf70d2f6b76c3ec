"""The generation loop shared by the POPE and CHAIR runs.

One loaded model; every ``--recipe`` (``none`` = the unsteered baseline) and every ``--seed`` run in
turn over the same items; each recipe is applied once around its own pass and removed after it,
so the baseline is the untouched model. Items are generated in left-padded batches through the
processor's chat template, each finished item is appended to the run directory at once
(:mod:`attnsteer.evals.results`), and finished items are skipped on resume.

Under ``accelerate launch`` each process takes the items with ``index % world_size == rank``
(``accelerate.PartialState``), writes its own samples file, and the main process merges them and
computes the metrics from the merged samples -- the same numbers as one process (the items and
their outputs are the same; only who computes them changes). With sampling (``--do_sample``) the
random stream is re-seeded per batch from ``(seed, first item id)``, so sampled outputs match
across sharding at ``--batch_size 1``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .results import BASELINE_HASH, RunDir, sample_key

BASELINE_LABEL = "baseline"
NONE_RECIPE = "none"


# ---- recipes ------------------------------------------------------------------------------------
@dataclass
class RecipeSpec:
    """One column of the comparison: the baseline (``recipe is None``) or a loaded recipe."""

    label: str
    recipe: Any = None  # attnsteer.Recipe or None
    # the concrete layers and heads it steered on the run's model (handle.resolved_recipe()),
    # filled by check_recipes_fit
    applied: dict | None = None

    @property
    def is_baseline(self) -> bool:
        return self.recipe is None

    @property
    def hash(self) -> str:
        return BASELINE_HASH if self.recipe is None else self.recipe.hash

    def to_json(self) -> dict:
        if self.recipe is None:
            return {"label": self.label, "name": NONE_RECIPE, "hash": BASELINE_HASH, "recipe": None}
        out = {
            "label": self.label,
            "name": self.recipe.name,
            "hash": self.recipe.hash,
            "recipe": self.recipe.resolved_dict(),
        }
        if self.applied is not None:
            out["applied"] = self.applied
        return out


def parse_recipes(values: Sequence | None) -> list[RecipeSpec]:
    """``--recipe`` values -> specs, baseline first. ``none`` (any case) is the baseline; no
    ``--recipe`` at all means the baseline only. Values may also be ``Recipe`` objects or dicts
    (the Python API). A bad recipe is a UsageError naming the value."""
    from ..recipe import load_labelled_recipes as _load_recipes

    def is_baseline(value) -> bool:
        return isinstance(value, str) and value.lower() == NONE_RECIPE

    values = list(values or [NONE_RECIPE])
    specs: list[RecipeSpec] = []
    if any(is_baseline(v) for v in values):
        specs.append(RecipeSpec(BASELINE_LABEL))
    strings = list(dict.fromkeys(v for v in values if isinstance(v, str) and not is_baseline(v)))
    others = strings + [v for v in values if not isinstance(v, str)]  # Recipe objects, dicts
    for label, recipe in _load_recipes(others) if others else []:
        specs.append(RecipeSpec(label, recipe))
    return specs


def check_recipes_fit(model, specs: Sequence[RecipeSpec], model_id: str, *, images: bool | None = None) -> list[str]:
    """Plan every recipe of ``specs`` on the model (``attnsteer.plan``: nothing changes), record
    the concrete layers and heads each steers (``spec.applied``); returns the plans' warnings.
    ``images``: whether the inputs carry image tokens (``attnsteer.plan.check_recipes``)."""
    from ..plan import check_recipes

    steered = [(spec.label, spec.recipe) for spec in specs if not spec.is_baseline]
    notes, applied = check_recipes(model, steered, model_id, images=images)
    for spec in specs:
        spec.applied = applied.get(spec.label)
    return notes


# ---- processes ----------------------------------------------------------------------------------
def use_cpu_processes() -> bool:
    """Whether the processes of a launch run on the CPU (gloo): asked for (``accelerate launch --cpu``
    sets ACCELERATE_USE_CPU), or no CUDA device exists. Without it accelerate leaves a torchrun-style
    launch (``accelerate launch --multi_gpu`` or ``torchrun``) on a CPU-only machine undistributed."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


class Dist:
    """This process in an ``accelerate launch`` run (or the only one).

    GPUs: ``accelerate launch --num_processes N -m attnsteer.cli eval ...``. CPU-only machines:
    ``accelerate launch --multi_gpu --num_processes N ...`` or ``torchrun --nproc_per_node N -m
    attnsteer.cli eval ...`` (``accelerate launch --cpu`` starts several CPU processes only through
    MPI); the processes then talk over gloo."""

    def __init__(self):
        self._state = None
        try:
            from accelerate import PartialState

            self._state = PartialState(cpu=use_cpu_processes())
        except ImportError:  # pragma: no cover - accelerate is a dependency
            self._state = None

    @property
    def rank(self) -> int:
        return self._state.process_index if self._state is not None else 0

    @property
    def world_size(self) -> int:
        return self._state.num_processes if self._state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> str | None:
        """The device this process should use in a multi-process run (None = leave it)."""
        if self._state is None or not self.distributed:
            return None
        return str(self._state.device)

    def barrier(self) -> None:
        if self._state is not None and self.distributed:
            self._state.wait_for_everyone()

    def shard(self, items: Sequence) -> list:
        """The items this process takes: those with ``index % world_size == rank``."""
        return [it for i, it in enumerate(items) if i % self.world_size == self.rank]


# ---- items and decoding -------------------------------------------------------------------------
@dataclass
class EvalItem:
    """One model call: a stable ``id``, the user message, an image (path or PIL image) and the
    task's own fields (label, split, ...)."""

    id: str
    prompt: str
    image: Any = None
    meta: dict = field(default_factory=dict)
    # the question without answer-format suffixes, for methods that match the image against the
    # prompt's text (AGLA's blip_itm); None: the prompt itself
    query: str | None = None


@dataclass
class Decoding:
    """How answers are generated (greedy by default)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.do_sample:
            out.pop("temperature")
            out.pop("top_p")
        out["strategy"] = "sampling" if self.do_sample else ("beam" if self.num_beams > 1 else "greedy")
        return out

    def generation_config(self, model, pad_id: int | None, eos_id):
        import copy

        config = copy.deepcopy(model.generation_config)
        eos = config.eos_token_id if config.eos_token_id is not None else eos_id
        pad = pad_id if pad_id is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=None,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        config.update(**kwargs)
        return config


def item_seed(seed: int, item_id: str) -> int:
    """The per-batch torch seed derived from the run seed and the batch's first item."""
    return int(hashlib.sha256(f"{seed}|{item_id}".encode()).hexdigest()[:8], 16)


# ---- inputs -------------------------------------------------------------------------------------
def load_image(image):
    """A PIL RGB image from a path or an image object."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as img:
            return img.convert("RGB")
    return image.convert("RGB") if hasattr(image, "convert") else image


class VLMInputs:
    """Batches of (prompt, image) through the processor's chat template, left-padded.

    ``chat=False`` (``--no-chat``): no chat template; the text is the processor's image token
    (which the processor expands to the image's placeholders) on its own line, then the prompt."""

    def __init__(self, processor, model_id: str = "the model", chat: bool = True, model=None):
        from ..errors import EvalError

        self.processor = processor
        self.chat = chat
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise EvalError(f"--model {model_id!r}: its processor has no tokenizer; a vision-language model is needed")
        self.image_token = getattr(processor, "image_token", None)
        if not chat and not isinstance(self.image_token, str):
            raise EvalError(
                f"--no-chat: the processor of --model {model_id!r} names no image token (processor.image_token), so "
                "the image cannot be placed in a prompt without its chat template. Fix: drop --no-chat"
            )
        if not chat and model is not None:
            from .. import archs

            arch = archs.resolve(model)
            if arch.wrapper_token_ids:
                raise EvalError(
                    f"--no-chat: --model {model_id!r} ({arch.spec.model_type}) wraps each image in marker tokens (ids "
                    f"{list(arch.wrapper_token_ids)}) that its chat template writes around the image token; a prompt "
                    "without the template would lack them. Fix: drop --no-chat"
                )
        if chat and not getattr(processor, "chat_template", None):
            raise EvalError(
                f"--model {model_id!r}: its processor has no chat template, so prompts cannot be formatted the way "
                "the model was trained. Fix: use a checkpoint whose processor ships one (e.g. the llava-hf/* "
                "conversions)"
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def prompt_text(self, prompt: str, with_image: bool = True) -> str:
        if not self.chat:
            return f"{self.image_token}\n{prompt}" if with_image else prompt
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def __call__(self, items: Sequence[EvalItem], device) -> dict:
        texts = [self.prompt_text(it.prompt, it.image is not None) for it in items]
        images = [load_image(it.image) for it in items if it.image is not None]
        kwargs: dict = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        enc = self.processor(**kwargs)
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in enc.items()}


def generate_batch(model, builder: VLMInputs, items: Sequence[EvalItem], decoding: Decoding, device, handle=None):
    """Generate for a batch; returns ``(texts, new_token_counts, hit_limit_flags)``. With a
    steering ``handle``, each item's ``query`` is the prompt text its methods match against."""
    import contextlib

    import torch

    inputs = builder(items, device)
    config = decoding.generation_config(model, builder.tokenizer.pad_token_id, builder.tokenizer.eos_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    queries = [it.query if it.query is not None else it.prompt for it in items]
    text = handle.prompt_text(queries) if handle is not None else contextlib.nullcontext()
    with torch.inference_mode(), text:
        out = model.generate(**inputs, generation_config=config)
    new = out[:, prompt_len:].tolist()
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    texts, counts, hit = [], [], []
    for row in new:
        n = len(row)
        stopped = False
        for i, tok in enumerate(row):
            if tok in eos_ids:
                n, stopped = i, True
                break
        while n and row[n - 1] == config.pad_token_id and config.pad_token_id not in eos_ids:
            n -= 1
        texts.append(builder.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
        counts.append(n + int(stopped))
        hit.append(not stopped and n >= decoding.max_new_tokens)
    return texts, counts, hit


# ---- the loop -----------------------------------------------------------------------------------
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


def run_generation(
    *,
    model,
    builder: VLMInputs,
    items: Sequence[EvalItem],
    specs: Sequence[RecipeSpec],
    seeds: Sequence[int],
    decoding: Decoding,
    batch_size: int,
    run: RunDir,
    make_record: Callable[[EvalItem, str], dict],
    dist: Dist,
    backend: str = "auto",
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Generate every (recipe, seed, item) not yet in ``run`` (this process's shard only),
    appending each finished item. Returns timings and steering notes for ``results.json``.

    ``make_record(item, output)`` returns the task's fields of a sample line (parsed answer,
    score, ...); the runner adds ``key``, ``item_id``, ``recipe``, ``recipe_hash``, ``seed``,
    ``output``, ``new_tokens`` and ``hit_max_new_tokens``.
    """
    import torch

    import attnsteer

    device = next(model.parameters()).device
    mine = dist.shard(items)
    done = run.finished()
    plan = []
    for spec in specs:
        for seed in seeds:
            todo = [it for it in mine if sample_key(it.id, spec.hash, seed) not in done]
            plan.append((spec, seed, todo))
    total = sum(len(todo) for _, _, todo in plan)
    skipped = len(mine) * len(specs) * len(seeds) - total
    if skipped and dist.is_main:
        print(
            f"resuming {run.path}: {skipped} finished item(s) are kept, {total} to go"
            + (" on this process" if dist.distributed else ""),
            file=sys.stderr,
        )
    timings: dict = {}
    notes: list[str] = []
    steering: dict = {}
    bar = _progress(total, desc, progress and dist.is_main)
    try:
        for spec in specs:
            todo_of_spec = [(seed, todo) for s, seed, todo in plan if s is spec and todo]
            if not todo_of_spec:
                continue
            handle = None
            t0 = time.perf_counter()
            n_items = 0
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always", attnsteer.AttnsteerWarning)
                try:
                    if not spec.is_baseline:
                        handle = attnsteer.apply(model, spec.recipe, backend=backend, processor=builder.processor)
                    bar.set_postfix_str(spec.label, refresh=False)
                    for seed, todo in todo_of_spec:
                        for start in range(0, len(todo), batch_size):
                            batch = todo[start : start + batch_size]
                            torch.manual_seed(item_seed(seed, batch[0].id))
                            texts, counts, hit = generate_batch(model, builder, batch, decoding, device, handle)
                            for it, text, n, h in zip(batch, texts, counts, hit):
                                rec = {
                                    "key": sample_key(it.id, spec.hash, seed),
                                    "item_id": it.id,
                                    "recipe": spec.label,
                                    "recipe_hash": spec.hash,
                                    "seed": seed,
                                }
                                rec.update(make_record(it, text))
                                rec.update({"output": text, "new_tokens": n, "hit_max_new_tokens": h})
                                run.append(rec)
                            n_items += len(batch)
                            bar.update(len(batch))
                    if handle is not None:
                        stats = handle.stats()
                        steering[spec.label] = {
                            "sites": len(stats),
                            "calls": sum(s["calls"] for s in stats),
                            "fired": sum(s["fired"] for s in stats),
                            "rows_modified": sum(s.get("rows_modified", 0) for s in stats),
                        }
                finally:
                    if handle is not None:
                        handle.remove()
            for w in record:
                if issubclass(w.category, attnsteer.AttnsteerWarning):
                    notes.append(str(w.message))
                else:  # not ours: show it as usual
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elapsed = time.perf_counter() - t0
            timings[spec.label] = {
                "items": n_items,
                "s": round(elapsed, 3),
                "items_per_s": round(n_items / elapsed, 4) if elapsed > 0 else None,
            }
    finally:
        bar.close()
        run.close()
    return {
        "per_recipe": timings,
        "notes": list(dict.fromkeys(notes)),
        "steering": steering,
        "items_this_session": total,
    }


# ---- model loading ------------------------------------------------------------------------------
def require_vlm(model_id: str) -> None:
    """Refuse the embedded text-only default up front (before any data or run directory work)."""
    from ..errors import EvalError
    from ..models import SMOLLM2_ID

    if model_id == SMOLLM2_ID:
        raise EvalError(
            f"--model {SMOLLM2_ID}: this benchmark needs a vision-language model (images in, text out), and "
            f"{SMOLLM2_ID} reads text only. Fix: pass e.g. --model llava-hf/llava-1.5-7b-hf (or a local folder of it)"
        )


def load_vlm(model_id: str, kwargs: dict, dist: Dist | None = None):
    """(processor, model) of a vision-language model from a hub id or local folder.

    ``kwargs`` come from ``--model_args`` (dtype, device, attn_implementation, revision,
    trust_remote_code). Under ``accelerate launch`` each process loads onto its own device.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..errors import EvalError
    from ..models import HUB_KWARGS

    require_vlm(model_id)
    kwargs = dict(kwargs)
    device = (
        kwargs.pop("device", None)
        or (dist.device() if dist is not None else None)
        or ("cuda" if torch.cuda.is_available() else None)
    )  # lm-eval's default: the GPU when there is one
    dtype = kwargs.pop("dtype", None)
    attn = kwargs.pop("attn_implementation", "sdpa")
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(model_id, **hub)
        processor = AutoProcessor.from_pretrained(model_id, **hub)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=dtype if dtype is not None else torch.float32, attn_implementation=attn, **hub
        )
    except (OSError, ValueError) as exc:
        raise EvalError(
            f"--model {model_id!r}: could not load it as a vision-language model ({type(exc).__name__}: {exc}). "
            "Fix: pass a folder (or hub id) with config.json, the processor files and weights of an image-text-to-text "
            "model such as llava-hf/llava-1.5-7b-hf"
        ) from None
    del config
    model.eval()
    if device:
        model.to(device)
    return processor, model


# ---- one whole run ------------------------------------------------------------------------------
def execute(
    *,
    args,
    task: str,
    model_id: str,
    model_kwargs: dict,
    identity: dict,
    data: dict,
    config: dict,
    items: Sequence[EvalItem],
    specs: Sequence[RecipeSpec],
    seeds: Sequence[int],
    decoding: Decoding,
    make_record: Callable[[EvalItem, str], dict],
    score: Callable[[RunDir, Sequence[RecipeSpec], Sequence[int]], dict],
    extra_files: dict[str, Any] | None = None,
    loaded: tuple | None = None,
) -> dict | None:
    """Run directory -> model -> generation -> (main process) merge, score, results.json, table.

    ``score(run, specs, seeds)`` returns ``{"metrics": {label: {...}}, "headline": [...], ...}``
    computed from the samples. ``extra_files`` (name -> JSON data) are written into the run
    directory by the main process (e.g. the CHAIR image list). ``loaded``: an already loaded
    ``(processor, model)`` to evaluate instead of loading ``model_id``. Returns the results record
    (``results.json``) on the main process, None on the others.
    """
    from . import _cli, compare
    from .results import now_iso, write_json_atomic

    dist = Dist()
    if len(seeds) > 1 and not decoding.do_sample and dist.is_main:
        print(
            "note: decoding is greedy, so every --seed gives the same outputs; seeds matter with --do_sample",
            file=sys.stderr,
        )
    out = _cli.output_dir(args, task, model_id, identity)
    run = RunDir(out, task, identity, data=data, rank=dist.rank, world_size=dist.world_size, is_main=dist.is_main)
    recipes_json = {s.label: s.to_json() for s in specs}
    initial = {"config": config, "recipes": recipes_json, "seeds": list(seeds), "data": config.get("data")}
    run.open(initial)
    with run.guard():  # a stop (Ctrl-C, an error) is recorded in results.json with how to resume
        dist.barrier()
        if dist.is_main:
            print(f"run directory: {out}", file=sys.stderr)
            for name, content in (extra_files or {}).items():
                write_json_atomic(out / name, content)
        started = now_iso()
        t0 = time.perf_counter()
        from ..console import quiet_transformers

        if loaded is not None:
            processor, model = loaded
        else:
            with quiet_transformers():
                processor, model = load_vlm(model_id, model_kwargs, dist)
        load_s = time.perf_counter() - t0
        notes = check_recipes_fit(model, specs, model_id)
        builder = VLMInputs(processor, model_id)
        gen = run_generation(
            model=model,
            builder=builder,
            items=items,
            specs=specs,
            seeds=seeds,
            decoding=decoding,
            batch_size=args.batch_size,
            run=run,
            make_record=make_record,
            dist=dist,
            backend=args.backend,
            progress=not args.no_progress,
            desc=f"{task} {model_id.rstrip('/').split('/')[-1]}",
        )
        dist.barrier()
        if not dist.is_main:
            return None
        run.merge_shards()
        scored = score(run, specs, seeds)
        example = builder.prompt_text(items[0].prompt, items[0].image is not None) if items else None
        payload = {
            "config": {**config, "prompt_example": example, "batch_size": args.batch_size, "backend": args.backend},
            "recipes": {s.label: s.to_json() for s in specs},  # now with the layers and heads that ran
            "seeds": list(seeds),
            "data": config.get("data"),
            **scored,
            "timings": {
                "model_load_s": round(load_s, 3),
                "total_s": round(time.perf_counter() - t0, 3),
                "generation": gen["per_recipe"],
                "items_this_session": gen["items_this_session"],
            },
            "steering": gen["steering"],
            "notes": list(dict.fromkeys(notes + gen["notes"])),
            "session": {"started": started, "world_size": dist.world_size, "batch_size": args.batch_size},
        }
        record = run.write_results(payload)
    print(compare.run_markdown(record, str(out)))
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out / 'results.json'} and {out / 'samples.jsonl'}", file=sys.stderr)
    return record


def collect(run: RunDir, items: Sequence[EvalItem], spec: RecipeSpec, seed: int) -> list[dict]:
    """The sample records of ``items`` for (spec, seed), in item order; an error if some are
    missing (an interrupted run: rerunning the command finishes it)."""
    from ..errors import EvalError

    keys = [sample_key(it.id, spec.hash, seed) for it in items]
    records = list(run.records(keys))
    if len(records) != len(keys):
        raise EvalError(
            f"{run.path}: {len(keys) - len(records)} of {len(keys)} items of recipe {spec.label!r} seed {seed} have no "
            "sample yet (the run was interrupted). Fix: rerun the same command to finish them"
        )
    return records
