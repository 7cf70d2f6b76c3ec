"""The methods' formulas on hand-made numbers, and the chunked backend against the oracle on odd shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from attention_cases import LargestTensor, Stats, attend, call_of, params, plan_of, weights_as_attention
from conftest import build_tiny

import attnsteer
from attnsteer.attention import chunked, reference
from attnsteer.attention.geometry import ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.errors import SilentSiteWarning, SteeringError
from attnsteer.methods.act import ACT, Calibration, sinks_from_column_means
from attnsteer.methods.rules import ReweightRule, RowView
from attnsteer.methods.softplus import LSSAScoring, SoftplusReweight

# backends that compute a group rule (ACT) on hand-made weights: the oracle, the chunked rule
# functions and the CPU flash path (masses and outputs of the groups from the row log-sum-exp)
GROUP_BACKENDS = ("reference", "chunked", "flash")


def _attended_weights(backend, plan, a, mask, info, prompt, stats):
    """The steered weights (1, 1, Q, K) of ``backend`` on the attention whose weights are ``a``."""
    q, k, v = weights_as_attention(a)
    out = attend(backend, plan, q, k, v, mask, info, prompt, stats, scaling=1.0)
    return out[:, :, :, : a.shape[-1]].transpose(1, 2)


# ---- ACT by hand ------------------------------------------------------------------------------
def test_act_calibration_by_hand():
    act = ACT(params(ACT, beta=0.4), layer=0, heads=None)
    (rule,) = act.rules
    assert isinstance(rule, Calibration) and rule.per_head and rule.column_stats
    assert rule.active(True) and not rule.active(False)  # apply_to: prefill leaves decode rows alone
    act.p = dataclasses.replace(act.p, apply_to="all")
    assert rule.active(False)
    a = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    # one decode row at position 2 seeing keys 0..2; the prompt's sink of the head: key 1
    info, mask = ForwardInfo(1, 2, 3, None), MaskView(None, 1, 3)

    def prompt():
        state = PromptState()
        state.put(act.key, "sinks", torch.tensor([[[False, True, False]]]))
        return state

    q, k, _ = weights_as_attention(a)
    call = call_of(q, k, mask, info, prompt(), scaling=1.0)
    out, rows = chunked.apply_group_rule(rule, a, call.rows(None, 0, rows=1), call)
    expected = torch.tensor([0.5 + 0.18 * 0.5 / 0.7, 0.12, 0.2 + 0.18 * 0.2 / 0.7])
    torch.testing.assert_close(out[0, 0, 0], expected)
    assert rows == 1 and abs(out.sum().item() - 1) < 1e-6
    for backend in GROUP_BACKENDS:  # each backend's own computation of the rule gives the same row
        stats = Stats()
        got = _attended_weights(backend, plan_of(act), a, mask, info, prompt(), stats)
        torch.testing.assert_close(got, out, msg=backend)
        assert stats.rows == {id(act): 1}, backend


def test_act_sink_detection_by_hand():
    """m_j = mean over the rows that see j (1/(N - j) on a causal map); first sink dropped."""
    a = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.3, 0.2, 0], [0.4, 0.3, 0.05, 0.25]]).view(1, 1, 4, 4)
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    # m = [2.4/4, 1.1/3, 0.25/2, 0.25/1] = [0.6, 0.367, 0.125, 0.25]
    colsum, count = a.sum(-2), visible.sum(-2, dtype=torch.float32)
    for keep_first, want in ((True, [False, True, False, True]), (False, [True, True, False, True])):
        act = ACT(params(ACT, threshold=0.2, keep_first_sink=keep_first), layer=0, heads=None)
        prompt = PromptState()
        act.rules[0].set_column_stats(colsum, count, torch.arange(4), prompt)
        assert prompt.get(act.key, "sinks")[0, 0].tolist() == want  # keep_first: 0 was the first sink
        for backend in GROUP_BACKENDS:  # each backend's column pass over the prompt's own map
            prompt = PromptState()
            _attended_weights(backend, plan_of(act), a, MaskView(None, 4, 4), ForwardInfo(4, 0, 4, None), prompt, None)
            assert prompt.get(act.key, "sinks")[0, 0].tolist() == want, backend
    assert sinks_from_column_means(torch.zeros(1, 1, 3), 0.1, True).sum() == 0  # no sink, nothing dropped


def test_act_leaves_row_zero_and_sinkless_rows_alone():
    act = ACT(params(ACT, threshold=0.3), layer=0, heads=None)
    (rule,) = act.rules
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.7, 0.1]]).view(1, 1, 3, 3)
    visible = torch.tril(torch.ones(3, 3, dtype=torch.bool)).view(1, 1, 3, 3)
    mask, info = MaskView(None, 3, 3), ForwardInfo(3, 0, 3, None)
    q, k, _ = weights_as_attention(a)
    call = call_of(q, k, mask, info, PromptState(), scaling=1.0)
    chunked.set_column_stats(rule, a.sum(-2), visible.sum(-2, dtype=torch.float32), call)  # as the oracle does
    out, rows = chunked.apply_group_rule(rule, a, call.rows(visible, 0, rows=3), call)
    assert call.prompt.get(act.key, "sinks")[0, 0].tolist() == [False, True, False]
    assert torch.equal(out[0, 0, 0], a[0, 0, 0])  # row 0 untouched
    assert rows == 2
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, 3))
    for backend in GROUP_BACKENDS:  # each backend finds the sinks and calibrates rows 1 and 2 alike
        prompt, stats = PromptState(), Stats()
        got = _attended_weights(backend, plan_of(act), a, mask, info, prompt, stats)
        assert prompt.get(act.key, "sinks")[0, 0].tolist() == [False, True, False], backend
        torch.testing.assert_close(got, out, msg=backend)
        assert stats.rows == {id(act): 2}, backend
    assert (out[0, 0, 1:] - a[0, 0, 1:]).abs().max() > 1e-3  # rows 1 and 2 are calibrated


# ---- softplus re-weighting by hand ---------------------------------------------------------------
def test_softplus_reweighting_by_hand():
    sp = SoftplusReweight(params(SoftplusReweight, p=2.0, offset=1.0), layer=0, heads=None)
    (rule,) = sp.rules
    assert isinstance(rule, ReweightRule) and (rule.power, rule.offset, rule.free_rows) == (2.0, 1.0, 3)
    a = torch.tensor([[[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.5, 0.0]]]])
    visible = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    visible[..., 2, 2] = False  # the last row sees two keys, uniformly
    # rows at positions 1 (first three rows: offset 0), 7 and 8 (offset 1)
    rows = RowView(visible, torch.arange(3), past_len=6, q0=0, rows=3, max_pad=10)  # max_pad: no scalar shortcut
    rows.rel_pos = torch.tensor([1, 7, 8]).view(1, 1, 3, 1)
    assert not rows.all_rows_at_least(3)
    out, changed = reference.reweight_literally(rule, a, rows)
    w0 = torch.tensor([1.5, 0.9, 0.6]) ** 2
    torch.testing.assert_close(out[0, 0, 0], w0 / w0.sum())
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # only 0.5 > 1/3 survives
    torch.testing.assert_close(out[0, 0, 2], a[0, 0, 2])  # uniform row: every w is 0 -> unchanged
    assert changed == 2
    log_space, changed = chunked.apply_reweight_rule(rule, a, rows)
    torch.testing.assert_close(log_space, out)
    assert changed == 2


def test_softplus_large_p_does_not_overflow():
    sp = SoftplusReweight(params(SoftplusReweight, p=15.0), layer=0, heads=None)
    (rule,) = sp.rules
    k = 4096
    a = torch.softmax(torch.randn(1, 1, 1, k) * 3, -1)
    rows = RowView(torch.ones(1, 1, 1, k, dtype=torch.bool), torch.arange(k), past_len=k - 1, rows=1)
    ref, changed = reference.reweight_literally(rule, a, rows)
    log_space, _ = chunked.apply_reweight_rule(rule, a, rows)
    assert changed == 1 and (ref - a).abs().max() > 1e-3  # the row is re-weighted
    assert torch.isfinite(log_space).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(log_space, ref, atol=1e-6, rtol=1e-5)


# ---- chunked vs reference on synthetic shapes -----------------------------------------------------
def _random_attention(b=2, hq=6, hkv=2, q_len=9, k_len=13, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g) * 2
    k = torch.randn(b, hkv, k_len, d, generator=g) * 2
    v = torch.randn(b, hkv, k_len, d, generator=g)
    k[:, :, 0] *= 4  # a strong first-key sink
    return q, k, v


def _padded_mask(b, q_len, k_len, pads):
    """bool (B, 1, Q, K): causal with the queries at the last Q key slots, left padding per row."""
    qpos = torch.arange(k_len - q_len, k_len).view(1, 1, -1, 1)
    keys = torch.arange(k_len).view(1, 1, 1, -1)
    mask = keys <= qpos
    pad = torch.tensor(pads).view(-1, 1, 1, 1)
    return (mask & (keys >= pad)).expand(b, 1, q_len, k_len).clone()


def _prompt(plan, sinks=None):
    """A fresh prompt state; ``sinks`` bool (B, H, P): the prompt's sinks for every ACT of ``plan``."""
    state = PromptState()
    if sinks is not None:
        for m in plan.methods:
            if m.name == "act":
                state.put(m.key, "sinks", sinks)
    return state


