"""The evaluations from Python, on a model the caller already holds (no argparse, no model loading):
each benchmark's ``evaluate(model, processor_or_tokenizer, recipes, config)`` gives the same
results record as the command line on the same settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_eval_helpers import eval_data, read_results, tiny_llava_dir  # noqa: F401  (fixtures)

import attnsteer
from attnsteer.cli import main
from attnsteer.evals import chair_run, pope_run


def _load_vlm(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return processor, model.eval()


def test_config_dataclasses_mirror_the_command_line_options():
    for config_class in (pope_run.PopeConfig, chair_run.ChairConfig):
        assert dataclasses.is_dataclass(config_class)
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for name in ("model", "recipe", "seed", "limit", "batch_size", "output_path", "backend"):
            assert name in fields and fields[name].metadata["help"]
        assert config_class().batch_size == 1 and config_class().backend == "auto"
    assert pope_run.PopeConfig().max_new_tokens == 16 and chair_run.ChairConfig().max_new_tokens == 512


def test_pope_evaluate_on_a_loaded_model_equals_the_cli(tiny_llava_dir, eval_data, tmp_path, capsys):  # noqa: F811
    recipe = attnsteer.load_recipe(
        {"name": "pai-small", "interventions": [{"method": "pai", "params": {"alpha": 0.3}}]}
    )
    common = dict(pope_dir=str(eval_data["pope"]), coco_dir=str(eval_data["images"]), limit=4, no_progress=True)
    processor, model = _load_vlm(tiny_llava_dir)
    record = pope_run.evaluate(model, processor, ["none", recipe], output_path=str(tmp_path / "api"), **common)
    assert set(record["metrics"]) == {"baseline", "pai-small"}
    assert record["recipes"]["pai-small"]["applied"]["interventions"][0]["method"] == "pai"
    assert read_results(tmp_path / "api")["metrics"] == record["metrics"]
    # the model is left as it was: no steering after evaluate() returns
    assert model not in attnsteer.api._STEERED and model.config.text_config._attn_implementation == "sdpa"
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    argv = [
        "eval",
        "pope",
        "--model",
        str(tiny_llava_dir),
        "--pope_dir",
        str(eval_data["pope"]),
        "--coco_dir",
        str(eval_data["images"]),
        "--limit",
        "4",
        "--no_progress",
        "--recipe",
        "none",
        "--recipe",
        str(path),
        "--output_path",
        str(tmp_path / "cli"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    from_cli = read_results(tmp_path / "cli")
    for label in ("baseline", "pai-small"):
        assert from_cli["metrics"][label]["summary"] == record["metrics"][label]["summary"]


def test_chair_evaluate_on_a_loaded_model(tiny_llava_dir, eval_data, tmp_path):  # noqa: F811
    processor, model = _load_vlm(tiny_llava_dir)
    config = chair_run.ChairConfig(
        coco_dir=str(eval_data["images"]),
        gt=str(eval_data["gt"]),
        synonyms=str(eval_data["synonyms"]),
        num_images=3,
        max_new_tokens=8,
        no_progress=True,
        output_path=str(tmp_path / "chair"),
    )
    record = chair_run.evaluate(model, processor, ["none", "act-default"], config)
    assert set(record["metrics"]) == {"baseline", "act-default"}
    assert {"CHAIRs", "CHAIRi"} <= set(record["metrics"]["baseline"]["summary"])
    assert record["config"]["n_items"] == 3


def test_mmlu_evaluate_on_a_loaded_model(smollm2, tmp_path):
    pytest.importorskip("lm_eval")
    from attnsteer.evals import mmlu

    tokenizer, model = smollm2
    record = mmlu.evaluate(
        model,
        tokenizer,
        ["none", "act-default"],
        tasks=["attnsteer_mc_demo"],
        limit=2,
        output_path=str(tmp_path / "mmlu"),
    )
    assert set(record["metrics"]) == {"baseline", "act-default"}
    assert "attnsteer_mc_demo/acc" in record["metrics"]["baseline"]["summary"]
    assert record["recipes"]["act-default"]["applied"]["interventions"][0]["layers"][0] == 2


def test_speed_evaluate_times_a_loaded_model(tmp_path):
    from conftest import build_tiny

    from attnsteer.speed import SpeedConfig, measure

    model = build_tiny("llama")
    recipe = attnsteer.load_recipe({"name": "sharp", "interventions": [{"method": "softplus", "params": {"p": 2.0}}]})
    config = SpeedConfig(
        new_tokens=2, repeats=1, warmup=0, device="cpu", backends="fused-pytorch", output_path=str(tmp_path),
        no_plot=True, prompt_len=[12, 16],
    )  # fmt: skip
    records = measure(model, ["softplus-reweight", recipe], config)
    assert [r["config"]["prompt_len"] for r in records] == [12, 16]
    assert set(records[0]["metrics"]) == {"baseline", "softplus-reweight@fused-pytorch", "sharp@fused-pytorch"}
    assert records[0]["meta"]["model"]["source"] == "loaded by the caller"
    assert records[1]["metrics"]["sharp@fused-pytorch"]["summary"]["rows_steered"] > 0
    assert model not in attnsteer.api._STEERED
