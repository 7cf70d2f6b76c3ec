"""Family x method: every property issue #2 promises, on tiny random models of each family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer import compat
from attnsteer.errors import AttnsteerWarning

# name -> (real recipe, identity recipe)
METHODS = {
    "act": (
        {"interventions": [{"method": "act", "layers": "1:", "params": {"beta": 0.3, "threshold": 0.08}}]},
        {"interventions": [{"method": "act", "layers": "1:", "params": {"beta": 1.0}}]},
    ),
    "act_all": (
        {
            "interventions": [
                {"method": "act", "layers": "all", "params": {"beta": 0.3, "threshold": 0.08, "apply_to": "all"}}
            ]
        },
        None,
    ),
    "softplus": (
        {"interventions": [{"method": "softplus", "params": {"p": 2.0, "offset": 1.0}}]},
        {"interventions": [{"method": "softplus", "params": {"p": 1.0, "offset": 0.0}}]},
    ),
    "lssa": (
        {"interventions": [{"method": "softplus", "layers": [0, 2], "params": {"p": 2.0, "scoring": "lssa"}}]},
        None,
    ),
}
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def inputs(batch=2, length=14, pad=(0, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad[:batch]):
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return build_tiny(family)


@pytest.mark.parametrize("method", ["act", "softplus"])
def test_identity_params_equal_unsteered(model, method):
    ids, mask = inputs()
    base = logits(model, ids, mask)
    with pytest.warns(AttnsteerWarning, match="identity"):
        handle = attnsteer.apply(model, METHODS[method][1])
    with handle:
        steered = logits(model, ids, mask)
    assert torch.equal(steered, base)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_real_params_change_logits_and_fire(model, method, backend):
    ids, mask = inputs()
    base = logits(model, ids, mask)
    with attnsteer.apply(model, METHODS[method][0], backend=backend) as handle:
        steered = logits(model, ids, mask)
        stats = handle.stats()
    valid = mask.bool()
    assert (steered - base)[valid].abs().max() > 1e-3
    assert stats and all(s["calls"] == 1 for s in stats)
    assert any(s["fired"] == 1 and s["rows_modified"] > 0 for s in stats)


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_equals_reference(model, method):
    ids, mask = inputs()
    out = {}
    for backend in ("reference", "fused"):
        with attnsteer.apply(model, METHODS[method][0], backend=backend):
            out[backend] = logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], **FP32_TOL)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_left_padded_batch_equals_rows_alone(model, method, backend):
    ids, mask = inputs(batch=3, pad=(0, 5, 2))
    with attnsteer.apply(model, METHODS[method][0], backend=backend):
        batched = logits(model, ids, mask)
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            alone = logits(model, ids[row : row + 1, keep], mask[row : row + 1, keep])
            torch.testing.assert_close(batched[row, keep], alone[0], **FP32_TOL)


@pytest.mark.parametrize("method", list(METHODS))
def test_remove_restores_exactly(model, method):
    ids, mask = inputs()
    before_impl = model.config._attn_implementation
    before_dicts = {name: set(m.__dict__) for name, m in model.named_modules()}
    base = logits(model, ids, mask)
    handle = attnsteer.apply(model, METHODS[method][0])
    assert model.config._attn_implementation != before_impl
    logits(model, ids, mask)
    handle.remove()
    assert model.config._attn_implementation == before_impl
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before_dicts
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model, ids, mask), base)
    # and it can be steered again
    with attnsteer.apply(model, METHODS[method][0]):
        pass


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_recipe_reloads_identically(model, method, tmp_path):
    recipe = attnsteer.load_recipe(METHODS[method][0])
    path = recipe.save(tmp_path / "r.yaml")
    again = attnsteer.load_recipe(path)
    assert again == recipe and again.hash == recipe.hash
    ids, mask = inputs()
    out = []
    for r in (recipe, again):
        with attnsteer.apply(model, r):
            out.append(logits(model, ids, mask))
    assert torch.equal(out[0], out[1])


def _greedy_recompute(model, ids, steps):
    """Greedy decoding that recomputes the whole sequence every step (no KV cache)."""
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _greedy_cached(model, ids, steps, between=None):
    """Greedy decoding with the KV cache through plain model() calls; ``between`` runs after prefill."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache, seq = compat.output_cache(out), ids
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    if between:
        between()
    for _ in range(steps):
        seq = torch.cat([seq, nxt], dim=1)
        with torch.no_grad():
            out = model(input_ids=nxt, use_cache=True, **compat.with_cache(model, cache))
        cache = compat.output_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat([seq, nxt], dim=1)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_generate_softplus_cache_equals_full_recompute(model, backend):
    """Softplus decode rows behave like prefill rows, so KV-cached generate == recomputation."""
    ids, _ = inputs(batch=1, pad=(0,), length=10)
    with attnsteer.apply(model, METHODS["softplus"][0], backend=backend):
        gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ref = _greedy_recompute(model, ids, 6)
    assert torch.equal(gen, ref)


