"""Logit soft-capping (Gemma 2) and alternating sliding-window / global layers (Gemma 2 / 3), and
masks that let a row see later keys (Gemma 3's bidirectional image blocks): every backend honours
them, and a method's own step acts on the capped logits."""

from __future__ import annotations

import types

import pytest
import torch
from attention_cases import Stats, attend, call_of, case, inputs, padded_mask
from conftest import TINY_SOFTCAP, VOCAB, build_tiny

import attnsteer
from attnsteer import kernels
from attnsteer.attention import chunked, dispatch, reference
from attnsteer.attention.geometry import ForwardInfo, MaskView
from attnsteer.errors import SilentSiteWarning, UnsupportedModelError

FP32 = dict(atol=2e-5, rtol=2e-5)
# ACT with a threshold no column mean can exceed: no sinks, so the weights are the model's own --
# the call still runs through attnsteer's backend (mask, window and soft-cap included)
PASS_THROUGH = {"interventions": [{"method": "act", "layers": "all", "params": {"threshold": 1.0}}]}


def no_change_expected():
    """The pass-through recipe changes no row, by design: attnsteer warns about that at remove()."""
    return pytest.warns(SilentSiteWarning, match="never changed a row")


ACT_REAL = {"method": "act", "params": {"beta": 0.3, "threshold": 0.08}}


