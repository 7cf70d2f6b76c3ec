"""The CPU ``flash`` backend (PyTorch's flash kernel + per-row corrections) against the float32
eager reference: every rule kind it claims (group, reweight), every phase, padded / windowed
masks, GQA, head subsets, low precision, the guards that hand ill-conditioned calls to the chunked
path, and that it never builds a queries x keys tensor."""

from __future__ import annotations

import pytest
import torch
from attention_cases import METHODS, PHASES, LargestTensor, Stats, attend, case, inputs, padded_mask, params
from conftest import build_tiny

import attnsteer
from attnsteer.attention import chunked
from attnsteer.attention import flash_cpu as fb
from attnsteer.attention.geometry import ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.kernels.ops import MaskSpec
from attnsteer.methods.act import ACT
from attnsteer.methods.softplus import SoftplusReweight
from attnsteer.plan import LayerPlan

MASKS = {
    "no-mask": (None, 0),  # transformers passes None for an unpadded causal prefill
    "left-padding": ((0, 5), 0),
    "window-padding": ((3, 0), 4),
}


def _case(name, k_len, past):
    """The shared cases; ACT with a threshold that leaves a few sinks among 11-15 keys (at 0.05 most
    keys are sinks and many rows keep almost nothing outside them: such rows sum the rest exactly,
    tested separately below)."""
    return case(name, k_len, past, **({"threshold": 0.2} if name.startswith("act") else {}))


def _call(name, phase, mask_case, seed=0, dtype=torch.float32):
    q_len, k_len, past = PHASES[phase]
    q, k, v = inputs(2, 6, 2, 15, 15, 16, seed=seed, dtype=dtype)
    q, k, v = q[:, :, -q_len:], k[:, :, :k_len], v[:, :, :k_len]
    pads, window = MASKS[mask_case]
    raw = None if pads is None else padded_mask(2, q_len, k_len, pads, window)
    mask = MaskView(raw, q_len, k_len)
    info = ForwardInfo(q_len, past, k_len, None if pads is None else torch.tensor(pads))
    valid = torch.ones(2, q_len, dtype=torch.bool)
    if pads is not None:  # rows that are padding themselves see nothing: compare only real rows
        valid = torch.tensor([[r + past >= pad for r in range(q_len)] for pad in pads])
    return q, k, v, mask, info, valid


@pytest.mark.parametrize("mask_case", list(MASKS))
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("name", list(METHODS))
def test_flash_matches_reference(name, phase, mask_case):
    if mask_case == "no-mask" and phase != "prefill" and name.startswith("var"):
        pytest.skip("VAR's fake prompt is 14 tokens; without a mask the chunk has no padding to test")
    q, k, v, mask, info, valid = _call(name, phase, mask_case, seed=3)
    plan, prompt = _case(name, k.shape[2], info.past_len)
    stats_ref, stats_flash = Stats(), Stats()
    prompt_ref, prompt_flash = prompt(), prompt()
    ref = attend("reference", plan, q, k, v, mask, info, prompt_ref, stats_ref, scaling=0.35)
    out = attend("flash", plan, q, k, v, mask, info, prompt_flash, stats_flash, scaling=0.35)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert stats_flash.paths == {f"flash/{phase}": 1} and not stats_flash.fallbacks, stats_flash.fallbacks
    # softplus: N a_ij - o_i near 0 amplifies the rounding of a_ij = exp(s_ij - lse_i) (the flash
    # path's weights carry the LSE's rounding, about 1 ulp of |s|; see the float64 test below)
    atol = 5e-6 if name.startswith("softplus") else 2e-6
    torch.testing.assert_close(out[valid], ref[valid], atol=atol, rtol=1e-5)
    assert torch.isfinite(out).all()
    assert list(stats_flash.rows.values()) == list(stats_ref.rows.values())
    if name.startswith("act") and phase == "prefill":  # the column pass finds the same sinks
        key = plan.methods[0].key
        assert torch.equal(prompt_ref.get(key, "sinks"), prompt_flash.get(key, "sinks"))


@pytest.mark.parametrize("name", ["act", "softplus-heads"])
def test_key_tiles_sum_like_one_pass(name, monkeypatch):
    """Long prompts split each row chunk's keys into tiles (PASS_KEYS); sums over tiles are exact."""
    monkeypatch.setattr(fb, "PASS_KEYS", 4)
    monkeypatch.setattr(fb, "PASS_ELEMENTS", 64)
    q, k, v, mask, info, valid = _call(name, "prefill", "window-padding", seed=6)
    plan, prompt = _case(name, k.shape[2], 0)
    prompt_ref, prompt_flash = prompt(), prompt()
    ref = attend("reference", plan, q, k, v, mask, info, prompt_ref, scaling=0.35)
    out = attend("flash", plan, q, k, v, mask, info, prompt_flash, scaling=0.35)
    torch.testing.assert_close(out[valid], ref[valid], atol=5e-6, rtol=1e-5)
    if name == "act":
        key = plan.methods[0].key
        assert torch.equal(prompt_ref.get(key, "sinks"), prompt_flash.get(key, "sinks"))


