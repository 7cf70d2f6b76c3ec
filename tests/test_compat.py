"""Every touchpoint with transformers internals (attnsteer/compat.py), one test each.

Each test fails with a message naming the touchpoint, so a transformers release that changes one
is caught here -- not by users getting silently different numbers.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import vlm_fixtures as F
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer import api, compat
from attnsteer.attention import dispatch
from attnsteer.errors import SteeringError

ACT_ALL = {"interventions": [{"method": "act", "layers": "all", "params": {"threshold": 0.05, "apply_to": "all"}}]}
SOFTPLUS = {"interventions": [{"method": "softplus", "layers": "all", "params": {"p": 2.0}}]}


def _ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _decoder_calls(model, **inputs):
    """The bound arguments of every call of the text decoder's forward during ``model(**inputs)``."""
    seen = []
    decoder = model.model

    def hook(module, args, kwargs):
        seen.append(compat.bind_arguments(module.forward, args, kwargs))

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    return out, seen


# ---- attention / mask interface ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_registration_puts_attention_and_mask_builder_under_the_neutral_name(impl):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = dispatch.registered_name(impl)
    assert name in ALL_ATTENTION_FUNCTIONS.valid_keys(), "attention interface: registered name missing"
    assert name in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys(), "mask interface: registered name missing"
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is ALL_MASK_ATTENTION_FUNCTIONS[impl], (
        "mask interface: the neutral name must build the original implementation's masks"
    )
    for word in ("flash", "sdpa", "flex_attention"):
        assert word not in name  # transformers substring-matches these names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_original_attention_function_of_every_family(family, impl):
    model = build_tiny(family, attn_implementation=impl)
    module = model.model.layers[0].self_attn
    function = compat.attention_function(impl, module)
    assert callable(function), f"{family}: no {impl} attention function"
    params = list(inspect.signature(function).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"], (
        f"attention call contract changed for {family}/{impl}: {params}"
    )


def test_missing_eager_function_is_a_compatibility_error(monkeypatch):
    model = build_tiny("llama")
    module = model.model.layers[0].self_attn
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.delattr(llama, "eager_attention_forward")
    with pytest.raises(compat.CompatibilityError, match="eager_attention_forward"):
        compat.attention_function("eager", module)


# ---- attention implementation on configs -----------------------------------------------------------
@pytest.mark.parametrize("family", F.FAMILIES)
def test_text_attention_switch_and_restore_on_every_sub_config(family):
    model = F.build_vlm(family)
    before = [(type(c).__name__, c._attn_implementation) for c in compat.config_tree(model.config)]
    snapshot = compat.snapshot_attn_implementations(model)
    text_key = attnsteer.archs.ARCHS[model.config.model_type].text_config_key
    name = dispatch.registered_name("sdpa")
    compat.set_text_attention(model, text_key, name)
    after = {type(c).__name__: c._attn_implementation for c in compat.config_tree(model.config)}
    text = getattr(model.config, text_key)
    assert text._attn_implementation == name, "set_attn_implementation dict form did not switch the text config"
    switched = [n for n, v in after.items() if v == name]
    assert switched == [type(text).__name__], f"only the text config may switch; switched: {switched}"
    compat.restore_attn_implementations(snapshot)
    assert [(type(c).__name__, c._attn_implementation) for c in compat.config_tree(model.config)] == before


def test_attn_implementation_without_the_attribute_is_a_compatibility_error():
    with pytest.raises(compat.CompatibilityError, match="_attn_implementation"):
        compat.attn_implementation(object())


# ---- KV cache -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_found_by_type_in_decoder_calls_and_outputs(family):
    model = build_tiny(family)
    ids = _ids()
    with torch.no_grad():
        out, calls = _decoder_calls(model, input_ids=ids, use_cache=True)
        cache = compat.output_cache(out)
        assert cache is not None, "model outputs: no Cache among the output's fields"
        assert compat.cache_length(cache) == ids.shape[1]
        step = ids[:, -1:]
        _, calls = _decoder_calls(model, input_ids=step, use_cache=True, **compat.with_cache(model, cache))
    found = compat.find_cache(calls[0].values())
    assert found is cache, "decoder forward: the cache passed to the model did not reach the decoder's arguments"
    assert compat.cache_length(found) == ids.shape[1] + 1  # updated in place by that forward


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_argument_is_read_from_the_signature(family):
    model = build_tiny(family)
    for forward in (model.forward, model.model.forward):
        name = compat.cache_argument(forward)
        assert name in inspect.signature(forward).parameters


def test_cache_argument_of_every_vlm_and_instructblip_language_model():
    for family in F.FAMILIES:
        model = F.build_vlm(family)
        host = attnsteer.archs.get_path(model, attnsteer.archs.ARCHS[model.config.model_type].stream_host)
        assert compat.cache_argument(host.forward)


