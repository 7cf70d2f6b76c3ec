"""Baseline vs recipes of finished runs as a Markdown table and a PNG chart (what ``attnsteer
compare RUN_DIR...`` writes; nothing here prints or parses arguments).

Reads the ``results.json`` of each run directory (any task), or, in a folder without one, every
results JSON there: what ``attnsteer eval speed`` writes (``<stem>.json``, one per prompt length).
A JSON file can also be passed directly. Every run lists its headline metrics
(``headline``) and, per recipe label, the mean over seeds (``metrics[label].summary``) with a
standard error (``summary_stderr``, lm-eval) or the spread over seeds (``summary_std``). The
table shows each recipe next to the baseline with the difference; fractions are shown in percent.
The chart has one small panel per (run, metric), each on its own scale (percent, ms, tok/s, MiB,
ratios), so every run and every metric is drawn. matplotlib is imported only to draw the chart.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASELINE = "baseline"
RESULTS_FILE = "results.json"
RUN_KINDS = (
    f"a folder written by `attnsteer eval pope|chair|mmlu --output_path DIR` (it holds {RESULTS_FILE}) or by "
    "`attnsteer eval speed --output_path DIR` (it holds one <stem>.json per prompt length), or one of those JSON files"
)


# ---- reading runs -------------------------------------------------------------------------------

# results.json statuses of a run without metrics -> what they mean
UNFINISHED = {
    "running": "unfinished, or its process was killed",
    "interrupted": "stopped by Ctrl-C",
    "failed": "stopped on an error",
}


def is_results_record(data: Any) -> bool:
    """Whether ``data`` has the results-schema fields compare reads (``task`` and ``metrics``)."""
    return isinstance(data, dict) and "task" in data and isinstance(data.get("metrics"), dict)


def _natural_key(path: Path) -> list:
    """``x_n512`` before ``x_n2048``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_runs(path: str | Path) -> list[tuple[str, dict]]:
    """The runs in ``path``, as (name, results record): a folder's ``results.json``; in a folder
    without one, every results JSON in it (``attnsteer eval speed`` writes one per prompt length),
    in natural name order; or the JSON file ``path`` itself. Raises :class:`RunDirError` naming
    what was looked for and what to pass instead."""
    from .results import RunDirError

    p = Path(path).expanduser()
    if not p.exists():
        raise RunDirError(f"{path}: no such folder or file, so no {RESULTS_FILE} there. Fix: pass {RUN_KINDS}")
    if p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(
                f"{path}: not readable as JSON ({exc}). Fix: pass {RUN_KINDS}, unedited (a file cut short by a "
                "crash: rerun the `attnsteer eval` command that wrote it)"
            ) from None
        status = data.get("status") if isinstance(data, dict) else None
        if isinstance(data, dict) and "task" in data and "metrics" not in data and status in UNFINISHED:
            raise RunDirError(
                f"{path}: the {data['task']} run has no metrics yet (status {status!r}: {UNFINISHED[status]}). "
                "Fix: let `attnsteer eval` finish, or rerun the same command to resume it"
                + (f" ({data['resume']})" if isinstance(data.get("resume"), str) else "")
            )
        if not is_results_record(data):
            raise RunDirError(
                f"{path}: not an attnsteer results file (no 'task' and 'metrics' fields). Fix: pass {RUN_KINDS}"
            )
        return [(str(path), data)]
    if (p / RESULTS_FILE).is_file():
        return [(str(path), load_runs(p / RESULTS_FILE)[0][1])]
    runs, skipped = [], []
    for file in sorted((f for f in p.glob("*.json") if not f.name.startswith(".")), key=_natural_key):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            skipped.append(f"{file.name} (not valid JSON)")
            continue
        if is_results_record(data):
            runs.append((str(file), data))
        else:
            skipped.append(f"{file.name} (no 'task' and 'metrics' fields)")
    if not runs:
        seen = f"; skipped {', '.join(skipped)}" if skipped else ""
        raise RunDirError(
            f"{path}: nothing to compare there: no {RESULTS_FILE} (written by `attnsteer eval pope|chair|mmlu`) and "
            f"no results .json of `attnsteer eval speed`{seen}. Fix: pass {RUN_KINDS}"
        )
    return runs


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


