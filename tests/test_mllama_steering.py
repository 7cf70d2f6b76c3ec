"""Llama-3.2-Vision (mllama): the image enters through cross-attention layers. Text methods (ACT,
softplus) steer its self-attention layers; VHR reinforces cross-attention heads; image-key
methods (VAR, PAI, AGLA) are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from mllama_fixtures import (
    build_mllama,
    cross_layer_indices,
    generation_position_ids,
    make_inputs,
    row_inputs,
    self_layer_indices,
    text_layers,
)

import attnsteer
from attnsteer import archs
from attnsteer.errors import RecipeError
from attnsteer.methods.vhr import VHR

TOL = dict(atol=3e-5, rtol=3e-5)
TEXT_RECIPES = {
    "act": {
        "interventions": [
            {"method": "act", "layers": "all", "params": {"beta": 0.3, "threshold": 0.08, "apply_to": "all"}}
        ]
    },
    "softplus": {"interventions": [{"method": "softplus", "params": {"p": 2.0, "offset": 1.0}}]},
}
VHR_RECIPE = {"interventions": [{"method": "vhr"}]}
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=[128])


@pytest.fixture(scope="module")
def mllama():
    return build_mllama()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=generation_position_ids(model, inputs)).logits


def test_layers_are_resolved_by_kind(mllama):
    arch = archs.resolve(mllama)
    assert sorted(arch.cross_layers) == cross_layer_indices(mllama) == [1, 3]
    assert arch.self_attention_layers == self_layer_indices(mllama)
    assert arch.attention_modules[1] is text_layers(mllama)[1].cross_attn


@pytest.mark.parametrize("method", list(TEXT_RECIPES))
def test_text_methods_steer_the_self_attention_layers(mllama, method):
    inputs = make_inputs(mllama, n_images=[1, 0, 1], seed=2)
    valid = inputs["attention_mask"].bool()
    base = _logits(mllama, inputs)
    out = {}
    for backend in ("reference", "fused"):
        with attnsteer.apply(mllama, TEXT_RECIPES[method], backend=backend) as handle:
            assert sorted(handle.plans) == self_layer_indices(mllama)  # "all" = the self-attention layers
            out[backend] = _logits(mllama, inputs)
            assert any(s["fired"] for s in handle.stats())
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], **TOL)
    assert (out["fused"] - base)[valid].abs().max() > 1e-4


@pytest.mark.parametrize("method", list(TEXT_RECIPES))
def test_text_methods_batch_equals_rows_alone_and_generate(mllama, method):
    inputs = make_inputs(mllama, n_images=[1, 0, 1], seed=2)
    with attnsteer.apply(mllama, TEXT_RECIPES[method]):
        together = _logits(mllama, inputs)
        for row in range(3):
            keep = inputs["attention_mask"][row].bool()
            # keep_image_slots: a row without an image still reads the batch's vision states in
            # transformers' Mllama (its cross-attention output is gated, not zeroed)
            alone = _logits(mllama, row_inputs(mllama, inputs, row, keep_image_slots=True))
            torch.testing.assert_close(together[row, keep], alone[0], **TOL)
        cached = mllama.generate(**inputs, **GEN)
        recomputed = mllama.generate(**inputs, use_cache=False, **GEN)
    if method == "softplus":  # decode rows are prefill rows: the cache changes nothing
        assert torch.equal(cached, recomputed)
    assert cached.shape == recomputed.shape


def _cross_head_outputs(model, inputs, layer):
    """The unsteered cross-attention head outputs (B, H, D) at the last prompt position."""
    captured = []
    o_proj = text_layers(model)[layer].cross_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0][:, -1].detach()))
    try:
        _logits(model, inputs)
    finally:
        hook.remove()
    heads = model.config.text_config.num_attention_heads
    return captured[0].view(captured[0].shape[0], heads, -1)


def test_vhr_reinforces_the_cross_attention_heads_of_the_image(mllama):
    """VHD on a cross-attention layer: the layer adds nothing without its image, so A_h(text) = 0
    and the heads are chosen from ||A_h(img)||; one layer so the captured outputs are unsteered."""
    inputs = make_inputs(mllama, n_images=[1, 1], seed=4)
    base = _logits(mllama, inputs)
    expected = VHR.select_heads(_cross_head_outputs(mllama, inputs, 1), torch.zeros(2, 4, 16))
    with attnsteer.apply(mllama, {"interventions": [{"method": "vhr", "layers": [1]}]}) as handle:
        steered = _logits(mllama, inputs)
        chosen = handle.vhr_heads()[1]
    assert chosen == [row.nonzero().flatten().tolist() for row in expected]
    assert (steered - base)[inputs["attention_mask"].bool()].abs().max() > 1e-4


def test_vhr_defaults_to_the_cross_attention_layers_and_generates(mllama):
    inputs = make_inputs(mllama, n_images=[1, 1], seed=4)
    with attnsteer.apply(mllama, VHR_RECIPE) as handle:
        assert sorted(handle.plans) == cross_layer_indices(mllama)
        cached = mllama.generate(**inputs, **GEN)
        stats = handle.stats()
    assert all(s["calls"] == 4 for s in stats)  # prefill + 3 decode steps (the 4th token needs no forward)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 4


def test_remove_restores_exactly(mllama):
    inputs = make_inputs(mllama, n_images=[1, 0, 1], seed=2)
    base = _logits(mllama, inputs)
    for recipe in (VHR_RECIPE, *TEXT_RECIPES.values()):
        with attnsteer.apply(mllama, recipe):
            _logits(mllama, inputs)
    assert torch.equal(_logits(mllama, inputs), base)
    assert all(not m._forward_pre_hooks or m is mllama for m in text_layers(mllama))


@pytest.mark.parametrize("method", ["var", "pai", "vaf", "hgai", "spin"])
def test_image_key_methods_are_refused_with_the_reason(mllama, method):
    with pytest.raises(RecipeError, match="cross-attention layers"):
        attnsteer.apply(mllama, {"interventions": [{"method": method, "layers": "all"}]})


def test_agla_is_refused(mllama):
    with pytest.raises(RecipeError, match="agla"):
        attnsteer.apply(mllama, {"interventions": [{"method": "agla"}]})


def test_a_layer_of_the_other_kind_named_explicitly_is_refused(mllama):
    with pytest.raises(RecipeError, match=r"act steers the self-attention layers .*layer\(s\) \[1\]"):
        attnsteer.apply(mllama, {"interventions": [{"method": "act", "layers": [0, 1]}]})
    with pytest.raises(RecipeError, match=r"vhr steers the cross-attention layers .*layer\(s\) \[2\]"):
        attnsteer.apply(mllama, {"interventions": [{"method": "vhr", "layers": [2]}]})
    with pytest.raises(RecipeError, match="selects none of them"):
        attnsteer.apply(mllama, {"interventions": [{"method": "vhr", "layers": "4:"}]})
    with pytest.raises(RecipeError, match=r"layer\(s\) \[0\]"):
        attnsteer.apply(
            mllama, {"interventions": [{"method": "vhr", "heads": {0: [1], 1: [2]}, "params": {"selection": "fixed"}}]}
        )


def test_vhr_fixed_heads_on_a_cross_attention_layer(mllama):
    inputs = make_inputs(mllama, n_images=[1, 1], seed=4)
    base = _logits(mllama, inputs)
    recipe = {"interventions": [{"method": "vhr", "heads": {3: [0, 2]}, "params": {"selection": "fixed"}}]}
    with attnsteer.apply(mllama, recipe) as handle:
        steered = _logits(mllama, inputs)
        assert handle.vhr_heads()[3] == [[0, 2], [0, 2]]
    assert (steered - base)[inputs["attention_mask"].bool()].abs().max() > 1e-4
