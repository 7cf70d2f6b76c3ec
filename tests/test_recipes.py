"""Recipe schema: loading, saving, built-ins, and a clear error for every kind of bad input."""

from __future__ import annotations

import pytest
import yaml
from conftest import build_tiny

import attnsteer
from attnsteer import RecipeError, UnsupportedModelError


def act(**params):
    return {"interventions": [{"method": "act", "params": params}]}


def test_builtins_load_and_round_trip(tmp_path):
    names = attnsteer.builtin_names()
    assert {"act-default", "softplus-reweight"} <= set(names)
    for name in names:
        recipe = attnsteer.load_recipe(name)
        assert recipe.name == name and recipe.description and recipe.source
        again = attnsteer.load_recipe(recipe.save(tmp_path / f"{name}.yaml"))
        assert again == recipe and again.to_dict() == recipe.to_dict()
        assert attnsteer.load_recipe(recipe) == recipe  # Recipe objects are accepted (and copied)


def test_defaults_are_spec_defaults():
    recipe = attnsteer.load_recipe({"interventions": [{"method": "act"}, {"method": "softplus"}]})
    assert recipe.interventions[0].params == {
        "beta": 0.4,
        "threshold": 0.1,
        "apply_to": "prefill",
        "keep_first_sink": True,
    }
    assert recipe.interventions[1].params == {"p": 3.0, "offset": 1.0, "scoring": "softmax"}
    assert recipe.interventions[0].layers is None  # resolved per method at apply time ("2:-1" for ACT)


def test_folder_save_and_hash_changes_with_params(tmp_path):
    a = attnsteer.load_recipe(act(beta=0.4))
    b = attnsteer.load_recipe(act(beta=0.5))
    assert a.hash != b.hash
    path = a.save(tmp_path / "shared_recipe")
    assert path.name == "recipe.yaml"
    assert attnsteer.load_recipe(tmp_path / "shared_recipe") == a


@pytest.mark.parametrize(
    "recipe, fragments",
    [
        ({"interventions": [{"method": "act", "params": {"beta": 1.5}}]}, ["params.beta", "1.5", "[0, 1]"]),
        ({"interventions": [{"method": "act", "params": {"beta": "high"}}]}, ["params.beta", "'high'"]),
        ({"interventions": [{"method": "act", "params": {"betta": 0.4}}]}, ["betta", "Did you mean 'beta'"]),
        ({"interventions": [{"method": "act", "params": {"apply_to": "decode"}}]}, ["apply_to", "'prefill', 'all'"]),
        ({"interventions": [{"method": "act", "params": {"threshold": 0}}]}, ["threshold", "(0, 1]"]),
        ({"interventions": [{"method": "softplus", "params": {"p": -1}}]}, ["params.p", "-1"]),
        ({"interventions": [{"method": "softplus", "params": {"scoring": "relu"}}]}, ["scoring", "'softmax', 'lssa'"]),
        (
            {"interventions": [{"method": "act", "params": {"keep_first_sink": "yes"}}]},
            ["keep_first_sink", "true or false"],
        ),
        ({"interventions": [{"method": "actt"}]}, ["method", "'actt'", "Did you mean 'act'"]),
        ({"interventions": [{"method": "agla", "params": {"matcher": "gradcam"}}]}, ["matcher", "'lvlm_attention'"]),
        (
            {"interventions": [{"method": "agla", "params": {"mask_ratio": 0.3}}]},
            ["interventions[0].params.mask_ratio", "blip_itm", "Fix"],
        ),
        ({"interventions": [{"method": "act", "beta": 0.4}]}, ["unknown key", "beta", "params"]),
        ({"interventions": [{"method": "act", "layers": "2-5"}]}, ["layers", "'2-5'", "slice"]),
        ({"interventions": [{"method": "act", "layers": []}]}, ["layers", "empty"]),
        ({"interventions": [{"method": "act", "layers": "::0"}]}, ["layers", "step"]),
        ({"interventions": [{"method": "act", "layers": 2.5}]}, ["layers", "2.5"]),
        ({"interventions": [{"method": "act", "heads": "some"}]}, ["heads", "'some'"]),
        ({"interventions": [{"method": "act", "heads": {1: []}}]}, ["heads[1]", "non-empty"]),
        ({"interventions": [{"method": "act", "heads": {"x": [1]}}]}, ["heads", "'x'"]),
        ({"interventions": []}, ["interventions", "non-empty"]),
        (
            {"interventions": [{"method": "act"}], "modle_types": ["llama"]},
            ["modle_types", "Did you mean 'model_types'"],
        ),
        ({"schema_version": 2, "interventions": [{"method": "act"}]}, ["schema_version", "2"]),
        ({"interventions": [{"method": "act"}], "model_types": []}, ["model_types"]),
        ({"interventions": [{"method": "act"}], "name": 5}, ["name", "5"]),
        ({"interventions": [{"method": "act", "params": [1]}]}, ["params", "mapping"]),
    ],
)
def test_bad_recipes_name_field_value_and_fix(recipe, fragments):
    with pytest.raises(RecipeError) as err:
        attnsteer.load_recipe(recipe)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_yaml_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("interventions: [method: act\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        attnsteer.load_recipe(bad)
    with pytest.raises(RecipeError, match="not a built-in recipe"):
        attnsteer.load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="allowed"):
        attnsteer.load_recipe(42)


def test_hub_recipe_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="could not download recipe.yaml"):
        attnsteer.load_recipe("hf://some-org/some-recipe")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


