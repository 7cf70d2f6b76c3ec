#!/usr/bin/env python
"""CPU benchmark of attnsteer on SmolLM2-135M-Instruct: prefill latency, decode tokens/s and peak
memory of the unsteered model (SDPA) against each recipe x backend, at several prompt lengths.

Method (also written into every output file):

* Timing: per prompt length ONE worker subprocess loads the model once, warms every configuration
  up on a short prompt, then runs alternating pairs (baseline, steered) -- the order inside a pair
  flips every repeat (ABBA) -- so every steered run has an unsteered run right next to it in the
  same process. Prefill = one ``model(prompt, use_cache=True, logits_to_keep=1)`` call (as
  ``generate`` does it). Decode = a manual greedy loop of ``--new_tokens`` single-token
  ``model(tok, past_key_values=cache)`` calls after that prefill (the first fed token is the argmax
  of the prefill logits); only those calls and their argmaxes are timed. Reported values are medians
  over repeats; ratios are medians of the per-pair ratios steered / adjacent baseline.
* Memory: a fresh subprocess per (length, configuration): load the model, warm up on a short
  prompt, ``gc.collect()`` + ``malloc_trim(0)``, reset the kernel's RSS high-water mark
  (``echo 5 > /proc/self/clear_refs``), read VmRSS, run the same prefill + decode once, read VmHWM.
  "peak extra" = VmHWM - VmRSS-before: the extra resident memory the work needed. "torch peak" (if
  enabled) is a second, separate run in the same subprocess under a TorchDispatchMode that tracks the
  bytes of every new (non-aliasing) tensor storage made by aten ops and reports the peak of those
  alive at once (op-internal scratch buffers are invisible to it).

Run ``python benchmarks/bench_cpu.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUTPUT = HERE / "results" / "cpu_smollm2.json"
DEFAULT_QUICK_OUTPUT = HERE / "results" / "cpu_smollm2_quick.json"
DEFAULT_LENGTHS = [512, 2048, 8192]
DEFAULT_RECIPES = ["act-default", "softplus-reweight"]
BACKENDS = ["reference", "fused"]
MIB = 1024 * 1024

# Varied English prose, repeated (in rotating order) to build prompts of any length.
PARAGRAPHS = [
    "The harbour town woke slowly in winter. Fishing boats that had spent the night beyond the breakwater "
    "came back one by one, their decks stacked with crates of cod and mackerel, and the auction hall opened "
    "its doors at six. Buyers from the inland restaurants argued over prices in low voices while gulls "
    "circled the roof. By nine the market was empty again, the floor hosed down, and the only sound left "
    "was the creak of ropes against the wooden piers.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent "
    "reactions, chlorophyll molecules in the thylakoid membranes absorb photons and use that energy to "
    "split water, releasing oxygen and producing ATP and NADPH. The Calvin cycle, which takes place in the "
    "stroma, then uses these carriers to fix carbon dioxide into three-carbon molecules that the plant "
    "assembles into glucose, starch and cellulose.",
    "To configure the backup service, first create a dedicated user with read access to the data "
    "directories and write access to the archive volume. Edit the schedule file so that incremental "
    "backups run every night at two o'clock and a full backup runs on Sundays. After the first run, "
    "check the log for skipped files, verify a random sample by restoring it to a scratch directory, "
    "and only then delete the old snapshots.",
    "In 1858 the city council debated for eleven weeks whether to cover the river that ran through the "
    "old quarter. Merchants complained about the smell in summer, while the millers downstream feared "
    "that a tunnel would change the current their wheels depended on. The compromise, a vaulted channel "
    "with iron gratings every hundred metres, was finished in 1864 and still carries storm water today.",
    "Maya had never liked the violin her grandmother left her. It was too dark, the varnish cracked along "
    "the ribs, and the lowest string buzzed whenever she played an open G. But one rainy afternoon, "
    "searching for a lost earring, she found a folded letter glued inside the body, and the name written "
    "on it belonged to a composer whose music she had been practising for months.",
    "A balanced diet for endurance athletes relies mostly on complex carbohydrates such as oats, rice, "
    "potatoes and whole-grain bread, which refill the glycogen stores in muscles and liver. Protein "
    "intake of about one and a half grams per kilogram of body weight supports recovery, and regular "
    "small amounts of salt and fluid during long sessions prevent the cramps and headaches that come "
    "with dehydration.",
    "The committee reviewed three proposals for the new library. The first kept the historic facade and "
    "added a glass reading room behind it; the second demolished the annex to make space for a garden; "
    "the third moved the children's section to the ground floor and opened the building on Sunday "
    "mornings. After two public hearings, members voted for a mix of the first and third plans, to be "
    "financed over six years.",
    "Sorting algorithms differ in how they trade time for memory. Merge sort always needs n log n "
    "comparisons and an extra buffer as large as the input, whereas heap sort works in place but has "
    "poor cache behaviour. Quicksort is usually the fastest in practice because its inner loop is short "
    "and its memory accesses are sequential, although a bad choice of pivot makes it quadratic.",
]
INSTRUCTION = "Read the following notes carefully and then write a short summary of each topic they cover.\n\n"


# ---------------------------------------------------------------------------------------------
# Small helpers (no torch needed)
# ---------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (Linux)."""
    text = Path("/proc/self/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        out[key] = int(m.group(1)) if m else -1
    return out


def reset_hwm() -> None:
    """Reset the RSS high-water mark (VmHWM) to the current RSS; Linux >= 4.0."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def verify_hwm_reset() -> bool:
    """Check that clear_refs=5 really resets VmHWM here (allocate ~64 MiB, free, reset)."""
    try:
        block = bytearray(64 * MIB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        del block
        malloc_trim()
        before = proc_status()
        reset_hwm()
        after = proc_status()
        return before["VmHWM"] - before["VmRSS"] > 32 * 1024 and after["VmHWM"] - after["VmRSS"] < 8 * 1024
    except OSError:
        return False


def machine_info() -> dict:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else platform.processor() or "unknown"
    except OSError:
        pass
    mem_total = None
    try:
        m = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_total = round(int(m.group(1)) / 1024 / 1024, 1) if m else None
    except OSError:
        pass
    git = "unknown"
    try:
        git = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        git += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        pass
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "attnsteer": ver("attnsteer"),
        "git": git,
        "hostname": platform.node(),
    }


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# Worker side (imports torch / transformers / attnsteer)
# ---------------------------------------------------------------------------------------------
def load(threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from attnsteer.models import load_smollm2

    tokenizer, model = load_smollm2()
    return tokenizer, model


def max_prompt_len(model, new_tokens: int) -> int:
    return int(model.config.max_position_embeddings) - new_tokens


def build_prompt(tokenizer, n_tokens: int, batch: int):
    """(batch, n_tokens) long: chat-template user turn "instruction + passage", passage cut so the
    whole prompt (template included) is exactly n_tokens; batch rows start at different paragraphs."""
    import torch

    marker = "\u0000PASSAGE\u0000"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION + marker}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    if len(head_ids) + len(tail_ids) + 16 > n_tokens:  # too short for the template: plain passage
        head_ids, tail_ids = [], []
    need = n_tokens - len(head_ids) - len(tail_ids)
    rows = []
    for b in range(batch):
        order = PARAGRAPHS[b % len(PARAGRAPHS) :] + PARAGRAPHS[: b % len(PARAGRAPHS)]
        one = tokenizer("\n\n".join(order) + "\n\n", add_special_tokens=False).input_ids
        passage = (one * (need // max(1, len(one)) + 1))[:need]
        rows.append(head_ids + passage + tail_ids)
    ids = torch.tensor(rows, dtype=torch.long)
    assert ids.shape == (batch, n_tokens), ids.shape
    return ids


def steering_summary(handle) -> dict:
    stats = handle.stats()
    out = {
        "sites": len(stats),
        "sites_fired": sum(1 for s in stats if s["fired"] > 0),
        "rows_modified": int(sum(s["rows_modified"] for s in stats)),
    }
    sinks = handle.sinks()
    if sinks:
        counts = [len(pos) for rows in sinks.values() for row in rows for pos in [sum(row.values(), [])]]
        heads = sum(len(row) for rows in sinks.values() for row in rows)
        out["act_sink_keys_total"] = int(sum(counts))
        out["act_heads_with_hidden_sinks"] = int(heads)
    return out


def run_once(model, ids, new_tokens: int, config: dict, tracker=None) -> dict:
    """One prefill + greedy decode under ``config``; returns timings (s) and the generated ids."""
    import torch

    import attnsteer
    from attnsteer import compat

    handle = None
    if config["recipe"] is not None:
        handle = attnsteer.apply(model, config["recipe"], backend=config["backend"])
    caught = []
    try:
        gc.collect()
        gc.disable()
        with torch.inference_mode(), tracker if tracker is not None else _null():
            c0, t0 = time.process_time(), time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            t1, c1 = time.perf_counter(), time.process_time()
            cache = compat.output_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
            generated = [tok]
            c2, t2 = time.process_time(), time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=tok, use_cache=True, **compat.with_cache(model, cache))
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(tok)
            t3, c3 = time.perf_counter(), time.process_time()
            del out, cache
    finally:
        gc.enable()
        summary = None
        if handle is not None:
            summary = steering_summary(handle)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                handle.remove()
            caught = [str(x.message) for x in w]
    decode_s = t3 - t2
    return {
        "prefill_s": t1 - t0,
        "decode_s": decode_s,
        "decode_tok_s": (new_tokens * ids.shape[0]) / decode_s if new_tokens and decode_s > 0 else None,
        # process CPU time / wall time: close to the thread count when the machine is not contended
        "prefill_cpu_util": (c1 - c0) / (t1 - t0) if t1 > t0 else None,
        "decode_cpu_util": (c3 - c2) / decode_s if decode_s > 0 else None,
        "generated": torch.cat(generated, dim=1).tolist(),
        "steering": summary,
        "warnings": caught,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_tracker():
    """TorchDispatchMode counting bytes of new tensor storages alive at once (torch's own view)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorTracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = 0
            self.peak = 0
            self.seen = weakref.WeakSet()

        def _free(self, nbytes):
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            flat, _ = tree_flatten(out)
            for i, t in enumerate(flat):
                if not isinstance(t, torch.Tensor):
                    continue
                ret = returns[i] if i < len(returns) else (returns[0] if len(returns) == 1 else None)
                if ret is not None and ret.alias_info is not None:
                    continue  # view / in-place / out=: no new memory
                st = t.untyped_storage()
                if st in self.seen:
                    continue
                self.seen.add(st)
                nbytes = st.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, nbytes)
            return out

    return LiveTensorTracker()


def worker_time(spec: dict) -> None:
    """One process per length: warm up, then alternating (baseline, steered) pairs; JSONL out."""
    tokenizer, model = load(spec["threads"])
    n = spec["length"]
    ids = build_prompt(tokenizer, n, spec["batch"])
    warm_ids = build_prompt(tokenizer, spec["warmup_tokens"], spec["batch"])
    configs = spec["configs"]
    baseline = next(c for c in configs if c["recipe"] is None)
    steered = [c for c in configs if c["recipe"] is not None]
    out = open(spec["out"], "a")

    def emit(rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()

    for c in configs:
        t = time.perf_counter()
        run_once(model, warm_ids, min(2, spec["new_tokens"]), c)
        log(f"  warm-up {c['name']:<30s} {time.perf_counter() - t:6.2f} s")
    for r in range(spec["repeats"]):
        pairs = [(c,) for c in [baseline]] if not steered else [(baseline, c) for c in steered]
        for pair in pairs:
            order = pair if r % 2 == 0 else tuple(reversed(pair))
            partner = pair[-1]["name"]
            for c in order:
                res = run_once(model, ids, spec["new_tokens"], c)
                log(
                    f"  rep {r} {c['name']:<30s} prefill {res['prefill_s']:8.3f} s  decode "
                    f"{(res['decode_tok_s'] or 0):7.2f} tok/s"
                )
                emit({"kind": "time", "length": n, "repeat": r, "pair": partner, "config": c["name"], **res})
    out.close()


def worker_mem(spec: dict) -> None:
    """Fresh process per (length, config): RSS high-water mark around one prefill + decode."""
    tokenizer, model = load(spec["threads"])
    config = spec["configs"][0]
    ids = build_prompt(tokenizer, spec["length"], spec["batch"])
    warm_ids = build_prompt(tokenizer, spec["warmup_tokens"], spec["batch"])
    run_once(model, warm_ids, min(2, spec["new_tokens"]), config)
    gc.collect()
    malloc_trim()
    reset_hwm()
    before = proc_status()
    res = run_once(model, ids, spec["new_tokens"], config)
    after = proc_status()
    rec = {
        "kind": "mem",
        "length": spec["length"],
        "config": config["name"],
        "rss_before_mib": before["VmRSS"] / 1024,
        "hwm_after_reset_mib": before["VmHWM"] / 1024,
        "peak_rss_mib": after["VmHWM"] / 1024,
        "peak_extra_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
        "rss_after_mib": after["VmRSS"] / 1024,
        "prefill_s": res["prefill_s"],
        "decode_tok_s": res["decode_tok_s"],
    }
    if spec["torch_memory"]:
        del res
        gc.collect()
        tracker = make_tracker()
        run_once(model, ids, spec["new_tokens"], config, tracker=tracker)
        rec["torch_peak_mib"] = tracker.peak / MIB
    with open(spec["out"], "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------
def run_worker(mode: str, spec: dict, timeout: float | None) -> tuple[list[dict], str | None]:
    """Run a worker subprocess; returns (records it wrote, error text or None)."""
    fd, path = tempfile.mkstemp(prefix=f"bench_{mode}_", suffix=".jsonl")
    os.close(fd)
    spec = dict(spec, out=path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", mode, "--_spec", json.dumps(spec)]
    err = None
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            reason = "killed (likely out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
            err = f"{mode} worker {reason}: {tail}"[:400]
    except subprocess.TimeoutExpired:
        err = f"{mode} worker timed out after {timeout} s"
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    os.unlink(path)
    return records, err


def parse_repeats(value: str | None, lengths: list[int]) -> list[int]:
    if value is None:
        return [3 if n <= 2048 else 1 for n in lengths]
    parts = [int(x) for x in value.split(",")]
    if len(parts) == 1:
        return parts * len(lengths)
    if len(parts) != len(lengths):
        raise SystemExit(f"--repeats: give one number or one per length ({len(lengths)}); got {value!r}")
    return parts


def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def summarise(lengths_used, configs_by_len, time_recs, mem_recs, notes) -> list[dict]:
    rows = []
    for req, n in lengths_used:
        trecs = [r for r in time_recs if r["length"] == n]
        mrecs = {r["config"]: r for r in mem_recs if r["length"] == n}
        base_runs = [r for r in trecs if r["config"] == "baseline"]
        base_mem = mrecs.get("baseline")
        for c in configs_by_len[n]:
            name = c["name"]
            runs = [r for r in trecs if r["config"] == name]
            row = {
                "length_requested": req,
                "length": n,
                "config": name,
                "recipe": c["recipe"],
                "backend": c["backend"] or "sdpa (model's own)",
                "runs": len(runs),
                "prefill_s": median([r["prefill_s"] for r in runs]),
                "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
                "prefill_s_min": min((r["prefill_s"] for r in runs), default=None),
                "prefill_cpu_util": median([r.get("prefill_cpu_util") for r in runs]),
                "decode_cpu_util": median([r.get("decode_cpu_util") for r in runs]),
                "peak_extra_mib": mrecs[name]["peak_extra_mib"] if name in mrecs else None,
                "torch_peak_mib": mrecs[name].get("torch_peak_mib") if name in mrecs else None,
                "prefill_ratio": None,
                "decode_ratio": None,
                "mem_ratio": None,
                "same_tokens_as_baseline": None,
                "steering": runs[-1]["steering"] if runs else None,
                "note": notes.get((n, name), ""),
            }
            if c["recipe"] is None:
                row["prefill_ratio"] = row["decode_ratio"] = row["mem_ratio"] = 1.0 if runs else None
            else:
                pr, dr = [], []
                for r in runs:
                    partner = [b for b in base_runs if b["repeat"] == r["repeat"] and b["pair"] == name]
                    if partner:
                        b = partner[0]
                        pr.append(r["prefill_s"] / b["prefill_s"])
                        if r["decode_tok_s"] and b["decode_tok_s"]:
                            dr.append(r["decode_tok_s"] / b["decode_tok_s"])
                row["prefill_ratio"] = median(pr)
                row["decode_ratio"] = median(dr)
                if row["peak_extra_mib"] is not None and base_mem and base_mem["peak_extra_mib"] > 0:
                    row["mem_ratio"] = row["peak_extra_mib"] / base_mem["peak_extra_mib"]
                if runs and base_runs:
                    a, b = runs[0]["generated"], base_runs[0]["generated"]
                    total = sum(len(x) for x in a)
                    row["same_tokens_as_baseline"] = sum(
                        int(u == v) for ra, rb in zip(a, b) for u, v in zip(ra, rb)
                    ) / max(1, total)
            rows.append(row)
        for (nn, name), note in notes.items():  # skipped configurations
            if nn == n and name not in {c["name"] for c in configs_by_len[n]}:
                est = extrapolate_memory(mem_recs, name, n)
                if est and "est. torch peak" not in note:
                    note += f"; {describe_estimate(est, n)}"
                rows.append({"length_requested": req, "length": n, "config": name, "runs": 0, "note": note})
    return rows


def extrapolate_memory(mem_recs, name: str, n: int) -> tuple[float, int] | None:
    """Quadratic extrapolation of a configuration's torch-peak extra over the baseline from the
    longest shorter length where both were measured (the reference map is O(N^2))."""
    best = None
    for r in mem_recs:
        if r["config"] != name or r["length"] >= n or r.get("torch_peak_mib") is None:
            continue
        base = [b for b in mem_recs if b["config"] == "baseline" and b["length"] == r["length"]]
        if base and base[0].get("torch_peak_mib") is not None and (best is None or r["length"] > best[0]):
            best = (r["length"], r["torch_peak_mib"] - base[0]["torch_peak_mib"], base[0]["torch_peak_mib"])
    if best is None:
        return None
    n0, extra, base_peak = best
    return (extra * (n / n0) ** 2 + base_peak * n / n0) / 1024, n0


def describe_estimate(est, n: int) -> str:
    gib, n0 = est
    return f"est. torch peak at {n}: ~{gib:.3g} GiB (from {n0}: quadratic extra + linear baseline)"


METHOD_TEXT = """\
* prefill s: median wall time of one `model(prompt, use_cache=True, logits_to_keep=1)` call.
* decode tok/s: batch x new_tokens / wall time of new_tokens greedy single-token `model(tok, past_key_values=cache)`
  calls after that prefill (manual loop, prefill NOT included; first fed token = argmax of the prefill logits).
* Timing protocol: one subprocess per length loads the model once, warms every configuration up on a short
  prompt, then runs (baseline, steered) pairs back to back, flipping the order every repeat; ratios are the
  median over repeats of steered / the baseline run of the same pair (prefill: time ratio, >1 = slower;
  decode: tok/s ratio, <1 = slower). The baseline row's numbers are medians over all its runs.
* peak extra MiB: fresh subprocess per (length, configuration); after load + short warm-up, gc + malloc_trim,
  VmHWM reset via `echo 5 > /proc/self/clear_refs`; value = VmHWM after one prefill+decode - VmRSS before it.
  mem ratio = steered / baseline peak extra at the same length.
* torch peak MiB: separate run in the same subprocess under a TorchDispatchMode counting the bytes of new
  (non-aliasing) tensor storages made by aten ops, peak of those alive at once (op-internal scratch not seen).
"""


def write_outputs(output: Path, meta: dict, rows: list[dict], time_recs, mem_recs) -> str:
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.with_suffix("")
    doc = {"meta": meta, "rows": rows, "time_runs": time_recs, "mem_runs": mem_recs}
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
    fields = [
        "length_requested",
        "length",
        "config",
        "recipe",
        "backend",
        "runs",
        "prefill_s",
        "decode_tok_s",
        "peak_extra_mib",
        "torch_peak_mib",
        "prefill_ratio",
        "decode_ratio",
        "mem_ratio",
        "same_tokens_as_baseline",
        "note",
    ]
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    m = meta["machine"]
    lines = [
        f"# attnsteer CPU benchmark: SmolLM2-135M-Instruct{' (--quick)' if meta['args']['quick'] else ''}",
        "",
        f"CPU: {m['cpu_model']}, {m['cpus_available']} cores available ({m['logical_cpus']} logical), "
        f"{meta['threads']} torch threads, {m['mem_total_gib']} GiB RAM; torch {m['torch']}, transformers "
        f"{m['transformers']}, attnsteer {m['attnsteer']}, git {m['git']}; float32, batch {meta['args']['batch']}, "
        f"new_tokens {meta['args']['new_tokens']}; load average at start / end: {meta['loadavg_start']} / "
        f"{meta['loadavg_end']}; started {meta['started']}, took {meta['elapsed_s']:.0f} s.",
        "",
        "| length | config | prefill s | decode tok/s | peak extra MiB | torch peak MiB | prefill ratio | decode ratio | mem ratio | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        length = f"{r['length']}" + (f" (req. {r['length_requested']})" if r["length"] != r["length_requested"] else "")
        note = r.get("note", "")
        st = r.get("steering")
        if st:
            extra = f"sites fired {st['sites_fired']}/{st['sites']}"
            if "act_heads_with_hidden_sinks" in st:
                extra += f", heads w/ hidden sinks {st['act_heads_with_hidden_sinks']}"
            note = f"{extra}; {note}" if note else extra
        lines.append(
            f"| {length} | {r['config']} | {fmt(r.get('prefill_s'))} | {fmt(r.get('decode_tok_s'), 2)} | "
            f"{fmt(r.get('peak_extra_mib'), 1)} | {fmt(r.get('torch_peak_mib'), 1)} | {fmt(r.get('prefill_ratio'), 2)} | "
            f"{fmt(r.get('decode_ratio'), 2)} | {fmt(r.get('mem_ratio'), 2)} | {note} |"
        )
    lines += ["", "Method:", "", METHOD_TEXT]
    for n in meta.get("general_notes", []):
        lines.append(f"* {n}")
    md = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(md)
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 512,2048,8192)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new_tokens", "--new-tokens", type=int, default=None, help="decode steps (default 32)")
    ap.add_argument("--recipes", default=None, help="comma-separated recipes (default act-default,softplus-reweight)")
    ap.add_argument("--backends", default="reference,fused", help="comma-separated backends (default reference,fused)")
    ap.add_argument(
        "--repeats",
        default=None,
        help="timed repeats: one number for all lengths or one per length (default: 3 for length <= 2048, else 1)",
    )
    ap.add_argument(
        "--skip-reference-above",
        type=int,
        default=4096,
        help="skip the reference backend above this prompt length (default 4096; at ~8k tokens the reference "
        "needs ~10 GiB for ACT and ~21 GiB for softplus, whose oracle works in float64)",
    )
    ap.add_argument(
        "--reference-max-gib",
        type=float,
        default=12.0,
        help="also skip a reference configuration whose peak memory, extrapolated quadratically from this run's "
        "own memory measurement at the longest shorter length, exceeds this (default 12 GiB)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    ap.add_argument("--warmup-tokens", type=int, default=64, help="prompt length of the per-config warm-up run")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-torch-memory", action="store_true", help="skip the TorchDispatchMode memory pass")
    ap.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is killed")
    ap.add_argument("--quick", action="store_true", help="smoke run: lengths 256,512, new_tokens 8, repeats 1")
    ap.add_argument(
        "--output", default=None, help=f"output path stem (.json/.csv/.md written; default {DEFAULT_OUTPUT})"
    )
    ap.add_argument("--_worker", choices=["time", "mem"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        spec = json.loads(args._spec)
        (worker_time if args._worker == "time" else worker_mem)(spec)
        return

    lengths = [int(x) for x in (args.lengths or ("256,512" if args.quick else "512,2048,8192")).split(",")]
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.quick else 32)
    repeats = parse_repeats(args.repeats if args.repeats is not None else ("1" if args.quick else None), lengths)
    recipes = (args.recipes or ",".join(DEFAULT_RECIPES)).split(",")
    backends = args.backends.split(",")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    output = Path(args.output) if args.output else (DEFAULT_QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)

    from transformers import AutoConfig

    import attnsteer
    from attnsteer.models import load_smollm2, smollm2_cache_dir

    if not (smollm2_cache_dir() / "config.json").is_file():
        log("converting the embedded SmolLM2 GGUF once (~25 s) ...")
        load_smollm2()
    for r in recipes:
        attnsteer.load_recipe(r)  # fail early on a typo
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--backends: {b!r} not in {BACKENDS}")
    max_pos = int(AutoConfig.from_pretrained(smollm2_cache_dir()).max_position_embeddings)
    cap = max_pos - new_tokens

    general_notes = []
    hwm_ok = verify_hwm_reset()
    if not hwm_ok and not args.no_memory:
        general_notes.append("clear_refs did not reset VmHWM on this kernel: memory columns are not valid")
    lengths_used = []
    for n in lengths:
        used = min(n, cap)
        if used != n:
            general_notes.append(
                f"length {n}: prompt cut to {used} = max_position_embeddings ({max_pos}) - new_tokens ({new_tokens}), "
                "so prompt + decoded tokens stay inside the trained positions"
            )
        lengths_used.append((n, used))

    configs_by_len, notes = {}, {}
    for _, n in lengths_used:
        cfgs = [{"name": "baseline", "recipe": None, "backend": None}]
        for r in recipes:
            for b in backends:
                name = f"{r}/{b}"
                if b == "reference" and n > args.skip_reference_above:
                    gib = 9 * n * n * 4 / 2**30
                    notes[(n, name)] = (
                        f"skipped (length > --skip-reference-above {args.skip_reference_above}): the reference "
                        f"materialises 9 heads x {n}^2 fp32 = {gib:.3g} GiB per tensor per layer, several alive "
                        "(float64 copies for softplus)"
                    )
                    continue
                cfgs.append({"name": name, "recipe": r, "backend": b})
        configs_by_len[n] = cfgs

    meta = {
        "machine": machine_info(),
        "threads": threads,
        "args": {
            "lengths": lengths,
            "batch": args.batch,
            "new_tokens": new_tokens,
            "recipes": recipes,
            "backends": backends,
            "repeats": repeats,
            "skip_reference_above": args.skip_reference_above,
            "reference_max_gib": args.reference_max_gib,
            "quick": args.quick,
            "warmup_tokens": args.warmup_tokens,
            "memory": not args.no_memory,
            "torch_memory": not args.no_torch_memory,
        },
        "model": "SmolLM2-135M-Instruct (attnsteer.models.load_smollm2, float32, attn_implementation=sdpa)",
        "max_position_embeddings": max_pos,
        "hwm_reset_verified": hwm_ok,
        "method": METHOD_TEXT,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    log(f"machine: {meta['machine']}  threads={threads}")
    t_start = time.perf_counter()
    time_recs, mem_recs = [], []
    base = {
        "batch": args.batch,
        "new_tokens": new_tokens,
        "threads": threads,
        "warmup_tokens": args.warmup_tokens,
        "torch_memory": not args.no_torch_memory,
    }
    for (_req, n), reps in zip(lengths_used, repeats):
        for c in list(configs_by_len[n]):
            est = extrapolate_memory(mem_recs, c["name"], n) if c["backend"] == "reference" else None
            if est and est[0] > args.reference_max_gib:
                configs_by_len[n].remove(c)
                notes[(n, c["name"])] = (
                    f"skipped: {describe_estimate(est, n)} > --reference-max-gib {args.reference_max_gib:g}"
                )
                log(f"!! length {n}: {c['name']} {notes[(n, c['name'])]}")
        cfgs = configs_by_len[n]
        log(f"== length {n}: timing {len(cfgs)} configs x {reps} repeat(s) in one process")
        recs, err = run_worker("time", dict(base, length=n, repeats=reps, configs=cfgs), args.worker_timeout)
        time_recs += recs
        if err:
            log(f"!! {err}")
            for c in cfgs:
                if not any(r["config"] == c["name"] for r in recs):
                    notes[(n, c["name"])] = f"timing failed: {err}"
        if not args.no_memory:
            for c in cfgs:
                log(f"== length {n}: memory {c['name']} (fresh process)")
                recs, err = run_worker("mem", dict(base, length=n, configs=[c]), args.worker_timeout)
                mem_recs += recs
                if err:
                    log(f"!! {err}")
                    notes[(n, c["name"])] = (notes.get((n, c["name"]), "") + f" memory failed: {err}").strip()
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for _, n in lengths_used:
        utils = [r.get("prefill_cpu_util") for r in time_recs if r["length"] == n]
        utils = [u for u in utils if u is not None]
        if utils:
            general_notes.append(
                f"length {n}: timed prefills used a median {statistics.median(utils):.2f} (min {min(utils):.2f}) of "
                f"{threads} threads' worth of CPU (process CPU time / wall time); well below {threads} means the "
                "machine was contended and the timings are noisy"
            )
    meta["general_notes"] = general_notes
    rows = summarise(lengths_used, configs_by_len, time_recs, mem_recs, notes)
    md = write_outputs(output, meta, rows, time_recs, mem_recs)
    print(md)
    log(f"wrote {output.with_suffix('')}.{{json,csv,md}}")


if __name__ == "__main__":
    main()
