"""The files of one speed measurement at one prompt length: the Markdown table (with the goals),
the long-format CSV and the PNG chart of the ratios."""

from __future__ import annotations

import csv
from pathlib import Path

from .summary import CPU_PREFILL_SLOWDOWN_MAX, GOALS, METRICS, MIB


def _fmt(x, spec="{:.3f}"):
    return "-" if x is None else spec.format(x)


def markdown(meta: dict, summary: list[dict]) -> str:
    """The Markdown report: settings, one table row per configuration, the fresh-process memory
    table (when measured), a warning for recipes that steered nothing, the goals and the command."""
    lines = _header(meta) + _table(summary) + _fresh_table(summary) + _idle_warning(summary)
    lines += _goals(summary, cpu=meta["machine"]["device"].startswith("cpu"))
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def _header(meta: dict) -> list[str]:
    a, m, mach = meta["args"], meta["model"], meta["machine"]
    image = (
        f" ({a['image_tokens']} image-placeholder + {a['prompt_len'] - a['image_tokens']} text)"
        if a.get("image_tokens")
        else ""
    )
    return [
        f"# attnsteer speed: {m['model']} (batch {a['batch_size']}, prompt {a['prompt_len']} tokens, "
        f"{a['new_tokens']} new tokens, {a['dtype']})",
        "",
        f"- hardware: {mach['hardware']} ({mach['device']}); torch {mach['torch']}, "
        f"transformers {mach['transformers']}, triton {mach['triton']}, git {mach['git']}",
        f"- model: {m['description'] or m['model']} [{m['source']}], {m['num_hidden_layers']} layers, "
        f"random weights: {a['random_weights']}",
        f"- prompt: {a['batch_size']} x {a['prompt_len']} tokens{image}, no padding; random token ids",
        f"- {a['repeats']} ABBA repeats after {a['warmup']} warm-up run(s); medians. Ratios: steered vs the "
        "adjacent baseline run (speed ratios > 1 = faster than baseline; memory ratio < 1 = less memory).",
        f"- peak memory: {meta['memory_note']}",
        "",
    ]


def _table(summary: list[dict]) -> list[str]:
    lines = [
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
    return lines


def _fresh_table(summary: list[dict]) -> list[str]:
    if not any(r.get("fresh_peak_extra_bytes") is not None for r in summary):
        return []
    lines = [
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
    return lines


def _idle_warning(summary: list[dict]) -> list[str]:
    idle = [r["config"] for r in summary if r["recipe"] is not None and r.get("rows_steered") == 0]
    if not idle:
        return []
    return [
        "",
        f"**Warning:** steered no (batch, head, row) in the timed runs: {', '.join(idle)}. Their "
        "timings are of the steering machinery, not of an intervention that changed the output.",
    ]


def _goals(summary: list[dict], cpu: bool) -> list[str]:
    lines = ["", "## Goals (CPU)" if cpu else "## Goals (GPU)", ""]
    for r in summary:
        if r["backend"] in (None, "reference") or r.get("prefill_speed_ratio") is None:
            continue
        parts = []
        for label, value, goal, sign in _checks(r, cpu):
            verdict = "n/a" if value is None else f"{value:.3f} {'met' if sign * (value - goal) >= 0 else 'NOT met'}"
            parts.append(f"{label}: {verdict}")
        lines.append(f"- {r['config']} ({r['impl']}): " + "; ".join(parts))
    if cpu:
        lines += [
            "",
            "CPU goals: prefill at most 1.3x the unsteered time for ACT and VAR, 1.8x for softplus re-weighting "
            "(defined for SmolLM2 at 2048 tokens); decode >= 0.95x and peak memory <= 1.1x for every method.",
        ]
    return lines


def _checks(r: dict, cpu: bool) -> list[tuple[str, float | None, float, int]]:
    """(label, value, goal, sign) of each goal of summary row ``r``: met when sign * (value - goal) >= 0."""
    g = GOALS
    if cpu:
        limits = [CPU_PREFILL_SLOWDOWN_MAX[m] for m in r.get("methods", []) if m in CPU_PREFILL_SLOWDOWN_MAX]
        slowdown = 1.0 / r["prefill_speed_ratio"]
        checks = [(f"prefill <= {max(limits):.1f}x the unsteered time", slowdown, max(limits), -1)] if limits else []
    else:
        checks = [
            (f"prefill >= {g['prefill_ratio_min']:.2f}x", r.get("prefill_speed_ratio"), g["prefill_ratio_min"], 1)
        ]
    checks += [
        (f"decode >= {g['decode_ratio_min']:.2f}x", r.get("decode_speed_ratio"), g["decode_ratio_min"], 1),
        (f"memory <= {g['memory_ratio_max']:.2f}x", r.get("memory_ratio"), g["memory_ratio_max"], -1),
    ]
    if not cpu:
        label = f"prefill >= {g['reference_speedup_min']:.0f}x faster than reference"
        checks.append((label, r.get("prefill_speedup_vs_reference"), g["reference_speedup_min"], 1))
    return checks


CSV_FIELDS = ("model", "hardware", "device", "dtype", "batch_size", "prompt_len", "new_tokens", "git", "config",
              "recipe", "backend", "impl", "stat", "repeat", "metric", "value")  # fmt: skip
RATIOS = (
    "prefill_speed_ratio",
    "decode_speed_ratio",
    "memory_ratio",
    "prefill_speedup_vs_reference",
    "decode_speedup_vs_reference",
)


def write_csv(path: Path, meta: dict, runs: list[dict], summary: list[dict]) -> None:
    """Long format: one row per (run, metric) (``stat`` raw, or the run's failure status), then per
    configuration its medians (``median``) and ratios (``ratio``)."""
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

    def row(r: dict, impl, stat: str, repeat, metric: str, value) -> dict:
        return {**common, "config": r["config"], "recipe": r["recipe"], "backend": r["backend"], "impl": impl,
                "stat": stat, "repeat": repeat, "metric": metric, "value": value}  # fmt: skip

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_FIELDS))
        w.writeheader()
        for r in runs:
            stat = "raw" if r.get("status") == "ok" else r.get("status")
            for m in METRICS + ("decode_s",):
                w.writerow(row(r, r.get("impl"), stat, r["repeat"], m, r.get(m)))
        for s in summary:
            for m in METRICS + (("rows_steered",) if s["recipe"] is not None else ()):
                w.writerow(row(s, s["impl"], "median", "", m, s.get(m)))
            for m in RATIOS:
                if s.get(m) is not None:
                    w.writerow(row(s, s["impl"], "ratio", "", m, s[m]))


def plot(path: Path, meta: dict, summary: list[dict]) -> str | None:
    """PNG of the ratios (steered / unsteered) with the goals; returns a note instead when
    matplotlib is missing or there is no ratio to plot."""
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