def test_steering_changes_rows_in_these_cases():
    """The comparisons above are not vacuous: each method steers rows in each phase."""
    for name in METHODS:
        for phase in PHASES:
            q, k, v, mask, info, _ = _call(name, phase, "left-padding", seed=3)
            stats = Stats()
            plan, prompt = _case(name, k.shape[2], info.past_len)
            attend("flash", plan, q, k, v, mask, info, prompt(), stats, scaling=0.35)
            assert sum(stats.rows.values()) > 0, (name, phase)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["act", "softplus", "var"])
def test_float32_error_is_the_reference_error(name, seed):
    """Against a float64 oracle, the flash path's float32 error is the float32 reference's plus the
    rounding of the exponent s_ij - lse_i (weights exp(s - lse) move by a relative ~eps |s|, where
    the reference's softmax subtracts the row max exactly): |err| <= ref_err + 4 eps max|s| max|v|."""
    q, k, v, mask, info, valid = _call(name, "chunk", "window-padding", seed=seed)
    plan, prompt = _case(name, 15, 6)
    oracle = attend(
        "reference",
        plan,
        q.double(),
        k.double(),
        v.double(),
        mask,
        info,
        prompt(),
        scaling=0.35,
        compute_dtype=torch.float64,
    )
    ref32 = attend("reference", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    ours = attend("flash", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    ours_err = (ours.double() - oracle)[valid].abs().max()
    ref_err = (ref32.double() - oracle)[valid].abs().max()
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.35).abs().max()
    bound = ref_err + 4 * torch.finfo(torch.float32).eps * scores * v.abs().max()
    assert ours_err <= bound, (ours_err, ref_err, bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["act", "softplus", "var"])
def test_low_precision_within_twice_the_dtype_error(name, dtype):
    """|flash(x_low) - oracle(x)| <= 2 |reference computed in the low dtype - oracle(x)|."""
    q, k, v, mask, info, valid = _call(name, "chunk", "left-padding", seed=5, dtype=dtype)
    plan, prompt = _case(name, 15, 6)
    oracle = attend("reference", plan, q.float(), k.float(), v.float(), mask, info, prompt(), scaling=0.35)
    naive = attend("reference", plan, q, k, v, mask, info, prompt(), scaling=0.35, compute_dtype=dtype)
    ours = attend("flash", plan, q, k, v, mask, info, prompt(), scaling=0.35)
    assert ours.dtype == dtype
    ours_err = (ours.float() - oracle)[valid].abs().max()
    naive_err = (naive.float() - oracle)[valid].abs().max()
    assert ours_err <= 2 * naive_err, (ours_err, naive_err)


def test_flash_with_lse_matches_the_formula_under_every_mask_shape():
    b, hq, hkv, d = 2, 4, 2, 8
    for q_len, k_len, spec in [
        (9, 9, MaskSpec(0)),
        (1, 9, MaskSpec(8)),
        (4, 9, MaskSpec(5)),
        (9, 9, MaskSpec(0, kv_start=torch.tensor([0, 3], dtype=torch.int32))),
        (9, 9, MaskSpec(0, kv_start=torch.tensor([2, 0], dtype=torch.int32), window=3)),
        (1, 9, MaskSpec(8, kv_start=torch.tensor([0, 6], dtype=torch.int32))),
    ]:
        q, k, v = inputs(b, hq, hkv, q_len, k_len, d, seed=q_len + k_len)
        vis = fb.visible_keys(spec, torch.arange(q_len), torch.arange(k_len)).expand(b, 1, q_len, k_len)
        s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.4).masked_fill(~vis, float("-inf"))
        want_lse = torch.logsumexp(s, -1)
        want_out = torch.softmax(s, -1).nan_to_num(0.0) @ v.repeat_interleave(2, 1)
        out, lse = fb.flash_with_lse(q, k, v, spec, 0.4)
        torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
        counts = fb.visible_counts(spec, b, torch.arange(q_len)).view(b, q_len)
        torch.testing.assert_close(counts, vis.sum(-1, dtype=torch.float32).view(b, q_len))