def selected_headline(record: dict, metrics: Sequence[str] | None = None) -> list[dict]:
    """The headline entries to show: all of them, or those named in ``metrics`` (metrics the
    headline does not list are shown by name)."""
    headline = headline_of(record)
    if metrics:
        wanted = set(metrics)
        headline = [h for h in headline if h["metric"] in wanted] or [
            {"metric": m, "label": m, "higher_is_better": None, "percent": False} for m in metrics
        ]
    return headline


def describe(record: dict) -> str:
    """One line: what the run measured and how."""
    cfg = record.get("config") or {}
    task = record.get("task", "?")
    parts = []
    if task == "speed":
        parts.append(
            f"batch {cfg.get('batch_size', '?')}, prompt {cfg.get('prompt_len', '?')} tokens, "
            f"{cfg.get('new_tokens', '?')} new tokens"
        )
        parts += [str(cfg[k]) for k in ("dtype", "device") if cfg.get(k)]
        if cfg.get("random_weights"):
            parts.append("random weights")
        parts.append("ratios: steered / unsteered in the same process (speed > 1 = faster)")
    elif task == "mmlu":
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
    headline = selected_headline(record, metrics)
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
CHART_COLUMNS = 4  # panels per row; a run with more metrics continues on the next row


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _run_title(path: str, record: dict) -> str:
    cfg = record.get("config") or {}
    model = cfg.get("model") or (record.get("identity") or {}).get("model") or "?"
    title = f"{record.get('task', '?')} - {model}"
    if record.get("task") == "speed" and cfg.get("prompt_len") is not None:
        title += f", prompt {cfg['prompt_len']}"
    return f"{title}\n{Path(path).name}" if path else title


def chart_panels(
    records: Sequence[tuple[str, dict]], baseline: str = BASELINE, metrics: Sequence[str] | None = None
) -> list[dict]:
    """What the chart draws: one panel per (run, headline metric), in run order, each with one bar
    per recipe label (baseline first) that has a value. Values are in the unit shown: fractions in
    percent, everything else as stored (ms, tok/s, MiB, ratios). Keys of a panel: ``run``,
    ``run_index``, ``title``, ``metric``, ``ylabel``, ``percent``, ``higher_is_better``,
    ``reference`` (1.0 for ratios: the baseline) and ``bars`` (dicts with ``label``, ``value``,
    ``err`` and ``delta`` to the baseline; ``err`` and ``delta`` are None when unknown)."""
    panels = []
    for index, (path, record) in enumerate(records):
        results = record.get("metrics") or {}
        labels = list(results)
        if baseline in labels:
            labels.remove(baseline)
            labels.insert(0, baseline)
        for h in selected_headline(record, metrics):
            m, pct = h["metric"], bool(h.get("percent"))
            scale = 100.0 if pct else 1.0
            base = _number((results.get(baseline, {}).get("summary") or {}).get(m))
            bars = []
            for lbl in labels:
                entry = results.get(lbl) or {}
                value = _number((entry.get("summary") or {}).get(m))
                if value is None:
                    continue
                spread = _number(_spread(entry, m)[0])
                bars.append(
                    {
                        "label": lbl,
                        "value": value * scale,
                        "err": spread * scale if spread else None,
                        "delta": (value - base) * scale if base is not None and lbl != baseline else None,
                    }
                )
            label = h.get("label", m)
            panels.append(
                {
                    "run": path,
                    "run_index": index,
                    "title": _run_title(path, record),
                    "metric": m,
                    "ylabel": f"{label} (%)" if pct else label,
                    "percent": pct,
                    "higher_is_better": h.get("higher_is_better"),
                    "reference": 1.0 if m.endswith("ratio") else None,
                    "bars": bars,
                }
            )
    return panels


def _short(value: float) -> str:
    a = abs(value)
    if a >= 1e5:
        return f"{value:.3g}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if a >= 0.01 or value == 0 else f"{value:.2g}"


