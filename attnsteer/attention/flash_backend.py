"""The ``fused`` backend on CPU: PyTorch's flash attention plus small per-row corrections.

PyTorch's CPU flash kernel (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``)
returns the unsteered output ``o_i = sum_j a_ij v_j`` *and* each row's log-sum-exp ``lse_i``
without building the Q x K map. Every weight-level rule attnsteer runs here is exact on top of
those two:

* **group rules** (ACT, VAR) rescale whole key groups of a row by factors ``f_g``, so
  ``o'_i = o_i + sum_g (f_g - 1) O_ig`` with ``O_ig = sum_{j in g} a_ij v_j`` and
  ``M_ig = sum_{j in g} a_ij``. The groups that change are small (ACT's sinks; VAR's sinks and
  image tokens) and their weights are ``a_ij = exp(s_ij - lse_i)`` from the known LSE, so their
  masses and outputs come from a gathered (rows x group keys) product, never the full map.
  ACT's large "other" group is the complement: ``M_other = 1 - M_sink``, ``O_other = o - O_sink``;
  in rows where that subtraction would lose precision (the non-sinks hold less than
  :data:`ACT_MIN_OTHER_MASS`) the complement is summed exactly over the row's keys instead.
  ACT's sink detection needs the column means of the whole prefill map: one chunked QK^T-only
  pass with the known LSE (``exp(s - lse)``, no softmax, no V).
* **softplus re-weighting**: ``w_ij = max(N_i a_ij - o_i, 0)^p = max(exp(s_ij - lse_i + log N_i) - o_i, 0)^p``
  -- one chunked pass after the LSE, in place, with the causal part above each chunk's last row
  skipped. Rows where every weight is 0 keep the flash output (SPEC: uniform rows unchanged).

Decode rows are the same computation with one query row. Everything runs in float32 (as the
reference does); the output is cast back to the model's dtype. What this module does not cover --
score-level steps, two weight steps on a layer, masks that are not causal + left padding (+ a
window), CUDA tensors -- goes to :func:`attnsteer.attention.fused.fused_attention`, counted in
:data:`attnsteer.attention.routing.COUNTERS` as ``fallback/<reason>``; what it runs is counted as
``flash/<rule>/<phase>``.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch

from ..errors import AttnsteerWarning
from ..kernels.ops import MaskSpec
from ..methods.base import StepInfo
from ..methods.softplus import FIRST_ROWS_WITHOUT_OFFSET
from . import fused
from .fused import grouped_pv, grouped_qk
from .routing import COUNTERS, fallback, fast_path_inputs, single_weight_step
from .rows import ForwardInfo, MaskView, row_context
from .structure import Structure

# A steered ACT row whose non-sink mass is below this has it summed exactly over its keys: o - O_sink
# carries the flash output's rounding, which the calibration multiplies by f_other = 1 + (1 - beta)
# M_sink / M_other (at most 4 below 1/4: float32 results stay within the reference's tolerance).
ACT_MIN_OTHER_MASS = 0.25

# Softplus weights are formed directly as (N_i a_ij - o_i)^p <= N^p: the pass runs only while that
# stays inside float32 (p log2 N < 126), and a row of a key-seeing query whose weights sum below
# 2^-100 (all 0 -- a uniform row -- or underflowed: the two cannot be told apart) sends the call to
# the chunked path, which works in log space.
SOFTPLUS_MAX_LOG2 = 126.0
SOFTPLUS_MIN_TOTAL = 2.0**-100

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
    size = max(1, fused.CHUNK_ELEMENTS // max(1, b * k_len))  # rows per chunk of the (B, 1, C, K) float mask
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
    return min(PASS_ELEMENTS, fused.CHUNK_ELEMENTS)


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
    """ACT's column pass: sum_i exp(s_ij - lse_i) over query rows, (B, H_q, K) float32.

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


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
def _route(plan, query, key, value, info: ForwardInfo):
    if query.device.type != "cpu":
        return f"{query.device.type} tensors (the flash path is for CPU)"
    if _flash_op() is None:
        return "cpu flash kernel unavailable"
    if query.shape[1] % key.shape[1] or key.shape[2] == 0:
        return "shape"
    return single_weight_step(plan, info.is_prefill, _GLUE)


