"""The ``attnsteer`` model of lmms-eval (attnsteer.integrations.lmms_eval) on a tiny LLaVA and small
local POPE- and CHAIR-format datasets, through lmms-eval's Python API and its command line. CPU,
offline. Needs lmms-eval: runs in .venv-lmms (scripts/setup_lmms.sh), skips elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="needs lmms-eval (bash scripts/setup_lmms.sh; .venv-lmms)")

import torch
from test_eval_helpers import IMAGE_IDS, build_processor, build_tiny_llava, coco_name, write_images

import attnsteer
from attnsteer.evals.pope import POPEItem, score_pope

ROOT = Path(__file__).resolve().parents[1]
LMMS_TASKS = Path(__import__("lmms_eval").__file__).parent / "tasks"
# a recipe that moves this tiny model's yes/no logits: PAI amplifies attention to image keys
RECIPE = {"interventions": [{"method": "pai", "params": {"alpha": 8.0, "gamma": 1.1}, "layers": "0:"}]}
BASE_ARGS = {"device": "cpu", "device_map": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def yes_no_llava(tmp_path_factory) -> Path:
    """The tiny LLaVA with an output layer that only ever picks "yes" or "no" (rows v and -v, every
    other row 0), so its one-token answers are POPE answers, saved with its processor."""
    folder = tmp_path_factory.mktemp("yes-no-llava")
    model, processor = build_tiny_llava(), build_processor()
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        v = head[yes].clone()
        head.zero_()
        head[yes], head[no] = v, -v
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> dict:
    """POPE- and CHAIR-format datasets (``datasets.save_to_disk``: lmms-eval's ``load_from_disk``) and
    task YAMLs that include lmms-eval's own pope_pop / coco_cap_chair and point them at them."""
    import datasets
    import yaml
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms-tasks")
    images = write_images(root / "val2014")
    objects = ("dog", "car", "chair", "cat")
    rows = []
    for k, image_id in enumerate(IMAGE_IDS):
        for j, answer in enumerate(("yes", "no")):
            rows.append({"question_id": str(len(rows)), "question": f"Is there a {objects[(k + j) % 4]} in the image?",
                         "answer": answer, "image_source": coco_name(image_id)[:-4], "category": "popular",
                         "image": Image.open(images / coco_name(image_id)).convert("RGB")})  # fmt: skip
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image_source": datasets.Value("string"),
                                  "category": datasets.Value("string"), "image": datasets.Image()})  # fmt: skip
    datasets.DatasetDict({"popular": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(root / "pope")
    chair_rows = [{"question_id": str(k), "image_id": image_id, "image": rows[2 * k]["image"],
                   "gt_object": ["person"], "gt_caption": ["a picture"]} for k, image_id in enumerate(IMAGE_IDS[:3])]  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_list(chair_rows)}).save_to_disk(root / "chair")
    folder = root / "yaml"
    folder.mkdir()
    for name, src, data, split in (("attnsteer_test_pope_pop", "pope/pope_pop.yaml", "pope", "popular"),
                                   ("attnsteer_test_chair", "coco_cap_chair/coco_cap_chair.yaml", "chair", "test")):  # fmt: skip
        cfg = {"include": str(LMMS_TASKS / src), "task": name, "dataset_path": str(root / data),
               "dataset_kwargs": {"load_from_disk": True}, "test_split": split,
               # one token: the tiny model answers "yes" or "no" (lmms-eval's own tasks allow 128 / 2048)
               "generation_kwargs": {"max_new_tokens": 1, "temperature": 0, "do_sample": False, "until": []}}  # fmt: skip
        if name.endswith("pope_pop"):
            cfg["dataset_name"] = None
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"yaml": folder, "rows": rows}


def _evaluate(model, tasks, local_tasks, model_args=None, predict_only=False):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(local_tasks["yaml"]))
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, log_samples=True,
                           batch_size=1, device="cpu", predict_only=predict_only)  # fmt: skip


def _predictions(out, task) -> dict[str, str]:
    return {s["doc"]["question_id"]: s["filtered_resps"][0] for s in out["samples"][task]}


def _pope_items(rows) -> list[POPEItem]:
    return [POPEItem(r["question_id"], r["image_source"] + ".jpg", r["question"], r["answer"], "popular", "coco")
            for r in rows]  # fmt: skip


