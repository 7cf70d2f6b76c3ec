"""End-to-end POPE and CHAIR runs (baseline) on a tiny LLaVA with synthetic images, resume after an
interrupted run, rescoring, and the missing-data errors. CPU, offline."""

from __future__ import annotations

import json

import pytest
from test_eval_helpers import (  # noqa: F401  (fixtures)
    IMAGE_IDS,
    eval_data,
    read_results,
    read_samples,
    tiny_llava_dir,
)

from attnsteer.cli import main
from attnsteer.evals import generation, vlm
from attnsteer.evals.pope import POPEItem, score_pope


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def pope_argv(model, data, out, *extra):
    return [
        "eval",
        "pope",
        "--model",
        model,
        "--pope_dir",
        data["pope"],
        "--coco_dir",
        data["images"],
        "--output_path",
        out,
        "--no_progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def pope_run(tiny_llava_dir, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pope") / "run"
    code = main([str(a) for a in pope_argv(tiny_llava_dir, eval_data, out, "--recipe", "none", "--batch_size", "4")])
    assert code == 0
    return out


def test_pope_baseline_results_and_samples(pope_run, eval_data):
    res = read_results(pope_run)
    assert res["status"] == "complete" and res["task"] == "pope"
    base = res["metrics"]["baseline"]
    summary = base["summary"]
    for key in (
        "f1_mean",
        "acc_mean",
        "f1_pooled",
        "acc_pooled",
        "yes_ratio_pooled",
        "unknown",
        "random/f1",
        "popular/acc",
        "adversarial/yes_ratio",
    ):
        assert key in summary
    cfg = res["config"]
    assert set(cfg["data"]["files"]) == {"random", "popular", "adversarial"}
    assert all(len(f["sha256"]) == 64 for f in cfg["data"]["files"].values())
    assert cfg["prompt_template"].endswith("Please answer this question with one word.")
    assert cfg["decoding"] == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1, "strategy": "greedy"}
    assert cfg["parser"] == "pope" and res["seeds"] == [0]
    assert "<image>" in cfg["prompt_example"]
    assert res["recipes"]["baseline"]["hash"] == "none"
    for key in ("versions", "git", "machine", "timings", "sessions"):
        assert res[key]
    assert "mean" in res["aggregates"] and "pooled" in res["aggregates"]
    samples = read_samples(pope_run)
    assert len(samples) == 24 and len({s["key"] for s in samples}) == 24
    assert set(samples[0]["parsed"]) == {"pope", "opera", "strict"}
    # the metrics are exactly those of the scorer on the logged raw outputs
    items = [POPEItem(s["question_id"], s["image"], s["question"], s["label"], s["split"], "coco") for s in samples]
    scores = score_pope(items, [s["output"] for s in samples], "pope")
    assert summary["f1_mean"] == pytest.approx(scores["mean_over_splits"]["f1"])
    assert summary["acc_pooled"] == pytest.approx(scores["pooled"]["accuracy"])


def test_pope_batch_size_one_gives_the_same_outputs(pope_run, tiny_llava_dir, eval_data, tmp_path, capsys):
    code, _, _ = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "b1", "--batch_size", "1"))
    assert code == 0
    one = {s["key"]: s["output"] for s in read_samples(tmp_path / "b1")}
    four = {s["key"]: s["output"] for s in read_samples(pope_run)}
    assert one == four