def flash_attention(plan, query, key, value, mask: MaskView, scaling: float, info: ForwardInfo, stats, softcap=None):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> (out (B, Q, H_q, D) in query.dtype, None);
    the contract and numbers of :func:`attnsteer.attention.fused.fused_attention`. PyTorch's flash
    kernel has no logit soft-capping: soft-capped calls (Gemma 2) take the chunked path."""
    ready = fast_path_inputs(_route(plan, query, key, value, info), query, key, mask, info, softcap)
    if isinstance(ready, str):
        return fallback(ready, plan, query, key, value, mask, scaling, info, stats, softcap=softcap)
    route, struct = ready
    q, k, v = query.float(), key.float(), value.float()
    result = _GLUE[route.kernel_rule](route, q, k, v, struct, float(scaling), info)
    if isinstance(result, str):
        return fallback(result, plan, query, key, value, mask, scaling, info, stats)
    out, rows, phase = result
    stats.record(route, rows)
    COUNTERS[f"flash/{route.kernel_rule}/{phase}"] += 1
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def _phase(info: ForwardInfo, q_len: int) -> str:
    return "prefill" if info.is_prefill else ("decode" if q_len == 1 else "chunk")


# ---------------------------------------------------------------------------------------------
# per-method glue: the methods' own group rules on the flash output
# ---------------------------------------------------------------------------------------------
def _act(method, q, k, v, struct: Structure, scaling: float, info: ForwardInfo):
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    spec = struct.spec
    step = StepInfo(is_prefill=info.is_prefill, key_offset=struct.key_offset, num_keys=k_len)
    if q_len <= DIRECT_ROWS and not method.needs_column_stats(info.is_prefill):
        return _rows_with_weights(method, q, k, v, struct, scaling, info)
    out, lse = flash_with_lse(q, k, v, spec, scaling)
    key_abs = torch.arange(k_len, device=q.device) + struct.key_offset
    if method.needs_column_stats(info.is_prefill):
        votes = torch.isfinite(lse)
        if info.row_valid is not None:
            votes = votes & info.row_valid.to(q.device)[:, None, :]
        colsum = column_sums(q, k, torch.where(votes, lse, float("inf")), spec, scaling)
        count = column_counts(spec, b, q_len, k_len, info.row_valid, q.device)
        method.set_column_stats(colsum, count, step, key_abs=key_abs)
    idx = _act_members(method, b, key_abs, step)
    if idx.shape[-1] == 0:
        return out, 0, _phase(info, q_len)
    # rows per chunk: (B, H, R, sinks) weights and (B, H, R, D) outputs within the element budget
    size = max(1, fused.CHUNK_ELEMENTS // max(1, b * hq * max(idx.shape[-1], q.shape[-1])))
    steered_total = 0
    for c0 in range(0, q_len, size):
        c1 = min(q_len, c0 + size)
        rows = torch.arange(c0, c1, device=q.device)
        steered_total = steered_total + _act_correct(
            method, q, k, v, lse, out, struct, rows, idx, key_abs, step, scaling
        )
    return out, steered_total, _phase(info, q_len)


def _act_correct(method, q, k, v, lse, out, struct: Structure, rows, idx, key_abs, step, scaling: float):
    """ACT's calibration of the query ``rows`` (long (R,), contiguous) of ``out`` (B, H, Q, D), in
    place: o' = f_sink O_sink + f_other (o - O_sink). Returns the number of steered rows."""
    b = q.shape[0]
    spec = struct.spec
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    a, pv = member_weights(q[:, :, r0:r1], k, v, lse[:, :, r0:r1], spec, rows, idx, scaling)
    m_sink, o_sink = a.sum(-1, keepdim=True), pv(a)  # (B, H, R, 1), (B, H, R, D)
    o = out[:, :, r0:r1]
    # the non-sinks are the rest of the row: mass 1 - M_sink, output o - O_sink -- except in rows
    # where that subtraction would lose precision, which are summed exactly (ACT_MIN_OTHER_MASS)
    seen_sinks = visible_keys(spec, rows, idx).sum(-1, keepdim=True)
    has_other = visible_counts(spec, b, rows) > seen_sinks
    m_other = torch.where(has_other, (1.0 - m_sink).clamp(min=0.0), torch.zeros((), device=q.device))
    rel = struct.rel0.view(-1, 1, 1, 1).to(q.device) + rows.view(1, 1, -1, 1)
    candidates = method.steered_rows(m_sink, has_other.to(m_sink.dtype), rel, m_sink)
    exact = candidates & (m_other < ACT_MIN_OTHER_MASS)
    o_other = o - o_sink
    if bool(exact.any()):
        sinks = method.sinks_for_keys(key_abs, b, step)  # (B, H, K)
        flagged = torch.zeros(*exact.shape[:2], q.shape[2], 1, dtype=torch.bool, device=q.device)
        flagged[:, :, r0:r1] = exact
        m_exact, o_exact = complement_rows(q, k, v, lse, spec, sinks, flagged, scaling)
        m_other = torch.where(exact, m_exact[:, :, r0:r1], m_other)
        o_other = torch.where(exact, o_exact[:, :, r0:r1], o_other)
        COUNTERS["exact-rows/act"] += int(exact.sum())
    steered = method.steered_rows(m_sink, m_other, rel, m_sink)
    f_sink, f_other = method.group_factors(m_sink, m_other)
    new = o_other.mul_(f_other).add_(o_sink.mul_(f_sink))  # f_sink O_sink + f_other O_other
    o.copy_(torch.where(steered, new, o))  # unsteered rows keep the flash output bit for bit
    return steered.sum()


