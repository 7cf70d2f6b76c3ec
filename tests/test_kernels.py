"""The Triton kernels and the ``triton`` backend against float32 eager references.

Without CUDA the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here, at
import, before anything defines the kernels (``attnsteer.kernels`` defines them on the first
kernel call, so setting it before that call is enough). With CUDA the same small odd-shape tests
run on the GPU with compiled kernels, and the ``gpu``-marked tests add real sizes in bf16/fp16
under flash-attention's tolerance rule (kernel error <= 2 x the error of plain PyTorch in the same
dtype, both against a float32 reference).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import vlm_fixtures as F  # noqa: E402
from attention_cases import METHODS, PHASES, Stats, attend, case, padded_mask, params  # noqa: E402
from attention_cases import inputs as _inputs  # noqa: E402
from conftest import build_tiny  # noqa: E402

import attnsteer  # noqa: E402
from attnsteer import kernels as K  # noqa: E402
from attnsteer.attention import router, structure  # noqa: E402
from attnsteer.attention.geometry import ForwardInfo, MaskView  # noqa: E402
from attnsteer.context import PromptState  # noqa: E402
from attnsteer.methods.act import ACT  # noqa: E402
from attnsteer.methods.softplus import SoftplusReweight  # noqa: E402
from attnsteer.plan import LayerPlan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = K.interpreting()
COMPILED_GPU = torch.cuda.is_available() and not INTERPRETED
NEG_INF = float("-inf")


# ---- float32 eager references -----------------------------------------------------------------
def _spec(b, q_len, k_len, kv_start=None, window=0, q_offset=None):
    kvs = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    return K.MaskSpec(q_offset=k_len - q_len if q_offset is None else q_offset, kv_start=kvs, window=window)


def _visible(spec, b, q_len, k_len):
    rows = torch.arange(q_len, device=DEVICE).view(-1, 1) + spec.q_offset
    keys = torch.arange(k_len, device=DEVICE).view(1, -1)
    vis = keys <= rows
    if spec.window:
        vis = vis & (keys > rows - spec.window)
    vis = vis.view(1, 1, q_len, k_len).expand(b, 1, q_len, k_len)
    if spec.kv_start is not None:
        vis = vis & (keys.view(1, 1, 1, -1) >= spec.kv_start.view(-1, 1, 1, 1).long())
    return vis


def _ref_probs(q, k, spec, scale):
    """(scores with -inf, weights with 0 on fully masked rows, visibility), float32."""
    b, hq, q_len, _ = q.shape
    kk = k.float().repeat_interleave(hq // k.shape[1], dim=1)
    s = q.float() @ kk.transpose(-1, -2) * scale
    vis = _visible(spec, b, q_len, k.shape[2])
    s = s.masked_fill(~vis, NEG_INF)
    a = torch.softmax(s, -1).nan_to_num(0.0)
    return s, a, vis


def _ref_out(a, v, hq):
    vv = v.float().repeat_interleave(hq // v.shape[1], dim=1)
    return (a @ vv).transpose(1, 2)


def _group_ids(b, h, length, num_groups, seed, empty_group=None):
    g = torch.randint(0, num_groups, (b, h, length), generator=torch.Generator().manual_seed(seed))
    if empty_group is not None:
        g[g == empty_group] = 0
    return g.to(torch.int8).to(DEVICE)


def _gather_groups(gid, offset, k_len, hq):
    """(B, 1|H, P) ids -> (B, H, 1, K) long, positions beyond P in group 0."""
    pos = torch.arange(k_len, device=DEVICE) + offset
    inside = pos < gid.shape[-1]
    g = gid.long()[:, :, pos.clamp(max=gid.shape[-1] - 1)] * inside
    return g.expand(g.shape[0], hq, k_len).unsqueeze(2)


def _softplus_ref(a, vis, rel, p, offset, steer):
    n = vis.sum(-1, keepdim=True).double()
    o = torch.where(rel < 3, 0.0, offset).double()
    t = n * a.double() - o
    w = t.clamp(min=0) ** p
    total = w.sum(-1, keepdim=True)
    rows = (total > 0) & steer.bool().view(1, -1, 1, 1)
    return torch.where(rows, w / total.clamp(min=1e-300), a.double()).float(), rows[..., 0]


# q is (B, Hq, Q, D): `kv_start` = first valid key per batch row, q_offset = K - Q
PREFILL_CASES = {
    # GQA 6/2, left padding with fully masked leading rows (row 1: keys < 7, queries at 4..16)
    "gqa-pad-offset": dict(b=2, hq=6, hkv=2, q_len=13, k_len=17, d=16, kv_start=(0, 7), window=0),
    # sliding window 5 on top of padding, MHA, head dim 32
    "window-pad": dict(b=2, hq=4, hkv=4, q_len=17, k_len=17, d=32, kv_start=(3, 0), window=5),
    # head dim 80 (padded to 128 in-kernel), a long cache before few queries
    "d80-cache": dict(b=1, hq=2, hkv=1, q_len=5, k_len=37, d=80, kv_start=None, window=0),
    # batch row 1 is padding only: every row of it is fully masked
    "all-padding-row": dict(b=2, hq=2, hkv=1, q_len=6, k_len=6, d=16, kv_start=(0, 6), window=0),
}


def _case(name, seed=0):
    c = PREFILL_CASES[name]
    q, k, v = _inputs(c["b"], c["hq"], c["hkv"], c["q_len"], c["k_len"], c["d"], seed=seed)
    spec = _spec(c["b"], c["q_len"], c["k_len"], c["kv_start"], c["window"])
    return c, q, k, v, spec


def _close(actual, expected, atol=2e-6, rtol=1e-5):
    assert torch.isfinite(actual).all(), "NaN/inf in kernel output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---- import behaviour -------------------------------------------------------------------------
def test_import_needs_no_triton_and_calls_say_how_to_install():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import attnsteer.kernels as K, torch\n"
        "from attnsteer.attention import router, triton\n"
        "assert not K.available()\n"
        "assert router.BackendConfig(triton='interpret').candidates('cpu') == ('triton', 'flash', 'chunked')\n"
        "assert 'not installed' in triton.unavailable(router.BackendConfig(triton='interpret'), None)\n"
        "try:\n"
        "    K.row_stats(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), K.MaskSpec(0), 1.0)\n"
        "except K.TritonUnavailableError as e:\n"
        "    assert 'pip install' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- bfloat16 rounding ------------------------------------------------------------------------
def _bf16_convert_kernel():
    """A one-line kernel around _cast (defined at first use, after TRITON_INTERPRET is set; the
    interpreter resolves names through this module's globals)."""
    import triton
    import triton.language as tl

    from attnsteer.kernels import ops

    global _cast
    _cast = ops.kernels()._cast

    @triton.jit
    def convert(X, Y, N: tl.constexpr, UPCAST: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, _cast(tl.load(X + offs), Y.dtype.element_ty, UPCAST))

    return convert


@pytest.mark.parametrize("upcast", [False, True])
def test_float32_to_bfloat16_rounds_to_nearest_even_in_the_kernels(upcast):
    """The kernels' float32 -> bfloat16 conversion (_cast; UPCAST is what the launchers pass under
    the interpreter) equals torch's round-to-nearest-even, ties and specials included. Without it,
    Triton's interpreter truncates: plain ``x.to(tl.bfloat16)`` there differs from torch on about
    half the values (a compiled kernel rounds)."""
    convert = _bf16_convert_kernel()
    ties = [1.00390625, 1.01171875, -1.00390625, 3.0 + 2**-7 * 3, 0.0, -0.0, float("inf"), -float("inf")]
    x = torch.cat([torch.randn(1016, generator=torch.Generator().manual_seed(0)) * 3, torch.tensor(ties)]).to(DEVICE)
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    convert[(1,)](x, y, N=x.numel(), UPCAST=upcast)
    wrong = int((y.float() != x.to(torch.bfloat16).float()).sum())
    if upcast or not INTERPRETED:
        assert wrong == 0
    else:  # the interpreter's own conversion: the reason the launchers pass UPCAST there
        assert wrong > 100
    kept = torch.empty_like(x)  # float32 targets pass through exactly
    convert[(1,)](x, kept, N=x.numel(), UPCAST=upcast)
    assert torch.equal(kept, x)


# ---- prefill kernels --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_row_stats_lse_and_group_masses(name):
    c, q, k, v, spec = _case(name)
    s, a, vis = _ref_probs(q, k, spec, 0.3)
    lse_ref = torch.logsumexp(s, -1)
    # three groups per query head, group 2 never used (empty group); ids beyond P -> group 0
    gid = _group_ids(c["b"], c["hq"], c["k_len"] - 2, 3, seed=1, empty_group=2)
    groups = K.Groups(gid, 3, offset=0)
    lse, masses = K.row_stats(q, k, spec, 0.3, groups=groups)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)  # fully masked rows: -inf, not NaN
    _close(lse[finite], lse_ref[finite])
    g = _gather_groups(gid, 0, c["k_len"], c["hq"])
    ref_m = torch.stack([(a * (g == x)).sum(-1) for x in range(3)], -1)
    _close(masses, ref_m)
    assert masses[..., 2].abs().max() == 0
    # masses again from the known LSE, with ids shared by all heads and a key offset of 5
    shared = _group_ids(c["b"], 1, c["k_len"] + 5, 2, seed=2)
    _, m2 = K.row_stats(q, k, spec, 0.3, groups=K.Groups(shared, 2, offset=5), lse=lse)
    g2 = _gather_groups(shared, 5, c["k_len"], c["hq"])
    _close(m2, torch.stack([(a * (g2 == x)).sum(-1) for x in range(2)], -1))


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_column_stats(name):
    c, q, k, v, spec = _case(name)
    _, a, vis = _ref_probs(q, k, spec, 0.3)
    lse, _ = K.row_stats(q, k, spec, 0.3)
    colsum, count = K.column_stats(q, k, lse, spec, 0.3)
    _close(colsum, a.sum(-2), atol=5e-6)
    assert torch.equal(count, vis.sum(-2).float())


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_biased_attention(name):
    c, q, k, v, spec = _case(name)
    b, hq, q_len, k_len = c["b"], c["hq"], c["q_len"], c["k_len"]
    s, a, _ = _ref_probs(q, k, spec, 0.3)
    gid = _group_ids(b, hq, k_len, 3, seed=3)
    bias = torch.randn(b, hq, q_len, 3, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    bias[..., 2] = NEG_INF  # a group removed entirely (ACT with beta = 0)
    bias[:, :, ::3] = 0.0  # unchanged rows
    out, _ = K.attention(q, k, v, spec, 0.3, groups=K.Groups(gid, 3), bias=bias)
    g = _gather_groups(gid, 0, k_len, hq).expand(b, hq, q_len, k_len)
    biased = torch.softmax(s + torch.gather(bias, 3, g), -1).nan_to_num(0.0)
    _close(out, _ref_out(biased, v, hq))
    plain, _ = K.attention(q, k, v, spec, 0.3)
    _close(plain, _ref_out(a, v, hq))
    # a rule that conserves each row's mass (M'_g = c_g M_g / sum_h c_h M_h): with pass 1's LSE the
    # kernel forms the weights exp(s + bias - lse) directly, with no running max
    lse, masses = K.row_stats(q, k, spec, 0.3, groups=K.Groups(gid, 3))
    c = torch.rand(b, hq, q_len, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.05
    c[..., 1] = 0.0  # group 1 dropped entirely
    bias = torch.log(c) - torch.log((c * masses).sum(-1, keepdim=True).clamp(min=1e-30))
    bias = torch.where(masses.sum(-1, keepdim=True) > 0, bias, torch.zeros_like(bias))
    bias = torch.where((c * masses).sum(-1, keepdim=True) > 0, bias, torch.zeros_like(bias))
    out, _ = K.attention(q, k, v, spec, 0.3, groups=K.Groups(gid, 3), bias=bias, lse=lse)
    biased = torch.softmax(s + torch.gather(bias, 3, g), -1).nan_to_num(0.0)
    _close(out, _ref_out(biased, v, hq), atol=3e-6)
    plain, _ = K.attention(q, k, v, spec, 0.3, lse=lse)
    _close(plain, _ref_out(a, v, hq))


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_softplus_reweighted_attention(name):
    c, q, k, v, spec = _case(name)
    b, hq, q_len = c["b"], c["hq"], c["q_len"]
    _, a, vis = _ref_probs(q, k, spec, 0.3)
    steer = torch.ones(hq, dtype=torch.int8, device=DEVICE)
    steer[-1] = 0  # an unsteered head
    kvs = spec.kv_start.long() if spec.kv_start is not None else torch.zeros(b, dtype=torch.long, device=DEVICE)
    rel0 = (spec.q_offset - kvs).to(torch.int32)  # positions from each row's first token
    rel = rel0.view(-1, 1, 1, 1).long() + torch.arange(q_len, device=DEVICE).view(1, 1, -1, 1)
    lse, _, rowmax = K.row_stats(q, k, spec, 0.3, with_max=True)
    # p = 2.5: multiplications + sqrt; 2.3: exp2/log2; offset 1e6: nothing survives -> unchanged rows
    for p, offset in ((2.5, 1.0), (2.3, 0.5), (1.5, 1e6)):
        args = K.ReweightArgs(power=p, offset=offset, free_rows=3, steer=steer, rel0=rel0, lse=lse, rowmax=rowmax)
        out, modified = K.attention(q, k, v, spec, 0.3, reweight=args)
        ref, rows = _softplus_ref(a, vis, rel, p, offset, steer)
        _close(out, _ref_out(ref, v, hq), atol=3e-6)
        assert torch.equal(modified.bool(), rows)


# ---- decode -----------------------------------------------------------------------------------
DECODE_CASES = {
    # GQA 6/2, 4 splits, row 1 padded, row 2 padding only (all splits empty)
    "gqa-pad-splits": dict(b=3, hq=6, hkv=2, k_len=45, d=16, kv_start=(0, 5, 45), window=0, splits=4),
    # sliding window 20 over 70 keys: the splits before the window are empty
    "window": dict(b=2, hq=4, hkv=1, k_len=70, d=32, kv_start=(0, 9), window=20, splits=5),
    # static-cache layout: the query sits at key 25 of 40, later slots are future keys
    "static-cache-d64": dict(b=1, hq=2, hkv=2, k_len=40, d=64, kv_start=None, window=0, splits=3, q_offset=25),
}


@pytest.mark.parametrize("kind", ["plain", "groups", "reweight"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name, kind):
    c = DECODE_CASES[name]
    b, hq, k_len = c["b"], c["hq"], c["k_len"]
    q, k, v = _inputs(b, hq, c["hkv"], 1, k_len, c["d"], seed=5)
    spec = _spec(b, 1, k_len, c["kv_start"], c["window"], q_offset=c.get("q_offset"))
    _, a, vis = _ref_probs(q, k, spec, 0.3)
    vv = v.float().repeat_interleave(hq // v.shape[1], dim=1)
    if kind == "plain":
        out, extra = K.decode(q, k, v, spec, 0.3, num_splits=c["splits"])
        assert extra is None
        _close(out, _ref_out(a, v, hq), atol=3e-6)
        return
    if kind == "groups":
        # per query head (ACT-like) and shared by the heads (VAR-like); the last 4 keys: generated (group 0)
        for heads, g_count, seed in ((hq, 2, 6), (1, 4, 7)):
            gid = _group_ids(b, heads, k_len - 4, g_count, seed=seed)
            out, (masses, outputs) = K.decode(q, k, v, spec, 0.3, groups=K.Groups(gid, g_count), num_splits=c["splits"])
            _close(out, _ref_out(a, v, hq), atol=3e-6)  # the plain output, for rows the rule leaves alone
            g = _gather_groups(gid, 0, k_len, hq)  # (B, H, 1, K)
            for x in range(g_count):
                in_group = a * (g == x)
                mass = in_group.sum(-1)  # (B, H, 1)
                _close(masses[..., x], mass[..., 0])
                ref_o = (in_group @ vv) / mass.clamp(min=1e-30)[..., None]
                has = mass[..., 0] > 0
                _close(outputs[:, :, x][has], ref_o[:, :, 0][has], atol=3e-6)
                assert outputs[:, :, x][~has].abs().max() == 0 if bool((~has).any()) else True
        return
    steer = torch.ones(hq, dtype=torch.int8, device=DEVICE)
    steer[1] = 0
    rel0 = torch.tensor([5, 0, 2][:b], dtype=torch.int32, device=DEVICE)  # row 1 sits in a free row
    args = K.ReweightArgs(power=3.0, offset=1.0, free_rows=3, steer=steer, rel0=rel0)
    out, modified = K.decode(q, k, v, spec, 0.3, reweight=args, num_splits=c["splits"])
    ref, rows = _softplus_ref(a, vis, rel0.view(-1, 1, 1, 1).long(), 3.0, 1.0, steer)
    assert torch.equal(modified.bool(), rows[..., 0])
    _close(out, _ref_out(ref, v, hq), atol=3e-6)


def test_decode_split_plan_covers_the_cache():
    for k_len in (1, 15, 16, 17, 1000):
        n, length = K.decode_splits(2, 8, k_len, 16, torch.device("cpu"), num_splits=7)
        assert length % 16 == 0 and (n - 1) * length < k_len <= n * length


# ---- low precision (flash-attention's rule) -----------------------------------------------------
def _fa_rule(ours, naive, oracle, mask=None):
    if mask is not None:
        ours, naive, oracle = ours[mask], naive[mask], oracle[mask]
    ours_err = (ours.float() - oracle).abs().max()
    naive_err = (naive.float() - oracle).abs().max()
    assert ours_err <= 2 * naive_err + 1e-6, (float(ours_err), float(naive_err))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_small(dtype):
    b, hq, hkv, q_len, k_len, d = 2, 4, 2, 24, 40, 64
    q, k, v = _inputs(b, hq, hkv, q_len, k_len, d, seed=7)
    spec = _spec(b, q_len, k_len, (0, 9))
    _, a, vis = _ref_probs(q, k, spec, 0.125)
    oracle = _ref_out(a, v, hq)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    # naive attention in the low dtype: scores and PV in `dtype`, softmax accumulated in float32
    s_low = (ql @ kl.repeat_interleave(2, 1).transpose(-1, -2)) * 0.125
    s_low = s_low.float().masked_fill(~vis, NEG_INF)
    naive = (torch.softmax(s_low, -1).nan_to_num(0).to(dtype) @ vl.repeat_interleave(2, 1)).transpose(1, 2)
    valid = vis.any(-1).transpose(1, 2).unsqueeze(-1).expand_as(oracle)  # rows that see a key
    out, _ = K.attention(ql, kl, vl, spec, 0.125)
    assert out.dtype == dtype
    _fa_rule(out, naive, oracle, valid)
    dec, _ = K.decode(ql[:, :, -1:], kl, vl, _spec(b, 1, k_len, (0, 9)), 0.125)
    _fa_rule(dec, naive[:, -1:], oracle[:, -1:])


# ---- the backend: triton vs reference ------------------------------------------------------------
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("name", list(METHODS))
def test_triton_attention_matches_reference(name, phase):
    q_len, k_len, past = PHASES[phase]
    q, k, v = _inputs(2, 6, 2, 15, 15, 16, seed=8)
    q, k, v = q[:, :, -q_len:], k[:, :, :k_len], v[:, :, :k_len]
    pads = (0, 5)
    mask = MaskView(padded_mask(2, q_len, k_len, pads), q_len, k_len)
    info = ForwardInfo(q_len, past, k_len, torch.tensor(pads, device=DEVICE))
    plan, prompt = case(name, k_len, past)
    stats_ref, stats_tri = Stats(), Stats()
    prompt_ref, prompt_tri = prompt(), prompt()
    ref = attend("reference", plan, q, k, v, mask, info, prompt_ref, stats_ref, scaling=0.35)
    out = attend("triton", plan, q, k, v, mask, info, prompt_tri, stats_tri, scaling=0.35)
    assert stats_tri.paths == {f"triton/{phase}": 1} and not stats_tri.fallbacks, stats_tri.fallbacks
    valid = torch.tensor([[True] * q_len, [r + past >= 5 for r in range(q_len)]], device=DEVICE)
    _close(out[valid], ref[valid], atol=3e-6)
    assert torch.isfinite(out).all()
    assert list(stats_tri.rows.values()) == list(stats_ref.rows.values())
    assert sum(stats_tri.rows.values()) > 0  # the comparison is not vacuous: rows are steered
    if name.startswith("act") and phase == "prefill":  # same sinks detected from the column pass
        key = plan.methods[0].key
        assert torch.equal(prompt_ref.get(key, "sinks"), prompt_tri.get(key, "sinks"))


def _one_plan(*methods):
    plan = LayerPlan(0)
    plan.methods.extend(methods)
    return plan


def test_sliding_window_mask_is_recognised():
    q_len = k_len = 14
    q, k, v = _inputs(2, 6, 2, q_len, k_len, 16, seed=9)
    mask = MaskView(padded_mask(2, q_len, k_len, (0, 3), window=4), q_len, k_len)
    info = ForwardInfo(q_len, 0, k_len, torch.tensor([0, 3], device=DEVICE))
    plan, prompt = case("softplus", k_len, 0)
    ref = attend("reference", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    out = attend("triton", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    valid = torch.tensor([[True] * q_len, [r >= 3 for r in range(q_len)]], device=DEVICE)
    _close(out[valid], ref[valid], atol=3e-6)
    struct = structure.mask_structure(mask, info, 2, q_len, k_len, q.device)
    assert struct.spec.window == 4


def test_additive_float_mask_is_recognised():
    """Models loaded with eager attention pass a 0 / min float mask: same structure, same kernels."""
    q_len = k_len = 12
    q, k, v = _inputs(2, 6, 2, q_len, k_len, 16, seed=12)
    raw = padded_mask(2, q_len, k_len, (0, 4))
    low = torch.tensor(torch.finfo(torch.float32).min, device=DEVICE)
    mask = MaskView(torch.where(raw, torch.zeros((), device=DEVICE), low), q_len, k_len)
    info = ForwardInfo(q_len, 0, k_len, torch.tensor([0, 4], device=DEVICE))
    plan, prompt = case("act", k_len, 0)
    ref = attend("reference", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    out = attend("triton", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    valid = torch.tensor([[True] * q_len, [r >= 4 for r in range(q_len)]], device=DEVICE)
    _close(out[valid], ref[valid], atol=3e-6)


@pytest.mark.parametrize(
    "case_name, reason",
    [
        ("holes-in-mask", "not causal + left padding"),
        ("lssa", "score rule"),
        ("two-weight-steps", "2 weight rules"),
        ("float-mask-with-bias", "not causal + left padding"),
    ],
)
def test_unsupported_inputs_fall_back_to_pytorch(case_name, reason):
    q_len = k_len = 10
    q, k, v = _inputs(2, 6, 2, q_len, k_len, 16, seed=10)
    raw = padded_mask(2, q_len, k_len, (0, 2))
    methods = [SoftplusReweight(params(SoftplusReweight, p=2.0), 0, None)]
    if case_name == "holes-in-mask":
        raw[:, :, 6:, 4] = False  # not causal + left padding: e.g. a packed or custom mask
    elif case_name == "lssa":
        methods = [SoftplusReweight(params(SoftplusReweight, p=2.0, scoring="lssa"), 0, None)]
    elif case_name == "two-weight-steps":
        methods.append(ACT(params(ACT, threshold=0.05), 0, None))
    if case_name == "float-mask-with-bias":
        low = torch.tensor(torch.finfo(torch.float32).min, device=DEVICE)
        raw = torch.where(raw, torch.zeros((), device=DEVICE), low)
        raw[..., 0] += 0.5  # a real additive bias on key 0: not a pure visibility mask
    mask = MaskView(raw, q_len, k_len)
    info = ForwardInfo(q_len, 0, k_len, torch.tensor([0, 2], device=DEVICE))
    plan = _one_plan(*methods)
    expected = attend("chunked", plan, q, k, v, mask, info, PromptState(), scaling=0.35)
    stats = Stats()
    out = attend("auto", plan, q, k, v, mask, info, PromptState(), stats, scaling=0.35, triton="interpret")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert stats.paths == {"chunked/prefill": 1}, stats.paths
    assert any(key.startswith("triton: ") and reason in key for key in stats.fallbacks), stats.fallbacks
    with pytest.raises(
        attnsteer.SteeringError, match=f"backend='triton' cannot run layer 0's prefill call: .*{re.escape(reason)}"
    ):
        attend("triton", plan, q, k, v, mask, info, PromptState(), scaling=0.35)


def test_backend_candidates_follow_the_settings(monkeypatch):
    """ATTNSTEER_TRITON (read once per handle, at apply): 0 never uses the kernels, 1 also on CPU
    tensors under the interpreter, unset on CUDA tensors only."""
    for value, cpu, cuda in (
        ("0", ("flash", "chunked"), ("chunked",)),
        ("1", ("triton", "flash", "chunked"), ("triton", "chunked")),
        (None, ("flash", "chunked"), ("triton", "chunked")),
    ):
        if value is None:
            monkeypatch.delenv("ATTNSTEER_TRITON", raising=False)
        else:
            monkeypatch.setenv("ATTNSTEER_TRITON", value)
        config = router.BackendConfig.from_settings("auto")
        assert (config.candidates("cpu"), config.candidates("cuda")) == (cpu, cuda), value
    assert router.BackendConfig.from_settings("flash").candidates("cuda") == ("flash",)


# ---- whole models: the triton backend == the chunked backend -------------------------------------
def _generate_on(backend, model, recipe, inputs, **kwargs):
    """(generate output, rows changed per site, paths and fallbacks of every site) on ``backend``."""
    with attnsteer.apply(model, recipe, backend=backend) as handle, torch.no_grad():
        out = model.generate(**inputs, **kwargs)
        stats = handle.stats()
    paths, fallbacks = {}, {}
    for site in {s["layer"]: s for s in stats}.values():
        for key, n in site["paths"].items():
            paths[key] = paths.get(key, 0) + n
        fallbacks.update(site["fallbacks"])
    return out, [s["rows_modified"] for s in stats], paths, fallbacks


@pytest.mark.parametrize(
    "family,recipe",
    [
        ("llama", "act-mtbench"),  # ACT prefill (sink detection) + decode with the prompt's sinks
        ("mistral", {"interventions": [{"method": "softplus", "layers": [1, 3], "params": {"p": 2.0}}]}),
        # sliding-window cache: decode keys start at a key offset, the sink table is absolute
        ("mistral", {"interventions": [{"method": "act", "layers": [2], "params": {"apply_to": "all"}}]}),
    ],
)
def test_models_generate_like_the_pytorch_backend(family, recipe, monkeypatch):
    """Left-padded batch, GQA, generate with the KV cache; mistral's sliding window (6) is shorter
    than the prompt, so its masks exercise the window path."""
    monkeypatch.setenv("ATTNSTEER_TRITON", "1")  # the kernels on CPU tensors under the interpreter
    model = build_tiny(family).to(DEVICE)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    inputs = dict(input_ids=ids, attention_mask=attention_mask)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref, ref_rows, _, _ = _generate_on("chunked", model, recipe, inputs, **kwargs)
    tri, tri_rows, paths, fallbacks = _generate_on("triton", model, recipe, inputs, **kwargs)
    assert not fallbacks, fallbacks
    assert any(key.endswith("/decode") for key in paths) and any(key.endswith("/prefill") for key in paths), paths
    assert all(key.startswith("triton/") for key in paths), paths
    assert torch.equal(ref.sequences, tri.sequences)
    for a, b in zip(ref.logits, tri.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert ref_rows == tri_rows and sum(tri_rows) > 0


@pytest.mark.parametrize("family,variant", [("llava", "paper"), ("qwen2_vl", "released")])
def test_vlm_var_generates_like_the_pytorch_backend(family, variant, monkeypatch):
    """VAR on a tiny VLM: left-padded batch with 2 / 0 / 1 images, generate with the KV cache --
    prefill (4 key groups, the row gate after the last image) and split-K decode whose group masses
    and outputs VAR's rule combines give the chunked backend's tokens, logits and steered-row counts."""
    monkeypatch.setenv("ATTNSTEER_TRITON", "1")
    model = F.build_vlm(family).to(DEVICE)
    inputs = {
        k: v.to(DEVICE) if torch.is_tensor(v) else v
        for k, v in F.make_inputs(family, model, n_images=[2, 0, 1], seed=3).items()
    }
    recipe = {
        "interventions": [
            {
                "method": "var",
                "layers": "all",
                "params": {
                    "tau": 2.8 if family == "llava" else 3.0,
                    "rho": 0.3,
                    "min_image_attention": 0.05,
                    "variant": variant,
                },
            }
        ]
    }
    kwargs = dict(
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[128, 129, 130, 131],
    )
    ref, ref_rows, _, _ = _generate_on("chunked", model, recipe, inputs, **kwargs)
    tri, tri_rows, paths, fallbacks = _generate_on("triton", model, recipe, inputs, **kwargs)
    assert not fallbacks, fallbacks
    assert paths.get("triton/prefill") and paths.get("triton/decode"), paths
    assert torch.equal(ref.sequences, tri.sequences)
    for a, b in zip(ref.logits, tri.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert ref_rows == tri_rows and sum(tri_rows) > 0


# ---- GPU: real sizes in bf16 / fp16 -------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED_GPU, reason="needs compiled Triton kernels on CUDA (not the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,hq,hkv", [(128, 32, 8), (64, 16, 16), (80, 32, 32)])
def test_gpu_kernels_real_sizes(dtype, d, hq, hkv):
    b, n = 2, 1024
    q, k, v = _inputs(b, hq, hkv, n, n, d, seed=11)
    spec = _spec(b, n, n, (0, 100))
    scale = d**-0.5
    s, a, vis = _ref_probs(q, k, spec, scale)
    oracle = _ref_out(a, v, hq)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    groups = K.Groups(_group_ids(b, hq, n, 2, seed=12), 2)
    g = _gather_groups(groups.gid, 0, n, hq)
    valid = torch.isfinite(torch.logsumexp(s, -1)).transpose(1, 2).unsqueeze(-1).expand_as(oracle)

    def naive(weights_fn):
        """The same formula computed in the low dtype (flash-attention's 'PyTorch in the same dtype')."""
        kk, vv = kl.repeat_interleave(hq // hkv, 1), vl.repeat_interleave(hq // hkv, 1)
        sl = ((ql @ kk.transpose(-1, -2)) * scale).masked_fill(~vis, NEG_INF)
        return (weights_fn(sl).nan_to_num(0).to(dtype) @ vv).transpose(1, 2)

    # plain and biased pass 2
    out, _ = K.attention(ql, kl, vl, spec, scale)
    _fa_rule(out, naive(lambda sl: torch.softmax(sl, -1)), oracle, valid)
    kk = kl.repeat_interleave(hq // hkv, 1)
    a_naive = torch.softmax(((ql @ kk.transpose(-1, -2)) * scale).masked_fill(~vis, NEG_INF), -1).nan_to_num(0)
    lse, masses = K.row_stats(ql, kl, spec, scale, groups=groups)
    ref_m = torch.stack([(a * (g == x)).sum(-1) for x in range(2)], -1)
    naive_m = torch.stack([(a_naive * (g == x)).sum(-1) for x in range(2)], -1)
    _fa_rule(masses, naive_m, ref_m)
    bias = torch.log(torch.rand(b, hq, n, 2, device=DEVICE) + 0.1)
    gg = g.expand(b, hq, n, n)
    biased_oracle = _ref_out(torch.softmax(s + torch.gather(bias, 3, gg), -1).nan_to_num(0), v, hq)
    out, _ = K.attention(ql, kl, vl, spec, scale, groups=groups, bias=bias)  # online softmax
    biased_naive = naive(lambda sl: torch.softmax(sl + torch.gather(bias, 3, gg).to(sl.dtype), -1))
    _fa_rule(out, biased_naive, biased_oracle, valid)
    # a mass-conserving group rule with pass 1's LSE (how ACT runs): weights exp(s + bias - lse)
    c = torch.rand(b, hq, n, 2, device=DEVICE) + 0.05
    bias2 = torch.log(c) - torch.log((c * masses).sum(-1, keepdim=True).clamp(min=1e-30))
    bias2 = torch.where(masses.sum(-1, keepdim=True) > 0, bias2, torch.zeros_like(bias2))
    out, _ = K.attention(ql, kl, vl, spec, scale, groups=groups, bias=bias2, lse=lse)
    oracle2 = _ref_out(torch.softmax(s + torch.gather(bias2, 3, gg), -1).nan_to_num(0), v, hq)
    naive2 = naive(lambda sl: torch.softmax(sl + torch.gather(bias2, 3, gg).to(sl.dtype), -1))
    _fa_rule(out, naive2, oracle2, valid)
    # column pass
    colsum, count = K.column_stats(ql, kl, lse, spec, scale)
    assert torch.equal(count, vis.sum(-2).float())
    _fa_rule(colsum, a_naive.sum(-2), a.sum(-2))
    # softplus pass 2
    steer = torch.ones(hq, dtype=torch.int8, device=DEVICE)
    rel0 = (spec.q_offset - spec.kv_start.long()).to(torch.int32)
    rel = rel0.view(-1, 1, 1, 1).long() + torch.arange(n, device=DEVICE).view(1, 1, -1, 1)
    lse, _, rowmax = K.row_stats(ql, kl, spec, scale, with_max=True)
    args = K.ReweightArgs(power=3.0, offset=1.0, free_rows=3, steer=steer, rel0=rel0, lse=lse, rowmax=rowmax)
    out, _ = K.attention(ql, kl, vl, spec, scale, reweight=args)
    sp_oracle = _ref_out(_softplus_ref(a, vis, rel, 3.0, 1.0, steer)[0], v, hq)
    _, a_low, _ = _ref_probs(ql, kl, spec, scale)
    sp_naive = (
        _softplus_ref(a_low.to(dtype).float(), vis, rel, 3.0, 1.0, steer)[0].to(dtype)
        @ vl.repeat_interleave(hq // hkv, 1)
    ).transpose(1, 2)
    _fa_rule(out, sp_naive, sp_oracle, valid)


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED_GPU, reason="needs compiled Triton kernels on CUDA (not the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["none", "act", "softplus"])
def test_gpu_decode_real_sizes(dtype, rule):
    b, hq, hkv, k_len, d = 8, 32, 8, 4096, 128
    q, k, v = _inputs(b, hq, hkv, 1, k_len, d, seed=13)
    spec = _spec(b, 1, k_len, tuple(range(0, 8 * 37, 37)))
    scale = d**-0.5
    _, a, vis = _ref_probs(q, k, spec, scale)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    _, a_low, _ = _ref_probs(ql, kl, spec, scale)
    steer = torch.ones(hq, dtype=torch.int8, device=DEVICE)
    rel0 = torch.full((b,), 100, dtype=torch.int32, device=DEVICE)
    vv = vl.repeat_interleave(hq // hkv, 1)
    if rule == "none":
        out, _ = K.decode(ql, kl, vl, spec, scale)
        ref, low = a, a_low
    elif rule == "act":  # the group kind: masses and group outputs, combined with ACT's factors
        gid = _group_ids(b, hq, k_len, 2, seed=14)
        _, (masses, outputs) = K.decode(ql, kl, vl, spec, scale, groups=K.Groups(gid, 2))
        f_other = 1 + 0.6 * masses[..., 1:2] / masses[..., :1].clamp(min=1e-30)
        factors = torch.cat([f_other, torch.full_like(f_other, 0.4)], -1)
        out = (factors * masses).unsqueeze(-1).mul(outputs).sum(-2)[:, None].to(dtype)  # (B, 1, H, D)
        g = _gather_groups(gid, 0, k_len, hq)

        def act(w):
            ms, mo = (w * (g == 1)).sum(-1, keepdim=True), (w * (g == 0)).sum(-1, keepdim=True)
            return torch.where(g == 1, 0.4 * w, w + 0.6 * ms * w / mo.clamp(min=1e-30))

        ref, low = act(a), act(a_low)
    else:
        args = K.ReweightArgs(power=3.0, offset=1.0, free_rows=3, steer=steer, rel0=rel0)
        out, _ = K.decode(ql, kl, vl, spec, scale, reweight=args)
        rel = rel0.view(-1, 1, 1, 1).long()
        ref = _softplus_ref(a, vis, rel, 3.0, 1.0, steer)[0]
        low = _softplus_ref(a_low.to(dtype).float(), vis, rel, 3.0, 1.0, steer)[0]
    naive = (low.to(dtype) @ vv).transpose(1, 2)
    _fa_rule(out, naive, _ref_out(ref, v, hq))


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED_GPU, reason="needs compiled Triton kernels on CUDA (not the interpreter)")
@pytest.mark.parametrize("recipe", ["act-mtbench", "softplus-reweight"])
def test_gpu_model_triton_matches_pytorch_fused(recipe):
    model = build_tiny("llama", dtype=torch.bfloat16).to(DEVICE)
    ids = torch.randint(3, 96, (4, 200), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :17] = 0
    logits = {}
    for backend in ("chunked", "triton"):
        with attnsteer.apply(model, recipe, backend=backend), torch.no_grad():
            logits[backend] = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    valid = attention_mask.bool()
    err = (logits["triton"] - logits["chunked"])[valid].abs().max()
    assert err < 0.1 * logits["chunked"][valid].abs().max(), float(err)