@pytest.mark.parametrize("stop", ["crash", "ctrl-c"])
def test_interrupted_run_resumes_without_recomputing(
    pope_run, tiny_llava_dir, eval_data, tmp_path, capsys, monkeypatch, stop
):
    real = generation.generate_batch
    calls = {"batches": 0, "items": 0}

    def crashing(model, builder, items, decoding, device, handle=None):
        if calls["batches"] == 3:
            raise RuntimeError("simulated crash") if stop == "crash" else KeyboardInterrupt()
        calls["batches"] += 1
        calls["items"] += len(items)
        return real(model, builder, items, decoding, device, handle)

    monkeypatch.setattr(generation, "generate_batch", crashing)
    argv = [str(a) for a in pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", "--batch_size", "2")]
    if stop == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(argv)
    else:
        assert main(argv) == 130
    _, err = capsys.readouterr()
    first = read_samples(tmp_path / "run")
    status = read_results(tmp_path / "run")
    # not left "running": the status says what happened, and both the file and the message say how to resume
    assert len(first) == 6 and status["status"] == ("failed" if stop == "crash" else "interrupted")
    hint = f"rerun the same command (with --output_path {tmp_path / 'run'}) to resume it"
    assert status["resume"] == hint and hint in err and "6 finished sample(s) are kept" in err
    assert status["stopped"]["reason"] == ("RuntimeError: simulated crash" if stop == "crash" else "KeyboardInterrupt")
    if stop == "crash":
        return  # resuming is the same after either stop: the Ctrl-C case goes on

    def counting(model, builder, items, decoding, device, handle=None):
        calls["items"] += len(items)
        return real(model, builder, items, decoding, device, handle)

    calls["items"] = 0
    monkeypatch.setattr(generation, "generate_batch", counting)
    code, _, err = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", "--batch_size", "2"))
    assert code == 0 and "6 finished item(s) are kept, 18 to go" in err
    assert calls["items"] == 18  # nothing finished is recomputed
    final = read_samples(tmp_path / "run")
    assert final[:6] == first and len(final) == 24
    resumed = read_results(tmp_path / "run")
    assert resumed["status"] == "complete" and "resume" not in resumed
    assert [s.get("status") for s in resumed["sessions"]] == ["interrupted", None]  # the stop stays on record
    # same numbers as the uninterrupted run
    assert (
        read_results(tmp_path / "run")["metrics"]["baseline"]["summary"]
        == read_results(pope_run)["metrics"]["baseline"]["summary"]
    )
    # a rerun generates nothing, and may rescore with another parser
    calls["items"] = 0
    code, out, _ = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", "--parser", "strict"))
    assert code == 0 and calls["items"] == 0 and "parser strict" in out


def test_the_runs_notes_are_printed_once_as_worded(tiny_llava_dir, eval_data, tmp_path, capsys):
    argv = pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", "--seed", "0", "--seed", "1", "--limit", "1")
    code, _, err = cli(capsys, *argv, "--splits", "random")
    assert code == 0
    assert err.count("note: decoding is greedy, so every seed gives the same outputs") == 1
    assert "note: note:" not in err and err.count("run directory: ") == 1


def test_changed_settings_are_refused(pope_run, tiny_llava_dir, eval_data, capsys):
    code, _, err = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, pope_run, "--max_new_tokens", "8"))
    assert code == 2 and "decoding.max_new_tokens: 16 in the existing run, 8 now" in err


def test_pope_recipe_on_llava_runs_or_fails_cleanly(tiny_llava_dir, eval_data, tmp_path, capsys):
    """Steered VLM runs need the core's LLaVA support; until then the error names the recipe and model."""
    argv = ["--recipe", "none", "--recipe", "act-default", "--limit", "3", "--splits", "random"]
    code, out, err = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", *argv, "--batch_size", "3"))
    if code == 0:
        res = read_results(tmp_path / "run")
        assert set(res["metrics"]) == {"baseline", "act-default"}
        assert res["recipes"]["act-default"]["recipe"]["interventions"][0]["method"] == "act"
        assert res["recipes"]["act-default"]["applied"]["interventions"][0]["layers"][0] == 2
        assert "| baseline | act-default | delta |" in out
        assert res["steering"]["act-default"]["calls"] > 0
        # steered generation does not depend on the batch either (left padding)
        code, _, _ = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "b1", *argv, "--batch_size", "1"))
        assert code == 0
        assert {s["key"]: s["output"] for s in read_samples(tmp_path / "b1")} == {
            s["key"]: s["output"] for s in read_samples(tmp_path / "run")
        }
    else:
        assert code == 2 and "--recipe 'act-default' cannot steer --model" in err


