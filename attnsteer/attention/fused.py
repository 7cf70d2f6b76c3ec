"""O(N)-memory steered attention in plain PyTorch (the CPU fast path, and CUDA until the Triton
kernels take over).

Queries are processed in chunks of C rows against all K keys, so the largest tensor is
(B, H_q, C, K) with C chosen from a fixed element budget -- never Q x K. Per chunk the row's
log-sum-exp gives the normalised weights; methods then act through per-row group masses and
factors (ACT: sink / non-sink groups, out' = sum_g M'_g o_g) or through the LSE (softplus
re-weighting). ACT's sink detection needs the column means of the whole prefill map: a first
QK^T-only pass (no V) accumulates them chunk by chunk.
GQA is handled by folding the query heads of each kv head into the row dimension, so K and V are
never repeated.
"""

from __future__ import annotations

import torch

from ..methods.base import StepInfo
from .rows import ForwardInfo, MaskView, key_positions, row_context, soft_cap
from .structure import sees_later_keys

# Elements of one (B, H_q, C, K) float32 chunk tensor; a handful of these are alive at once.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(batch: int, heads: int, q_len: int, k_len: int, budget: int | None = None) -> int:
    """Query rows per chunk so that one (B, H_q, C, K) tensor holds at most ``budget`` elements."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(q_len, budget // max(1, batch * heads * k_len)))


def grouped_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H_q, C, D), k (B, H_kv, K, D) -> (B, H_q, C, K) without repeating k."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    folded = q.reshape(b, hkv, (hq // hkv) * c, d)
    return torch.matmul(folded, k.transpose(-1, -2)).view(b, hq, c, k.shape[2])


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H_q, C, K), v (B, H_kv, K, D) -> (B, H_q, C, D) without repeating v."""
    b, hq, c, k_len = p.shape
    hkv = v.shape[1]
    out = torch.matmul(p.reshape(b, hkv, (hq // hkv) * c, k_len), v)
    return out.view(b, hq, c, v.shape[-1])


def fused_attention(
    plan,
    query,
    key,
    value,
    mask: MaskView,
    scaling: float,
    info: ForwardInfo,
    stats,
    chunk=None,
    causal: bool = True,
    softcap: float | None = None,
):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> (out (B, Q, H_q, D) in query.dtype, None).

    With ``causal`` (decoder self-attention), a chunk of rows q0..q1 only reads the keys up to its
    last row's position: the keys after it are masked anyway, so prefill does half the work. A mask
    that lets some row see a later key (Gemma 3's bidirectional image blocks) turns that off.
    ``softcap``: logit soft-capping before the mask (:func:`attnsteer.attention.rows.soft_cap`).
    """
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    q = query.float()
    k = key.float()
    v = value.float()
    key_offset = max(info.total_len - k_len, 0)
    key_abs = key_positions(info, k_len, query.device)
    step = StepInfo(is_prefill=info.is_prefill, key_offset=key_offset, num_keys=k_len)
    score_steps = plan.score_steps(info.is_prefill)
    weight_steps = plan.weight_steps(info.is_prefill)
    causal = causal and not sees_later_keys(mask, info, q_len, k_len, query.device)
    size = chunk or chunk_rows(b, hq, q_len, k_len)
    spans = [(s, min(s + size, q_len)) for s in range(0, q_len, size)]

    def key_limit(q1: int) -> int:
        """Keys a causal chunk ending at row q1 can see: indices < limit."""
        return min(k_len, info.past_len + q1 - key_offset) if causal else k_len

    def probs(q0: int, q1: int, record: bool = False):
        """Normalised weights of rows q0..q1 over their keys: (B, H_q, C, K') float32 (K' <= K,
        see ``key_limit``) and their RowContext."""
        limit = key_limit(q1)
        visible, bias = mask.chunk(q0, q1, query.device)
        if limit < k_len:
            visible = visible[..., :limit] if visible is not None else None
            bias = bias[..., :limit] if bias is not None else None
        ctx = row_context(visible, info, q0, key_abs[:limit], rows=q1 - q0)
        qc = q[:, :, q0:q1]
        kc = k[:, :, :limit]
        s = soft_cap(grouped_qk(qc, kc) * scaling, softcap)
        if bias is not None:
            s = s + bias
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        for method in score_steps:
            s = method.scores(s, qc, kc, ctx, grouped_qk)
            if record:
                stats.record(method, method.rows_touched(s))
        p = torch.softmax(s, dim=-1)
        if visible is not None:
            p = p.nan_to_num(0.0)  # fully masked rows (padding queries): 0, not NaN
        return p, ctx

    out = torch.empty(b, q_len, hq, d, dtype=query.dtype, device=query.device)
    if len(spans) == 1:
        # The whole map fits in one chunk: column statistics come from the same weights.
        p, ctx = probs(0, q_len, record=True)
        for method in weight_steps:
            if method.needs_column_stats(info.is_prefill):
                voting = p if ctx.row_valid is None else p * ctx.row_valid  # padding query rows do not vote
                visible = ctx.visible if ctx.row_valid is None else ctx.visible & ctx.row_valid
                method.set_column_stats(
                    voting.sum(dim=-2), visible.sum(dim=-2, dtype=torch.float32), step, key_abs=key_abs
                )
            p, rows = method.fused_weights(p, ctx, step)
            stats.record(method, rows)
        out[:] = grouped_pv(p, v).transpose(1, 2).to(query.dtype)
        return out, None

    # Column passes (QK^T only): methods that need statistics of the whole map entering them.
    for idx, method in enumerate(weight_steps):
        if not method.needs_column_stats(info.is_prefill):
            continue
        colsum = torch.zeros(b, hq, k_len, device=query.device)
        count = None
        for q0, q1 in spans:
            p, ctx = probs(q0, q1)
            for earlier in weight_steps[:idx]:
                p, _ = earlier.fused_weights(p, ctx, step)
            limit = p.shape[-1]
            if ctx.row_valid is not None:  # padding query rows do not vote
                p = p * ctx.row_valid
            colsum[..., :limit] += p.sum(dim=-2)
            visible = ctx.visible if ctx.row_valid is None else ctx.visible & ctx.row_valid
            seen = visible.sum(dim=-2, dtype=torch.float32)
            if count is None:
                count = torch.zeros(*seen.shape[:-1], k_len, device=query.device)
            count[..., :limit] += seen
        method.set_column_stats(colsum, count, step, key_abs=key_abs)

    for q0, q1 in spans:
        p, ctx = probs(q0, q1, record=True)
        for method in weight_steps:
            p, rows = method.fused_weights(p, ctx, step)
            stats.record(method, rows)
        out[:, q0:q1] = grouped_pv(p, v[:, :, : p.shape[-1]]).transpose(1, 2).to(query.dtype)
    return out, None
