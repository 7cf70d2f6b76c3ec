"""lm-eval through `attnsteer eval mmlu` on the shipped multiple-choice set with SmolLM2: baseline vs
recipe, identical at batch sizes 1 and 4, resume; the set itself; task errors. CPU, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_helpers import read_results, read_samples

pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'attnsteer[eval]')")

from attnsteer.cli import main
from attnsteer.evals.tasks import mmlu

SUBJECTS = ("arithmetic", "general_knowledge", "geography", "science")


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_shipped_set_is_well_formed():
    folder = mmlu.packaged_tasks_dir()
    questions = set()
    for split, n in (("test", 24), ("dev", 5)):
        positions = [0, 0, 0, 0]
        for subject in SUBJECTS:
            rows = [json.loads(line) for line in (folder / split / f"{subject}.jsonl").read_text().splitlines()]
            assert len(rows) == n
            for r in rows:
                assert set(r) == {"question", "subject", "choices", "answer"} and r["subject"] == subject
                assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and r["answer"] in range(4)
                assert r["question"] not in questions
                questions.add(r["question"])
                positions[r["answer"]] += 1
        if split == "test":
            assert positions == [24, 24, 24, 24]  # no answer-position bias
    names = mmlu._yaml_names(folder)
    assert {"attnsteer_mc_demo", "attnsteer_mc_demo_mmlu"} <= set(names)
    assert {f"attnsteer_mc_demo_{s}" for s in SUBJECTS} <= set(names)


def test_materialize_makes_data_files_absolute(tmp_path):
    files = mmlu.materialize(mmlu.packaged_tasks_dir(), tmp_path)
    assert len(files) == 8 and all(f.is_file() for f in files)
    import yaml

    cfg = yaml.safe_load((tmp_path / "attnsteer_mc_demo_science.yaml").read_text())
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert (tmp_path / "_cloze_template_yaml").is_file()


def mc_argv(out, batch, *extra):
    return [
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
        str(batch),
        "--log_samples",
        "--output_path",
        out,
        *extra,
    ]


def _docs(run_dir):
    return {(s["recipe"], s["task"], s["doc_id"]): s for s in read_samples(run_dir) if s.get("kind") == "doc"}


def test_lm_eval_baseline_vs_recipe_identical_at_batch_sizes_1_and_4(smollm2, tmp_path, capsys, monkeypatch):
    code, out, _ = cli(capsys, *mc_argv(tmp_path / "b1", 1))
    assert code == 0
    assert "| metric | baseline | act-default | delta |" in out and "attnsteer_mc_demo acc" in out
    code, _, _ = cli(capsys, *mc_argv(tmp_path / "b4", 4))
    assert code == 0
    r1, r4 = read_results(tmp_path / "b1"), read_results(tmp_path / "b4")
    for label in ("baseline", "act-default"):
        assert r1["metrics"][label]["summary"] == r4["metrics"][label]["summary"]
        assert "attnsteer_mc_demo/acc" in r1["metrics"][label]["summary"]
        assert "attnsteer_mc_demo/acc" in r1["metrics"][label]["summary_stderr"]
    d1, d4 = _docs(tmp_path / "b1"), _docs(tmp_path / "b4")
    assert d1.keys() == d4.keys() and len(d1) == 2 * 4 * 2  # recipes x subjects x limit
    for key in d1:
        a = [x[0] for x in d1[key]["resps"]]
        b = [x[0] for x in d4[key]["resps"]]
        assert a == pytest.approx(b, abs=1e-4)
        assert d1[key]["acc"] == d4[key]["acc"]
    # the recipe changes the model's log-likelihoods, and the results say which recipe it was
    assert any(d1[("baseline", t, i)]["resps"] != d1[("act-default", t, i)]["resps"] for _, t, i in d1)
    rec = r1["recipes"]["act-default"]
    assert len(rec["hash"]) == 64 and rec["recipe"]["interventions"][0]["method"] == "act"
    applied = rec["applied"]["interventions"][0]  # the concrete sites that ran: ACT's "2:-1"
    assert applied["heads"] == "all" and applied["layers"][0] == 2 and all(type(x) is int for x in applied["layers"])
    assert r1["config"]["num_fewshot_used"] == 0 and r1["config"]["n_questions"] == 8
    assert r1["identity"]["lm_eval"]
    # rerunning the same command recomputes nothing
    calls = []
    import lm_eval

    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = cli(capsys, *mc_argv(tmp_path / "b4", 4))
    assert code == 0 and calls == [] and "2 finished item(s) are kept, 0 to go" in err
    assert read_results(tmp_path / "b4")["metrics"]["act-default"]["summary"] == r4["metrics"]["act-default"]["summary"]


def test_unknown_task_and_changed_task_are_errors(tmp_path, capsys):
    code, _, err = cli(
        capsys, "eval", "mmlu", "--model", "smollm2", "--tasks", "no_such_task_xyz", "--output_path", tmp_path / "x"
    )
    assert code == 2 and "unknown lm-eval task(s) ['no_such_task_xyz']" in err and "attnsteer_mc_demo" in err
    assert not (tmp_path / "x").exists()


def test_fewshot_default_is_stated_for_mmlu():
    assert mmlu._fewshot_default(["mmlu"], None) == 5
    assert mmlu._fewshot_default(["mmlu_abstract_algebra"], None) == 5
    assert mmlu._fewshot_default(["attnsteer_mc_demo"], None) is None
    assert mmlu._fewshot_default(["mmlu"], 0) == 0
    assert mmlu.parse_tasks(["a,b", "c", "a"]) == ["a", "b", "c"]
