"""`attnsteer compare`: Markdown table and PNG chart of run directories; eval --help examples."""

from __future__ import annotations

import json

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
    assert last[-2].strip() == "example:" and last[-1].strip().startswith("attnsteer ")


def test_eval_without_subcommand_prints_help(capsys):
    code, _, err = cli(capsys, "eval")
    assert code == 2 and "pope" in err and "mmlu" in err
