""":func:`measure`: time the unsteered model against recipes and write one set of result files
per prompt length (``<stem>.json``, ``.csv``, ``.md`` and ``.png``; see :data:`METHOD`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .bench import Bench, Progress, load_recipes, prepare
from .config import SpeedConfig, SpeedError
from .protocol import time_length
from .report import markdown, plot, write_csv
from .summary import GOALS, add_fresh_memory, results_record, summarise

METHOD = """\
* The model is built once (``random_weights``: from its config, nothing downloaded but the
  config of a hub id; built-in config names work offline) with ``attn_implementation="sdpa"`` --
  the baseline is the model's own SDPA attention. A model the caller loaded is timed as it is.
* Configurations: ``baseline`` (no recipe) and, for each recipe and each ``backends`` entry, the
  recipe applied with that backend (``attnsteer.apply(..., backend=...)``): ``auto`` (the
  default: the Triton kernels on CUDA, PyTorch's flash kernel plus corrections on CPU, the chunked
  path for what they do not run), ``triton`` / ``flash`` / ``chunked`` (every steered call on that
  backend), and ``reference`` (float32 eager with materialised weights -- how the papers' code
  runs). Earlier names are accepted: ``fused-triton``, ``fused-chunked``, ``fused-pytorch`` (flash
  on CPU, chunked elsewhere).
* Every configuration is warmed up once (Triton compiles, cuBLAS picks kernels). Then, per
  repeat, each steered configuration runs next to a baseline run (ABBA order: the order inside a
  pair flips every repeat). Ratios are medians over repeats of steered / the adjacent baseline.
* One run = prefill (one ``model(prompt, use_cache=True, logits_to_keep=1)`` call, as
  ``generate`` does it) + ``new_tokens`` greedy decode steps with the KV cache; decode tokens/s
  counts batch x new tokens over the decode loop. CUDA is synchronised around each timed region.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the run (weights, KV cache and
  activations; also reported above the memory allocated before the run). On CPU the resident-set
  high-water mark above the RSS before the run (Linux ``/proc``; same process, so memory the
  allocator kept from earlier runs is not counted again: a lower bound, indicative only). With
  ``memory="fresh-process"`` also each configuration's peak in its own fresh process."""

MEMORY_NOTES = {
    "cuda": "torch.cuda.max_memory_allocated during the run (weights + KV cache + activations)",
    "cpu": "CPU: VmHWM - VmRSS before the run (Linux /proc; same process, allocator reuse makes it a lower bound); "
    "the memory ratio compares these peaks including the resident model",
}


def measure(model, recipes: Sequence, config: SpeedConfig | None = None, *, progress: Progress | None = None):
    """Time the unsteered model against each recipe: prefill latency, decode tokens/s and peak
    memory, and their ratios (:data:`METHOD`).

    Args:
        model: a causal LM you already hold (timed as it is, on its own device), or None to build
            ``config.model`` (a built-in config name, ``smollm2``, a config file or folder, a hub id).
        recipes: recipe names, YAML paths, hub repos, dicts or ``attnsteer.Recipe`` objects (at least one).
        config: the settings (:class:`SpeedConfig`; default: its defaults).
        progress: called with one line per step and per timed run (default: silent).

    Returns:
        One results record per prompt length, as written to ``<output_path>/<stem>.json``: the
        fields every evaluation's results have (``task``, ``config``, ``metrics``, ``headline``; so
        ``attnsteer compare`` reads it), plus ``meta`` (settings, model, machine, the files written
        and notes), ``configs``, ``runs`` and ``summary``. A configuration that ran out of memory or
        could not run on its forced backend has that status in ``summary`` instead of numbers.

    Raises :class:`SpeedError` (an :class:`~attnsteer.errors.UsageError`) naming the setting and the
    fix when the settings, the recipes or the model cannot run -- before any timing.
    """
    from ..evals.paths import check_writable

    config = SpeedConfig() if config is None else config
    if not isinstance(config, SpeedConfig):
        raise SpeedError(f"config: got {type(config).__name__}. Fix: pass an attnsteer.speed.SpeedConfig")
    if model is not None and config.memory == "fresh-process":
        raise SpeedError(
            "--memory 'fresh-process': a fresh process must rebuild the model, and this one was loaded by the "
            "caller. Fix: pass model=None with SpeedConfig(model=...), or memory='in-process'"
        )
    check_writable(config.output_path, "--output_path", folder=True)  # before the model is built
    bench = prepare(model, load_recipes(recipes), config, progress, sources=list(recipes))
    return [_measure_length(bench, prompt_len, progress) for prompt_len in bench.lengths]


