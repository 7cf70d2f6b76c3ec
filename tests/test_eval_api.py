"""The evaluations from Python, on a model the caller already holds (no argparse, no model loading):
``attnsteer.evals.run(model, processor_or_tokenizer, task, recipes, config)`` gives the same results
record as the command line on the same settings, for every benchmark, and prints nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_eval_helpers import eval_data, read_results, tiny_llava_dir  # noqa: F401  (fixtures)

import attnsteer
from attnsteer.cli import main
from attnsteer.errors import UsageError
from attnsteer.evals import RunConfig, run
from attnsteer.evals.tasks import ChairConfig, ChairTask, MMLUConfig, MMLUTask, PopeConfig, PopeTask


def _load_vlm(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return processor, model.eval()


def test_configs_are_typed_dataclasses_with_the_papers_defaults():
    for config_class in (PopeConfig, ChairConfig, MMLUConfig, RunConfig):
        assert dataclasses.is_dataclass(config_class)
        assert all(f.type for f in dataclasses.fields(config_class))
    assert PopeConfig().decoding.max_new_tokens == 16 and ChairConfig().decoding.max_new_tokens == 512
    assert RunConfig().batch_size == 1 and RunConfig().backend == "auto" and RunConfig().seeds == [0]
    assert MMLUConfig(tasks="a,b").tasks == ["a", "b"]


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: RunConfig(batch_size=0), "RunConfig.batch_size"),
        (lambda: RunConfig(limit=1.5), "RunConfig.limit"),
        (lambda: RunConfig(limit=float("nan")), "RunConfig.limit"),
        (lambda: RunConfig(backend="fast"), "RunConfig.backend"),
        (lambda: RunConfig(seeds=["a"]), "RunConfig.seeds"),
        (lambda: PopeConfig(splits=["easy"]), "PopeConfig.splits"),
        (lambda: PopeConfig(parser="loose"), "PopeConfig.parser"),
        (lambda: ChairConfig(lemmatizer="spacy"), "ChairConfig.lemmatizer"),
        (lambda: MMLUConfig(num_fewshot=-1), "MMLUConfig.num_fewshot"),
    ],
)
def test_a_bad_setting_names_its_field(build, field):
    with pytest.raises(UsageError, match=field.replace(".", r"\.")):
        build()


@pytest.mark.parametrize("text", ["0", "1.5", "nan", "inf", "-2"])
def test_the_limit_flag_refuses_what_the_run_config_refuses(text, capsys):
    assert main(["eval", "pope", "--limit", text]) == 2
    assert f"expected a count >= 1 or a fraction in (0, 1), got {text!r}" in capsys.readouterr().err


def test_pope_run_on_a_loaded_model_equals_the_cli(tiny_llava_dir, eval_data, tmp_path, capsys):  # noqa: F811
    recipe = attnsteer.load_recipe(
        {"name": "pai-small", "interventions": [{"method": "pai", "params": {"alpha": 0.3}}]}
    )
    task = PopeTask(PopeConfig(pope_dir=eval_data["pope"], coco_dir=eval_data["images"]))
    processor, model = _load_vlm(tiny_llava_dir)
    capsys.readouterr()
    lines: list[str] = []
    config = RunConfig(limit=4, progress=False, output_path=tmp_path / "api", log=lines.append)
    record = run(model, processor, task, ["none", recipe], config)
    assert capsys.readouterr() == ("", "")  # the library prints nothing; its notes went to the callback
    assert any(line.startswith("run directory:") for line in lines)
    assert set(record["metrics"]) == {"baseline", "pai-small"}
    assert record["recipes"]["pai-small"]["applied"]["interventions"][0]["method"] == "pai"
    assert read_results(tmp_path / "api")["metrics"] == record["metrics"] == record.metrics
    assert "pai-small" in record.markdown()
    # the model is left as it was: no steering after run() returns
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
    assert record["steering"]["pai-small"]["rows_modified"] > 0  # the recipe steered rows


def test_chair_run_on_a_loaded_model(tiny_llava_dir, eval_data, tmp_path, capsys):  # noqa: F811
    processor, model = _load_vlm(tiny_llava_dir)
    capsys.readouterr()
    task = ChairTask(
        ChairConfig(
            coco_dir=eval_data["images"],
            gt=eval_data["gt"],
            synonyms=eval_data["synonyms"],
            num_images=3,
            decoding=dataclasses.replace(ChairConfig().decoding, max_new_tokens=8),
        )
    )
    record = run(model, processor, task, ["none", "act-default"], RunConfig(progress=False, output_path=tmp_path / "c"))
    assert capsys.readouterr() == ("", "")
    assert set(record["metrics"]) == {"baseline", "act-default"}
    assert {"CHAIRs", "CHAIRi"} <= set(record["metrics"]["baseline"]["summary"])
    assert record["config"]["n_items"] == 3


def test_mmlu_run_on_a_loaded_model(smollm2, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tokenizer, model = smollm2
    capsys.readouterr()
    task = MMLUTask(MMLUConfig(tasks=["attnsteer_mc_demo"]))
    record = run(model, tokenizer, task, ["none", "act-default"], RunConfig(limit=2, output_path=tmp_path / "mmlu"))
    assert capsys.readouterr().out == ""
    assert set(record["metrics"]) == {"baseline", "act-default"}
    assert "attnsteer_mc_demo/acc" in record["metrics"]["baseline"]["summary"]
    assert record["recipes"]["act-default"]["applied"]["interventions"][0]["layers"][0] == 2
    assert record["steering"]["act-default"]["rows_modified"] > 0


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
