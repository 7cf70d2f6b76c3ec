"""`attnsteer compare`: Markdown table and PNG chart of run directories; eval --help examples."""

from __future__ import annotations

import json
import re

import pytest

from attnsteer.cli import main
from attnsteer.evals.compare import run_markdown


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


POPE = {
    "task": "pope",
    "status": "complete",
    "seeds": [0, 1],
    "config": {
        "model": "llava-hf/llava-1.5-7b-hf",
        "n_items": 9000,
        "parser": "pope",
        "decoding": {"strategy": "greedy", "max_new_tokens": 16},
    },
    "headline": [
        {"metric": "f1_mean", "label": "F1, mean of splits", "higher_is_better": True, "percent": True},
        {"metric": "unknown", "label": "unparsable answers", "higher_is_better": False, "percent": False},
    ],
    "metrics": {
        "baseline": {"summary": {"f1_mean": 0.80, "unknown": 3}, "summary_std": {"f1_mean": 0.01}},
        "act-default": {"summary": {"f1_mean": 0.85, "unknown": 1}, "summary_std": {"f1_mean": 0.02}},
    },
}
MMLU = {
    "task": "mmlu",
    "status": "complete",
    "seeds": [0],
    "config": {"model": "smollm2", "tasks": ["attnsteer_mc_demo"], "num_fewshot_used": 0, "n_questions": 96},
    "headline": [
        {"metric": "attnsteer_mc_demo/acc", "label": "attnsteer_mc_demo acc", "higher_is_better": True, "percent": True}
    ],
    "metrics": {
        "baseline": {"summary": {"attnsteer_mc_demo/acc": 0.6}, "summary_stderr": {"attnsteer_mc_demo/acc": 0.05}},
        "softplus-gentle": {
            "summary": {"attnsteer_mc_demo/acc": 0.55},
            "summary_stderr": {"attnsteer_mc_demo/acc": 0.051},
        },
    },
}


@pytest.fixture
def runs(tmp_path):
    out = []
    for name, rec in (("pope", POPE), ("mmlu", MMLU)):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(rec))
        out.append(d)
    return out


def test_markdown_table_has_deltas_and_spreads():
    text = run_markdown(POPE, "runs/pope")
    assert "| metric | baseline | act-default | delta |" in text
    assert "| F1, mean of splits (up) | 80.0 +- 1.0 | 85.0 +- 2.0 | +5.0 |" in text
    assert "| unparsable answers (down) | 3 | 1 | -2 |" in text
    assert "std over seeds" in text and "seeds 0, 1" in text
    no_base = run_markdown({**POPE, "metrics": {"x": POPE["metrics"]["act-default"]}})
    assert "delta" not in no_base.splitlines()[4] and "run with --recipe none" in no_base


def test_compare_command_writes_markdown_and_png(runs, tmp_path, capsys):
    code, out, err = cli(capsys, "compare", *runs, "--output_path", tmp_path / "cmp")
    assert code == 0
    assert "### pope - llava-hf/llava-1.5-7b-hf" in out and "### mmlu - smollm2" in out
    assert "| attnsteer_mc_demo acc (up) | 60.0 +- 5.0 | 55.0 +- 5.1 | -5.0 |" in out
    assert "0-shot" in out and "96 questions" in out
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == out.strip()
    png = tmp_path / "cmp" / "compare.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in err
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, _ = cli(
        capsys, "compare", runs[0], "--output_path", tmp_path / "cmp2", "--no_plot", "--metrics", "unknown"
    )
    assert code == 0 and not (tmp_path / "cmp2" / "compare.png").exists()


def test_compare_missing_run_is_a_usage_error(tmp_path, capsys):
    code, _, err = cli(capsys, "compare", tmp_path / "nope", "--output_path", tmp_path / "o")
    assert code == 2 and "no results.json" in err


@pytest.mark.parametrize(
    "argv", [["eval", "pope"], ["eval", "chair"], ["eval", "mmlu"], ["eval", "speed"], ["compare"]]
)
def test_eval_help_ends_with_a_runnable_example(capsys, argv):
    code, out, _ = cli(capsys, *argv, "--help")
    assert code == 0
    last = out.strip().splitlines()
    assert re.fullmatch(r"example( \(needs .+\))?:", last[-2].strip()) and last[-1].strip().startswith("attnsteer ")