def build_chart(
    records: Sequence[tuple[str, dict]], baseline: str = BASELINE, metrics: Sequence[str] | None = None
) -> tuple[Any, list[tuple[str, str, str, float]]]:
    """The matplotlib figure of :func:`chart_panels` -- a grid of small bar charts, one per (run,
    metric), each with its own y scale; a run starts a new row -- and the (run, metric, label,
    value) of every bar drawn, read back from the figure. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = chart_panels(records, baseline, metrics)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to plot: the runs have no headline metrics", ha="center", va="center")
        return fig, []
    by_run: dict[int, list[dict]] = {}
    for panel in panels:
        by_run.setdefault(panel["run_index"], []).append(panel)
    ncols = min(CHART_COLUMNS, max(len(v) for v in by_run.values()))
    rows = [group[i : i + ncols] for group in by_run.values() for i in range(0, len(group), ncols)]
    labels = list(dict.fromkeys(bar["label"] for p in panels for bar in p["bars"]))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {lbl: cmap(i % cmap.N) for i, lbl in enumerate(labels)}
    legend_rows = math.ceil(len(labels) / 4) if labels else 0
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(3.3 * ncols + 0.4, 2.9 * len(rows) + 0.25 * legend_rows + 0.3),
        squeeze=False,
    )
    drawn: list[tuple[str, str, str, float]] = []
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel = row[c]
            bars = panel["bars"]
            xs = list(range(len(bars)))
            values = [b["value"] for b in bars]
            errs = [b["err"] or 0.0 for b in bars]
            artists = ax.bar(
                xs,
                values,
                0.75,
                yerr=errs if any(errs) else None,
                capsize=2,
                color=[color[b["label"]] for b in bars],
            )
            for artist, bar in zip(artists, bars):
                drawn.append((panel["run"], panel["metric"], bar["label"], float(artist.get_height())))
                text = _short(bar["value"])
                if bar["delta"] is not None:
                    text += f"\n({'+' if bar['delta'] >= 0 else ''}{_short(bar['delta'])})"
                height = artist.get_height()
                ax.annotate(
                    text,
                    (
                        artist.get_x() + artist.get_width() / 2,
                        height + (bar["err"] or 0.0) * (1 if height >= 0 else -1),
                    ),
                    ha="center",
                    va="bottom" if height >= 0 else "top",
                    fontsize=6,
                )
            if panel["reference"] is not None:
                ax.axhline(panel["reference"], color="black", linewidth=0.7, linestyle="--")
            if not bars:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            low, high = ax.get_ylim()
            if panel["reference"] is not None:  # keep the baseline's 1.0 in view
                low, high = min(low, 0.0), max(high, panel["reference"] * 1.05)
            ax.set_ylim(low, high + 0.18 * (high - low))  # room for the value labels
            ax.set_xticks([])
            better = {True: " (higher is better)", False: " (lower is better)"}.get(panel["higher_is_better"], "")
            ax.set_title(f"{panel['title']}\n{panel['ylabel']}{better}", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
    if labels:
        handles = [Patch(color=color[lbl], label=lbl) for lbl in labels]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    bottom = (0.25 * legend_rows + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, min(bottom, 0.5), 1, 1))
    return fig, drawn


def plot(
    records: Sequence[tuple[str, dict]], png: Path, baseline: str = BASELINE, metrics: Sequence[str] | None = None
) -> Path | None:
    """Write :func:`build_chart` to ``png`` (every run and metric; a figure saying so when there is
    nothing to plot). Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, _ = build_chart(records, baseline, metrics)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110 if len(fig.axes) <= 48 else 80)
    plt.close(fig)
    return png


# ---- writing a comparison ----------------------------------------------------------------------
def compare(
    paths: Sequence[str | Path],
    output_path: str | Path,
    *,
    baseline: str = BASELINE,
    metrics: Sequence[str] | None = None,
    draw: bool = True,
) -> dict:
    """Read the runs in ``paths`` (:func:`load_runs`), write ``compare.md`` (one :func:`run_markdown`
    table per run) and, with ``draw``, ``compare.png`` (:func:`plot`) into the folder ``output_path``.

    Returns ``{"markdown": the tables, "files": [paths written], "notes": [what was left out and
    why]}``. Raises :class:`~attnsteer.errors.EvalError` naming the path and the fix when
    ``output_path`` cannot be written (checked first) or a run cannot be read."""
    from ..errors import EvalError
    from .paths import check_writable
    from .results import RunDirError

    out = check_writable(output_path, "--output_path", folder=True)
    records = []
    for path in paths:
        try:
            records.extend(load_runs(path))
        except RunDirError as exc:
            raise EvalError(f"compare: {exc}") from None
    text = "\n\n".join(run_markdown(r, p, baseline, metrics) for p, r in records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    written, notes = [out / "compare.md"], []
    if draw:
        png = plot(records, out / "compare.png", baseline, metrics)
        if png is None:
            notes.append("no PNG chart: matplotlib is not installed (pip install matplotlib, or attnsteer[eval])")
        else:
            written.append(png)
    return {"markdown": text, "files": written, "notes": notes}