_ACT_MEMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _act_members(method, b: int, key_abs: torch.Tensor, step: StepInfo) -> torch.Tensor:
    """Key indices of the prompt's sinks, long (B, H, G) (-1 = padding or outside these keys). The
    sink positions are found once per prompt (decode steps reuse them); ACT's own lookup raises
    when there is no sink table for this batch."""
    table = method.prompt_state.get("sinks")
    if table is None or table.shape[0] != b:
        method.sinks_for_keys(key_abs, b, step)  # raises the SteeringError that explains it
        raise AssertionError("unreachable: sinks_for_keys accepted a missing sink table")  # pragma: no cover
    cached = _ACT_MEMBERS.get(method)
    if cached is None or cached[0] is not table:
        cached = (table, member_table(table))
        _ACT_MEMBERS[method] = cached
    return key_indices(cached[1], step.key_offset, step.num_keys)


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
    step = max(1, fused.CHUNK_ELEMENTS // max(1, k_len))
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


_VAR_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _var_prompt_groups(method, device):
    """VAR's changed groups as gathered members: prompt positions long (B, 1, G), -1 = padding, and
    their group ids long (B, 1, G): 1 text sink, 2 image sink, 3 visual non-sink
    (``VAR.group_ids``). Cached per prompt and layer (rebuilt when the sink or image table is
    replaced)."""
    state = method.state
    sinks, image = state.sinks.by_layer.get(method.layer), state.roles.image
    cached = _VAR_GROUPS.get(method)
    if cached is not None and cached[0] is sinks and cached[1] is image and cached[2] == str(device):
        return cached[3]
    gid_by_pos = method.group_ids(torch.arange(image.shape[-1], device=image.device)).to(device).long()
    positions = member_table((gid_by_pos > 0).unsqueeze(1))
    gid = torch.where(positions >= 0, gid_by_pos.unsqueeze(1).gather(-1, positions.clamp(min=0)), 0)
    tables = (positions, gid)
    _VAR_GROUPS[method] = (sinks, image, str(device), tables)
    return tables


def _var(method, q, k, v, struct: Structure, scaling: float, info: ForwardInfo):
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    spec = struct.spec
    if q_len <= DIRECT_ROWS:
        return _rows_with_weights(method, q, k, v, struct, scaling, info)
    first_row = struct.key_offset + spec.q_offset  # absolute position of query row 0
    key_abs = torch.arange(k_len, device=q.device) + struct.key_offset
    gate = method.row_gate(torch.arange(q_len, device=q.device) + first_row, *method.key_groups(key_abs))  # (B, Q)
    positions, gid = _var_prompt_groups(method, q.device)
    out, lse = flash_with_lse(q, k, v, spec, scaling)
    gated = gate.any(0).nonzero()
    idx = key_indices(positions, struct.key_offset, k_len)
    if gated.numel() == 0 or idx.shape[-1] == 0:
        return out, 0, _phase(info, q_len)
    r0 = int(gated[0])
    size = max(1, _budget() // max(1, b * hq * idx.shape[-1]))  # rows x members per chunk
    onehot = torch.nn.functional.one_hot(gid, 4).to(torch.float32)  # (B, 1, G, 4): the member's group
    steered_total = 0
    for c0 in range(r0, q_len, size):
        c1 = min(q_len, c0 + size)
        rows = torch.arange(c0, c1, device=q.device)
        a, pv = member_weights(q[:, :, c0:c1], k, v, lse[:, :, c0:c1], spec, rows, idx, scaling)
        masses = torch.matmul(a, onehot)  # (B, H, C, 4) group masses (group 0: not gathered, unused)
        steered, factors = _var_factors(method, gate[:, None, c0:c1, None], *masses[..., 1:].split(1, dim=-1))
        # o' = o + sum_j a_ij (f_group(j) - 1) v_j over the members
        correction = pv(a.mul_(torch.matmul(factors - 1.0, onehot.transpose(-1, -2))))
        out[:, :, c0:c1] = torch.where(steered, out[:, :, c0:c1] + correction, out[:, :, c0:c1])
        steered_total = steered_total + steered.sum()
    return out, steered_total, _phase(info, q_len)


def _var_factors(method, gate, m_text_sink, m_image_sink, m_vis):
    """VAR's rule on the group masses (each float (B, H, R, 1)): the steered rows (bool (B, H, R, 1))
    and each group's factor, float (B, H, R, 4) in group order (other, text sink, image sink,
    visual non-sink), from ``VAR.select_rows`` and ``VAR.group_factors``."""
    m_sink, m_img = m_text_sink + m_image_sink, m_image_sink + m_vis
    steered = method.select_rows(gate, m_img, m_sink, m_vis, m_vis)
    f_sink, f_vis = method.group_factors(m_sink, m_vis)
    sink = torch.full_like(m_vis, f_sink)
    return steered, torch.cat([torch.ones_like(m_vis), sink, sink, f_vis], dim=-1)


def _rows_with_weights(method, q, k, v, struct: Structure, scaling: float, info: ForwardInfo):
    """A weight-level method on a few query rows (decode): the full (B, H_q, Q, K) weights -- O(K) --
    go through the method's own ``fused_weights`` rule, then one grouped product with V."""
    q_len, k_len = q.shape[2], k.shape[2]
    _, a, vis = _row_weights(q, k, struct.spec, scaling)
    key_abs = torch.arange(k_len, device=q.device) + struct.key_offset
    ctx = row_context(vis, info, 0, key_abs, rows=q_len)
    a, rows = method.fused_weights(a, ctx, StepInfo(info.is_prefill, struct.key_offset, k_len))
    return grouped_pv(a, v), rows, _phase(info, q_len)


def _softplus(method, q, k, v, struct: Structure, scaling: float, info: ForwardInfo):
    b, hq, q_len, d = q.shape
    k_len = k.shape[2]
    spec = struct.spec
    p = float(method.p.p)
    if p * math.log2(max(2, k_len)) >= SOFTPLUS_MAX_LOG2:
        return "softplus p too large for the direct form"
    n_vis, log_n, neg_offset = struct.memo(
        ("softplus rows", b, q_len, str(q.device), float(method.p.offset)),
        lambda: _softplus_row_terms(struct, b, q_len, float(method.p.offset), q.device),
    )
    if q_len <= DIRECT_ROWS:
        return _softplus_rows(method, q, k, v, spec, scaling, n_vis, neg_offset, info)
    out, lse = flash_with_lse(q, k, v, spec, scaling)
    heads = None if method.heads is None else method.heads.nonzero().flatten().tolist()
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
        if p != 1.0:
            x.pow_(p)
        total[:, :, q0:q1] += x.sum(-1, keepdim=True).view(b, hs, c, 1)
        num[:, :, q0:q1] += torch.bmm(x, vf[:, lo:hi]).view(b, hs, c, d)
    new = num / total.clamp(min=1e-38)
    keep = _softplus_kept(total, n_vis)
    if isinstance(keep, str):
        return keep
    if heads is None:
        return torch.where(keep, new, out), keep.sum(), _phase(info, q_len)
    out[:, heads] = torch.where(keep, new, out[:, heads])
    return out, keep.sum(), _phase(info, q_len)


def _softplus_row_terms(struct: Structure, b: int, q_len: int, offset: float, device):
    """Per-row inputs of the re-weighting, shared by a forward's layers: N_i float (B, 1, Q, 1),
    log N_i (log 1 where N_i = 0) and -o_i (o_i: 0 in a row's first three positions, ``offset`` after)."""
    rows = torch.arange(q_len, device=device)
    n_vis = visible_counts(struct.spec, b, rows)
    rel = struct.rel0.view(-1, 1).to(device) + rows.view(1, -1)  # (B, Q) position from the row's first token
    neg_o = torch.where(rel < FIRST_ROWS_WITHOUT_OFFSET, 0.0, -offset).view(b, 1, q_len, 1)
    return n_vis, torch.log(n_vis.clamp(min=1)), neg_o


def _softplus_kept(total, n_vis):
    """Rows whose re-weighting applies (weights not all 0), or the reason to take the log-space
    path: a row that sees keys but whose weights sum below SOFTPLUS_MIN_TOTAL."""
    if bool(((total < SOFTPLUS_MIN_TOTAL) & (n_vis > 0)).any()):
        return "softplus row whose weights all underflow"
    return total > 0


def _softplus_rows(method, q, k, v, spec: MaskSpec, scaling: float, n_vis, neg_offset, info: ForwardInfo):
    """Re-weighting of a few query rows (decode): scores, LSE and weights from one (B, H_q, Q, K)
    product; the plain output only where some row keeps it (unsteered heads, uniform rows)."""
    q_len = q.shape[2]
    _, a, _ = _row_weights(q, k, spec, scaling)  # rows that see nothing: weights 0 (and N = 0)
    x = torch.addcmul(neg_offset, a, n_vis).clamp_(min=0.0)  # max(N_i a_ij - o_i, 0)
    if method.p.p != 1.0:
        x.pow_(float(method.p.p))
    total = x.sum(-1, keepdim=True)
    if method.heads is None and float(total.amin()) >= SOFTPLUS_MIN_TOTAL:  # every row re-weighted: one sync
        return grouped_pv(x, v) / total, total.numel(), _phase(info, q_len)
    out = grouped_pv(x, v) / total.clamp(min=1e-38)
    keep = _softplus_kept(total, n_vis)
    if isinstance(keep, str):
        return keep
    heads = method.head_mask(keep)
    if heads is not None:
        keep = keep & heads
    if not bool(keep.all()):
        plain = grouped_pv(a, v)
        out = torch.where(keep, out, plain)
    return out, keep.sum(), _phase(info, q_len)


_GLUE = {"act": _act, "var": _var, "softplus": _softplus}
