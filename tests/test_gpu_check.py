"""benchmarks/gpu_check.sh, the prepared GPU check, on CPU: its syntax (and shellcheck, when
installed), its budget and skip plumbing, and (slow) the whole CPU dry run on tiny sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ("gpu-tests", "selfcheck", "methods", "selfcheck-tests", "speed-llava", "speed-4096", "vllm")


def _run(tmp_path, timeout=60, **env):
    full = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def _rows(summary: str) -> dict:
    """step -> (status, seconds) from summary.md's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STEPS:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_out_of_budget_steps_are_skipped_and_still_summarised(tmp_path):
    result = _run(tmp_path, DRY_RUN="1", BUDGET="0", VLLM_WHEEL=str(tmp_path / "missing.whl"))
    assert result.returncode == 0, result.stderr
    rows = _rows((tmp_path / "summary.md").read_text())
    assert list(rows) == list(STEPS)
    assert all(rows[s][0] == "skipped: out of time (budget 0 s)" for s in STEPS[:-1]), rows
    assert rows["vllm"][0] == f"skipped: VLLM_WHEEL={tmp_path / 'missing.whl'} is not a file"
    assert not (tmp_path / ".steps.tsv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_to_use_the_dry_run(tmp_path):
    result = _run(tmp_path, DRY_RUN="0")
    assert result.returncode == 2 and "DRY_RUN=1" in result.stderr


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_step(tmp_path):
    """About 80 s on 2 CPU cores: every step on tiny sizes (vLLM skipped without a wheel)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_WHEEL"}
    full = dict(env, PY=sys.executable, OUT=str(tmp_path), PYTHONPATH=str(REPO), DRY_RUN="1")
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = _rows(summary)
    assert all(rows[s][0] == "ok" for s in STEPS[:-1]), (rows, result.stderr)
    assert rows["vllm"][0].startswith("skipped: no vLLM wheel")
    assert "skipped" in summary and "passed" in summary  # junit counts of the test steps
    check = json.loads((tmp_path / "selfcheck" / "selfcheck.json").read_text())
    assert check["combinations"] == 4 and check["failed"] == 0
    methods = json.loads((tmp_path / "methods" / "methods.json").read_text())["rows"]
    status = {r["method"]: r["status"] for r in methods}
    assert all(
        status[m].startswith("pass") for m in ("act", "softplus", "var", "vhr", "pai", "vaf", "hgai", "spin", "seka")
    ), status
    assert status["agla"] == "skipped"
    assert len(list((tmp_path / "speed").glob("*.md"))) == 2 and "## Speed goals" in summary
