"""apply() is transactional, and the recipe a handle reports is the recipe that ran."""

from __future__ import annotations

import re

import pytest
import torch
import vlm_fixtures as F
from conftest import VOCAB, build_tiny

import attnsteer
from attnsteer import RecipeError, api, compat
from attnsteer.attention import dispatch
from attnsteer.errors import SilentSiteWarning


def fingerprint(model) -> dict:
    """Everything apply() may touch: hooks and instance attributes of every module, the attention
    implementation of every (sub-)config, attnsteer's registries."""
    modules = {
        name: (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            sorted(k for k in vars(m) if not k.startswith("_")),
            m in dispatch._SITES,
        )
        for name, m in model.named_modules()
    }
    configs = [
        (type(c).__name__, vars(c).get("_attn_implementation_internal")) for c in compat.config_tree(model.config)
    ]
    return {
        "modules": modules,
        "configs": configs,
        "steered": model in api._STEERED,
        "generate": "generate" in vars(model),
    }


CASES = {
    # VAR: layer pre-hooks; PAI gamma: logits hook; InstructBLIP: generate wrapper and a second host
    "llava-var-pai": (
        "llava",
        {
            "interventions": [
                {"method": "var", "layers": "1:", "params": {"tau": 3.0}},
                {"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}},
            ]
        },
    ),
    "instructblip-pai": ("instructblip", {"interventions": [{"method": "pai", "params": {"alpha": 0.5}}]}),
}


def _steps(model, recipe) -> list[str]:
    names = []
    api._after_install_step = names.append
    try:
        attnsteer.apply(model, recipe).remove()
    finally:
        api._after_install_step = None
    return names


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failure_after_any_install_step_leaves_the_model_exactly_as_before(case):
    family, recipe = CASES[case]
    model = F.build_vlm(family)
    inputs = F.make_inputs(family, model, n_images=[1, 1], seed=2)
    with torch.no_grad():
        before_logits = model(**inputs).logits
    before = fingerprint(model)
    steps = _steps(model, recipe)
    assert len(steps) >= 5 and steps[0] == "attention implementation" and steps[-1] == "registry"
    assert fingerprint(model) == before
    for k in range(len(steps)):
        calls = []

        def fail_at(name, k=k, calls=calls):
            calls.append(name)
            if len(calls) == k + 1:
                raise RuntimeError(f"injected failure after step {k} ({name})")

        api._after_install_step = fail_at
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                attnsteer.apply(model, recipe)
        finally:
            api._after_install_step = None
        assert fingerprint(model) == before, f"failure after step {k} ({steps[k]}) left a change behind"
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, before_logits), f"step {k}: logits changed"
    with attnsteer.apply(model, recipe):  # and the model can still be steered normally
        pass


def test_validation_errors_change_nothing():
    model = build_tiny("llama")
    before = fingerprint(model)
    for bad in (
        {"interventions": [{"method": "act", "layers": 7}]},
        {"interventions": [{"method": "act", "heads": {0: [9]}}]},
        {"interventions": [{"method": "var", "params": {"sink_dims": [9999]}}]},  # hidden dim does not exist
        {"model_types": ["qwen2"], "interventions": [{"method": "act"}]},
    ):
        try:
            attnsteer.apply(model, bad).remove()
        except (RecipeError, attnsteer.UnsupportedModelError):
            pass
        assert fingerprint(model) == before


# ---- the recipe that ran ------------------------------------------------------------------------
def _logits(model, recipe, ids):
    with attnsteer.apply(model, recipe) as handle, torch.no_grad():
        return model(input_ids=ids).logits, handle.resolved_recipe()