def test_cache_argument_refuses_to_guess():
    def forward(input_ids, attention_mask=None):
        return input_ids

    with pytest.raises(compat.CompatibilityError, match="0 Cache-annotated"):
        compat.cache_argument(forward)


def test_two_caches_in_one_call_are_ambiguous():
    from transformers import DynamicCache

    with pytest.raises(compat.CompatibilityError, match="2 Cache objects"):
        compat.find_cache([DynamicCache(), DynamicCache()])


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_key_length_matches_what_attention_receives(family):
    """The mask size transformers reports per layer equals the keys the attention function gets
    (prefill, then decode steps past mistral's sliding window of 6)."""
    model = build_tiny(family)
    impl = model.config._attn_implementation  # eager for gemma2 (soft-capped)
    got = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        got[module.layer_idx] = key.shape[2]
        return compat.attention_function(impl, module)(module, query, key, value, attention_mask, **kwargs)

    name = f"attnsteer_test_spy_{family}"  # registration is once per process and name
    compat.register_attention(name, spy, mask_of=impl)
    model.set_attn_implementation(name)
    ids = _ids(length=9)
    with torch.no_grad():
        expected = {l: compat.expected_key_length(None, ids.shape[1], l) for l in range(4)}
        out = model(input_ids=ids, use_cache=True)
        assert got == expected
        cache = compat.output_cache(out)
        for _ in range(3):
            expected = {l: compat.expected_key_length(cache, 1, l) for l in range(4)}
            out = model(input_ids=ids[:, -1:], use_cache=True, **compat.with_cache(model, cache))
            assert got == expected, f"{family}: keys seen {got}, cache said {expected}"


def test_keep_batch_rows_crops_the_cache():
    model = build_tiny("llama")
    with torch.no_grad():
        out = model(input_ids=_ids(batch=4), use_cache=True)
    cache = compat.output_cache(out)
    compat.keep_batch_rows(cache, 2, out.logits.device)
    with torch.no_grad():
        step = model(input_ids=_ids(batch=2, length=1), use_cache=True, **compat.with_cache(model, cache))
    assert step.logits.shape[0] == 2


# ---- binding -------------------------------------------------------------------------------------------
def test_instructblip_generate_with_positional_input_ids_steers():
    """transformers' InstructBLIP generate takes (pixel_values, qformer_input_ids,
    qformer_attention_mask, input_ids, ...): a positional input_ids must reach the roles."""
    model = F.build_vlm("instructblip")
    inputs = F.make_inputs("instructblip", model, n_images=[1, 1], seed=1)
    recipe = {"interventions": [{"method": "pai", "params": {"alpha": 0.8}}]}
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=inputs["attention_mask"])
    with attnsteer.apply(model, recipe) as handle:
        by_name = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        positional = model.generate(
            inputs["pixel_values"],
            inputs["qformer_input_ids"],
            inputs["qformer_attention_mask"],
            inputs["input_ids"],
            **kwargs,
        )
        assert sum(s["fired"] for s in handle.stats()) > 0
    assert torch.equal(by_name, positional)


def test_first_argument_of_a_decoder_layer():
    model = build_tiny("llama")
    layer = model.model.layers[0]
    hidden = torch.zeros(1, 2, 64)
    assert compat.first_argument(layer.forward, (hidden,), {}) is hidden
    assert compat.first_argument(layer.forward, (), {"hidden_states": hidden}) is hidden


# ---- the cross-checks: disagreement raises, never guesses ------------------------------------------
def test_a_release_that_hides_the_cache_fails_loudly(monkeypatch):
    """What transformers 5.24 did to the old lookup by name: the decoder hook cannot find the cache.
    The attention function then receives more keys than a prefill has, and attnsteer must raise,
    naming the transformers version -- not recompute ACT's sinks from one decode row."""
    model = build_tiny("llama")
    ids = _ids()
    real_find = compat.find_cache
    with attnsteer.apply(model, ACT_ALL):
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            monkeypatch.setattr(compat, "find_cache", lambda values: None)
            with pytest.raises(compat.CompatibilityError) as err:
                model(input_ids=ids[:, -1:], use_cache=True, **compat.with_cache(model, real_find(out.values())))
    message = str(err.value)
    assert compat.transformers_version() in message and "keys" in message and "layer" in message


def test_attention_called_outside_a_seen_forward_raises():
    model = build_tiny("llama")
    with attnsteer.apply(model, SOFTPLUS) as handle:
        handle._state.info = None
        module = model.model.layers[0].self_attn
        q = torch.zeros(1, 4, 3, 16)
        kv = torch.zeros(1, 2, 3, 16)
        with pytest.raises(SteeringError, match="decoder pre-hook did not see"):
            handle._sites[0](module, q, kv, kv, None, scaling=0.25)