def _measure_length(bench: Bench, prompt_len: int, progress: Progress | None) -> dict:
    """The protocol at one prompt length; writes its CSV / Markdown / PNG, then the JSON."""
    from ..evals.results import write_json_atomic
    from .memory import fresh_memory

    runs, elapsed = time_length(bench, prompt_len, progress)
    summary = summarise(runs, bench.configs)
    if bench.config.memory == "fresh-process":  # on CUDA too: a fresh process has no cached allocations either
        add_fresh_memory(summary, fresh_memory(bench, prompt_len, progress))
    meta = _meta(bench, prompt_len, elapsed)
    out_dir = Path(bench.config.output_path).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{_stem(bench, prompt_len)}.{ext}" for ext in ("json", "csv", "md", "png")}
    write_csv(paths["csv"], meta, runs, summary)
    paths["md"].write_text(markdown(meta, summary))
    note = None if bench.config.no_plot else plot(paths["png"], meta, summary)
    if note:
        meta["notes"].append(note)
    skip_png = bench.config.no_plot or note
    meta["files"] = {k: str(p) for k, p in paths.items() if k != "png" or not skip_png}
    configs = [{k: (v.name if k == "recipe" and v is not None else v) for k, v in c.items()} for c in bench.configs]
    record = {**results_record(meta, summary), "meta": meta, "configs": configs, "runs": runs, "summary": summary}
    write_json_atomic(paths["json"], record)
    return json.loads(paths["json"].read_text())


def _meta(bench: Bench, prompt_len: int, elapsed: float) -> dict:
    from .machine import describe

    hf = bench.hf_config
    return {
        "command": "attnsteer eval speed " + command_line(bench, prompt_len),
        "args": _args(bench, prompt_len),
        "model": {
            **bench.model_info,
            "num_hidden_layers": hf.num_hidden_layers,
            "hidden_size": hf.hidden_size,
            "num_attention_heads": hf.num_attention_heads,
            "num_key_value_heads": getattr(hf, "num_key_value_heads", None),
            "model_type": hf.model_type,
        },
        "machine": describe(bench.device),
        "recipes": [{"label": label, "name": recipe.name, "hash": recipe.hash} for label, recipe in bench.recipes],
        "memory_note": MEMORY_NOTES["cuda" if bench.device.type == "cuda" else "cpu"],
        "method": METHOD,
        "goals": GOALS,
        "elapsed_s": elapsed,
        "notes": [],
    }


def _recipe_values(bench: Bench) -> list[str]:
    """The recipes as given where they are names or paths, else their labels."""
    return [
        str(src) if isinstance(src, (str, Path)) else label for src, (label, _) in zip(bench.sources, bench.recipes)
    ]


def _args(bench: Bench, prompt_len: int) -> dict:
    """The settings of this prompt length, by field name (the command line's flags)."""
    c = bench.config
    out = dataclasses.asdict(c)
    out.update(
        prompt_len=prompt_len,
        prompt_lens=list(c.prompt_len),
        recipe=_recipe_values(bench),
        backend_list=c.backend_list,
    )
    return out


def command_line(bench: Bench, prompt_len: int) -> str:
    """The flags of ``attnsteer eval speed`` that repeat this measurement at ``prompt_len``."""
    c = bench.config
    values = [s for s in bench.sources if isinstance(s, (str, Path))]
    parts = [f"--model {c.model}"] + [f"--recipe {r}" for r in values]
    if c.random_weights:
        parts.append("--random-weights")
    parts += [
        f"--batch_size {c.batch_size}",
        f"--prompt-len {prompt_len}",
        f"--new-tokens {c.new_tokens}",
        f"--dtype {c.dtype}",
        f"--backends {c.backends}",
        f"--repeats {c.repeats}",
    ]
    if c.image_tokens:
        parts.append(f"--image-tokens {c.image_tokens}")
    if c.memory != "in-process":
        parts.append(f"--memory {c.memory}")
    parts += [f"--override {o}" for o in c.override]
    if c.device:
        parts.append(f"--device {c.device}")
    return " ".join(parts)


def _stem(bench: Bench, prompt_len: int) -> str:
    from ..evals.paths import slug

    c = bench.config
    if c.label:
        return f"{c.label}_n{prompt_len}" if len(c.prompt_len) > 1 else c.label
    return f"speed_{slug(c.model)}_b{c.batch_size}_n{prompt_len}_t{c.new_tokens}_{c.dtype}_{bench.device.type}"