@pytest.mark.parametrize("chunk", [None, 1, 4])
@pytest.mark.parametrize("recipe", ["act", "act_heads", "softplus", "lssa", "act+softplus"])
def test_chunked_matches_reference_on_odd_shapes(chunk, recipe):
    """GQA 6/2, padding (a row fully padded at the start), cache offset (K > Q), chunking."""
    heads = torch.tensor([True, False, True, False, False, True])
    make = {
        "act": lambda: [ACT(params(ACT, threshold=0.05, beta=0.2), 0, None)],
        "act_heads": lambda: [ACT(params(ACT, threshold=0.05, beta=0.2), 0, heads)],
        "softplus": lambda: [SoftplusReweight(params(SoftplusReweight, p=2.5), 0, None)],
        "lssa": lambda: [SoftplusReweight(params(SoftplusReweight, p=2.0, scoring="lssa"), 0, heads)],
        "act+softplus": lambda: [
            SoftplusReweight(params(SoftplusReweight, p=1.5), 0, None),
            ACT(params(ACT, threshold=0.05), 0, None),
        ],
    }[recipe]
    q, k, v = _random_attention()
    for q_len, k_len, past in ((9, 9, 0), (9, 13, 4)):
        qq = q[:, :, :q_len]
        kk, vv = k[:, :, :k_len], v[:, :, :k_len]
        pads = (0, 5)
        mask = MaskView(_padded_mask(2, q_len, k_len, pads), q_len, k_len)
        info = ForwardInfo(q_len, past, k_len, torch.tensor(pads))
        plan = plan_of(*make())
        if recipe == "lssa":
            assert [type(r) for r in plan.methods[0].rules] == [LSSAScoring, ReweightRule]
        sinks = None
        if past:  # continuation rows (K > Q): ACT reuses stored prompt sinks (apply_to: all)
            sinks = torch.rand(2, 6, k_len, generator=torch.Generator().manual_seed(1)) > 0.7
            for m in plan.methods:
                if m.name == "act":
                    m.p = dataclasses.replace(m.p, apply_to="all")
        stats_ref, stats_chunked = Stats(), Stats()
        call = call_of(qq, kk, mask, info, _prompt(plan, sinks), scaling=0.35)
        ref, weights = reference.attend(plan.steps(info.is_prefill), call, qq, kk, vv, stats_ref)
        out = attend(
            "chunked", plan, qq, kk, vv, mask, info, _prompt(plan, sinks), stats_chunked, scaling=0.35, chunk=chunk
        )
        valid = torch.tensor([[True] * q_len, [r + past >= 5 for r in range(q_len)]])
        # every method steers rows here (the comparison is not vacuous), and both count the same rows
        assert set(stats_ref.rows) == {id(m) for m in plan.methods}, (q_len, past)
        assert all(n > 0 for n in stats_ref.rows.values()), stats_ref.rows
        plain = attend("reference", plan_of(), qq, kk, vv, mask, info, PromptState(), scaling=0.35)
        assert (ref - plain)[valid].abs().max() > 1e-3
        torch.testing.assert_close(out[valid], ref[valid], atol=2e-6, rtol=1e-5)
        assert stats_chunked.rows == stats_ref.rows
        assert torch.isfinite(out).all()
        sums = weights.sum(-1)[valid.unsqueeze(1).expand_as(weights.sum(-1))]
        torch.testing.assert_close(sums, torch.ones_like(sums))  # mass conserved on real rows


