"""The ``flash`` backend (CPU): PyTorch's flash attention plus small per-row corrections.

PyTorch's CPU flash kernel (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``)
returns the unsteered output ``o_i = sum_j a_ij v_j`` *and* each row's log-sum-exp ``lse_i``
without building the Q x K map. Both weight-rule kinds are exact on top of those two:

* **group rules** rescale whole key groups of a row by factors ``f_g``:
  ``o'_i = f_0 O_i0 + sum_{g>=1} f_g O_ig`` with ``O_ig = sum_{j in g} a_ij v_j`` and
  ``M_ig = sum_{j in g} a_ij``. The small groups (1..G-1) are gathered keys whose weights are
  ``a_ij = exp(s_ij - lse_i)`` from the known LSE, so their masses and outputs come from a
  (rows x members) product, never the full map. Group 0, the rest of the row, is the complement:
  ``M_0 = 1 - sum M_g``, ``O_0 = o - sum O_g``; in rows where a rule rescales it and that
  subtraction would lose precision (the rest holds less than :data:`MIN_REST_MASS`) it is summed
  exactly over the row's keys instead. A rule's ``column_stats`` (the column means of the whole
  prefill map) come from one chunked QK^T-only pass with the known LSE (``exp(s - lse)``, no
  softmax, no V).
* **reweight rules**: ``w_ij = max(N_i a_ij - o_i, 0)^p = max(exp(s_ij - lse_i + log N_i) - o_i, 0)^p``
  -- one chunked pass after the LSE, in place, with the causal part above each chunk's last row
  skipped. Rows where every weight is 0 keep the flash output (uniform rows unchanged).

Decode rows (a few query rows) form their weights directly: group rules through the chunked
backend's rule function, re-weighting formed on the row. Everything runs in float32 (as the reference does); the output is cast back to the
model's dtype. What the capability table excludes (score rules, two weight rules on a layer, masks
that are not causal + left padding (+ a window), soft-capping) the router gives to the chunked
backend under ``auto`` (a forced ``flash`` raises); a call this backend gives back after seeing its
data (re-weighting that would leave float32) is a :class:`~attnsteer.attention.router.Refusal`.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import AttnsteerWarning
from ..kernels.ops import MaskSpec
from ..methods.rules import group_ids_of
from . import chunked
from .capability import Capability
from .chunked import grouped_pv, grouped_qk
from .geometry import AttentionCall
from .router import Refusal
from .structure import Structure, call_structure

CAPABILITY = Capability(
    name="flash",
    kinds=frozenset({"group", "reweight"}),
    devices=frozenset({"cpu"}),
    softcap=False,
    any_mask=False,
    weight_rules=1,
)

# A steered row whose rest group (group 0) holds less than this mass, under a rule that rescales
# it, has it summed exactly over its keys: o - sum O_g carries the flash output's rounding, which
# the rule multiplies by f_0 (e.g. f_0 = 1 + (1 - beta) M_1 / M_0 <= 4 while M_0 >= 1/4:
# float32 results stay within the reference's tolerance).
MIN_REST_MASS = 0.25

# Re-weighted weights are formed directly as (N_i a_ij - o_i)^p <= N^p: the pass runs only while that
# stays inside float32 (p log2 N < 126), and a row of a key-seeing query whose weights sum below
# 2^-100 (all 0 -- a uniform row -- or underflowed: the two cannot be told apart) sends the call to
# the chunked path, which works in log space.
REWEIGHT_MAX_LOG2 = 126.0
REWEIGHT_MIN_TOTAL = 2.0**-100

# Elements of one chunk of the column and re-weighting passes: 4 MiB of float32 stays in cache
# between the product, exp and the reductions (on a 2-core EPYC, 64-row chunks of a 9-head, 2048-key
# layer ran the column pass in ~32 ms, 227-row chunks in ~57 ms).
PASS_ELEMENTS = 1 << 20
PASS_KEYS = 2048  # keys per tile: long prompts keep tens of rows per block instead of a handful
# Forwards with at most this many query rows (decode steps) form their rows directly instead of
# calling the flash kernel, which would need the cache copied once per query head (GQA).
DIRECT_ROWS = 4

_OP_STATE: dict = {}


# ---------------------------------------------------------------------------------------------
# the flash kernel
# ---------------------------------------------------------------------------------------------
def _kernel():
    """The torch touchpoint (a private aten op; tests/test_compat.py pins its behaviour)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_op():
    """PyTorch's CPU flash kernel, or None (with the reason in ``_OP_STATE``) when it is missing or
    does not behave as this module relies on: (out, lse) with lse the natural-log row LSE of the
    scaled scores, (B, H, Q), for keys and values broadcast over heads (stride 0, as grouped-query
    calls pass them). Checked once per process on a tiny input against a direct formula."""
    if "op" in _OP_STATE:
        return _OP_STATE["op"]
    op, reason = None, ""
    try:
        candidate = _kernel()
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 5, 8, generator=gen)
        k, v = (torch.randn(1, 1, 5, 8, generator=gen).expand(1, 2, 5, 8) for _ in range(2))
        mask = torch.zeros(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        mask[..., 0] = float("-inf")  # row 0 sees nothing
        out, lse = candidate(q, k, v, 0.0, False, attn_mask=mask, scale=0.3)
        s = (q @ k.transpose(-1, -2)) * 0.3 + mask
        want_lse = torch.logsumexp(s[..., 1:, :], -1)
        want_out = torch.softmax(s[..., 1:, :], -1) @ v
        if tuple(lse.shape) != (1, 2, 5) or tuple(out.shape) != (1, 2, 5, 8):
            reason = f"returned shapes {tuple(out.shape)} / {tuple(lse.shape)}"
        elif not (
            torch.allclose(lse[..., 1:], want_lse, atol=1e-5) and torch.allclose(out[..., 1:, :], want_out, atol=1e-5)
        ):
            reason = "returned an output or log-sum-exp that differs from the formula"
        else:
            op = candidate
    except (AttributeError, RuntimeError, TypeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if op is None:
        _OP_STATE["reason"] = reason
        warnings.warn(
            f"attnsteer: PyTorch's CPU flash attention kernel is not usable in torch {torch.__version__} ({reason}); "
            "steered attention on CPU runs on the slower chunked path",
            AttnsteerWarning,
            stacklevel=3,
        )
    _OP_STATE["op"] = op
    return op


def _row_positions(spec: MaskSpec, rows: torch.Tensor) -> torch.Tensor:
    """Key index of each query row: long (R,)."""
    return rows + spec.q_offset


def visible_keys(spec: MaskSpec, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """bool visibility of ``keys`` from query ``rows`` under causal + left padding (+ window).

    rows: long (R,) query row indices; keys: long (K,) or (B, H, G) key indices (negative =
    no key). Returns (B|1, 1, R, K) or (B, H, R, G)."""
    p = _row_positions(spec, rows).view(1, 1, -1, 1)
    j = keys.view(1, 1, 1, -1) if keys.dim() == 1 else keys[:, :, None, :]
    vis = (j <= p) & (j >= 0)
    if spec.kv_start is not None:
        vis = vis & (j >= spec.kv_start.to(keys.device).view(-1, 1, 1, 1))
    if spec.window:
        vis = vis & (j > p - spec.window)
    return vis


def visible_counts(spec: MaskSpec, b: int, rows: torch.Tensor) -> torch.Tensor:
    """N_i: float (B, 1, R, 1) number of keys each query row sees (0 for rows that see none)."""
    pos = _row_positions(spec, rows).view(1, -1)
    first = torch.zeros(b, 1, dtype=torch.long, device=rows.device)
    if spec.kv_start is not None:
        first = spec.kv_start.to(rows.device).view(-1, 1).long()
    if spec.window:
        first = torch.maximum(first, pos - spec.window + 1)
    return (pos - first + 1).clamp(min=0).to(torch.float32).view(b, 1, -1, 1)


def _key_range(spec: MaskSpec, q0: int, q1: int, k_len: int) -> tuple[int, int]:
    """Keys [lo, hi) that rows q0..q1 can see at all (causal edge, window edge)."""
    hi = min(k_len, spec.q_offset + q1)
    lo = max(0, spec.q_offset + q0 - spec.window + 1) if spec.window else 0
    return lo, max(hi, lo)


def _chunk_mask(spec: MaskSpec, q0: int, q1: int, lo: int, hi: int, device) -> torch.Tensor | None:
    """bool (B|1, 1, C, hi-lo) visibility of keys lo..hi from rows q0..q1, or None when all visible."""
    pos_first, pos_last = spec.q_offset + q0, spec.q_offset + q1 - 1
    all_causal = hi - 1 <= pos_first
    no_window = not spec.window or lo > pos_last - spec.window
    if all_causal and no_window and spec.kv_start is None:
        return None
    return visible_keys(spec, torch.arange(q0, q1, device=device), torch.arange(lo, hi, device=device))


def flash_with_lse(q, k, v, spec: MaskSpec, scaling: float):
    """q (B, H_q, Q, D), k/v (B, H_kv, K, D) float32 -> (out float32 (B, H_q, Q, D), lse float32
    (B, H_q, Q)) of plain attention under ``spec``; rows that see no key get out 0 and lse -inf."""
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    if q_len <= DIRECT_ROWS:
        return _direct_with_lse(q, k, v, spec, scaling)
    if hkv == hq:
        out, lse = _flash_heads(q, k, v, spec, scaling)
    else:  # the CPU kernel has no grouped-query form: one call per kv head, its keys broadcast (no copy)
        group = hq // hkv
        out = torch.empty(b, hq, q_len, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, q_len, dtype=torch.float32, device=q.device)
        for j in range(hkv):
            heads = slice(j * group, (j + 1) * group)
            kj, vj = (t[:, j : j + 1].expand(b, group, k_len, d) for t in (k, v))
            out[:, heads], lse[:, heads] = _flash_heads(q[:, heads], kj, vj, spec, scaling)
    if spec.kv_start is not None:
        empty = visible_counts(spec, b, torch.arange(q_len, device=q.device)).view(b, 1, q_len) == 0
        if bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def _flash_heads(q, k, v, spec: MaskSpec, scaling: float):
    """The CPU flash kernel on q (B, H, Q, D) and k/v (B, H, K, D) (any strides): one call for a
    plain causal prefill, else query chunks with a float mask of their visible keys."""
    op = _flash_op()
    b, h, q_len, d = q.shape
    k_len = k.shape[2]
    plain = spec.kv_start is None and not spec.window
    if plain and spec.q_offset == 0 and q_len == k_len:
        return op(q, k, v, 0.0, True, scale=scaling)
    out = torch.empty(b, h, q_len, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, q_len, dtype=torch.float32, device=q.device)
    size = max(1, chunked.CHUNK_ELEMENTS // max(1, b * k_len))  # rows per chunk of the (B, 1, C, K) float mask
    for q0 in range(0, q_len, size):
        q1 = min(q_len, q0 + size)
        lo, hi = _key_range(spec, q0, q1, k_len)
        vis = _chunk_mask(spec, q0, q1, lo, hi, q.device)
        mask = None
        if vis is not None:
            mask = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
            mask = mask.expand(b, 1, q1 - q0, hi - lo)
        out[:, :, q0:q1], lse[:, :, q0:q1] = op(
            q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], 0.0, False, attn_mask=mask, scale=scaling
        )
    return out, lse


def _row_weights(q, k, spec: MaskSpec, scaling: float):
    """A few query rows (decode) whole: q (B, H_q, Q, D), k (B, H_kv, K, D) -> (scores float32
    (B, H_q, Q, K) with -inf where invisible, softmax weights (0 in rows that see no key), the
    visibility (B|1, 1, Q, K) or None when every key is visible). O(K) per row; the grouped product
    reads each kv head once instead of copying the cache per query head."""
    s = grouped_qk(q * scaling, k)
    vis = _chunk_mask(spec, 0, q.shape[2], 0, k.shape[2], q.device)
    if vis is not None:
        s.masked_fill_(~vis, float("-inf"))
    a = torch.softmax(s, dim=-1)
    if spec.kv_start is not None:
        a = a.nan_to_num_(0.0)  # rows that are padding see nothing
    return s, a, vis


def _direct_with_lse(q, k, v, spec: MaskSpec, scaling: float):
    """flash_with_lse for a few query rows, from :func:`_row_weights`."""
    s, a, _ = _row_weights(q, k, spec, scaling)
    return grouped_pv(a, v), torch.logsumexp(s, -1)


# ---------------------------------------------------------------------------------------------
# the pieces every rule is built from
# ---------------------------------------------------------------------------------------------
def _fold(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H_q, C, X) -> (B * H_kv, (H_q / H_kv) * C, X): the query heads of one kv head as rows."""
    b, hq, c, x = t.shape
    return t.reshape(b * hkv, (hq // hkv) * c, x)


def _budget() -> int:
    """Elements of one block of the in-place passes (the chunked path's budget, if smaller)."""
    return min(PASS_ELEMENTS, chunked.CHUNK_ELEMENTS)


def _tiles(spec: MaskSpec, b: int, hq: int, q_len: int, k_len: int):
    """(q0, q1, lo, hi) tiles of the in-place passes: rows q0..q1 against the keys lo..hi they can
    see, in key tiles of at most PASS_KEYS and (B, H, C, tile) blocks of at most PASS_ELEMENTS."""
    size = max(1, min(q_len, _budget() // max(1, b * hq * min(k_len, PASS_KEYS))))
    for q0 in range(0, q_len, size):
        q1 = min(q0 + size, q_len)
        lo, hi = _key_range(spec, q0, q1, k_len)
        for t0 in range(lo, hi, PASS_KEYS):
            yield q0, q1, t0, min(t0 + PASS_KEYS, hi)


def _masked_rows_block(x: torch.Tensor, spec: MaskSpec, q0: int, q1: int, lo: int, hi: int, hkv: int, value: float):
    """Set the entries of x (B * H_kv, g * C, hi-lo), the rows q0..q1 of one fold, that the rows do not
    see to ``value``; only the partly visible part of the chunk is touched."""
    vis = _chunk_mask(spec, q0, q1, lo, hi, x.device)
    if vis is None:
        return
    c = q1 - q0
    view = x.view(-1, hkv, x.shape[1] // c, c, hi - lo)  # (B, H_kv, g, C, L)
    hidden = ~vis.view(vis.shape[0], 1, 1, c, hi - lo)
    if vis.shape[0] == 1:  # the same pattern for every batch row: only the causal / window edges
        cols = (~vis).view(c, hi - lo).any(0).nonzero()
        if cols.numel() == 0:
            return
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        view[..., c0:c1].masked_fill_(hidden[..., c0:c1], value)
    else:
        view.masked_fill_(hidden, value)


def column_sums(q, k, lse_vote, spec: MaskSpec, scaling: float) -> torch.Tensor:
    """The column pass: sum_i exp(s_ij - lse_i) over query rows, (B, H_q, K) float32.

    q (B, H_q, Q, D), k (B, H_kv, K, D) float32; lse_vote (B, H_q, Q): the row LSE, +inf for rows
    that do not vote (padding). QK^T only, chunk by chunk, in place; keys a chunk cannot see are
    skipped or zeroed."""
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    g = hq // hkv
    colsum = torch.zeros(b, hkv, g, k_len, dtype=torch.float32, device=q.device)
    kt = k.reshape(b * hkv, k_len, d).transpose(1, 2)
    for q0, q1, lo, hi in _tiles(spec, b, hq, q_len, k_len):
        shift = _fold(-lse_vote[:, :, q0:q1, None], hkv)
        x = torch.baddbmm(shift, _fold(q[:, :, q0:q1], hkv), kt[:, :, lo:hi], alpha=scaling)
        x.exp_()
        _masked_rows_block(x, spec, q0, q1, lo, hi, hkv, 0.0)
        colsum[..., lo:hi] += x.view(b, hkv, g, q1 - q0, hi - lo).sum(3)
    return colsum.view(b, hq, k_len)


def column_counts(spec: MaskSpec, b: int, q_len: int, k_len: int, row_valid, device) -> torch.Tensor:
    """Number of voting query rows that see each key: float32 (B, 1, K) (row_valid bool (B, Q) or None)."""
    rows = torch.arange(q_len, device=device)
    votes = visible_counts(spec, b, rows).view(b, q_len) > 0
    if row_valid is not None:
        votes = votes & row_valid.to(device)
    # rows with key index < x that vote, for x = 0..K (query row i sits at key index q_offset + i)
    before = torch.zeros(b, k_len + 1, dtype=torch.long, device=device)
    pos = rows + spec.q_offset
    inside = pos < k_len
    before[:, 1:].index_add_(1, pos[inside], votes[:, inside].long())
    before = before.cumsum(1)
    keys = torch.arange(k_len, device=device)
    last = torch.full_like(keys, k_len) if not spec.window else (keys + spec.window).clamp(max=k_len)
    count = before[:, last] - before[:, keys]
    if spec.kv_start is not None:
        count = count.masked_fill(keys.view(1, -1) < spec.kv_start.to(device).view(-1, 1), 0)
    return count.to(torch.float32).view(b, 1, k_len)


def gather_keys(t: torch.Tensor, idx: torch.Tensor, hq: int) -> torch.Tensor:
    """Rows ``idx`` of t (B, H_kv, K, D): idx long (B, 1, G) -> (B, H_kv, G, D) (one set for every
    head) or (B, H_q, G) -> (B, H_q, G, D) (per query head, read from its kv head)."""
    b, hkv = t.shape[:2]
    heads = idx.shape[1]
    kv = torch.arange(hkv, device=t.device) if heads == 1 else torch.arange(hq, device=t.device) // (hq // hkv)
    bi = torch.arange(b, device=t.device).view(-1, 1, 1)
    return t[bi, kv.view(1, -1, 1), idx.clamp(min=0).expand(b, kv.numel(), idx.shape[-1])]


def member_weights(q, k, v, lse, spec: MaskSpec, rows: torch.Tensor, idx, scaling: float):
    """The weights of gathered keys from the known row LSE, and their values.

    q (B, H_q, R, D) the query rows ``rows`` (long (R,) indices), lse (B, H_q, R); idx long
    (B, 1|H_q, G) key indices of the members (negative = padding). Returns a float32 (B, H_q, R, G)
    with a_ij = exp(s_ij - lse_i) on visible members (0 elsewhere), and ``pv(weights)`` (B, H_q, R,
    D) = the weighted sum of the members' values, for any weights shaped like a."""
    hq = q.shape[1]
    kg, vg = gather_keys(k, idx, hq), gather_keys(v, idx, hq)
    per_head = idx.shape[1] != 1
    s = torch.matmul(q, kg.transpose(-1, -2)) if per_head else grouped_qk(q, kg)
    vis = visible_keys(spec, rows, idx)  # (B, 1|H, R, G)
    a = torch.where(vis, torch.exp(s * scaling - lse[..., None]), torch.zeros((), device=q.device))
    return a, (lambda w: torch.matmul(w, vg)) if per_head else (lambda w: grouped_pv(w, vg))


def member_table(flags: torch.Tensor) -> torch.Tensor:
    """bool (B, H, K) -> long (B, H, G) indices of the True keys, padded with -1 (G = the most in a row)."""
    counts = flags.sum(-1)
    width = int(counts.max()) if flags.numel() else 0
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True)[..., :width]
    slot = torch.arange(width, device=flags.device)
    return torch.where(slot < counts[..., None], order, torch.full_like(order, -1))


def key_indices(positions: torch.Tensor, key_offset: int, k_len: int) -> torch.Tensor:
    """Absolute prompt positions (-1 = padding) -> indices among this forward's keys, which start at
    ``key_offset`` (a sliding-window cache drops the oldest); -1 where a position is not among them."""
    idx = positions - key_offset
    return torch.where((positions >= 0) & (idx >= 0) & (idx < k_len), idx, -1)


def complement_rows(q, k, v, lse, spec: MaskSpec, members: torch.Tensor, rows: torch.Tensor, scaling: float):
    """Exact mass and output of the keys *outside* ``members`` (bool (B, H_q, K)) for the query rows
    flagged in ``rows`` (bool (B, H_q, Q, 1)): (float32 (B, H_q, Q, 1), float32 (B, H_q, Q, D)), zero
    elsewhere. One (rows x K) product per (batch row, head) that has flagged rows, in chunks."""
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    mass = torch.zeros(b, hq, q_len, 1, dtype=torch.float32, device=q.device)
    output = torch.zeros(b, hq, q_len, d, dtype=torch.float32, device=q.device)
    keys = torch.arange(k_len, device=q.device)
    step = max(1, chunked.CHUNK_ELEMENTS // max(1, k_len))
    for bi, hi in rows[..., 0].any(-1).nonzero().tolist():
        kv = hi // (hq // hkv)
        flagged = rows[bi, hi, :, 0].nonzero().flatten()
        for start in range(0, flagged.numel(), step):
            r = flagged[start : start + step]
            vis = visible_keys(spec, r, keys)[bi if spec.kv_start is not None else 0, 0] & ~members[bi, hi]
            s = q[bi, hi, r] @ k[bi, kv].T * scaling - lse[bi, hi, r, None]
            a = torch.where(vis, torch.exp(s), torch.zeros((), device=q.device))
            mass[bi, hi, r, 0] = a.sum(-1)
            output[bi, hi, r] = a @ v[bi, kv]
    return mass, output


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
def unavailable(config, call) -> str | None:
    """Why the CPU flash kernel cannot serve this process, or None."""
    return None if _flash_op() is not None else f"cpu flash kernel unavailable ({_OP_STATE.get('reason', '')})"


def run(steps, call: AttentionCall, query, key, value, stats, config=None):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> out (B, Q, H_q, D) in query.dtype, or a
    :class:`Refusal`; the numbers of the chunked backend. One weight rule (the capability table)."""
    rule = steps.weight[0]
    q, k, v = query.float(), key.float(), value.float()
    struct = call_structure(call)
    result = (_group if rule.kind == "group" else _reweight)(rule, q, k, v, struct, call)
    if isinstance(result, str):
        return Refusal(result)
    out, rows = result
    stats.record(rule.method, rows)
    return out.transpose(1, 2).to(query.dtype).contiguous()


def _group_rows(rule, q, k, v, struct: Structure, call: AttentionCall):
    """A group rule on a few query rows (decode): the full (B, H_q, Q, K) weights -- O(K) -- go
    through the chunked backend's rule function, then one grouped product with V."""
    _, a, vis = _row_weights(q, k, struct.spec, call.scaling)
    a, changed = chunked.apply_group_rule(rule, a, call.rows(vis, 0, rows=q.shape[2]), call)
    return grouped_pv(a, v), changed


def _members(rule, call: AttentionCall):
    """The rule's small groups as gathered members, kept per prompt: prompt positions long
    (B, 1|H, M) (-1 = padding) and their group ids long (B, 1|H, M)."""
    table = chunked.group_table(rule, call)

    def build():
        gid = table.long()
        positions = member_table(gid > 0)
        ids = torch.where(positions >= 0, gid.gather(-1, positions.clamp(min=0)), 0)
        return positions, ids

    return call.prompt.memo((rule.key, "flash members", str(call.device)), (table,), build)


def _column_stats(rule, q, k, lse, struct: Structure, call: AttentionCall) -> None:
    """The column sums of the prefill map (QK^T only, from the known LSE) for ``rule``."""
    b, _, q_len, _ = q.shape
    spec = struct.spec
    votes = torch.isfinite(lse)
    if call.info.row_valid is not None:
        votes = votes & call.info.row_valid.to(q.device)[:, None, :]
    colsum = column_sums(q, k, torch.where(votes, lse, float("inf")), spec, call.scaling)
    count = column_counts(spec, b, q_len, k.shape[2], call.info.row_valid, q.device)
    chunked.set_column_stats(rule, colsum, count, call)


def _group(rule, q, k, v, struct: Structure, call: AttentionCall):
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    spec = struct.spec
    columns = rule.column_stats and call.is_prefill
    if q_len <= DIRECT_ROWS and not columns:
        return _group_rows(rule, q, k, v, struct, call)
    out, lse = flash_with_lse(q, k, v, spec, call.scaling)
    if columns:
        _column_stats(rule, q, k, lse, struct, call)
    positions, ids = _members(rule, call)
    idx = key_indices(positions, struct.key_offset, k_len)
    all_rows = call.rows(None, 0, rows=q_len)
    gate = rule.row_gate(all_rows, call.prompt)  # (B|1, 1, Q, 1) or None
    first = 0
    if gate is not None:
        gated = gate.expand(-1, 1, q_len, 1).any(0).flatten().nonzero()
        if gated.numel() == 0:
            return out, 0
        first = int(gated[0])
    if idx.shape[-1] == 0:
        return out, 0
    onehot = torch.nn.functional.one_hot(ids, rule.num_groups).to(torch.float32)  # (B, 1|H, M, G)
    size = max(1, chunked.CHUNK_ELEMENTS // max(1, b * hq * max(idx.shape[-1], q.shape[-1])))
    steered_total = 0
    for c0 in range(first, q_len, size):
        c1 = min(q_len, c0 + size)
        steered_total = steered_total + _correct(rule, q, k, v, lse, out, struct, call, c0, c1, idx, ids, onehot)
    return out, steered_total


def _correct(rule, q, k, v, lse, out, struct: Structure, call: AttentionCall, c0, c1, idx, ids, onehot):
    """The group rule on query rows c0..c1 of ``out`` (B, H, Q, D), in place; returns the number of
    steered (batch, head, row)s."""
    b = q.shape[0]
    spec = struct.spec
    rows = torch.arange(c0, c1, device=q.device)
    a, pv = member_weights(q[:, :, c0:c1], k, v, lse[:, :, c0:c1], spec, rows, idx, call.scaling)
    small = torch.matmul(a, onehot)  # (B, H, R, G): column 0 (the rest) is never gathered
    # the rest of the row: mass 1 - sum of the small groups, where the row sees keys outside them
    seen = visible_keys(spec, rows, idx).sum(-1, keepdim=True)
    has_rest = visible_counts(spec, b, rows) > seen
    rest = torch.where(has_rest, (1.0 - small.sum(-1, keepdim=True)).clamp(min=0.0), torch.zeros((), device=q.device))
    masses = torch.cat([rest, small[..., 1:]], dim=-1)
    view = call.rows(None, c0, rows=c1 - c0)
    o = out[:, :, c0:c1]
    exact = None
    if not rule.rest_unchanged:
        # rows whose rest would be rescaled from a complement that lost precision: sum it exactly
        candidates = chunked.steered_rows(rule, has_rest, view, call)
        exact = candidates & (rest < MIN_REST_MASS)
        if bool(exact.any()):
            member_keys = group_ids_of(chunked.group_table(rule, call), call.key_abs) > 0  # (B, 1|H, K)
            flagged = torch.zeros(*exact.shape[:2], q.shape[2], 1, dtype=torch.bool, device=q.device)
            flagged[:, :, c0:c1] = exact
            mass, output = complement_rows(
                q, k, v, lse, spec, member_keys.expand(b, q.shape[1], -1), flagged, call.scaling
            )
            masses = torch.cat([torch.where(exact, mass[:, :, c0:c1], rest), small[..., 1:]], dim=-1)
            exact_rest = output[:, :, c0:c1]
        else:
            exact = None
    steered, factors = rule.factors(masses, call.prompt)
    steered = chunked.steered_rows(rule, steered, view, call)
    f_rest = factors[..., :1]
    per_member = factors.gather(-1, ids[:, :, None, :].expand(*factors.shape[:-1], ids.shape[-1]))  # (B, H, R, M)
    if exact is None:
        # o' = f_0 (o - sum O_g) + sum f_g O_g = f_0 o + sum (f_g - f_0) O_g
        new = o * f_rest + pv(a * (per_member - f_rest))
    else:
        o_rest = torch.where(exact, exact_rest, o - pv(a))
        new = o_rest * f_rest + pv(a * per_member)
    o.copy_(torch.where(steered, new, o))  # unsteered rows keep the flash output bit for bit
    return steered.sum()


def _reweight(rule, q, k, v, struct: Structure, call: AttentionCall):
    b, hq, q_len, d = q.shape
    k_len = k.shape[2]
    spec = struct.spec
    scaling = call.scaling
    power = rule.power
    if power * math.log2(max(2, k_len)) >= REWEIGHT_MAX_LOG2:
        return "re-weighting power too large for the direct form"
    n_vis, log_n, neg_offset = struct.memo(
        ("reweight rows", b, q_len, str(q.device), rule.offset, rule.free_rows),
        lambda: _reweight_row_terms(struct, b, q_len, rule.offset, rule.free_rows, q.device),
    )
    if q_len <= DIRECT_ROWS:
        return _reweight_rows(rule, q, k, v, spec, scaling, n_vis, neg_offset)
    out, lse = flash_with_lse(q, k, v, spec, scaling)
    heads = None if rule.heads is None else rule.heads.nonzero().flatten().tolist()
    qs, ks, vs, ls = q, k, v, lse
    if heads is not None:  # only the steered query heads, each with its own copy of its kv head
        group = hq // k.shape[1]
        kv = [h // group for h in heads]
        qs, ks, vs, ls = q[:, heads], k[:, kv], v[:, kv], lse[:, heads]
    hs, hkv = qs.shape[1], ks.shape[1]
    # N_i a_ij = exp(s_ij - (lse_i - log N_i)); rows that see nothing: shift +inf (weights 0)
    shift = torch.where(n_vis > 0, ls[..., None] - log_n, float("inf"))
    kt = ks.reshape(b * hkv, k_len, d).transpose(1, 2)
    vf = vs.reshape(b * hkv, k_len, d)
    num = torch.zeros(b, hs, q_len, d, dtype=torch.float32, device=q.device)
    total = torch.zeros(b, hs, q_len, 1, dtype=torch.float32, device=q.device)
    for q0, q1, lo, hi in _tiles(spec, b, hs, q_len, k_len):
        c = q1 - q0
        sh = _fold(-shift[:, :, q0:q1].expand(b, hs, c, 1), hkv)
        x = torch.baddbmm(sh, _fold(qs[:, :, q0:q1], hkv), kt[:, :, lo:hi], alpha=scaling)
        x.exp_()
        x.add_(_fold(neg_offset[:, :, q0:q1].expand(b, hs, c, 1), hkv)).clamp_(min=0.0)
        _masked_rows_block(x, spec, q0, q1, lo, hi, hkv, 0.0)
        if power != 1.0:
            x.pow_(power)
        total[:, :, q0:q1] += x.sum(-1, keepdim=True).view(b, hs, c, 1)
        num[:, :, q0:q1] += torch.bmm(x, vf[:, lo:hi]).view(b, hs, c, d)
    new = num / total.clamp(min=1e-38)
    keep = _reweight_kept(total, n_vis)
    if isinstance(keep, str):
        return keep
    if heads is None:
        return torch.where(keep, new, out), keep.sum()
    out[:, heads] = torch.where(keep, new, out[:, heads])
    return out, keep.sum()


def _reweight_row_terms(struct: Structure, b: int, q_len: int, offset: float, free_rows: int, device):
    """Per-row inputs of the re-weighting, shared by a forward's layers: N_i float (B, 1, Q, 1),
    log N_i (log 1 where N_i = 0) and -o_i (o_i: 0 in a row's first ``free_rows`` positions, ``offset`` after)."""
    rows = torch.arange(q_len, device=device)
    n_vis = visible_counts(struct.spec, b, rows)
    rel = struct.rel0.view(-1, 1).to(device) + rows.view(1, -1)  # (B, Q) position from the row's first token
    neg_o = torch.where(rel < free_rows, 0.0, -offset).view(b, 1, q_len, 1)
    return n_vis, torch.log(n_vis.clamp(min=1)), neg_o


def _reweight_kept(total, n_vis):
    """Rows whose re-weighting applies (weights not all 0), or the reason to take the log-space
    path: a row that sees keys but whose weights sum below REWEIGHT_MIN_TOTAL."""
    if bool(((total < REWEIGHT_MIN_TOTAL) & (n_vis > 0)).any()):
        return "a re-weighted row whose weights all underflow"
    return total > 0


def _reweight_rows(rule, q, k, v, spec: MaskSpec, scaling: float, n_vis, neg_offset):
    """Re-weighting of a few query rows (decode): scores, LSE and weights from one (B, H_q, Q, K)
    product; the plain output only where some row keeps it (unsteered heads, uniform rows)."""
    _, a, _ = _row_weights(q, k, spec, scaling)  # rows that see nothing: weights 0 (and N = 0)
    x = torch.addcmul(neg_offset, a, n_vis).clamp_(min=0.0)  # max(N_i a_ij - o_i, 0)
    if rule.power != 1.0:
        x.pow_(rule.power)
    total = x.sum(-1, keepdim=True)
    if rule.heads is None and float(total.amin()) >= REWEIGHT_MIN_TOTAL:  # every row re-weighted: one sync
        return grouped_pv(x, v) / total, total.numel()
    out = grouped_pv(x, v) / total.clamp(min=1e-38)
    keep = _reweight_kept(total, n_vis)
    if isinstance(keep, str):
        return keep
    heads = rule.head_mask(keep)
    if heads is not None:
        keep = keep & heads
    if not bool(keep.all()):
        plain = grouped_pv(a, v)
        out = torch.where(keep, out, plain)
    return out, keep.sum()
