"""The FlexAttention steering of attnsteer's vLLM plugin (attnsteer/vllm/flex_rules.py) on CPU,
without vLLM: several requests packed in one call as vLLM packs them (rows concatenated, keys in a
paged cache whose blocks are shuffled, FlexAttention's score_mod on logical positions), each with
its own recipe or none, against attnsteer's chunked backend run on each request alone (its keys
read in position order). torch's ``flex_attention`` runs eagerly on CPU here."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from attention_cases import HEADS, Stats, params, plan_of
from toy_methods import TOYS

from attnsteer.attention import chunked
from attnsteer.attention.geometry import AttentionCall, ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.methods.act import ACT
from attnsteer.methods.pai import PAI
from attnsteer.methods.softplus import SoftplusReweight
from attnsteer.methods.var import VAR
from attnsteer.roles import PromptRoles
from attnsteer.vllm import flex_rules
from attnsteer.vllm.paged import window_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")

H, HKV, D, BLOCK = 6, 2, 16, 16
SCALE = D**-0.5
PROMPT = 20  # every request's prompt length; image / focus keys at 4..10


def _roles() -> PromptRoles:
    image = torch.zeros(1, PROMPT, dtype=torch.bool)
    image[0, 4:11] = True
    return PromptRoles(image)


def _methods():
    """name -> (a fresh method, a function filling a fresh PromptState for a request whose rows
    start after ``past`` tokens)."""

    def act(**over):
        return lambda: ACT(params(ACT, threshold=0.05, beta=0.2, **over), 0, None)

    def var():
        chosen = params(VAR, rho=0.2, min_image_attention=0.05, variant="paper", p=0.6)
        return VAR(VAR.finalize_params(chosen), 0, None)

    def sinks(method, prompt, past):
        if past:  # decode rows reuse the prompt's sinks, found at its prefill
            table = torch.zeros(1, H, PROMPT, dtype=torch.bool)
            table[0, :, 0], table[0, ::2, 6] = True, True
            prompt.put(method.key, "sinks", table)

    def var_sinks(method, prompt, past):
        table = torch.zeros(1, PROMPT, dtype=torch.bool)
        table[0, [0, 5, 7]] = True
        prompt.put(method.key, "sinks", table)

    def first(method, prompt, past):
        table = torch.zeros(1, PROMPT, dtype=torch.bool)
        table[0, 0] = True
        prompt.put(method.key, "first", table)

    none = lambda m, p, past: None  # noqa: E731
    return {
        "softplus": (lambda: SoftplusReweight(params(SoftplusReweight, p=2.5), 0, None), none),
        "softplus-heads": (lambda: SoftplusReweight(params(SoftplusReweight, p=3.0, offset=0.5), 0, HEADS), none),
        "lssa": (lambda: SoftplusReweight(params(SoftplusReweight, p=2.0, scoring="lssa"), 0, None), none),
        "pai": (lambda: PAI(params(PAI, alpha=0.5), 0, None), none),
        "pai-heads": (lambda: PAI(params(PAI, alpha=0.8), 0, HEADS), none),
        "act": (act(apply_to="all"), sinks),
        "var": (var, var_sinks),
        "toy_score": (lambda: TOYS["toy_score"]({"c": 2.0}, 0, HEADS), none),
        "toy_key_scale": (lambda: TOYS["toy_key_scale"]({"c": 3.0}, 0, None), none),
        "toy_group": (lambda: TOYS["toy_group"]({"c": 3.0}, 0, None), first),
        "toy_head": (lambda: TOYS["toy_head"]({"c": 2.0}, 0, None), none),
    }


METHODS = _methods()


@dataclasses.dataclass
class Req:
    """One request of the packed call: its tokens so far, its rows, its method (or None)."""

    length: int
    rows: int
    method: str | None


def _packed(reqs: list[Req], seed=0):
    """Queries (T, H, D), per-request keys/values (H_kv, n, D), and a paged cache (blocks, BLOCK,
    H_kv, D) x 2 with a shuffled block table (block 0 unused, as in vLLM)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(r.rows for r in reqs)
    q = torch.randn(t, H, D, generator=g) * 1.5
    kv = []
    for r in reqs:
        k = torch.randn(HKV, r.length, D, generator=g) * 1.5
        k[:, 3] *= 3.0  # one strong key, so rows are not near-uniform
        kv.append((k, torch.randn(HKV, r.length, D, generator=g)))
    per_req = [-(-r.length // BLOCK) for r in reqs]
    blocks = 1 + sum(per_req)
    order = torch.randperm(blocks - 1, generator=g) + 1
    table = torch.zeros(len(reqs), max(per_req), dtype=torch.long)
    k_cache = torch.zeros(blocks * BLOCK, HKV, D)
    v_cache = torch.zeros(blocks * BLOCK, HKV, D)
    used = 0
    for i, (r, (k, v)) in enumerate(zip(reqs, kv)):
        for b in range(per_req[i]):
            table[i, b] = order[used]
            used += 1
            n = min(BLOCK, r.length - b * BLOCK)
            at = int(table[i, b]) * BLOCK
            k_cache[at : at + n] = k[:, b * BLOCK : b * BLOCK + n].transpose(0, 1)
            v_cache[at : at + n] = v[:, b * BLOCK : b * BLOCK + n].transpose(0, 1)
    return q, kv, table, k_cache, v_cache


def _attend_fn(reqs, q, table, k_cache, v_cache, window=0):
    """``attend(score_mod)`` over the packed layout, as vLLM's FlexAttention backend runs it: a
    paged mask on logical positions, the user's score_mod called on logical positions with
    ``physical_q``, -inf on invalid slots."""
    t = q.shape[0]
    blocks = k_cache.shape[0] // BLOCK
    doc = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor([r.rows for r in reqs]))
    starts = torch.tensor([0] + [r.rows for r in reqs]).cumsum(0)[:-1]
    past = torch.tensor([r.length - r.rows for r in reqs])
    seq = torch.tensor([r.length for r in reqs])
    to_logical = torch.full((len(reqs), blocks), -1, dtype=torch.long)
    for i in range(len(reqs)):
        for b in range(table.shape[1]):
            if b * BLOCK < reqs[i].length:
                to_logical[i, table[i, b]] = b

    def logical(q_idx, kv_idx):
        r = doc[q_idx]
        lb = to_logical[r, kv_idx // BLOCK]
        lkv = lb * BLOCK + kv_idx % BLOCK
        lq = q_idx - starts[r] + past[r]
        valid = (lb >= 0) & (lkv < seq[r]) & (lkv <= lq)
        if window:
            valid = valid & (lkv > lq - window)
        return valid, lq, lkv

    def mask_mod(b, h, q_idx, kv_idx):
        return logical(q_idx, kv_idx)[0]

    mask = flex.create_block_mask(mask_mod, None, None, t, blocks * BLOCK, device="cpu")
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4, v4 = k_cache.transpose(0, 1).unsqueeze(0), v_cache.transpose(0, 1).unsqueeze(0)

    def attend(score_mod):
        wrapped = None
        if score_mod is not None:

            def wrapped(score, b, h, q_idx, kv_idx):
                valid, lq, lkv = logical(q_idx, kv_idx)
                return torch.where(valid, score_mod(score, b, h, lq, lkv, physical_q=q_idx), float("-inf"))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, aux = flex.flex_attention(q4, k4, v4, wrapped, mask, scale=SCALE, enable_gqa=True,
                                           return_aux=flex.AuxRequest(lse=True))  # fmt: skip
        return out[0].transpose(0, 1), aux.lse[0].transpose(0, 1)

    return attend


def _chunked_alone(req: Req, plan, prompt, q, k, v, window=0):
    """attnsteer's chunked backend on one request alone -> (C, H, D), then its head rules."""
    past = req.length - req.rows
    info = ForwardInfo(q_len=req.rows, past_len=past, total_len=req.length, first_valid=None, batch=1)
    qr = q.transpose(0, 1).unsqueeze(0)
    mask = MaskView(window_mask(req.rows, req.length, window), req.rows, req.length)
    call = AttentionCall(0, info, qr, k.unsqueeze(0), mask, SCALE, prompt)
    steps = plan.steps(past == 0)
    out = chunked.run(steps, call, qr, k.unsqueeze(0), v.unsqueeze(0), Stats())
    for rule in steps.head:
        out, _ = rule.apply(out, call, prompt)
    return out[0]


def _run(reqs: list[Req], window=0):
    """(flex output (T, H, D), chunked outputs per request, plain outputs per request)."""
    q, kv, table, k_cache, v_cache = _packed(reqs)
    attend = _attend_fn(reqs, q, table, k_cache, v_cache, window)
    slices, expected, plain = [], [], []
    q0 = 0
    for r, (k, v) in zip(reqs, kv):
        rows = slice(q0, q0 + r.rows)
        plan = plan_of()
        prompts = [PromptState(_roles()), PromptState(_roles())]
        if r.method is not None:
            make, fill = METHODS[r.method]
            method = make()
            plan = plan_of(method)
            for prompt in prompts:
                fill(method, prompt, r.length - r.rows)
        steps = plan.steps(r.length == r.rows)
        slices.append(flex_rules.RequestSlice(q0, q0 + r.rows, r.length, steps, prompts[0],
                                              lambda k=k, v=v: (k, v)))  # fmt: skip
        expected.append(_chunked_alone(r, plan, prompts[1], q[rows], k, v, window))
        plain.append(_chunked_alone(r, plan_of(), PromptState(), q[rows], k, v, window))
        q0 += r.rows
    out = flex_rules.steer(0, q, slices, SCALE, attend, window)
    return out, expected, plain


SHAPES = [(PROMPT, PROMPT), (PROMPT + 9, 7), (PROMPT + 14, 1)]  # prefill, continuation chunk, decode


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_rule_kind_on_a_paged_batch_equals_the_chunked_backend_per_request(name):
    """Every phase of one method, packed with an unsteered request, equals the chunked backend on
    each request alone; the method changes its rows by more than 1e-3."""
    if name in ("act", "var", "toy_group"):
        shapes = [s for s in SHAPES if s[0] > s[1]] if name != "act" else SHAPES
    else:
        shapes = SHAPES
    reqs = [Req(n, c, name) for n, c in shapes] + [Req(PROMPT + 3, 1, None)]
    out, expected, plain = _run(reqs)
    q0, changed = 0, 0.0
    for r, want, base in zip(reqs, expected, plain):
        got = out[q0 : q0 + r.rows]
        torch.testing.assert_close(got, want.float(), atol=3e-5, rtol=1e-4)
        changed = max(changed, float((want - base).abs().max())) if r.method else changed
        q0 += r.rows
    assert changed > 1e-3, f"{name} changed nothing ({changed})"


def test_requests_with_different_recipes_or_none_share_one_packed_call():
    """One call: a softplus prefill, a PAI decode, an unsteered request, an ACT decode, a VAR chunk,
    each equal to the chunked backend alone; the unsteered rows equal plain attention."""
    reqs = [Req(PROMPT, PROMPT, "softplus"), Req(PROMPT + 5, 1, "pai"), Req(PROMPT + 2, 3, None),
            Req(PROMPT + 7, 1, "act"), Req(PROMPT + 9, 4, "var"), Req(PROMPT + 1, 1, "lssa")]  # fmt: skip
    out, expected, plain = _run(reqs)
    q0 = 0
    for r, want, base in zip(reqs, expected, plain):
        got = out[q0 : q0 + r.rows]
        torch.testing.assert_close(got, want.float(), atol=3e-5, rtol=1e-4)
        if r.method is None:
            torch.testing.assert_close(got, base.float(), atol=3e-6, rtol=1e-5)
        else:
            assert float((want - base).abs().max()) > 1e-3, r
        q0 += r.rows


def test_a_sliding_window_is_honoured():
    reqs = [Req(PROMPT + 9, 7, "softplus"), Req(PROMPT + 14, 1, "pai"), Req(PROMPT + 2, 1, "act")]
    out, expected, _ = _run(reqs, window=8)
    q0 = 0
    for r, want in zip(reqs, expected):
        torch.testing.assert_close(out[q0 : q0 + r.rows], want.float(), atol=3e-5, rtol=1e-4)
        q0 += r.rows


def test_rules_this_path_cannot_run_are_named():
    """More than one weight rule on a layer is refused with the reason; one is accepted."""
    softplus = METHODS["softplus"][0]()
    act = METHODS["act"][0]()
    assert flex_rules.refusal(softplus.rules) is None
    assert "more than one weight rule" in flex_rules.refusal([*softplus.rules, *act.rules])
