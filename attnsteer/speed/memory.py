"""Peak memory of each configuration in its own fresh process (``memory="fresh-process"``).

The timing process has run every configuration, so the allocator keeps memory earlier runs freed
and a later peak is a lower bound. Here each (prompt length, configuration) gets a new
``python -m attnsteer.speed.worker`` process: it rebuilds the model, warms the configuration up on a
short prompt, releases what the warm-up freed (gc, ``malloc_trim``) and measures one prefill +
decode (:func:`~attnsteer.speed.timing.run_once` resets the resident high-water mark first).

The worker reads one JSON request on stdin -- ``config`` (a :class:`SpeedConfig` as a dict, one
prompt length), ``recipes`` ([label, recipe folder] pairs, saved by the parent so the worker needs
no network and keeps the labels), ``name`` (the configuration to measure) and ``result`` (the file
it writes its answer to) -- and writes ``{"config", "prompt_len", "peak_extra_bytes",
"peak_mem_bytes"}`` there.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import timing
from .bench import Bench, Progress, inputs, prepare
from .config import SpeedConfig
from .summary import MIB

WORKER = "attnsteer.speed.worker"
TIMEOUT_S = 3600


def fresh_memory(bench: Bench, prompt_len: int, progress: Progress | None = None) -> dict[str, dict]:
    """Configuration name -> the worker's answer (or ``{"error": [last line of its output]}``)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="attnsteer-speed-") as tmp:
        folder = Path(tmp)
        recipes = [[label, str(recipe.save(folder / f"recipe{i}"))] for i, (label, recipe) in enumerate(bench.recipes)]
        config = dataclasses.asdict(bench.config.replace(prompt_len=[prompt_len], memory="in-process"))
        for c in bench.configs:
            result = folder / "result.json"
            result.unlink(missing_ok=True)
            request = {"config": config, "recipes": recipes, "name": c["name"], "result": str(result)}
            out[c["name"]] = _spawn(request, result)
            _say(progress, _line(c["name"], out[c["name"]]))
    return out


def _spawn(request: dict, result: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", WORKER], input=json.dumps(request), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if proc.returncode != 0 or not result.is_file():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(result.read_text())


def _line(name: str, answer: dict) -> str:
    if "error" in answer:
        return f"  fresh-process memory of {name}: failed ({answer['error'][0][:200]})"
    return f"  fresh-process memory {name:<34s} peak extra {(answer['peak_extra_bytes'] or 0) / MIB:8.1f} MiB"


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# ---- in the worker ---------------------------------------------------------------------------------------
def serve(request: dict) -> dict:
    """The worker's part: rebuild the model and the configurations of ``request``, measure the
    one named, write the answer to ``request["result"]`` and return it."""
    import attnsteer

    from ..evals.results import write_json_atomic

    config = SpeedConfig(**request["config"])
    recipes = [(label, attnsteer.load_recipe(path)) for label, path in request["recipes"]]
    bench = prepare(None, recipes, config)
    answer = peak_of(bench, request["name"])
    write_json_atomic(Path(request["result"]), answer)
    return answer


def peak_of(bench: Bench, name: str) -> dict:
    """Warm configuration ``name`` up on a short prompt, release what the warm-up freed, then
    measure one prefill + decode at the (single) prompt length of ``bench``."""
    import ctypes

    c = next(conf for conf in bench.configs if conf["name"] == name)
    prompt_len = bench.lengths[0]
    ids, focus = inputs(bench, prompt_len)
    warm = min(prompt_len, max(bench.config.image_tokens + 2, 16))
    timing.run_once(bench.model, ids[:, :warm], 1, c, bench.device, focus=None if focus is None else focus[:, :warm])
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    res = timing.run_once(bench.model, ids, bench.config.new_tokens, c, bench.device, focus=focus)
    return {
        "config": c["name"],
        "prompt_len": prompt_len,
        "peak_extra_bytes": res["peak_extra_bytes"],
        "peak_mem_bytes": res["peak_mem_bytes"],
    }
