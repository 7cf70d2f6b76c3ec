"""The numbers of one speed measurement at one prompt length: medians of the timed runs, the
ratios of each steered configuration to its adjacent baseline runs, and the results-schema fields
(``task``, ``config``, ``metrics``, ``headline``) that ``attnsteer compare`` reads."""

from __future__ import annotations

import math
import statistics

GOALS = {"prefill_ratio_min": 0.85, "decode_ratio_min": 0.95, "memory_ratio_max": 1.10, "reference_speedup_min": 3.0}
# CPU goals (SmolLM2 at 2048 tokens, float32): the largest prefill slowdown allowed per method (a recipe
# with several methods takes the loosest), and the GPU's decode and memory goals
CPU_PREFILL_SLOWDOWN_MAX = {"act": 1.3, "var": 1.3, "softplus": 1.8}
MIB = 1024 * 1024


# ---- summary ---------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


METRICS = ("prefill_s", "decode_tok_s", "peak_mem_bytes", "peak_extra_bytes")


def summarise(runs: list[dict], configs: list[dict]) -> list[dict]:
    """Per config: medians of each metric; per steered config: median over repeats of the ratio to the
    baseline run of the same pair (prefill: baseline time / steered time, i.e. relative speed)."""
    out = []
    for c in configs:
        mine = [r for r in runs if r["config"] == c["name"] and r.get("status") == "ok"]
        row = {
            "config": c["name"],
            "recipe": c["recipe_label"],
            "backend": c["backend"],
            "methods": c.get("methods", []),
            "impl": ",".join(sorted({r["impl"] for r in mine})) or None,
            "runs": len(mine),
            "status": "ok" if mine else _status(runs, c["name"]),
        }
        for m in METRICS:
            row[m] = _median([r.get(m) for r in mine])
        if c["recipe"] is not None:
            row["rows_steered"] = _median([(r.get("steering") or {}).get("rows_modified") for r in mine])
            ratios = {"prefill_speed_ratio": [], "decode_speed_ratio": [], "memory_ratio": []}
            for r in mine:
                base = next(
                    (
                        x
                        for x in runs
                        if x["config"] == "baseline"
                        and x["pair"] == c["name"]
                        and x["repeat"] == r["repeat"]
                        and x.get("status") == "ok"
                    ),
                    None,
                )
                if base is None:
                    continue
                if r["prefill_s"] and base["prefill_s"]:
                    ratios["prefill_speed_ratio"].append(base["prefill_s"] / r["prefill_s"])
                if r.get("decode_tok_s") and base.get("decode_tok_s"):
                    ratios["decode_speed_ratio"].append(r["decode_tok_s"] / base["decode_tok_s"])
                if r.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
                    ratios["memory_ratio"].append(r["peak_mem_bytes"] / base["peak_mem_bytes"])
            for k, v in ratios.items():
                row[k] = _median(v)
        out.append(row)
    by_name = {r["config"]: r for r in out}
    for c in configs:  # speed-up of each recipe's fast path over its reference run
        if c["recipe"] is None or c["backend"] == "reference":
            continue
        ref = by_name.get(f"{c['recipe_label']}@reference")
        row = by_name[c["name"]]
        if ref and ref.get("prefill_s") and row.get("prefill_s"):
            row["prefill_speedup_vs_reference"] = ref["prefill_s"] / row["prefill_s"]
        if ref and ref.get("decode_tok_s") and row.get("decode_tok_s"):
            row["decode_speedup_vs_reference"] = row["decode_tok_s"] / ref["decode_tok_s"]
    return out


def add_fresh_memory(summary: list[dict], fresh: dict[str, dict]) -> None:
    """Put each configuration's fresh-process peak (and its ratio to the baseline's) in its row."""
    base = (fresh.get("baseline") or {}).get("peak_extra_bytes")
    for row in summary:
        extra = (fresh.get(row["config"]) or {}).get("peak_extra_bytes")
        row["fresh_peak_extra_bytes"] = extra
        if row["recipe"] is not None:
            row["fresh_memory_ratio"] = extra / base if extra and base else None


def results_record(meta: dict, summary: list[dict]) -> dict:
    """The fields every evaluation's results.json has (task, config, metrics, headline), so
    ``attnsteer compare`` reads a speed result like any other run."""
    a = meta["args"]
    metrics = {}
    for r in summary:
        values = {
            "prefill_ms": r["prefill_s"] * 1000 if r.get("prefill_s") is not None else None,
            "decode_tok_s": r.get("decode_tok_s"),
            "peak_mib": r["peak_mem_bytes"] / MIB if r.get("peak_mem_bytes") is not None else None,
            "prefill_speed_ratio": r.get("prefill_speed_ratio"),
            "decode_speed_ratio": r.get("decode_speed_ratio"),
            "memory_ratio": r.get("memory_ratio"),
            "fresh_peak_extra_mib": (
                r["fresh_peak_extra_bytes"] / MIB if r.get("fresh_peak_extra_bytes") is not None else None
            ),
            "fresh_memory_ratio": r.get("fresh_memory_ratio"),
            "rows_steered": r.get("rows_steered"),
        }
        metrics[r["config"]] = {"summary": {k: v for k, v in values.items() if v is not None}}
    headline = [
        {"metric": "prefill_ms", "label": "prefill ms", "higher_is_better": False, "percent": False},
        {"metric": "decode_tok_s", "label": "decode tok/s", "higher_is_better": True, "percent": False},
        {"metric": "peak_mib", "label": "peak MiB", "higher_is_better": False, "percent": False},
        # medians of the per-pair ratios to the adjacent baseline run (the baseline has none)
        {"metric": "prefill_speed_ratio", "label": "prefill speed ratio", "higher_is_better": True, "percent": False},
        {"metric": "decode_speed_ratio", "label": "decode speed ratio", "higher_is_better": True, "percent": False},
        {"metric": "memory_ratio", "label": "memory ratio", "higher_is_better": False, "percent": False},
    ]
    if any(r.get("fresh_peak_extra_bytes") is not None for r in summary):
        headline += [
            {
                "metric": "fresh_peak_extra_mib",
                "label": "peak extra MiB (fresh process)",
                "higher_is_better": False,
                "percent": False,
            },
            {
                "metric": "fresh_memory_ratio",
                "label": "memory ratio (fresh process)",
                "higher_is_better": False,
                "percent": False,
            },
        ]
    return {
        "task": "speed",
        "status": "complete",
        "config": {
            "task": "speed",
            "model": meta["model"]["model"],
            "batch_size": a["batch_size"],
            "prompt_len": a["prompt_len"],
            "new_tokens": a["new_tokens"],
            "dtype": a["dtype"],
            "device": meta["machine"]["device"],
            "random_weights": a["random_weights"],
        },
        "metrics": metrics,
        "headline": headline,
    }


def _status(runs, name):
    states = {r.get("status") for r in runs if r["config"] == name}
    return ",".join(sorted(s for s in states if s)) or "not run"