def test_a_mask_of_the_wrong_width_raises_instead_of_assuming_no_padding():
    model = build_tiny("llama")
    ids = _ids(length=6)
    with attnsteer.apply(model, SOFTPLUS), torch.no_grad():
        with pytest.raises(SteeringError, match="padding mask was expected"):
            model.model(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_a_3d_mask_raises():
    from attnsteer.state import padding_facts

    with pytest.raises(SteeringError, match="3 dimensions"):
        padding_facts(torch.ones(2, 1, 5), 2, 5, 0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_generation_steers_like_the_dynamic_cache(family):
    """StaticCache hands every layer max_cache_len keys (later ones empty): the cross-check takes
    the layer's mask size from the cache, and results equal the dynamic cache's."""
    model = build_tiny(family)
    ids = _ids(length=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=mask)
    with attnsteer.apply(model, SOFTPLUS) as handle:
        dynamic = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
        assert sum(s["fired"] for s in handle.stats()) > 0
    assert torch.equal(dynamic, static)


def test_transactional_apply_names_every_step():
    assert api._after_install_step is None  # the seam is off unless a test sets it


# ---- torch touchpoint: the CPU flash kernel the fused backend builds on ----------------------------
def test_cpu_flash_kernel_returns_output_and_row_lse():
    """attnsteer's CPU fused path relies on torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    returning (out (B, H, Q, D), lse (B, H, Q)) with lse the natural-log LSE of the scaled, masked
    scores. A torch release that renames or changes it must fail here (at run time the backend
    would warn and fall back to the slower chunked path)."""
    from attnsteer.attention import flash_cpu

    flash_cpu._OP_STATE.clear()
    op = flash_cpu._flash_op()
    assert op is not None, flash_cpu._OP_STATE.get("reason")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    out, lse = op(q, k, v, 0.0, True, scale=0.25)
    s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 3, 7, 16) and lse.shape == (2, 3, 7) and lse.dtype == torch.float32


def test_missing_cpu_flash_kernel_warns_and_falls_back(monkeypatch):
    from attnsteer.attention import flash_cpu
    from attnsteer.errors import AttnsteerWarning

    def missing():
        raise AttributeError(
            "'_OpNamespace' 'aten' object has no attribute '_scaled_dot_product_flash_attention_for_cpu'"
        )

    monkeypatch.setattr(flash_cpu, "_OP_STATE", {})
    monkeypatch.setattr(flash_cpu, "_kernel", missing)
    with pytest.warns(AttnsteerWarning, match="chunked path"):
        assert flash_cpu._flash_op() is None
    model = build_tiny("llama")
    with attnsteer.apply(model, ACT_ALL) as handle:
        model(input_ids=_ids())
        stats = handle.stats()
    # every layer's call fell back from the flash kernel, with the reason, and ran on the chunked path
    for site in stats:
        assert site["paths"] == {"chunked/prefill": 1}, site
        reasons = [reason for reason in site["fallbacks"] if reason.startswith("flash: cpu flash kernel unavailable")]
        assert reasons and site["fallbacks"][reasons[0]] > 0, site["fallbacks"]


# ---- beam search and static caches -----------------------------------------------------------------
def test_beam_search_reorders_the_cache_through_reorder_cache_and_the_callback_follows():
    """generate()'s beam search must call ``Cache.reorder_cache(beam_idx)`` on the cache the prefill
    received; attnsteer's per-row state (PAI's text-only stream, sink sets) follows those calls."""
    model = build_tiny("llama")
    seen, orders = [], []

    def record(module, args, kwargs):
        cache = compat.find_cache(compat.bind_arguments(module.forward, args, kwargs).values())
        if cache is not None and compat.cache_length(cache) == 0:
            compat.on_cache_reorder(cache, lambda index: orders.append(index.clone()))
            seen.append(cache)

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(_ids(), max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert len(seen) == 1, "beam search: the prefill did not receive an empty Cache"
    assert len(orders) >= 3, f"beam search: reorder_cache(beam_idx) was called {len(orders)} times for 4 steps"
    for index in orders:
        assert not index.is_floating_point() and index.shape == (6,), "beam search: beam_idx is not (batch * beams,)"
        assert bool(((index // 3) == torch.arange(6) // 3).all()), "beam search: a beam moved to another prompt"


def test_static_caches_are_told_apart_from_dynamic_ones():
    from transformers import DynamicCache, StaticCache

    model = build_tiny("llama")
    assert compat.cache_is_static(StaticCache(config=model.config, max_cache_len=16)) is True
    assert compat.cache_is_static(DynamicCache()) is False