def test_pope_through_the_plugin_scores_like_attnsteers_pope_scorer(yes_no_llava, local_tasks):
    from lmms_eval.models.chat.llava_hf import LlavaHf

    from attnsteer.integrations.lmms_eval import AttnsteerLMMS

    task = "attnsteer_test_pope_pop"
    baseline = AttnsteerLMMS(pretrained=str(yes_no_llava), recipe="none", **BASE_ARGS)
    plain = LlavaHf(pretrained=str(yes_no_llava), **BASE_ARGS)
    steered = AttnsteerLMMS(pretrained=str(yes_no_llava), recipe=RECIPE, **BASE_ARGS)
    outs = {name: _evaluate(lm, [task], local_tasks) for name, lm in
            (("baseline", baseline), ("plain", plain), ("steered", steered))}  # fmt: skip
    preds = {name: _predictions(out, task) for name, out in outs.items()}
    n = len(local_tasks["rows"])
    assert all(len(p) == n and set(p.values()) <= {"yes", "no"} for p in preds.values())
    # the recipe changes answers; the unsteered plugin answers as lmms-eval's own model class
    assert sum(preds["baseline"][q] != preds["steered"][q] for q in preds["baseline"]) >= 1
    assert preds["baseline"] == preds["plain"]
    items = _pope_items(local_tasks["rows"])
    for name in ("baseline", "steered"):
        ours = score_pope(items, {it.key: preds[name][it.question_id] for it in items}, parser="strict")
        got = outs[name]["results"][task]
        expected = ours["per_split"]["popular"]
        for metric, key in (("accuracy", "pope_accuracy"), ("precision", "pope_precision"),
                            ("recall", "pope_recall"), ("f1", "pope_f1_score")):  # fmt: skip
            assert got[f"{key},none"] == pytest.approx(expected[metric], abs=1e-12), (name, metric)
    info = outs["steered"]["config"]["attnsteer"]
    assert info["recipe_hash"] == attnsteer.Recipe.from_dict(RECIPE).hash
    assert info["recipe_applied"]["interventions"][0]["method"] == "pai"
    assert outs["baseline"]["config"]["attnsteer"]["recipe_hash"] == "none"
    assert "attnsteer" not in outs["plain"]["config"]


def test_the_question_without_its_answer_format_suffix_reaches_the_steering(yes_no_llava, local_tasks):
    from attnsteer.integrations.lmms_eval import AttnsteerLMMS

    lm = AttnsteerLMMS(pretrained=str(yes_no_llava), recipe=RECIPE, **BASE_ARGS)
    seen = []
    lm.attnsteer_handle.prompt_text = lambda texts, real=lm.attnsteer_handle.prompt_text: (
        seen.append(texts) or real(texts)
    )
    _evaluate(lm, ["attnsteer_test_pope_pop"], local_tasks)
    questions = {r["question"] for r in local_tasks["rows"]}
    assert len(seen) == len(local_tasks["rows"]) and {t[0] for t in seen} == questions  # no "Answer the question..."
    assert lm.processor is lm.inner._image_processor and lm.base == "llava_hf"  # what attnsteer.apply(processor=) got
    lm.remove_steering()


def test_chair_format_task_runs_through_the_plugin(yes_no_llava, local_tasks):
    """coco_cap_chair's prompt and data path; its metric needs NLTK data (none offline): predictions only."""
    from attnsteer.integrations.lmms_eval import AttnsteerLMMS

    lm = AttnsteerLMMS(pretrained=str(yes_no_llava), recipe=RECIPE, **BASE_ARGS)
    out = _evaluate(lm, ["attnsteer_test_chair"], local_tasks, predict_only=True)
    preds = _predictions(out, "attnsteer_test_chair")
    assert len(preds) == 3 and set(preds.values()) <= {"yes", "no"}
    assert out["config"]["attnsteer"]["recipe_hash"] == attnsteer.Recipe.from_dict(RECIPE).hash
    lm.remove_steering()


def test_lmms_eval_command_line_loads_the_plugin_by_its_entry_point(yes_no_llava, local_tasks, tmp_path):
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "attnsteer", "--model_args",
           f"pretrained={yes_no_llava},recipe=pai-llava15,device_map=cpu,dtype=float32", "--tasks",
           "attnsteer_test_pope_pop", "--include_path", str(local_tasks["yaml"]), "--batch_size", "1",
           "--device", "cpu", "--output_path", str(out_dir), "--limit", "4"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out_dir.rglob("*results*.json"))
    assert files, proc.stderr[-2000:]
    result = json.loads(files[0].read_text())
    assert "pope_accuracy,none" in result["results"]["attnsteer_test_pope_pop"]
    assert result["config"]["attnsteer"]["recipe_hash"] == attnsteer.Recipe.from_pretrained("pai-llava15").hash