def test_generate_act_prefill_leaves_decode_rows_alone(model):
    """apply_to: prefill -> the prompt is calibrated, decode steps run the unsteered attention."""
    ids, _ = inputs(batch=1, pad=(0,), length=12)
    handle = attnsteer.apply(model, METHODS["act"][0])
    gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    stats = handle.stats()
    assert all(s["calls"] == 1 for s in stats)  # prefill only
    manual = _greedy_cached(model, ids, 5, between=handle.remove)
    assert torch.equal(gen, manual)


def test_generate_act_all_uses_prefill_sinks(model):
    ids, _ = inputs(batch=1, pad=(0,), length=12)
    with attnsteer.apply(model, METHODS["act_all"][0]) as handle:
        gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        manual = _greedy_cached(model, ids, 5)
        assert all(s["calls"] == 12 for s in handle.stats())  # 2 prefills + 2 x 5 decode steps
    assert torch.equal(gen, manual)


@pytest.mark.parametrize("method", ["act", "act_all", "softplus"])
def test_generate_left_padded_batch_equals_rows_alone(model, method):
    ids, mask = inputs(batch=2, pad=(0, 4), length=12)
    with attnsteer.apply(model, METHODS[method][0]):
        batched = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
        )
        for row in range(2):
            keep = mask[row].bool()
            alone = model.generate(
                input_ids=ids[row : row + 1, keep], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
            )
            assert torch.equal(batched[row, -5:], alone[0, -5:])


def test_untouched_layers_run_models_own_attention(model):
    """Layer 0 is not in the recipe: its output is bit-identical to the unsteered model's."""
    ids, mask = inputs()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with attnsteer.apply(model, METHODS["act"][0]):  # layers "1:"
            steered = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(base[1], steered[1])
    assert not torch.equal(base[-1], steered[-1])


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_in_many_small_chunks_equals_reference(model, method, monkeypatch):
    """Prompts longer than one chunk: causal key truncation and ACT's separate column pass, on the
    chunked backend and on what ``auto`` picks (the CPU flash path chunks by the same budget)."""
    from attnsteer.attention import chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * 4 * 14 * 3)  # ~3 query rows per chunk
    ids, mask = inputs()
    out, sinks = {}, {}
    for backend in ("reference", "chunked", "auto"):
        with attnsteer.apply(model, METHODS[method][0], backend=backend) as handle:
            out[backend] = logits(model, ids, mask)
            sinks[backend] = handle.sinks()
            if backend == "chunked":
                assert all(s["paths"] == {"chunked/prefill": 1} for s in handle.stats()), handle.stats()
    valid = mask.bool()
    assert (out["reference"] - logits(model, ids, mask))[valid].abs().max() > 1e-3  # the recipe steers
    for backend in ("chunked", "auto"):
        torch.testing.assert_close(out[backend][valid], out["reference"][valid], **FP32_TOL)
        if method.startswith("act"):
            assert sinks[backend] == sinks["reference"]


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_right_padded_batch_equals_rows_alone_for_act(model, backend):
    """Right padding (as lm-eval batches): padding query rows must not vote in ACT's sink means."""
    ids, _ = inputs(batch=2, pad=(0, 0), length=14)
    mask = torch.ones_like(ids)
    ids[1, -5:], mask[1, -5:] = 0, 0
    with attnsteer.apply(model, METHODS["act"][0], backend=backend):
        with torch.no_grad():
            batched = model(input_ids=ids, attention_mask=mask).logits
            alone = model(input_ids=ids[1:, :-5]).logits
    torch.testing.assert_close(batched[1, :-5], alone[0], **FP32_TOL)