def test_chair_baseline_end_to_end_and_rescoring(tiny_llava_dir, eval_data, tmp_path, capsys):
    run = tmp_path / "chair"
    code, out, _ = cli(
        capsys,
        "eval",
        "chair",
        "--model",
        tiny_llava_dir,
        "--coco_dir",
        eval_data["images"],
        "--gt",
        eval_data["gt"],
        "--synonyms",
        eval_data["synonyms"],
        "--num_images",
        "5",
        "--image_seed",
        "3",
        "--max_new_tokens",
        "24",
        "--batch_size",
        "3",
        "--output_path",
        run,
        "--no_progress",
        "--lemmatizer",
        "rules",
    )
    assert code == 0 and "CHAIR_s" in out
    res = read_results(run)
    images = json.loads((run / "chair_images.json").read_text())
    import random

    assert images["image_ids"] == random.Random(3).sample(sorted(IMAGE_IDS), 5)
    assert res["config"]["image_ids"] == images["image_ids"]
    assert res["config"]["drop_incomplete"] is True  # max_new_tokens <= 64: OPERA's short setting
    summary = res["metrics"]["baseline"]["summary"]
    for key in ("CHAIRs", "CHAIRi", "Recall", "Len", "repetition_rate", "n_captions"):
        assert key in summary
    assert summary["n_captions"] == 5
    assert len(read_samples(run)) == 5
    # rescoring our own samples file with no model gives the same numbers
    code, out, _ = cli(
        capsys,
        "eval",
        "chair",
        "--captions",
        run / "samples.jsonl",
        "--caption_key",
        "output",
        "--gt",
        eval_data["gt"],
        "--synonyms",
        eval_data["synonyms"],
        "--lemmatizer",
        "rules",
        "--drop_incomplete",
        "yes",
        "--output_path",
        tmp_path / "rescored",
    )
    assert code == 0
    rescored = read_results(tmp_path / "rescored")["metrics"]["samples"]["summary"]
    for key in ("CHAIRs", "CHAIRi", "Recall", "Len"):
        assert rescored[key] == pytest.approx(summary[key])


def test_chair_image_list(tiny_llava_dir, eval_data, tmp_path, capsys):
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(f"COCO_val2014_{i:012d}.jpg" for i in IMAGE_IDS[5:]) + "\n")
    code, _, _ = cli(
        capsys,
        "eval",
        "chair",
        "--model",
        tiny_llava_dir,
        "--coco_dir",
        eval_data["images"],
        "--gt",
        eval_data["gt"],
        "--synonyms",
        eval_data["synonyms"],
        "--image_list",
        listing,
        "--max_new_tokens",
        "12",
        "--drop_incomplete",
        "no",
        "--output_path",
        tmp_path / "run",
        "--no_progress",
        "--lemmatizer",
        "rules",
        "--limit",
        "2",
    )
    assert code == 0
    res = read_results(tmp_path / "run")
    assert res["config"]["image_ids"] == IMAGE_IDS[5:7]
    assert res["config"]["drop_incomplete"] is False
    assert res["config"]["data"]["images"]["method"] == "list"


def test_rescore_published_opera_log(capsys, tmp_path):
    from conftest import SHARED_DATA

    log = SHARED_DATA / "chair" / "opera_chair_eval_results" / "llava-1.5" / "greedy.jsonl"
    if not log.is_file():
        pytest.skip("shared CHAIR data not available")
    code, out, _ = cli(
        capsys,
        "eval",
        "chair",
        "--captions",
        log,
        "--gt",
        SHARED_DATA / "chair" / "gt_coco2014.json",
        "--synonyms",
        SHARED_DATA / "chair" / "synonyms.txt",
        "--lemmatizer",
        "rules",
        "--output_path",
        tmp_path / "r",
    )
    assert code == 0 and "greedy" in out
    m = read_results(tmp_path / "r")["metrics"]["greedy"]["summary"]
    assert m["n_captions"] == 500 and 0.3 < m["CHAIRs"] < 0.7


