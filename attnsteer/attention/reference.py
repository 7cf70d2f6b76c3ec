"""The oracle: float32 eager attention with materialised weights and the formulas of docs/methods.md applied
literally, step by step. Slow and O(Q K) memory by design; every fast path is tested against it.
"""

from __future__ import annotations

import torch

from ..methods.base import StepInfo
from .rows import ForwardInfo, MaskView, key_positions, row_context, soft_cap


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, K, D) -> (B, H_kv * groups, K, D), query head h reading kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reference_attention(
    plan,
    query,
    key,
    value,
    mask: MaskView,
    scaling: float,
    info: ForwardInfo,
    stats,
    compute_dtype=torch.float32,
    softcap: float | None = None,
):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> (out (B, Q, H_q, D) in query.dtype,
    weights (B, H_q, Q, K) in ``compute_dtype``).

    ``compute_dtype`` is float32 for the oracle; tests also run it in bf16/fp16 as the "naive
    same-dtype implementation" of flash-attention's tolerance rule. ``softcap`` (Gemma 2) caps the
    logits, ``s = cap * tanh(s / cap)``, before the mask and before any method's step.
    """
    groups = query.shape[1] // key.shape[1]
    q = query.to(compute_dtype)
    k = _repeat_kv(key.to(compute_dtype), groups)
    v = _repeat_kv(value.to(compute_dtype), groups)
    visible, bias = mask.chunk(0, query.shape[2], query.device)
    key_abs = key_positions(info, key.shape[2], query.device)
    ctx = row_context(visible, info, 0, key_abs, rows=query.shape[2])
    visible = ctx.visible  # the oracle always materialises it
    step = StepInfo(is_prefill=info.is_prefill, key_offset=max(info.total_len - key.shape[2], 0), num_keys=key.shape[2])

    s = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * scaling, softcap)
    if bias is not None:
        s = s + bias.to(compute_dtype)
    s = s.masked_fill(~visible, float("-inf"))
    for method in plan.score_steps(info.is_prefill):
        s = method.scores(s, q, k, ctx, lambda a, b: torch.matmul(a, b.transpose(-1, -2)))
        stats.record(method, method.rows_touched(s))
    a = torch.softmax(s, dim=-1)
    a = torch.where(visible, a, torch.zeros_like(a))  # fully masked rows: 0, not NaN
    for method in plan.weight_steps(info.is_prefill):
        a, rows = method.reference_weights(a, ctx, step)
        stats.record(method, rows)
    a = a.to(compute_dtype)
    out = torch.matmul(a, v)
    return out.transpose(1, 2).contiguous().to(query.dtype), a