@pytest.mark.parametrize("backend", ["chunked", "flash"])
def test_identity_group_rule_matches_sdpa(backend):
    """Forcing a steered backend with beta = 1 reproduces SDPA (to fp32 rounding)."""
    q, k, v = _random_attention(b=2, hq=4, hkv=4, q_len=11, k_len=11)
    mask = _padded_mask(2, 11, 11, (0, 3))
    plan = plan_of(ACT(params(ACT, beta=1.0, threshold=0.05), 0, None))
    stats = Stats()
    info = ForwardInfo(11, 0, 11, torch.tensor([0, 3]))
    out = attend(backend, plan, q, k, v, MaskView(mask, 11, 11), info, PromptState(), stats, scaling=0.3)
    assert stats.paths == {f"{backend}/prefill": 1}, stats.fallbacks
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out[0], sdpa[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], sdpa[1, 3:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["act", "softplus"])
def test_chunked_never_builds_a_queries_by_keys_tensor(method, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2048)
    b, h, n, d = 1, 4, 128, 8
    q, k, v = _random_attention(b=b, hq=h, hkv=2, q_len=n, k_len=n, d=d)
    plan = plan_of(
        ACT(params(ACT, threshold=0.05), 0, None)
        if method == "act"
        else SoftplusReweight(params(SoftplusReweight), 0, None)
    )
    stats = Stats()
    with LargestTensor() as probe:
        attend(
            "chunked",
            plan,
            q,
            k,
            v,
            MaskView(None, n, n),
            ForwardInfo(n, 0, n, None),
            PromptState(),
            stats,
            scaling=0.3,
        )
    assert sum(stats.rows.values()) > 0  # the method steered rows
    assert probe.largest < b * h * n * n // 8  # chunks only: at most a few rows x keys