def test_column_pass_equals_the_materialised_column_sums():
    spec = MaskSpec(0, kv_start=torch.tensor([0, 4], dtype=torch.int32), window=6)
    b, q_len = 2, 13
    q, k, _ = inputs(b, 6, 2, q_len, q_len, 8, seed=11)
    vis = fb.visible_keys(spec, torch.arange(q_len), torch.arange(q_len)).expand(b, 1, q_len, q_len)
    s = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(~vis, float("-inf"))
    a = torch.softmax(s, -1).nan_to_num(0.0)
    row_valid = torch.ones(b, q_len, dtype=torch.bool)
    row_valid[0, -2:] = False  # right padding: those rows do not vote
    lse = torch.logsumexp(s, -1)
    votes = torch.isfinite(lse) & row_valid[:, None, :]
    got = fb.column_sums(q, k, torch.where(votes, lse, float("inf")), spec, 0.3)
    want = (a * row_valid[:, None, :, None]).sum(-2)
    keys_seen = fb.column_counts(spec, b, q_len, q_len, row_valid, q.device)
    torch.testing.assert_close(keys_seen, (vis & row_valid[:, None, :, None]).sum(-2, dtype=torch.float32))
    live = keys_seen.expand_as(got) > 0  # keys nobody sees: their column mean is 0 whatever the sum
    torch.testing.assert_close(got[live], want[live], atol=2e-6, rtol=1e-5)


def _plan(method):
    plan = LayerPlan(0)
    plan.methods.append(method)
    return plan


def _one_call(method, q, k, v, backend="flash"):
    """(reference, ``backend``) outputs of one plain prefill of ``method``, and the stats of the second."""
    n = q.shape[2]
    mask, info, stats = MaskView(None, n, n), ForwardInfo(n, 0, n, None), Stats()
    ref = attend("reference", _plan(method), q, k, v, mask, info, PromptState(), scaling=0.3)
    return ref, attend(backend, _plan(method), q, k, v, mask, info, PromptState(), stats, scaling=0.3), stats


def test_group_row_almost_all_in_small_groups_sums_the_rest_exactly(monkeypatch):
    """o - sum O_g loses precision when the rest of the row holds almost nothing: such rows, under a
    rule that rescales the rest (ACT), sum it over their keys, and the output still equals the reference."""
    q, k, v = inputs(1, 2, 2, 12, 12, 8, seed=2)
    k[:, :, 5] = q[:, :, 6:].mean(2, keepdim=True)[:, :, 0] * 40  # a hidden sink holding ~all the mass
    k[:, :, 0] *= 0.0
    exact = []
    real = fb.complement_rows
    monkeypatch.setattr(fb, "complement_rows", lambda *a, **kw: exact.append(int(a[-2].sum())) or real(*a, **kw))
    ref, out, stats = _one_call(ACT(params(ACT, threshold=0.05, beta=0.3), 0, None), q, k, v)
    assert sum(exact) > 0 and stats.paths == {"flash/prefill": 1}, (exact, stats.fallbacks)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_softplus_large_p_runs_on_the_log_space_path():
    q, k, v = inputs(1, 2, 2, 12, 12, 8, seed=4)
    ref, out, stats = _one_call(SoftplusReweight(params(SoftplusReweight, p=60.0), 0, None), q, k, v, backend="auto")
    assert stats.paths == {"chunked/prefill": 1}, stats.paths
    assert any("power too large" in key for key in stats.fallbacks), stats.fallbacks
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["act", "softplus", "var"])
def test_never_builds_a_queries_by_keys_tensor(name, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2048)
    b, h, n = 2, 6, 14 * 8
    q, k, v = inputs(b, h, 2, n, n, 8, seed=1)
    plan, make_prompt = case(name, n, 0)
    prompt = make_prompt()
    if name == "var":  # the fake prompt's roles cover 14 tokens: stretch them over n
        prompt.roles = type(prompt.roles)(prompt.roles.image.repeat_interleave(8, 1))
        prompt.put((0, 0), "sinks", prompt.get((0, 0), "sinks").repeat_interleave(8, 1))
    stats = Stats()
    with LargestTensor() as probe:
        attend("flash", plan, q, k, v, MaskView(None, n, n), ForwardInfo(n, 0, n, None), prompt, stats, scaling=0.3)
    assert stats.paths == {"flash/prefill": 1}
    assert probe.largest < b * h * n * n // 8, probe.largest


def test_models_on_cpu_run_the_flash_path():
    """A steered model's fused backend on CPU is this path, and equals the reference backend."""
    model = build_tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    recipe = {"interventions": [{"method": "act", "layers": [1, 2], "params": {"threshold": 0.05}}]}
    out = {}
    for backend in ("reference", "auto"):
        with attnsteer.apply(model, recipe, backend=backend) as handle:
            out[backend] = model(input_ids=ids, attention_mask=mask).logits
            stats = handle.stats()
        if backend == "auto":
            assert [s["paths"] for s in stats] == [{"flash/prefill": 1}] * 2, stats
            assert not any(s["fallbacks"] for s in stats), stats
    torch.testing.assert_close(out["auto"][mask.bool()], out["reference"][mask.bool()], atol=1e-5, rtol=1e-4)
