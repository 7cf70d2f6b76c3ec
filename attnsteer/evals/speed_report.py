"""The report of one ``attnsteer eval speed`` run: medians and ratios of the timed runs, the
results-schema fields ``attnsteer compare`` reads, and the Markdown / CSV / PNG files."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

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


def _fmt(x, spec="{:.3f}"):
    return "-" if x is None else spec.format(x)


def markdown(meta: dict, summary: list[dict]) -> str:
    a = meta["args"]
    lines = [
        f"# attnsteer speed: {meta['model']['model']} (batch {a['batch_size']}, prompt {a['prompt_len']} tokens, "
        f"{a['new_tokens']} new tokens, {a['dtype']})",
        "",
        f"- hardware: {meta['machine']['hardware']} ({meta['machine']['device']}); torch {meta['machine']['torch']}, "
        f"transformers {meta['machine']['transformers']}, triton {meta['machine']['triton']}, "
        f"git {meta['machine']['git']}",
        f"- model: {meta['model']['description'] or meta['model']['model']} [{meta['model']['source']}], "
        f"{meta['model']['num_hidden_layers']} layers, random weights: {a['random_weights']}",
        f"- prompt: {a['batch_size']} x {a['prompt_len']} tokens"
        + (
            f" ({a['image_tokens']} image-placeholder + {a['prompt_len'] - a['image_tokens']} text)"
            if a.get("image_tokens")
            else ""
        )
        + ", no padding; random token ids",
        f"- {a['repeats']} ABBA repeats after {a['warmup']} warm-up run(s); medians. Ratios: steered vs the "
        "adjacent baseline run (speed ratios > 1 = faster than baseline; memory ratio < 1 = less memory).",
        f"- peak memory: {meta['memory_note']}",
        "",
        "| config | ran on | prefill ms | prefill speed ratio | decode tok/s | decode speed ratio | peak MiB "
        "| memory ratio | prefill x vs reference | rows steered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        prefill_ms = r["prefill_s"] * 1000 if r["prefill_s"] is not None else None
        peak_mib = r["peak_mem_bytes"] / MIB if r["peak_mem_bytes"] is not None else None
        cells = [
            r["config"],
            r["impl"] or r["status"],
            _fmt(prefill_ms, "{:.1f}"),
            _fmt(r.get("prefill_speed_ratio")),
            _fmt(r["decode_tok_s"], "{:.1f}"),
            _fmt(r.get("decode_speed_ratio")),
            _fmt(peak_mib, "{:.0f}"),
            _fmt(r.get("memory_ratio")),
            _fmt(r.get("prefill_speedup_vs_reference"), "{:.2f}"),
            _fmt(r.get("rows_steered"), "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("fresh_peak_extra_bytes") is not None for r in summary):
        lines += [
            "",
            "Peak memory in a fresh process per configuration (resident high-water mark reset after a short "
            "warm-up and malloc_trim; what one prefill + decode adds):",
            "",
            "| config | peak extra MiB (fresh process) | ratio to baseline |",
            "|---|---:|---:|",
        ]
        for r in summary:
            extra = r.get("fresh_peak_extra_bytes")
            lines.append(
                f"| {r['config']} | {_fmt(extra / MIB if extra is not None else None, '{:.1f}')} | "
                f"{_fmt(r.get('fresh_memory_ratio'))} |"
            )
    idle = [r["config"] for r in summary if r["recipe"] is not None and r.get("rows_steered") == 0]
    if idle:
        lines += [
            "",
            f"**Warning:** steered no (batch, head, row) in the timed runs: {', '.join(idle)}. Their "
            "timings are of the steering machinery, not of an intervention that changed the output.",
        ]
    cpu = meta["machine"]["device"].startswith("cpu")
    lines += ["", "## Goals (CPU)" if cpu else "## Goals (GPU)", ""]
    g = GOALS
    for r in summary:
        if r["backend"] in (None, "reference") or r.get("prefill_speed_ratio") is None:
            continue
        if cpu:
            limits = [CPU_PREFILL_SLOWDOWN_MAX[m] for m in r.get("methods", []) if m in CPU_PREFILL_SLOWDOWN_MAX]
            slowdown = 1.0 / r["prefill_speed_ratio"]
            prefill = (
                (f"prefill <= {max(limits):.1f}x the unsteered time", slowdown, max(limits), -1) if limits else None
            )
            checks = [prefill] if prefill else []
        else:
            checks = [
                (f"prefill >= {g['prefill_ratio_min']:.2f}x", r.get("prefill_speed_ratio"), g["prefill_ratio_min"], 1)
            ]
        checks += [
            (f"decode >= {g['decode_ratio_min']:.2f}x", r.get("decode_speed_ratio"), g["decode_ratio_min"], 1),
            (f"memory <= {g['memory_ratio_max']:.2f}x", r.get("memory_ratio"), g["memory_ratio_max"], -1),
        ]
        if not cpu:
            checks.append(
                (
                    f"prefill >= {g['reference_speedup_min']:.0f}x faster than reference",
                    r.get("prefill_speedup_vs_reference"),
                    g["reference_speedup_min"],
                    1,
                )
            )
        parts = []
        for label, value, goal, sign in checks:
            verdict = "n/a" if value is None else f"{value:.3f} {'met' if sign * (value - goal) >= 0 else 'NOT met'}"
            parts.append(f"{label}: {verdict}")
        lines.append(f"- {r['config']} ({r['impl']}): " + "; ".join(parts))
    if cpu:
        lines += [
            "",
            "CPU goals: prefill at most 1.3x the unsteered time for ACT and VAR, 1.8x for softplus re-weighting "
            "(defined for SmolLM2 at 2048 tokens); decode >= 0.95x and peak memory <= 1.1x for every method.",
        ]
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def write_csv(path: Path, meta: dict, runs: list[dict], summary: list[dict]) -> None:
    a, mach = meta["args"], meta["machine"]
    common = {
        "model": meta["model"]["model"],
        "hardware": mach["hardware"],
        "device": mach["device"],
        "dtype": a["dtype"],
        "batch_size": a["batch_size"],
        "prompt_len": a["prompt_len"],
        "new_tokens": a["new_tokens"],
        "git": mach["git"],
    }
    fields = [
        "model",
        "hardware",
        "device",
        "dtype",
        "batch_size",
        "prompt_len",
        "new_tokens",
        "git",
        "config",
        "recipe",
        "backend",
        "impl",
        "stat",
        "repeat",
        "metric",
        "value",
    ]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in runs:
            for m in METRICS + ("decode_s",):
                w.writerow(
                    {
                        **common,
                        "config": r["config"],
                        "recipe": r["recipe"],
                        "backend": r["backend"],
                        "impl": r.get("impl"),
                        "stat": "raw" if r.get("status") == "ok" else r.get("status"),
                        "repeat": r["repeat"],
                        "metric": m,
                        "value": r.get(m),
                    }
                )
        for s in summary:
            for m in METRICS + (("rows_steered",) if s["recipe"] is not None else ()):
                w.writerow(
                    {
                        **common,
                        "config": s["config"],
                        "recipe": s["recipe"],
                        "backend": s["backend"],
                        "impl": s["impl"],
                        "stat": "median",
                        "repeat": "",
                        "metric": m,
                        "value": s.get(m),
                    }
                )
            for m in (
                "prefill_speed_ratio",
                "decode_speed_ratio",
                "memory_ratio",
                "prefill_speedup_vs_reference",
                "decode_speedup_vs_reference",
            ):
                if s.get(m) is not None:
                    w.writerow(
                        {
                            **common,
                            "config": s["config"],
                            "recipe": s["recipe"],
                            "backend": s["backend"],
                            "impl": s["impl"],
                            "stat": "ratio",
                            "repeat": "",
                            "metric": m,
                            "value": s[m],
                        }
                    )


def plot(path: Path, meta: dict, summary: list[dict]) -> str | None:
    """PNG of the ratios; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG chart (pip install matplotlib, or attnsteer[eval])"
    rows = [r for r in summary if r["backend"] is not None and r.get("prefill_speed_ratio") is not None]
    if not rows:
        return "no ratios to plot"
    metrics = [
        ("prefill_speed_ratio", "prefill speed", GOALS["prefill_ratio_min"]),
        ("decode_speed_ratio", "decode speed", GOALS["decode_ratio_min"]),
        ("memory_ratio", "peak memory", GOALS["memory_ratio_max"]),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.6))
    width = 0.8 / len(metrics)
    colors = ["#4C72B0", "#55A868", "#C44E52"]
    for mi, (key, label, goal) in enumerate(metrics):
        xs = [i + (mi - 1) * width for i in range(len(rows))]
        vals = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(
            xs, vals, width, label=f"{label} (goal {'>=' if key != 'memory_ratio' else '<='} {goal})", color=colors[mi]
        )
        for bar, v in zip(bars, vals):
            ax.annotate(
                f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
            )
        ax.axhline(goal, color=colors[mi], linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['config']}\n({r['impl']})" for r in rows], fontsize=8)
    ax.set_ylabel("steered / unsteered (same process)")
    a = meta["args"]
    ax.set_title(
        f"{meta['model']['model']} ({meta['model']['num_hidden_layers']} layers) on "
        f"{meta['machine']['hardware']}: batch {a['batch_size']}, "
        f"{a['prompt_len']} + {a['new_tokens']} tokens, {a['dtype']}",
        fontsize=9,
    )
    top = max([1.2] + [r.get(k) or 0.0 for r in rows for k, _, _ in metrics])
    ax.set_ylim(0, top * 1.12)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