def test_resolved_recipe_records_concrete_layers_and_heads_and_reapplies_identically():
    model = build_tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    cases = [
        ({"interventions": [{"method": "act", "heads": {0: [1]}, "params": {"threshold": 0.05}}]}, None, {0: [1]}),
        ({"interventions": [{"method": "act", "params": {"threshold": 0.05}}]}, [2], "all"),
        ({"interventions": [{"method": "softplus", "layers": ["1:", -1], "params": {"p": 2.0}}]}, [1, 2, 3], "all"),
    ]
    for recipe, layers, heads in cases:
        logits, resolved = _logits(model, recipe, ids)
        item = resolved.interventions[0]
        assert item.layers == layers and item.heads == heads
        again, resolved_again = _logits(model, resolved.to_dict(), ids)
        assert torch.equal(logits, again)
        assert resolved_again.to_dict() == resolved.to_dict()


def test_resolved_dict_never_writes_a_default_the_head_mapping_overrides():
    recipe = attnsteer.load_recipe({"interventions": [{"method": "act", "heads": {0: [1]}}]})
    item = recipe.resolved_dict()["interventions"][0]
    assert "layers" not in item  # not ACT's default "2:-1", which would contradict heads
    attnsteer.load_recipe(recipe.resolved_dict())  # re-loads
    vhr = attnsteer.load_recipe({"interventions": [{"method": "vhr"}]}).resolved_dict()["interventions"][0]
    assert "layers" not in vhr  # family-dependent: resolved against a model, not written as text


def test_vhr_resolved_recipe_has_the_family_default_layers():
    model = F.build_vlm("llava")
    with attnsteer.apply(model, {"interventions": [{"method": "vhr"}]}) as handle:
        layers = handle.resolved_recipe().interventions[0].layers
    n = len(F.text_layers(model))
    expected = sorted({1 % n, *range(n)[-14:]})
    assert layers == expected


def test_a_head_mapping_naming_one_layer_twice_is_an_error():
    model = build_tiny("llama")  # 4 layers: 3 and -1 are the same layer
    with pytest.raises(RecipeError, match=r"keys 3 and -1 both name layer 3"):
        attnsteer.apply(model, {"interventions": [{"method": "act", "heads": {3: [0], -1: [1]}}]})


def test_two_var_interventions_on_one_layer_are_an_error():
    model = F.build_vlm("llava")
    recipe = {
        "interventions": [
            {"method": "var", "layers": "1:", "params": {"tau": 3.0}},
            {"method": "var", "layers": [2], "params": {"tau": 9.0}},
        ]
    }
    with pytest.raises(RecipeError, match=r"interventions\[1\].*layer 2 is already steered by var"):
        attnsteer.apply(model, recipe)


def test_two_var_interventions_on_different_layers_each_use_their_own_tau():
    model = F.build_vlm("llava")
    inputs = F.make_inputs("llava", model, n_images=[1], seed=4)
    n = len(F.text_layers(model))
    recipe = {
        "interventions": [
            {"method": "var", "layers": [0], "params": {"tau": 2.8}},
            {"method": "var", "layers": [n - 1], "params": {"tau": 1000.0}},
        ]
    }
    # the last layer's tau of 1000 finds no sink, so that site is silent by design: the warning names it alone
    with pytest.warns(SilentSiteWarning, match=rf"never changed a row: layer {n - 1} var\."):
        with attnsteer.apply(model, recipe) as handle, torch.no_grad():
            model(**inputs)
            prompt = handle._state.prompt
            sinks = {layer: prompt.get((layer, i), "sinks") for i, layer in enumerate([0, n - 1])}
            stats = {s["layer"]: s for s in handle.stats()}
    assert bool(sinks[0].any()), "layer 0 (tau 2.8) should find sinks in this prompt"
    assert stats[0]["rows_modified"] > 0, "layer 0 (tau 2.8) should steer this prompt"
    assert not bool(sinks[n - 1].any()), "the last layer (tau 1000) must not reuse the first intervention's tau"
    assert stats[n - 1]["calls"] == 1 and stats[n - 1]["rows_modified"] == 0


