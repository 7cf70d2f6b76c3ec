"""The timing protocol at one prompt length: every configuration warmed up, then per repeat each
steered configuration next to a baseline run, the order inside a pair flipping every repeat (ABBA).
A configuration that runs out of memory, or whose forced backend cannot run one of its calls, is
recorded with that status and skipped from then on."""

from __future__ import annotations

import gc
import time

from ..errors import SteeringError
from . import timing
from .bench import Bench, Progress, inputs
from .summary import MIB


def time_length(bench: Bench, prompt_len: int, progress: Progress | None = None) -> tuple[list[dict], float]:
    """(one record per timed run, seconds the protocol took) at ``prompt_len``. A record has the
    configuration's ``config``, ``recipe``, ``backend``, ``repeat``, ``pair`` (the steered
    configuration the run belongs to), ``status`` (ok / oom / unsupported), ``impl`` and
    :func:`~attnsteer.speed.timing.run_once`'s numbers (or ``error``)."""
    ids, focus = inputs(bench, prompt_len)
    c = bench.config
    runs: list[dict] = []
    failed: set[str] = set()

    def one(conf: dict, repeat: int, pair: str | None, warm: bool = False) -> None:
        if conf["name"] in failed:
            return
        new_tokens = min(c.new_tokens, 4) if warm else c.new_tokens
        res, status = _attempt(bench, ids, focus, conf, new_tokens)
        if status != "ok":
            failed.add(conf["name"])
            _say(progress, f"  {conf['name']}: {status} ({res['error']}); skipping its remaining runs")
        if warm:
            return
        rec = {"config": conf["name"], "recipe": conf["recipe_label"], "backend": conf["backend"], "repeat": repeat,
               "pair": pair, "status": status, **res}  # fmt: skip
        rec["impl"] = timing.implementation(conf["backend"], res.get("kernel_calls") or {}) if status == "ok" else None
        runs.append(rec)
        if status == "ok":
            _say(progress, _run_line(repeat, conf["name"], res, rec["impl"]))

    t_start = time.perf_counter()
    for conf in bench.configs:
        for _ in range(c.warmup):
            one(conf, -1, None, warm=True)
    baseline = bench.configs[0]
    for r in range(c.repeats):
        for conf in bench.configs[1:]:
            for x in (baseline, conf) if r % 2 == 0 else (conf, baseline):
                one(x, r, conf["name"])
    return runs, time.perf_counter() - t_start


def _attempt(bench: Bench, ids, focus, conf: dict, new_tokens: int) -> tuple[dict, str]:
    """(run_once's result or ``{"error": ...}``, status): ok, oom or unsupported."""
    import torch

    try:
        return timing.run_once(bench.model, ids, new_tokens, conf, bench.device, focus=focus), "ok"
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        res, status = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}, "oom"
    except SteeringError as exc:  # a forced backend that cannot run one of the recipe's calls says why
        res, status = {"error": str(exc).splitlines()[0][:300]}, "unsupported"
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        res, status = {"error": str(exc).splitlines()[0][:200]}, "oom"
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    return res, status


def _run_line(repeat: int, name: str, res: dict, impl: str) -> str:
    return (
        f"  rep {repeat} {name:<34s} prefill {res['prefill_s'] * 1000:9.1f} ms  decode "
        f"{(res['decode_tok_s'] or 0):8.1f} tok/s  peak {((res['peak_mem_bytes'] or 0) / MIB):8.0f} MiB  [{impl}]"
    )


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)