def _ids(batch=2, length=16, pad=(0, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad[:batch]):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text"])
def gemma(request):
    return build_tiny(request.param)


# ---- model level ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_steered_attention_without_a_change_equals_the_models_own(gemma, backend):
    """Prompts of 16 tokens against windows of 6, left padding: a pass through attnsteer's backend
    on every layer (global and windowed) gives the model's own logits; generate too."""
    ids, mask = _ids()
    base = _logits(gemma, ids, mask)
    gen_kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    base_gen = gemma.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    with no_change_expected(), attnsteer.apply(gemma, PASS_THROUGH, backend=backend) as handle:
        steered = _logits(gemma, ids, mask)
        stats = handle.stats()
        assert len(stats) == gemma.config.num_hidden_layers
        # every layer's call ran through one of attnsteer's backends (not delegated to the model's own)
        assert all(s["calls"] == 1 and sum(s["paths"].values()) == 1 for s in stats), stats
        if backend == "reference":
            assert all(s["paths"] == {"reference/prefill": 1} for s in stats), stats
        steered_gen = gemma.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    valid = mask.bool()
    torch.testing.assert_close(steered[valid], base[valid], **FP32)
    assert torch.equal(steered_gen, base_gen)


def test_the_check_fails_without_the_soft_cap(monkeypatch):
    """The pass-through test can fail: dropping the cap in attnsteer's backends changes Gemma 2."""
    model = build_tiny("gemma2")
    ids, mask = _ids()
    base = _logits(model, ids, mask)
    monkeypatch.setattr(chunked, "soft_cap", lambda s, cap: s)  # the chunked path every soft-capped call takes
    with no_change_expected(), attnsteer.apply(model, PASS_THROUGH, backend="auto") as handle:
        uncapped = _logits(model, ids, mask)
        assert all(s["paths"] == {"chunked/prefill": 1} for s in handle.stats())
    assert (uncapped - base)[mask.bool()].abs().max() > 1e-3


def test_soft_capped_calls_take_the_chunked_path_on_cpu():
    model = build_tiny("gemma2")
    ids, mask = _ids()
    with no_change_expected(), attnsteer.apply(model, PASS_THROUGH, backend="auto") as handle:
        _logits(model, ids, mask)
        stats = handle.stats()
    assert len(stats) == model.config.num_hidden_layers
    for s in stats:  # the flash path does not implement the cap: every layer's call fell back, saying why
        assert s["paths"] == {"chunked/prefill": 1}, s
        assert s["fallbacks"] == {"flash: logit soft-capping": 1}, s


@pytest.mark.parametrize("layers", [[1], [0], [0, 1]], ids=["global", "windowed", "both"])
def test_recipe_on_a_global_layer_next_to_a_windowed_one(gemma, layers):
    """Gemma layer types alternate sliding (0, 2) / full (1, 3): steering one kind leaves the other
    bit-identical, and the fast backend == reference on both, chunked in few rows too."""
    assert gemma.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    ids, mask = _ids(length=18)
    recipe = {"interventions": [{**ACT_REAL, "layers": layers}]}
    out = {}
    with torch.no_grad():
        base = gemma(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for backend in ("reference", "auto"):
        with attnsteer.apply(gemma, recipe, backend=backend) as handle:
            with torch.no_grad():
                out[backend] = gemma(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            stats = handle.stats()
            assert [s["layer"] for s in stats] == layers
            assert all(s["fired"] and s["rows_modified"] > 0 for s in stats), stats
    valid = mask.bool()
    first = min(layers)
    assert torch.equal(out["auto"][first], base[first])  # layers before the first steered one
    assert (out["auto"][first + 1][valid] - base[first + 1][valid]).abs().max() > 1e-3
    torch.testing.assert_close(out["auto"][-1][valid], out["reference"][-1][valid], **FP32)


def test_windowed_layers_beyond_the_window_in_decode(gemma):
    """Cached generation past the window (sliding caches keep only the last keys) == recomputing
    the whole sequence every step, with softplus re-weighting (its decode rows equal prefill rows)."""
    ids, _ = _ids(batch=1, pad=(0,), length=10)
    recipe = {"interventions": [{"method": "softplus", "params": {"p": 2.0, "offset": 1.0}}]}
    with torch.no_grad():
        base = gemma(input_ids=ids).logits
    with attnsteer.apply(gemma, recipe) as handle:
        with torch.no_grad():
            assert (gemma(input_ids=ids).logits - base).abs().max() > 1e-3  # the re-weighting steers
        cached = gemma.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # every layer re-weighted rows in every forward, decode steps past the window included
        stats = handle.stats()
        assert all(s["calls"] == 7 and s["fired"] == 7 for s in stats), stats
        seq = ids
        for _ in range(6):
            with torch.no_grad():
                nxt = gemma(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_sdpa_with_a_soft_cap_is_refused():
    config = types.SimpleNamespace(_attn_implementation="sdpa", attn_logit_softcapping=TINY_SOFTCAP)
    with pytest.raises(UnsupportedModelError, match="attn_implementation='eager'"):
        dispatch.check_implementation(config)


def test_attention_arguments_attnsteer_does_not_implement_are_refused():
    with pytest.raises(UnsupportedModelError, match="s_aux"):
        dispatch.attention_softcap({"s_aux": torch.zeros(2)})
    assert dispatch.attention_softcap({"softcap": 30.0, "sliding_window": 4}) == 30.0
    assert dispatch.attention_softcap({"softcap": None}) is None


# ---- attention level -----------------------------------------------------------------------------
def _bidirectional_mask(b, q_len, k_len, pads, block):
    """Causal + left padding, plus rows of ``block`` (a range of key indices) seeing each other."""
    mask = padded_mask(b, q_len, k_len, pads)
    lo, hi = block
    rows = torch.arange(k_len - q_len, k_len, device=mask.device)
    inside_rows = (rows >= lo) & (rows < hi)
    inside_keys = torch.zeros(k_len, dtype=torch.bool, device=mask.device)
    inside_keys[lo:hi] = True
    keys_ok = torch.arange(k_len, device=mask.device).view(1, -1) >= torch.tensor(pads, device=mask.device).view(-1, 1)
    extra = inside_rows.view(1, 1, -1, 1) & (inside_keys.view(1, -1) & keys_ok).view(b, 1, 1, k_len)
    return mask | extra


# backends a call is run on: the oracle, the router's choice with the CPU flash path (the Triton
# kernels on CUDA) falling back to the chunked path when it must, the chunked path in chunks of 3
# rows, and the router with the Triton backend first (its kernels on CUDA, or on CPU under Triton's
# interpreter, where they apply; soft-capped and non-causal calls never reach them)
BACKEND_RUNS = {
    "reference": ("reference", {}),
    "auto": ("auto", {"triton": "auto"}),
    "chunked": ("chunked", {"chunk": 3}),
    "triton": ("auto", {"triton": "interpret"}),
}


@pytest.mark.parametrize("method", ["act", "softplus", "var"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no-cap", "cap"])
@pytest.mark.parametrize("mask_kind", ["causal", "bidirectional", "window"])
def test_backends_honour_cap_window_and_later_keys(method, softcap, mask_kind, monkeypatch):
    q_len = k_len = 14
    q, k, v = inputs(2, 6, 2, q_len, k_len, 16, seed=2)
    pads = (0, 3)
    if mask_kind == "bidirectional":
        raw = _bidirectional_mask(2, q_len, k_len, pads, (4, 10))
    else:
        raw = padded_mask(2, q_len, k_len, pads, window=5 if mask_kind == "window" else 0)
    mask = MaskView(raw, q_len, k_len)
    info = ForwardInfo(q_len, 0, k_len, torch.tensor(pads))
    valid = torch.tensor([[r >= pad for r in range(q_len)] for pad in pads], device=q.device)
    plan, prompt = case(method, k_len, 0)
    out = {}
    for name, (backend, kw) in BACKEND_RUNS.items():
        stats = Stats()
        out[name] = attend(backend, plan, q, k, v, mask, info, prompt(), stats, scaling=0.25, softcap=softcap, **kw)
        if name == "reference":  # the method steers rows here: the comparisons below are not vacuous
            assert stats.rows[id(plan.methods[0])] > 0
        if backend == "auto" and (softcap or mask_kind == "bidirectional"):
            # no fast path implements the cap or a row seeing later keys: the chunked path ran
            assert stats.paths == {"chunked/prefill": 1}, (stats.paths, stats.fallbacks)
        elif name == "triton" and kernels.available() and (q.is_cuda or kernels.interpreting()):
            assert stats.paths == {"triton/prefill": 1}, stats.fallbacks  # the kernels themselves ran
    for name in ("auto", "chunked", "triton"):
        torch.testing.assert_close(out[name][valid], out["reference"][valid], **FP32)
    if mask_kind == "bidirectional":  # the later keys matter: causal truncation would differ
        monkeypatch.setattr(chunked, "sees_later_keys", lambda *a: False)
        wrong = attend("chunked", plan, q, k, v, mask, info, prompt(), scaling=0.25, softcap=softcap, chunk=3)
        assert (wrong - out["reference"])[valid].abs().max() > 1e-3


def test_methods_act_on_the_capped_logits():
    """Softplus re-weighting of a capped call == the re-weighting of the capped softmax, by hand."""
    q, k, v = inputs(1, 2, 2, 6, 6, 8, seed=3)
    info = ForwardInfo(6, 0, 6, None)
    plan, prompt = case("softplus", 6, 0)
    (rule,) = plan.methods[0].rules
    call = call_of(q, k, MaskView(None, 6, 6), info, prompt(), scaling=0.5, softcap=1.5)
    _, weights = reference.attend(plan.steps(True), call, q, k, v, Stats())
    causal = torch.ones(6, 6, dtype=torch.bool, device=q.device).tril().view(1, 1, 6, 6)
    rows = call.rows(causal, 0, rows=6)
    capped = torch.softmax(
        (torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 1.5) * 1.5).masked_fill(~causal, float("-inf")), -1
    )
    expected, _ = reference.reweight_literally(rule, capped, rows)
    assert (expected - capped).abs().max() > 1e-3  # the re-weighting changes the capped weights
    torch.testing.assert_close(weights, expected, **FP32)
    uncapped, _ = reference.reweight_literally(
        rule, torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")), -1), rows
    )
    assert (uncapped - expected).abs().max() > 1e-3


def test_cli_loading_with_an_implementation_the_model_lacks_says_use_eager(monkeypatch):
    """transformers refuses sdpa for Gemma 2 at load time; the CLI's error says what to pass."""
    import io

    from attnsteer import models
    from attnsteer.errors import UsageError

    def refuse(*args, **kwargs):
        raise ValueError("Gemma2ForCausalLM does not support an attention implementation through sdpa yet")

    monkeypatch.setattr(models, "load_with_progress", refuse)
    with pytest.raises(UsageError, match="--model_args attn_implementation=eager"):
        models.load_checked("some/gemma-2", {}, io.StringIO())