# ---- plan(): pure resolution ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, recipe",
    [
        ("llava", {"interventions": [{"method": "var", "params": {"tau": 3.0}}, {"method": "vhr"}]}),
        ("instructblip", {"interventions": [{"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}]}),
    ],
)
def test_plan_touches_nothing_and_is_what_apply_installs(family, recipe):
    model = F.build_vlm(family)
    inputs = F.make_inputs(family, model, n_images=[1, 1], seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before_logits = model(**inputs).logits
    before = fingerprint(model)
    planned = attnsteer.plan(model, recipe)
    assert fingerprint(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before_logits)
    assert planned.sites() and {s["method"] for s in planned.sites()} == {i["method"] for i in recipe["interventions"]}
    with attnsteer.apply(model, recipe) as handle:
        assert handle.plan.sites() == planned.sites()
        assert handle.resolved_recipe() == planned.resolved_recipe()


def test_plan_raises_what_apply_raises_without_touching_the_model():
    model = build_tiny("llama")
    before = fingerprint(model)
    with pytest.raises(RecipeError, match="layer 9 does not exist"):
        attnsteer.plan(model, {"interventions": [{"method": "act", "layers": [9]}]})
    assert fingerprint(model) == before


def test_handle_report_collects_each_methods_report():
    model = F.build_vlm("llava")
    inputs = F.make_inputs("llava", model, n_images=[1, 1], seed=2)
    recipe = {
        "interventions": [
            {"method": "act", "layers": [0], "params": {"threshold": 0.05}},
            {"method": "vhr", "layers": [1]},
            {"method": "var", "layers": [2], "params": {"tau": 2.8}},  # a few sinks, and VAR steers
        ]
    }
    with attnsteer.apply(model, recipe) as handle, torch.no_grad():
        assert handle.report() == {}  # nothing before the first prompt
        model(**inputs)
        assert all(s["rows_modified"] > 0 for s in handle.stats()), handle.stats()  # every method steered
        report = handle.report()
        assert set(report) == {0, 1, 2}
        assert set(report[0]) == {"act"} and len(report[0]["act"]["sinks"]) == 2
        assert set(report[1]) == {"vhr"} and len(report[1]["vhr"]["heads"]) == 2
        assert set(report[2]) == {"var"} and len(report[2]["var"]["sinks"]) == 2
        assert handle.sinks() == {0: report[0]["act"]["sinks"]}
        assert handle.vhr_heads() == {1: report[1]["vhr"]["heads"]}


def test_a_switch_of_the_attention_implementation_failing_half_way_is_undone(monkeypatch):
    model = F.build_vlm("llava")
    before = fingerprint(model)
    real = compat.set_text_attention

    def switch_then_fail(model_, key, name):
        real(model_, key, name)
        raise RuntimeError("injected failure inside set_attn_implementation")

    monkeypatch.setattr(compat, "set_text_attention", switch_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        attnsteer.apply(model, {"interventions": [{"method": "pai", "params": {"alpha": 0.5}}]})
    assert fingerprint(model) == before


# ---- a removed handle ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "use",
    [
        ("with handle", lambda h: h.__enter__()),
        ("handle.focus(mask)", lambda h: h.focus(torch.ones(1, 4, dtype=torch.bool))),
        ("handle.prompt_text(texts)", lambda h: h.prompt_text(["a question"])),
    ],
    ids=["with", "focus", "prompt_text"],
)
def test_a_removed_handle_refuses_to_steer_again(use):
    name, call = use
    model = build_tiny("llama")
    handle = attnsteer.apply(model, {"interventions": [{"method": "softplus", "params": {"p": 2.0}}]})
    handle.remove()
    with pytest.raises(attnsteer.SteeringError, match=rf"{re.escape(name)}: this handle .* was removed.*Fix: apply"):
        call(handle)
    handle.remove()  # removing twice stays harmless
    assert handle.stats() and handle.report() == {}  # what it recorded stays readable


def test_a_focus_mask_that_marks_nothing_is_refused_naming_the_mask():
    model = build_tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    recipe = {"interventions": [{"method": "pai", "params": {"alpha": 0.5}}]}
    with attnsteer.apply(model, recipe) as handle, handle.focus(torch.zeros(2, 8, dtype=torch.bool)):
        with pytest.raises(attnsteer.SteeringError, match=r"handle.focus\(mask\): the mask .* marks no position.*Fix"):
            model(input_ids=ids)
