"""``attnsteer compare RUN_DIR...``: baseline vs recipes as a Markdown table and a PNG chart.

Reads the ``results.json`` of each run directory (any task). Every run lists its headline metrics
(``headline``) and, per recipe label, the mean over seeds (``metrics[label].summary``) with a
standard error (``summary_stderr``, lm-eval) or the spread over seeds (``summary_std``). The
table shows each recipe next to the baseline with the difference; fractions are shown in percent.
matplotlib is imported only to draw the chart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HELP = "Markdown table + PNG chart of eval runs: baseline vs recipes, with deltas"
EXAMPLE = "attnsteer compare attnsteer_runs/mmlu-smollm2-* --output_path compare"
DESCRIPTION = (
    "Read the results.json of one or more run directories written by `attnsteer eval ...` and print a Markdown "
    "table of the headline metrics, baseline vs each recipe with the difference, and draw them as a PNG bar chart. "
    "Both are written to --output_path (compare.md, compare.png)."
)
BASELINE = "baseline"


# ---- formatting ---------------------------------------------------------------------------------
def _fmt(value: Any, percent: bool, digits: int = 1) -> str:
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    if percent:
        return f"{100 * value:.{digits}f}"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


def _spread(entry: dict, metric: str) -> tuple[float | None, str]:
    """(spread, kind): lm-eval stderr, else std over seeds, else None."""
    stderr = (entry.get("summary_stderr") or {}).get(metric)
    if isinstance(stderr, (int, float)):
        return float(stderr), "stderr"
    std = (entry.get("summary_std") or {}).get(metric)
    if isinstance(std, (int, float)):
        return float(std), "std over seeds"
    return None, ""


def headline_of(record: dict) -> list[dict]:
    headline = record.get("headline")
    if headline:
        return headline
    labels = list(record.get("metrics") or {})
    names = list((record["metrics"][labels[0]].get("summary") or {}) if labels else [])
    return [{"metric": m, "label": m, "higher_is_better": None, "percent": False} for m in names]


def describe(record: dict) -> str:
    """One line: what the run measured and how."""
    cfg = record.get("config") or {}
    task = record.get("task", "?")
    parts = []
    if task == "mmlu":
        parts.append(f"tasks {', '.join(cfg.get('tasks') or [])}")
        if cfg.get("num_fewshot_used") is not None:
            parts.append(f"{cfg['num_fewshot_used']}-shot")
        if cfg.get("n_questions"):
            parts.append(f"{cfg['n_questions']} questions")
        if cfg.get("limit") is not None:
            parts.append(f"limit {cfg['limit']}")
    else:
        if cfg.get("n_items") is not None:
            parts.append(f"{cfg['n_items']} items")
        dec = cfg.get("decoding") or {}
        if dec:
            parts.append(f"{dec.get('strategy', 'greedy')}, max_new_tokens {dec.get('max_new_tokens')}")
        if cfg.get("parser"):
            parts.append(f"parser {cfg['parser']}")
        if cfg.get("lemmatizer"):
            parts.append(f"lemmatizer {cfg['lemmatizer']}")
        if cfg.get("drop_incomplete") is not None and task == "chair":
            parts.append("last incomplete sentence dropped" if cfg["drop_incomplete"] else "captions scored whole")
        if cfg.get("limit") is not None:
            parts.append(f"limit {cfg['limit']}")
    seeds = record.get("seeds")
    if seeds and len(seeds) > 1:
        parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def run_markdown(
    record: dict, path: str | None = None, baseline: str | None = BASELINE, metrics: Sequence[str] | None = None
) -> str:
    """The Markdown table of one run: one row per headline metric, one column per recipe (and the
    difference to the ``baseline`` column when there is one; ``baseline=None``: no deltas)."""
    results = record.get("metrics") or {}
    labels = list(results)
    base = baseline if baseline and baseline in results else None
    others = [lbl for lbl in labels if lbl != base]
    headline = headline_of(record)
    if metrics:
        wanted = set(metrics)
        headline = [h for h in headline if h["metric"] in wanted] or [
            {"metric": m, "label": m, "higher_is_better": None, "percent": False} for m in metrics
        ]
    model = (record.get("config") or {}).get("model") or (record.get("identity") or {}).get("model", "?")
    title = f"### {record.get('task', '?')} - {model}"
    if path:
        title += f" (`{path}`)"
    lines = [title, ""]
    info = describe(record)
    if info:
        lines += [info, ""]
    head = ["metric"] + ([base] if base else []) + [x for lbl in others for x in ((lbl, "delta") if base else (lbl,))]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    spreads = set()
    for h in headline:
        m, pct = h["metric"], bool(h.get("percent"))
        row = [
            h.get("label", m)
            + ("" if h.get("higher_is_better") is None else (" (up)" if h["higher_is_better"] else " (down)"))
        ]
        base_value = (results.get(base, {}).get("summary") or {}).get(m) if base else None

        def cell(label: str, m: str = m, pct: bool = pct) -> str:
            entry = results.get(label, {})
            value = (entry.get("summary") or {}).get(m)
            text = _fmt(value, pct)
            spread, kind = _spread(entry, m)
            if spread is not None and value is not None:
                text += f" +- {_fmt(spread, pct)}"
                spreads.add(kind)
            return text

        if base:
            row.append(cell(base))
        for lbl in others:
            row.append(cell(lbl))
            if base:
                value = (results.get(lbl, {}).get("summary") or {}).get(m)
                if isinstance(value, (int, float)) and isinstance(base_value, (int, float)):
                    d = (value - base_value) * (100 if pct else 1)
                    row.append(f"{d:+.1f}" if pct else (f"{d:+.2f}" if not float(d).is_integer() else f"{int(d):+d}"))
                else:
                    row.append("n/a")
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    if any(h.get("percent") for h in headline):
        notes.append("fractions in percent")
    if spreads:
        notes.append("+- = " + " / ".join(sorted(spreads)))
    if base:
        notes.append(f"delta = recipe - {base}")
    elif baseline:
        notes.append(f"no {baseline!r} column (run with --recipe none for deltas)")
    lines += ["", "(" + "; ".join(notes) + ")"]
    return "\n".join(lines)


# ---- chart --------------------------------------------------------------------------------------
def plot(
    records: Sequence[tuple[str, dict]], png: Path, baseline: str = BASELINE, metrics: Sequence[str] | None = None
) -> Path | None:
    """Grouped bars per run (the percent-valued headline metrics), recipes side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: no PNG chart: matplotlib is not installed (pip install matplotlib, or attnsteer[eval])",
            file=sys.stderr,
        )
        return None
    panels = []
    for path, record in records:  # noqa: B007 - path kept for the panel order
        hl = [h for h in headline_of(record) if h.get("percent")]
        if metrics:
            hl = [h for h in hl if h["metric"] in set(metrics)]
        if hl:
            panels.append((path, record, hl[:8]))
    if not panels:
        return None
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(7.0, 1.6 * max(len(p[2]) for p in panels) + 3), 3.6 * len(panels)), squeeze=False
    )
    for ax, (_path, record, hl) in zip(axes[:, 0], panels):
        results = record["metrics"]
        labels = list(results)
        if baseline in labels:
            labels.remove(baseline)
            labels.insert(0, baseline)
        width = 0.8 / max(1, len(labels))
        colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
        for j, lbl in enumerate(labels):
            entry = results[lbl]
            values = [100 * ((entry.get("summary") or {}).get(h["metric"]) or 0.0) for h in hl]
            errs = [100 * (_spread(entry, h["metric"])[0] or 0.0) for h in hl]
            yerr = [[min(e, v) for e, v in zip(errs, values)], [min(e, 100 - v) for e, v in zip(errs, values)]]
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(hl))]
            bars = ax.bar(
                xs, values, width, yerr=yerr if any(errs) else None, capsize=2, label=lbl, color=colors(j % colors.N)
            )
            if lbl != baseline and baseline in results:
                base = results[baseline].get("summary") or {}
                for bar, h, v in zip(bars, hl, values):
                    b = base.get(h["metric"])
                    if isinstance(b, (int, float)):
                        ax.annotate(
                            f"{v - 100 * b:+.1f}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
        ax.set_xticks(range(len(hl)))
        ax.set_xticklabels([h.get("label", h["metric"]) for h in hl], fontsize=8, rotation=12)
        ax.set_ylabel("%")
        model = (record.get("config") or {}).get("model", "")
        ax.set_title(f"{record.get('task', '?')} - {model}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# ---- command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their results.json)")
    p.add_argument(
        "--output_path",
        default="attnsteer_compare",
        help="folder for compare.md and compare.png (default: ./attnsteer_compare)",
    )
    p.add_argument("--baseline", default=BASELINE, help=f"label of the reference column (default: {BASELINE})")
    p.add_argument("--metrics", nargs="+", default=None, metavar="M", help="only these metrics (default: headline)")
    p.add_argument("--no_plot", action="store_true", help="skip the PNG chart")


def run(args) -> int:
    from ..errors import EvalError
    from .results import RunDirError, load_results

    records = []
    for path in args.runs:
        try:
            records.append((path, load_results(path)))
        except RunDirError as exc:
            raise EvalError(f"compare: {exc}") from None
    text = "\n\n".join(run_markdown(r, p, args.baseline, args.metrics) for p, r in records)
    print(text)
    out = Path(args.output_path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    written = [out / "compare.md"]
    if not args.no_plot:
        png = plot(records, out / "compare.png", args.baseline, args.metrics)
        if png is not None:
            written.append(png)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