def test_eval_without_subcommand_prints_help(capsys):
    code, _, err = cli(capsys, "eval")
    assert code == 2 and "pope" in err and "mmlu" in err


# ---- speed runs and the chart -------------------------------------------------------------------
def _speed_record(prompt_len: int) -> dict:
    """What `attnsteer eval speed` writes per prompt length (its results-schema part), from a summary."""
    from attnsteer.speed.summary import MIB, results_record

    meta = {
        "args": {
            "batch_size": 1,
            "prompt_len": prompt_len,
            "new_tokens": 8,
            "dtype": "float32",
            "random_weights": True,
        },
        "model": {"model": "llama-tiny"},
        "machine": {"device": "cpu"},
    }
    row = {"recipe": None, "backend": None, "prefill_s": 0.002 * prompt_len, "decode_tok_s": 400.0}
    summary = [
        {**row, "config": "baseline", "peak_mem_bytes": 300 * MIB},
        {
            **row,
            "config": "act-default@auto",
            "recipe": "act-default",
            "backend": "auto",
            "prefill_s": 0.0025 * prompt_len,
            "decode_tok_s": 380.0,
            "peak_mem_bytes": 310 * MIB,
            "prefill_speed_ratio": 0.8,
            "decode_speed_ratio": 0.95,
            "memory_ratio": 1.03,
            "rows_steered": 12,
        },
    ]
    record = results_record(meta, summary)
    return {**record, "meta": meta, "summary": summary}


@pytest.fixture
def speed_dir(tmp_path):
    """A folder as `attnsteer eval speed --prompt-len 2048,512 --output_path DIR` leaves it."""
    d = tmp_path / "speed"
    d.mkdir()
    for n in (2048, 512):
        stem = d / f"speed_llama-tiny_b1_n{n}_t8_float32_cpu"
        stem.with_suffix(".json").write_text(json.dumps(_speed_record(n)))
        stem.with_suffix(".md").write_text("# table\n")
        stem.with_suffix(".csv").write_text("model,metric,value\n")
    return d


WIDE = {  # one run with 10 headline metrics on different scales (more than the old chart's 8)
    "task": "pope",
    "config": {"model": "wide"},
    "headline": [
        {"metric": f"m{i}", "label": f"metric {i}", "higher_is_better": True, "percent": i % 2 == 0} for i in range(10)
    ],
    "metrics": {
        "baseline": {"summary": {f"m{i}": (0.5 if i % 2 == 0 else 10.0**i) for i in range(10)}},
        "r1": {"summary": {f"m{i}": (0.6 if i % 2 == 0 else 2 * 10.0**i) for i in range(10)}},
        "r2": {"summary": {f"m{i}": (0.4 if i % 2 == 0 else 3 * 10.0**i) for i in range(10)}},
    },
}


def test_compare_reads_a_speed_run_folder_next_to_other_runs(runs, speed_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "compare", *runs, speed_dir, "--output_path", tmp_path / "cmp", "--no_plot")
    assert code == 0, err
    titles = [line for line in out.splitlines() if line.startswith("### ")]
    assert [t.split(" (")[0] for t in titles] == [
        "### pope - llava-hf/llava-1.5-7b-hf",
        "### mmlu - smollm2",
        "### speed - llama-tiny",
        "### speed - llama-tiny",
    ]
    assert "_n512_" in titles[2] and "_n2048_" in titles[3]  # every prompt length, in natural order
    assert "| prefill ms (down) | 1024 | 1280 | +256 |" in out
    assert "| prefill speed ratio (up) | n/a | 0.80 | n/a |" in out
    assert "batch 1, prompt 512 tokens, 8 new tokens" in out
    one = speed_dir / "speed_llama-tiny_b1_n512_t8_float32_cpu.json"
    code, out, _ = cli(capsys, "compare", one, "--output_path", tmp_path / "cmp1", "--no_plot")  # a file works too
    assert code == 0 and out.count("### speed") == 1


