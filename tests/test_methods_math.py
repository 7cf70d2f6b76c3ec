"""The methods' formulas on hand-made numbers, and the fused backend against the oracle on odd shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from attention_cases import LargestTensor
from conftest import build_tiny

import attnsteer
from attnsteer.attention import fused as fused_mod
from attnsteer.attention.fused import fused_attention
from attnsteer.attention.reference import reference_attention
from attnsteer.attention.rows import ForwardInfo, MaskView, row_context
from attnsteer.errors import AttnsteerWarning, SteeringError
from attnsteer.methods.act import ACT, sinks_from_column_means
from attnsteer.methods.base import StepInfo
from attnsteer.methods.softplus import SoftplusReweight
from attnsteer.plan import LayerPlan


def _params(cls, **over):
    return {name: over.get(name, p.default) for name, p in cls.params.items()}


class NoStats:
    def record(self, method, rows):
        pass


def _ctx(a, rel_pos=None, n_visible=None):
    q, k = a.shape[-2:]
    visible = torch.ones(1, 1, q, k, dtype=torch.bool) if n_visible is None else n_visible
    if rel_pos is None:
        rel_pos = torch.arange(q).view(1, 1, q, 1) + 5
    return row_context(visible, ForwardInfo(q, 0, k, None), 0, torch.arange(k)), rel_pos


# ---- ACT by hand ------------------------------------------------------------------------------
def test_act_calibration_by_hand():
    act = ACT(_params(ACT, beta=0.4), layer=0, heads=None)
    act.prompt_state["sinks"] = torch.tensor([[[False, True, False]]])
    a = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    visible = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    ctx = row_context(visible, ForwardInfo(1, 3, 4, None), 0, torch.arange(3))
    out, rows = act.reference_weights(a, ctx, StepInfo(False, 0, 3))
    expected = torch.tensor([0.5 + 0.18 * 0.5 / 0.7, 0.12, 0.2 + 0.18 * 0.2 / 0.7])
    act.p = dataclasses.replace(act.p, apply_to="all")
    out, rows = act.reference_weights(a, ctx, StepInfo(False, 0, 3))
    torch.testing.assert_close(out[0, 0, 0], expected)
    assert rows == 1 and abs(out.sum().item() - 1) < 1e-6
    fused, _ = act.fused_weights(a, ctx, StepInfo(False, 0, 3))
    torch.testing.assert_close(fused, out)


def test_act_sink_detection_by_hand():
    """m_j = mean over the rows that see j (1/(N - j) on a causal map); first sink dropped."""
    a = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.3, 0.2, 0], [0.4, 0.3, 0.05, 0.25]]).view(1, 1, 4, 4)
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    ctx = row_context(visible, ForwardInfo(4, 0, 4, None), 0, torch.arange(4))
    # m = [2.4/4, 1.1/3, 0.25/2, 0.25/1] = [0.6, 0.367, 0.125, 0.25]
    act = ACT(_params(ACT, threshold=0.2), layer=0, heads=None)
    act.reference_weights(a, ctx, StepInfo(True, 0, 4))
    assert act.prompt_state["sinks"][0, 0].tolist() == [False, True, False, True]  # 0 was the first sink
    act = ACT(_params(ACT, threshold=0.2, keep_first_sink=False), layer=0, heads=None)
    act.reference_weights(a, ctx, StepInfo(True, 0, 4))
    assert act.prompt_state["sinks"][0, 0].tolist() == [True, True, False, True]
    assert sinks_from_column_means(torch.zeros(1, 1, 3), 0.1, True).sum() == 0  # no sink, nothing dropped


def test_act_leaves_row_zero_and_sinkless_rows_alone():
    act = ACT(_params(ACT, threshold=0.3), layer=0, heads=None)
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.7, 0.1]]).view(1, 1, 3, 3)
    visible = torch.tril(torch.ones(3, 3, dtype=torch.bool)).view(1, 1, 3, 3)
    ctx = row_context(visible, ForwardInfo(3, 0, 3, None), 0, torch.arange(3))
    out, rows = act.reference_weights(a, ctx, StepInfo(True, 0, 3))
    assert act.prompt_state["sinks"][0, 0].tolist() == [False, True, False]
    assert torch.equal(out[0, 0, 0], a[0, 0, 0])  # row 0 untouched
    assert rows == 2
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, 3))


# ---- softplus re-weighting by hand ---------------------------------------------------------------
def test_softplus_reweighting_by_hand():
    sp = SoftplusReweight(_params(SoftplusReweight, p=2.0, offset=1.0), layer=0, heads=None)
    a = torch.tensor([[[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.5, 0.0]]]])
    visible = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    visible[..., 2, 2] = False  # the last row sees two keys, uniformly
    # rows at positions 1 (first three rows: offset 0), 7 and 8 (offset 1)
    info = ForwardInfo(3, 6, 9, None)
    ctx = row_context(visible, info, 0, torch.arange(3))
    ctx.rel_pos = torch.tensor([1, 7, 8]).view(1, 1, 3, 1)
    ctx.max_pad = 10  # rows are not all past position 3: no scalar shortcut
    out, rows = sp.reference_weights(a, ctx, StepInfo(False, 0, 3))
    w0 = torch.tensor([1.5, 0.9, 0.6]) ** 2
    torch.testing.assert_close(out[0, 0, 0], w0 / w0.sum())
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # only 0.5 > 1/3 survives
    torch.testing.assert_close(out[0, 0, 2], a[0, 0, 2])  # uniform row: every w is 0 -> unchanged
    assert rows == 2
    fused, _ = sp.fused_weights(a, ctx, StepInfo(False, 0, 3))
    torch.testing.assert_close(fused, out)


def test_softplus_large_p_does_not_overflow():
    sp = SoftplusReweight(_params(SoftplusReweight, p=15.0), layer=0, heads=None)
    k = 4096
    a = torch.softmax(torch.randn(1, 1, 1, k) * 3, -1)
    ctx = row_context(torch.ones(1, 1, 1, k, dtype=torch.bool), ForwardInfo(1, k - 1, k, None), 0, torch.arange(k))
    ref, _ = sp.reference_weights(a, ctx, StepInfo(False, 0, k))
    fused, _ = sp.fused_weights(a, ctx, StepInfo(False, 0, k))
    assert torch.isfinite(fused).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-5)


# ---- fused vs reference on synthetic shapes -----------------------------------------------------
def _plan(*methods):
    plan = LayerPlan(0)
    plan.methods.extend(methods)
    return plan


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


@pytest.mark.parametrize("chunk", [None, 1, 4])
@pytest.mark.parametrize("recipe", ["act", "act_heads", "softplus", "lssa", "act+softplus"])
def test_fused_matches_reference_on_odd_shapes(chunk, recipe):
    """GQA 6/2, padding (a row fully padded at the start), cache offset (K > Q), chunking."""

    def build():
        heads = torch.tensor([True, False, True, False, False, True])
        make = {
            "act": lambda: [ACT(_params(ACT, threshold=0.05, beta=0.2), 0, None)],
            "act_heads": lambda: [ACT(_params(ACT, threshold=0.05, beta=0.2), 0, heads)],
            "softplus": lambda: [SoftplusReweight(_params(SoftplusReweight, p=2.5), 0, None)],
            "lssa": lambda: [SoftplusReweight(_params(SoftplusReweight, p=2.0, scoring="lssa"), 0, heads)],
            "act+softplus": lambda: [
                SoftplusReweight(_params(SoftplusReweight, p=1.5), 0, None),
                ACT(_params(ACT, threshold=0.05), 0, None),
            ],
        }[recipe]
        return _plan(*make())

    q, k, v = _random_attention()
    for q_len, k_len, past in ((9, 9, 0), (9, 13, 4)):
        qq = q[:, :, :q_len]
        kk, vv = k[:, :, :k_len], v[:, :, :k_len]
        pads = (0, 5)
        mask = MaskView(_padded_mask(2, q_len, k_len, pads), q_len, k_len)
        info = ForwardInfo(q_len, past, k_len, torch.tensor(pads))
        plan_ref, plan_fused = build(), build()
        if past:  # continuation rows (K > Q): ACT reuses stored prompt sinks (apply_to: all)
            sinks = torch.rand(2, 6, k_len, generator=torch.Generator().manual_seed(1)) > 0.7
            for plan in (plan_ref, plan_fused):
                for m in plan.methods:
                    if m.name == "act":
                        m.p = dataclasses.replace(m.p, apply_to="all")
                        m.prompt_state["sinks"] = sinks
        ref, weights = reference_attention(plan_ref, qq, kk, vv, mask, 0.35, info, NoStats())
        out, _ = fused_attention(plan_fused, qq, kk, vv, mask, 0.35, info, NoStats(), chunk=chunk)
        valid = torch.tensor([[True] * q_len, [r + past >= 5 for r in range(q_len)]])
        torch.testing.assert_close(out[valid], ref[valid], atol=2e-6, rtol=1e-5)
        assert torch.isfinite(out).all()
        sums = weights.sum(-1)[valid.unsqueeze(1).expand_as(weights.sum(-1))]
        torch.testing.assert_close(sums, torch.ones_like(sums))  # mass conserved on real rows


def test_fused_identity_matches_sdpa():
    """Forcing the fused path with beta = 1 reproduces SDPA (to fp32 rounding)."""
    q, k, v = _random_attention(b=2, hq=4, hkv=4, q_len=11, k_len=11)
    mask = _padded_mask(2, 11, 11, (0, 3))
    plan = _plan(ACT(_params(ACT, beta=1.0, threshold=0.05), 0, None))
    out, _ = fused_attention(
        plan, q, k, v, MaskView(mask, 11, 11), 0.3, ForwardInfo(11, 0, 11, torch.tensor([0, 3])), NoStats()
    )
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out[0], sdpa[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], sdpa[1, 3:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["act", "softplus"])
def test_fused_never_builds_a_queries_by_keys_tensor(method, monkeypatch):
    monkeypatch.setattr(fused_mod, "CHUNK_ELEMENTS", 2048)
    b, h, n, d = 1, 4, 128, 8
    q, k, v = _random_attention(b=b, hq=h, hkv=2, q_len=n, k_len=n, d=d)
    plan = _plan(
        ACT(_params(ACT, threshold=0.05), 0, None)
        if method == "act"
        else SoftplusReweight(_params(SoftplusReweight), 0, None)
    )
    with LargestTensor() as probe:
        fused_attention(plan, q, k, v, MaskView(None, n, n), 0.3, ForwardInfo(n, 0, n, None), NoStats())
    assert probe.largest < b * h * n * n // 8  # chunks only: at most a few rows x keys


# ---- dtypes: error relative to the dtype's own error (flash-attention's rule) --------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["act", "softplus", "lssa"])
def test_low_precision_error_within_twice_naive_error(dtype, method):
    """|fused(x_low) - oracle(x)| <= 2 |naive_low(x_low) - oracle(x)|, naive = the reference formula
    computed in the low dtype; ACT uses fixed prompt sinks so no threshold flips between the two."""
    q, k, v = _random_attention(b=2, hq=6, hkv=2, q_len=24, k_len=40, d=64, seed=7)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = MaskView(_padded_mask(2, 24, 40, (0, 9)), 24, 40)
    info = ForwardInfo(24, 16, 40, torch.tensor([0, 9]))
    sinks = torch.rand(2, 6, 40, generator=torch.Generator().manual_seed(2)) > 0.8

    def plan():
        if method == "act":
            m = ACT(_params(ACT, apply_to="all"), 0, None)
            m.prompt_state["sinks"] = sinks
        else:
            m = SoftplusReweight(
                _params(SoftplusReweight, p=2.0, scoring="lssa" if method == "lssa" else "softmax"), 0, None
            )
        return _plan(m)

    oracle, _ = reference_attention(plan(), q.float(), k.float(), v.float(), mask, 0.125, info, NoStats())
    naive, _ = reference_attention(plan(), q, k, v, mask, 0.125, info, NoStats(), compute_dtype=dtype)
    ours, _ = fused_attention(plan(), q, k, v, mask, 0.125, info, NoStats())
    valid = torch.tensor([[True] * 24, [r + 16 >= 9 for r in range(24)]])
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
                assert any(s["fired"] for s in handle.stats())


# ---- lifecycle -----------------------------------------------------------------------------
def test_eager_original_is_supported_and_restored():
    sdpa = build_tiny("qwen2")
    eager = build_tiny("qwen2", attn_implementation="eager")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = []
    for model in (sdpa, eager):
        with attnsteer.apply(
            model, {"interventions": [{"method": "act", "layers": "1:", "params": {"threshold": 0.05}}]}
        ):
            out.append(model(input_ids=ids, attention_mask=mask).logits)
    assert eager.config._attn_implementation == "eager"
    valid = mask.bool()
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
    with pytest.warns(AttnsteerWarning, match="never changed a row"):
        handle.remove()


def test_unsupported_attention_implementation_says_how_to_fix():
    model = build_tiny("llama")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(attnsteer.UnsupportedModelError, match="attn_implementation='sdpa'"):
        attnsteer.apply(model, "act-default")