@pytest.mark.parametrize(
    "recipe, fragments",
    [
        ({"interventions": [{"method": "act", "layers": 7}]}, ["layers", "layer 7 does not exist", "4 layers"]),
        ({"interventions": [{"method": "act", "layers": "9:"}]}, ["selects no layer", "4 layers"]),
        ({"interventions": [{"method": "act", "heads": {1: [0, 9]}}]}, ["heads[1]", "[9]", "4 query heads"]),
        ({"interventions": [{"method": "act", "heads": {6: [0]}}]}, ["heads", "layer 6 does not exist"]),
        (
            {"interventions": [{"method": "act", "layers": "0:2", "heads": {3: [0]}}]},
            ["heads", "[3]", "does not select"],
        ),
        ({"model_types": ["qwen2"], "interventions": [{"method": "act"}]}, ["model_types", "'llama'"]),
    ],
)
def test_recipes_that_do_not_fit_the_model(tiny, recipe, fragments):
    with pytest.raises(RecipeError) as err:
        attnsteer.apply(tiny, recipe)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert tiny.config._attn_implementation == "sdpa"  # nothing half-applied


def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as err:
        attnsteer.apply(model, "act-default")
    assert "'gpt2'" in str(err.value) and "llama" in str(err.value) and "mistral" in str(err.value)


def test_head_mapping_selects_layers_and_heads(tiny):
    recipe = {"interventions": [{"method": "act", "heads": {1: [0, 3], -1: [2]}, "params": {"threshold": 0.05}}]}
    with attnsteer.apply(tiny, recipe) as handle:
        assert sorted(handle.plans) == [1, 3]
        assert handle.plans[1].methods[0].heads.tolist() == [True, False, False, True]


def test_yaml_file_written_by_hand(tmp_path, tiny):
    text = """
schema_version: 1
name: hand-written
description: test
source: unit test
model_types: [llama]
interventions:
  - method: act
    layers: [1, "2:"]
    heads: all
    params: {beta: 0.5, threshold: 0.05}
"""
    path = tmp_path / "hand.yaml"
    path.write_text(text)
    recipe = attnsteer.load_recipe(path)
    assert yaml.safe_load(recipe.to_yaml())["interventions"][0]["layers"] == [1, "2:"]
    with attnsteer.apply(tiny, path) as handle:
        assert sorted(handle.plans) == [1, 2, 3]


def test_hash_ignores_whether_defaults_are_written_out():
    implicit = attnsteer.load_recipe({"interventions": [{"method": "act"}]})
    explicit = attnsteer.load_recipe({"interventions": [{"method": "act", "layers": "2:-1", "params": {"beta": 0.4}}]})
    assert implicit.hash == explicit.hash
    assert implicit.hash != attnsteer.load_recipe({"interventions": [{"method": "act", "layers": "all"}]}).hash


def test_an_installed_wheel_ships_the_builtin_recipes(tmp_path):
    """`pip install .` (no editable checkout) keeps `attnsteer recipes list` working: the built-ins
    live in the top-level recipes/builtin folder and the wheel carries them as package data."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("attnsteer", "recipes"):
        shutil.copytree(repo / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    proc = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = sorted(p.stem for p in (target / "attnsteer" / "recipes").glob("*.yaml"))
    assert shipped == sorted(p.stem for p in (repo / "recipes" / "builtin").glob("*.yaml"))
    code = (
        "import attnsteer, sys\n"
        f"assert attnsteer.__file__.startswith({str(target)!r}), attnsteer.__file__\n"
        "from attnsteer.cli import main\n"
        "sys.exit(main(['recipes', 'list']))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in shipped:
        assert name in run.stdout


def _tiny_for(recipe):
    """A tiny model of the recipe's first model type, large enough for the layers, heads and
    hidden dims it names."""
    from conftest import build_tiny
    from vlm_fixtures import build_vlm

    layers, heads, dims = 3, 3, 0
    for iv in recipe.interventions:
        if isinstance(iv.heads, dict):
            layers = max(layers, *iv.heads)
            heads = max(heads, *(h for hs in iv.heads.values() for h in hs))
        for item in iv.layers if isinstance(iv.layers, list) else [iv.layers]:
            if isinstance(item, int):
                layers = max(layers, item)
            elif isinstance(item, str) and item.split(":")[0].isdigit():  # "14:" needs 15 layers
                layers = max(layers, int(item.split(":")[0]) + 1)
        if isinstance(iv.params.get("sink_dims"), list):
            dims = max(dims, *iv.params["sink_dims"])
    n_heads = heads + 1
    head_dim = max(2, -(-(dims + 1) // n_heads)) if dims else (16 if n_heads <= 4 else 2)
    shape = dict(num_hidden_layers=layers + 1, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                 head_dim=head_dim, hidden_size=n_heads * head_dim)  # fmt: skip
    family = (recipe.model_types or ["llama"])[0]
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        return build_tiny(family, **shape)
    if family in ("qwen2_vl", "qwen2_5_vl") and "hidden_size" in shape:  # M-RoPE sections follow head_dim
        shape["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2, 0, 0],
        }
    return build_vlm(family, **shape)


@pytest.mark.parametrize("name", attnsteer.builtin_names())
def test_every_builtin_applies_to_a_tiny_model_of_its_type(name):
    recipe = attnsteer.Recipe.from_pretrained(name)
    model = _tiny_for(recipe)

    class ImageProcessor:
        image_mean, image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    handle = attnsteer.apply(model, recipe, processor=ImageProcessor())
    try:
        assert handle.plan.sites(), f"{name} steers nothing on a {model.config.model_type} model"
    finally:
        handle.remove()