# ---- missing data ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        "no_pope_dir",
        "empty_pope_dir",
        "no_coco_dir",
        "missing_images",
        "smollm2",
        "hf_offline",
        "chair_no_coco",
        "chair_no_gt",
        "chair_no_synonyms",
        "chair_too_few_images",
        "captions_with_model",
    ],
)
def test_missing_data_errors_say_what_to_download(case, tiny_llava_dir, eval_data, tmp_path, capsys, monkeypatch):
    d, m = eval_data, tiny_llava_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    chair = ["eval", "chair", "--model", m, "--output_path", tmp_path / "c"]
    cases = {
        "no_pope_dir": (
            ["eval", "pope", "--model", m],
            ["github.com/RUCAIBox/POPE", "--pope_dir", "val2014.zip", "--hf"],
        ),
        "empty_pope_dir": (
            ["eval", "pope", "--model", m, "--pope_dir", empty],
            ["coco_pope_random.json", "RUCAIBox/POPE"],
        ),
        "no_coco_dir": (
            ["eval", "pope", "--model", m, "--pope_dir", d["pope"]],
            ["--coco_dir is missing", "val2014.zip"],
        ),
        "missing_images": (
            ["eval", "pope", "--model", m, "--pope_dir", d["pope"], "--coco_dir", empty],
            ["4 images the questions need are not there", "COCO_val2014_000000002239.jpg", "val2014.zip"],
        ),
        "smollm2": (
            [
                "eval",
                "pope",
                "--model",
                "smollm2",
                "--pope_dir",
                d["pope"],
                "--coco_dir",
                d["images"],
                "--output_path",
                tmp_path / "s",
            ],
            ["vision-language model"],
        ),
        "hf_offline": (
            ["eval", "pope", "--model", m, "--hf", "--splits", "random"],
            ["lmms-lab/POPE", "huggingface-cli download", "--pope_dir"],
        ),
        "chair_no_coco": (
            chair + ["--gt", d["gt"], "--synonyms", d["synonyms"]],
            ["--coco_dir is missing", "val2014.zip"],
        ),
        "chair_no_gt": (
            chair + ["--coco_dir", d["images"], "--synonyms", d["synonyms"], "--num_images", "2"],
            ["annotations_trainval2014.zip", "--gt FILE", "--coco_annotations"],
        ),
        "chair_no_synonyms": (
            chair + ["--coco_dir", d["images"], "--gt", d["gt"]],
            ["--synonyms is missing", "LisaAnne/Hallucination"],
        ),
        "chair_too_few_images": (
            chair + ["--coco_dir", d["images"], "--gt", d["gt"], "--synonyms", d["synonyms"]],
            ["holds 8 COCO images but --num_images is 500", "val2014"],
        ),
        "captions_with_model": (
            chair + ["--captions", d["gt"], "--gt", d["gt"], "--synonyms", d["synonyms"]],
            ["loads no model"],
        ),
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv, needles = cases[case]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    for needle in needles:
        assert needle in err, (needle, err)
    assert len(err.strip().splitlines()) <= 2


def test_pope_runs_the_agla_builtins_like_any_recipe(tiny_llava_dir, eval_data, tmp_path, capsys, monkeypatch):
    """Both AGLA built-ins through `attnsteer eval pope`: blip_itm (its checkpoint replaced by a
    tiny random BLIP, as nothing can be downloaded here) is given the POPE question itself."""
    from test_agla_blip_matcher import _blip

    from attnsteer.methods import agla_matchers

    blip = _blip(tmp_path)
    asked = []
    real = agla_matchers.BlipItmMatcher.relevance

    def relevance(self, images, texts, device, dtype):
        asked.extend(texts)
        return real(self, images, texts, device, dtype)

    monkeypatch.setattr(agla_matchers, "load_blip", lambda checkpoint: blip)
    monkeypatch.setattr(agla_matchers.BlipItmMatcher, "relevance", relevance)
    argv = pope_argv(tiny_llava_dir, eval_data, tmp_path / "agla", "--recipe", "none", "--recipe", "agla-llava15")
    code, _, err = cli(capsys, *argv, "--recipe", "agla-lvlm-attention", "--limit", "2", "--batch_size", "2")
    assert code == 0, err
    res = read_results(tmp_path / "agla")
    assert set(res["metrics"]) == {"baseline", "agla-llava15", "agla-lvlm-attention"}
    samples = read_samples(tmp_path / "agla")
    questions = {s["question"] for s in samples}
    assert asked and set(asked) <= questions  # the question, without the answer-format suffix


def test_generate_saves_the_agla_views_next_to_the_originals(tiny_llava_dir, eval_data, tmp_path, capsys):
    from PIL import Image

    image = sorted(eval_data["images"].glob("*.jpg"))[0]
    views = tmp_path / "views"
    code, out, err = cli(
        capsys, "generate", "--model", tiny_llava_dir, "--image", image, "--prompt", "Is there a dog?",
        "--prompt", "Describe it.", "--recipe", "agla-lvlm-attention", "--max_new_tokens", "3", "--save-views", views,
    )  # fmt: skip
    assert code == 0, err
    assert "[baseline] prompt 1" in out and "[agla-lvlm-attention] prompt 2" in out
    files = sorted(p.name for p in (views / "agla-lvlm-attention").iterdir())
    assert files == [f"prompt{i}_image1_{kind}.png" for i in (1, 2) for kind in ("augmented", "original")]
    original = Image.open(views / "agla-lvlm-attention" / "prompt1_image1_original.png")
    augmented = Image.open(views / "agla-lvlm-attention" / "prompt1_image1_augmented.png")
    assert original.size == augmented.size
    import numpy as np

    black = (np.asarray(augmented).max(-1) == 0).mean()
    assert 0.4 <= black <= 0.6  # half of the pixels, the least relevant ones


def test_generate_save_views_without_an_agla_recipe_is_an_error(tiny_llava_dir, eval_data, tmp_path, capsys):
    image = sorted(eval_data["images"].glob("*.jpg"))[0]
    code, _, err = cli(
        capsys, "generate", "--model", tiny_llava_dir, "--image", image, "--prompt", "Hi", "--recipe", "vhr-llava15",
        "--max_new_tokens", "2", "--save-views", tmp_path / "v",
    )  # fmt: skip
    assert code == 2 and "--save-views" in err and "agla" in err.lower()


@pytest.mark.parametrize("chat", [True, False])
def test_generate_vlm_honours_no_chat_and_writes_output_path(tiny_llava_dir, eval_data, tmp_path, capsys, chat):
    image = sorted(eval_data["images"].glob("*.jpg"))[0]
    out_file = tmp_path / "vlm.json"
    code, out, err = cli(
        capsys, "generate", "--model", tiny_llava_dir, "--image", image, "--prompt", "Is there a dog?",
        "--recipe", "vhr-llava15", "--max_new_tokens", "2", "--output_path", out_file,
        *([] if chat else ["--no-chat"]),
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out_file.read_text())
    assert record["chat"] is chat
    text = record["results"][0]["prompt_text"]
    if chat:  # the processor's chat template (tests/test_eval_helpers.py CHAT_TEMPLATE)
        assert text.startswith("user : <image>") and text.endswith("assistant :")
    else:  # no template: the image token the processor expands, then the prompt as given
        assert text == "<image>\nIs there a dog?"
    assert set(record["results"][0]["outputs"]) == {"baseline", "vhr-llava15"}


def test_vlm_inputs_without_chat_needs_an_image_token():
    from test_eval_helpers import build_processor

    from attnsteer.errors import EvalError

    processor = build_processor()
    assert vlm.VLMInputs(processor, chat=False).prompt_text("Hi", with_image=False) == "Hi"
    processor.image_token = None
    with pytest.raises(EvalError, match="--no-chat") as err:
        vlm.VLMInputs(processor, "m", chat=False)
    assert "Fix: drop --no-chat" in str(err.value)


def test_no_chat_is_refused_for_a_family_that_wraps_its_images_in_marker_tokens():
    """Qwen2-VL writes <|vision_start|> ... <|vision_end|> around the image token in its chat
    template; without the template those markers would be missing, so --no-chat is refused."""
    from test_eval_helpers import build_processor
    from vlm_fixtures import build_vlm

    from attnsteer.errors import EvalError

    processor = build_processor()
    vlm.VLMInputs(processor, "m", chat=False, model=build_vlm("llava"))  # no markers: accepted
    with pytest.raises(EvalError, match=r"--no-chat: --model 'm' \(qwen2_vl\) wraps each image.*Fix: drop --no-chat"):
        vlm.VLMInputs(processor, "m", chat=False, model=build_vlm("qwen2_vl"))


# the newer methods' recipes, on every layer of the tiny LLaVA (the built-ins name LLaVA-1.5-7B's layers)
NEW_METHOD_RECIPES = {
    "vaf": {"method": "vaf", "layers": "all", "params": {"alpha": 1.6, "beta": 0.6}},
    "hgai": {"method": "hgai", "layers": "all", "params": {"alpha": 0.8}},
    "spin": {"method": "spin", "layers": "all", "params": {"rho": 0.5, "eps": 0.1}},
}


def test_pope_and_compare_take_the_newer_methods_like_any_recipe(tiny_llava_dir, eval_data, tmp_path, capsys):
    import yaml

    argv = ["--recipe", "none"]
    for name, intervention in NEW_METHOD_RECIPES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"schema_version": 1, "name": name, "interventions": [intervention]}))
        argv += ["--recipe", path]
    code, out, err = cli(capsys, *pope_argv(tiny_llava_dir, eval_data, tmp_path / "run", *argv, "--limit", "3"))
    assert code == 0, err
    res = read_results(tmp_path / "run")
    assert set(res["metrics"]) == {"baseline", *NEW_METHOD_RECIPES}
    for name in NEW_METHOD_RECIPES:
        assert res["recipes"][name]["recipe"]["interventions"][0]["method"] == name
        assert res["steering"][name]["calls"] > 0 and res["steering"][name]["rows_modified"] > 0, res["steering"]
    code, out, err = cli(capsys, "compare", tmp_path / "run", "--output_path", tmp_path / "cmp", "--no_plot")
    assert code == 0, err
    assert all(f"| {name} " in out or f" {name} |" in out for name in NEW_METHOD_RECIPES), out
