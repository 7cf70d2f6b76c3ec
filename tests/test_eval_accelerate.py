"""`accelerate launch` with 2 CPU processes gives the same samples and metrics as one process.

On a CPU-only machine accelerate starts several processes through torchrun with ``--multi_gpu``
(``--cpu`` alone needs MPI); attnsteer's runner then uses gloo. Each process takes the items with
``index % 2 == rank`` and the main process merges the samples and scores them.
"""

from __future__ import annotations

import shutil

import pytest
from test_eval_helpers import eval_data, read_results, read_samples, run_cli, tiny_llava_dir  # noqa: F401

from attnsteer.evals.results import SAMPLES_FILE


def accelerate_cmd():
    exe = shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate CLI not installed")
    return [
        exe,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "attnsteer.cli",
    ]


def _launch(args, tmp_path):
    import os
    import subprocess

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [*accelerate_cmd(), *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pope_two_processes_equal_one(tiny_llava_dir, eval_data, tmp_path):
    common = [
        "eval",
        "pope",
        "--model",
        tiny_llava_dir,
        "--pope_dir",
        eval_data["pope"],
        "--coco_dir",
        eval_data["images"],
        "--recipe",
        "none",
        "--batch_size",
        "2",
        "--no_progress",
    ]
    one = run_cli(*common, "--output_path", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    _launch([*common, "--output_path", tmp_path / "two"], tmp_path)
    r1, r2 = read_results(tmp_path / "one"), read_results(tmp_path / "two")
    assert r2["sessions"][-1]["world_size"] == 2 and r1["sessions"][-1]["world_size"] == 1
    assert r1["metrics"]["baseline"]["summary"] == r2["metrics"]["baseline"]["summary"]
    s1 = {s["key"]: s["output"] for s in read_samples(tmp_path / "one")}
    s2 = {s["key"]: s["output"] for s in read_samples(tmp_path / "two")}
    assert s1 == s2 and len(s2) == 24
    # the per-process files were merged into samples.jsonl and removed
    assert sorted(p.name for p in (tmp_path / "two").glob("samples*.jsonl")) == [SAMPLES_FILE]


@pytest.mark.slow
def test_mmlu_two_processes_equal_one(smollm2, tmp_path):
    pytest.importorskip("lm_eval")
    common = [
        "eval",
        "mmlu",
        "--model",
        "smollm2",
        "--tasks",
        "attnsteer_mc_demo",
        "--recipe",
        "none",
        "--recipe",
        "act-default",
        "--limit",
        "2",
        "--batch_size",
        "4",
    ]
    one = run_cli(*common, "--output_path", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    _launch([*common, "--output_path", tmp_path / "two"], tmp_path)
    r1, r2 = read_results(tmp_path / "one"), read_results(tmp_path / "two")
    assert r2["sessions"][-1]["world_size"] == 2
    for label in ("baseline", "act-default"):
        assert r1["metrics"][label]["summary"] == r2["metrics"][label]["summary"]
