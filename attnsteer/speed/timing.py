"""One timed run: a prefill and greedy decode steps with the KV cache, unsteered or under one
recipe and backend, with its peak memory and which attention paths ran."""

from __future__ import annotations

import collections
import contextlib
import gc
import re
import time
import warnings
from pathlib import Path

from .. import compat

# --backends entries of earlier releases -> attnsteer.apply's backend (by device where they differed)
_OLD_NAMES = {"fused-chunked": "chunked", "fused-triton": "triton"}


def api_backend(backend: str, device) -> str:
    """The ``attnsteer.apply`` backend of a ``--backends`` entry (``fused-pytorch``: the PyTorch fused
    path of the device -- flash plus corrections on CPU, chunked elsewhere)."""
    if backend == "fused-pytorch":
        return "flash" if device.type == "cpu" else "chunked"
    return _OLD_NAMES.get(backend, backend)


def implementation(backend: str | None, counters: dict) -> str:
    """Which implementation actually ran the steered layers: ``sdpa`` (unsteered), ``reference``,
    or the attention paths of ``counters`` (path -> calls, from ``handle.stats()``) that ran, e.g.
    ``flash`` or ``chunked+flash``."""
    if backend is None:
        return "sdpa"
    if backend == "reference":
        return "reference"
    ran = {path.split("/")[0] for path, calls in counters.items() if calls and not path.startswith("fallback/")}
    return "+".join(sorted(ran)) or "none"


# ---- resident memory (Linux /proc) -------------------------------------------------------------------
def proc_kib(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (None where /proc is missing)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_hwm() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to its current size; False if /proc refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---- one run -----------------------------------------------------------------------------------------
def run_once(model, ids, new_tokens: int, config: dict, device, focus=None) -> dict:
    """One prefill + greedy decode under ``config``; timings in seconds, memory in bytes.

    ids: (B, L) prompt token ids on ``device``. config: a configuration (``recipe``: an
    ``attnsteer.Recipe`` or None for the unsteered model, ``backend``: a ``--backends`` entry).
    focus: bool (B, L) image-placeholder positions of ``ids``; when given, the recipe runs inside
    ``handle.focus(focus)`` so methods that steer toward the image (VAR, VHR, PAI) see them.

    Returns prefill_s, decode_s, decode_tok_s (B x new tokens / decode time), peak_mem_bytes,
    peak_extra_bytes (above the memory before the run), steering (sites, sites fired, rows
    modified; None unsteered) and kernel_calls (attention path -> calls)."""
    import torch

    import attnsteer

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    handle = None
    if config["recipe"] is not None:
        handle = attnsteer.apply(model, config["recipe"], backend=api_backend(config["backend"] or "auto", device))
    focused = handle.focus(focus) if (handle is not None and focus is not None) else contextlib.nullcontext()
    summary, paths = None, collections.Counter()
    try:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            mem_before = torch.cuda.memory_allocated(device)
        else:
            mem_before = (proc_kib("VmRSS") or 0) * 1024
            hwm_ok = reset_hwm()
        with torch.inference_mode(), focused:
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            cache = compat.output_cache(out)
            del out
            sync()
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=tok, use_cache=True, **compat.with_cache(model, cache))
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t3 = time.perf_counter()
            del cache
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            extra = peak - mem_before
        else:
            hwm = proc_kib("VmHWM")
            extra = (hwm * 1024 - mem_before) if (hwm and hwm_ok) else None
            peak = hwm * 1024 if (hwm and hwm_ok) else None
    finally:
        if handle is not None:
            summary = _steering_summary(handle, paths)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle.remove()
    decode_s = t3 - t2
    return {
        "prefill_s": t1 - t0,
        "decode_s": decode_s,
        "decode_tok_s": ids.shape[0] * new_tokens / decode_s if new_tokens and decode_s > 0 else None,
        "peak_mem_bytes": peak,
        "peak_extra_bytes": extra,
        "steering": summary,
        "kernel_calls": dict(paths),
    }


def _steering_summary(handle, paths: collections.Counter) -> dict:
    """Sites, sites that fired and rows modified of ``handle``; adds each layer's calls per
    attention path (and per fallback reason) to ``paths``."""
    stats = handle.stats()
    for layer in {s["layer"]: s for s in stats}.values():  # each layer's calls once
        paths.update(layer["paths"])
        paths.update({f"fallback/{reason}": n for reason, n in layer["fallbacks"].items()})
    return {
        "sites": len(stats),
        "sites_fired": sum(1 for s in stats if s["fired"] > 0),
        "rows_modified": int(sum(int(s["rows_modified"]) for s in stats)),
    }
