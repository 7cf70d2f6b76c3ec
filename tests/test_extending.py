"""docs/extending.md, followed for a toy method and a family attnsteer does not ship."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_TEXT, VOCAB, build_tiny

import attnsteer
from attnsteer import archs, compat
from attnsteer.errors import AttnsteerWarning, RecipeError
from attnsteer.methods import METHODS
from attnsteer.methods.base import Method, param, register


@dataclass(frozen=True)
class TemperatureParams:
    """The toy method's parameters: type (annotation), default, help and range in one place."""

    temperature: float = param(2.0, "divides the scores", low=0.0, low_open=True, high=100.0)


class ScoreTemperature(Method):
    """Toy score-level method: ``s_ij <- s_ij / temperature`` on the steered heads."""

    name = "toy_temperature"
    docs = "docs/extending.md#adding-a-method"
    citation = "attnsteer test suite"
    default_layers = "1:"
    has_score_step = True
    Params = TemperatureParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["temperature"] == 1.0

    def scores(self, s, q, k, ctx, qk):
        return self.select_heads(s / self.p.temperature, s)


@pytest.fixture
def toy_method():
    register(ScoreTemperature)  # the "one registry line"
    yield ScoreTemperature
    METHODS.pop(ScoreTemperature.name)


def _ids(batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def test_a_toy_method_added_by_the_documented_route(toy_method):
    model = build_tiny("llama")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    recipe = {
        "interventions": [{"method": "toy_temperature", "heads": {1: [0, 2], 3: [1]}, "params": {"temperature": 3.0}}]
    }
    with pytest.raises(RecipeError, match=r"params\.temperature"):
        attnsteer.load_recipe({"interventions": [{"method": "toy_temperature", "params": {"temperature": 0}}]})
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        out = {}
        for backend in ("reference", "fused"):
            with attnsteer.apply(model, recipe, backend=backend) as handle:
                out[backend] = model(input_ids=ids, attention_mask=mask).logits
                assert {s["layer"] for s in handle.stats() if s["fired"]} == {1, 3}
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)  # removed exactly
    valid = mask.bool()
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], atol=2e-5, rtol=2e-5)
    assert (out["fused"] - base)[valid].abs().max() > 1e-3
    # KV-cache generation == recomputing every step (a score-level rule has no prompt state)
    with attnsteer.apply(model, recipe):
        cached = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        recomputed = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", AttnsteerWarning)
        plan = attnsteer.plan(model, {"interventions": [{"method": "toy_temperature", "params": {"temperature": 1.0}}]})
    assert plan.layers == {} and any("identity" in str(w.message) for w in record)


def test_a_family_added_by_one_declarative_entry(monkeypatch):
    from transformers import AutoModelForCausalLM, Olmo2Config

    assert "olmo2" not in archs.ARCHS
    monkeypatch.setitem(archs.ARCHS, "olmo2", archs.ArchSpec("olmo2"))  # the one entry
    cfg = Olmo2Config(**TINY_TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = _ids()
    recipe = {"interventions": [{"method": "softplus", "layers": "all", "params": {"p": 2.0}}]}
    with torch.no_grad():
        base = model(input_ids=ids).logits
        out = {}
        for backend in ("reference", "fused"):
            with attnsteer.apply(model, recipe, backend=backend):
                out[backend] = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)
        with attnsteer.apply(model, recipe):
            first = model(input_ids=ids, use_cache=True)
            step = model(input_ids=ids[:, -1:], use_cache=True, **compat.with_cache(model, compat.output_cache(first)))
            full = model(input_ids=torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1]
    torch.testing.assert_close(out["fused"], out["reference"], atol=2e-5, rtol=2e-5)
    assert (out["fused"] - base).abs().max() > 1e-4
    torch.testing.assert_close(step.logits[:, -1], full, atol=2e-5, rtol=2e-5)