# ---- dtypes: error relative to the dtype's own error (flash-attention's rule) --------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["act", "softplus", "lssa"])
def test_low_precision_error_within_twice_naive_error(dtype, method):
    """|chunked(x_low) - oracle(x)| <= 2 |naive_low(x_low) - oracle(x)|, naive = the reference formula
    computed in the low dtype; ACT uses fixed prompt sinks so no threshold flips between the two."""
    q, k, v = _random_attention(b=2, hq=6, hkv=2, q_len=24, k_len=40, d=64, seed=7)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = MaskView(_padded_mask(2, 24, 40, (0, 9)), 24, 40)
    info = ForwardInfo(24, 16, 40, torch.tensor([0, 9]))
    sinks = torch.rand(2, 6, 40, generator=torch.Generator().manual_seed(2)) > 0.8
    if method == "act":
        m = ACT(params(ACT, apply_to="all"), 0, None)
    else:
        m = SoftplusReweight(
            params(SoftplusReweight, p=2.0, scoring="lssa" if method == "lssa" else "softmax"), 0, None
        )
    plan = plan_of(m)

    def prompt():
        state = PromptState()
        state.put(m.key, "sinks", sinks)
        return state

    stats = Stats()
    oracle = attend("reference", plan, q.float(), k.float(), v.float(), mask, info, prompt(), stats, scaling=0.125)
    naive = attend("reference", plan, q, k, v, mask, info, prompt(), scaling=0.125, compute_dtype=dtype)
    ours = attend("chunked", plan, q, k, v, mask, info, prompt(), scaling=0.125)
    valid = torch.tensor([[True] * 24, [r + 16 >= 9 for r in range(24)]])
    assert stats.rows[id(m)] > 0  # the method steered rows
    naive_err = (naive.float() - oracle)[valid].abs().max()
    ours_err = (ours.float() - oracle)[valid].abs().max()
    assert ours.dtype == dtype
    assert ours_err <= 2 * naive_err, (ours_err, naive_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_run_steered(dtype):
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    model = build_tiny("llama", dtype=dtype)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for recipe in ("act-default", "softplus-reweight"):
            with attnsteer.apply(model, recipe) as handle:
                out = model(input_ids=ids).logits
                assert out.dtype == dtype and torch.isfinite(out).all()
                assert not torch.equal(out, base)
                stats = handle.stats()
                assert all(s["fired"] for s in stats), stats


# ---- lifecycle -----------------------------------------------------------------------------
def test_eager_original_is_supported_and_restored():
    sdpa = build_tiny("qwen2")
    eager = build_tiny("qwen2", attn_implementation="eager")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    valid = mask.bool()
    out = []
    for model in (sdpa, eager):
        with torch.no_grad():
            base = model(input_ids=ids, attention_mask=mask).logits
        with attnsteer.apply(
            model, {"interventions": [{"method": "act", "layers": "1:", "params": {"threshold": 0.05}}]}
        ) as handle:
            out.append(model(input_ids=ids, attention_mask=mask).logits)
            stats = handle.stats()
        assert all(s["fired"] for s in stats), stats
        assert (out[-1] - base)[valid].abs().max() > 1e-3  # steered
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(out[0][valid], out[1][valid], atol=1e-5, rtol=1e-5)


def test_double_apply_raises_and_context_manager_cleans_up_on_error():
    model = build_tiny("llama")
    with attnsteer.apply(model, "act-default"):
        with pytest.raises(SteeringError, match="already steered"):
            attnsteer.apply(model, "softplus-reweight")
    with pytest.raises(RuntimeError, match="boom"):
        with attnsteer.apply(model, "softplus-reweight"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    attnsteer.apply(model, "act-default").remove()


def test_site_that_never_fires_warns_on_remove():
    model = build_tiny("llama")
    ids = torch.randint(3, 96, (1, 10))
    handle = attnsteer.apply(
        model, {"interventions": [{"method": "act", "layers": "all", "params": {"threshold": 0.999}}]}
    )
    model(input_ids=ids)
    assert all(s["calls"] == 1 and s["fired"] == 0 for s in handle.stats())
    with pytest.warns(SilentSiteWarning, match="never changed a row"):
        handle.remove()


def test_unsupported_attention_implementation_says_how_to_fix():
    model = build_tiny("llama")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(attnsteer.UnsupportedModelError, match="attn_implementation='sdpa'"):
        attnsteer.apply(model, "act-default")