def test_compare_speed_only_writes_a_png(speed_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, _, err = cli(capsys, "compare", speed_dir, "--output_path", tmp_path / "cmp")
    assert code == 0
    png = tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in err
    empty = tmp_path / "empty"  # a run without metrics: still a PNG (saying there is nothing to plot)
    empty.mkdir()
    (empty / "results.json").write_text(json.dumps({"task": "pope", "metrics": {}}))
    code, _, _ = cli(capsys, "compare", empty, "--output_path", tmp_path / "cmp2")
    assert code == 0 and (tmp_path / "cmp2" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_draws_every_run_and_every_metric_on_its_own_scale(speed_dir):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from attnsteer.evals.compare import build_chart, chart_panels, load_runs

    records = [("pope", POPE), ("mmlu", MMLU), ("wide", WIDE), *load_runs(speed_dir)]
    expected = set()
    for path, record in records:
        for h in record["headline"]:
            for label, entry in record["metrics"].items():
                value = entry["summary"].get(h["metric"])
                if value is not None:
                    expected.add((path, h["metric"], label, round(value * (100 if h["percent"] else 1), 6)))
    fig, drawn = build_chart(records)
    try:
        assert {(r, m, lbl, round(v, 6)) for r, m, lbl, v in drawn} == expected
        assert len(drawn) == len(expected)
        panels = chart_panels(records)
        assert len(panels) == sum(len(r["headline"]) for _, r in records) == 2 + 1 + 10 + 2 * 6
        assert [p["metric"] for p in panels if p["run"] == "wide"] == [f"m{i}" for i in range(10)]
        titled = [ax for ax in fig.axes if ax.get_title()]  # one axes per panel (the rest of a row is blank)
        assert len(titled) == len(panels)
        for ax, panel in zip(titled, panels):
            assert panel["ylabel"] in ax.get_title()
            heights = sorted(round(p.get_height(), 6) for p in ax.patches)
            assert heights == sorted(round(b["value"], 6) for b in panel["bars"])
        pope_f1 = next(p for p in panels if p["metric"] == "f1_mean")
        assert pope_f1["ylabel"].endswith("(%)") and [b["value"] for b in pope_f1["bars"]] == pytest.approx([80, 85])
        ratio = next(p for p in panels if p["metric"] == "prefill_speed_ratio")
        assert ratio["reference"] == 1.0 and [b["label"] for b in ratio["bars"]] == ["act-default@auto"]
    finally:
        plt.close(fig)


def test_compare_folder_with_nothing_readable_says_what_it_looked_for(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "notes.json").write_text('{"hello": 1}')
    (d / "speed.md").write_text("# table\n")
    code, _, err = cli(capsys, "compare", d, "--output_path", tmp_path / "o")
    assert code == 2
    assert f"{d}: nothing to compare there: no results.json" in err
    assert "no results .json of `attnsteer eval speed`" in err and "skipped notes.json" in err
    assert "Fix: pass a folder written by `attnsteer eval pope|chair|mmlu --output_path DIR`" in err
    assert "`attnsteer eval speed --output_path DIR`" in err
    code, _, err = cli(capsys, "compare", d / "notes.json", "--output_path", tmp_path / "o")
    assert code == 2 and "not an attnsteer results file" in err and "Fix:" in err
    (d / "results.json").write_text(json.dumps({"task": "pope", "status": "running", "identity": {}}))
    code, _, err = cli(capsys, "compare", d, "--output_path", tmp_path / "o")
    assert code == 2 and "has no metrics yet (status 'running'" in err and "rerun the same command" in err
    for status, why in (("interrupted", "stopped by Ctrl-C"), ("failed", "stopped on an error")):
        record = {"task": "pope", "status": status, "identity": {}, "resume": f"rerun with --output_path {d}"}
        (d / "results.json").write_text(json.dumps(record))
        code, _, err = cli(capsys, "compare", d, "--output_path", tmp_path / "o")
        assert code == 2 and f"(status '{status}': {why})" in err and f"rerun with --output_path {d}" in err
    (tmp_path / "taken").write_text("a file")
    code, _, err = cli(capsys, "compare", d, "--output_path", tmp_path / "taken")
    assert code == 2 and "--output_path" in err and "existing file" in err and "Fix:" in err
