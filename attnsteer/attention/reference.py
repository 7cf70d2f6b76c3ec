"""The oracle backend: float32 eager attention with the whole (B, H, Q, K) map materialised and every
rule applied to it in composition order. Slow and O(Q K) memory by design; every fast path is
tested against it. Re-weighting is computed literally in float64, so large exponents cannot
overflow the oracle.
"""

from __future__ import annotations

import torch

from .capability import Capability
from .chunked import apply_group_rule, apply_score_rules, set_column_stats
from .geometry import AttentionCall, soft_cap

CAPABILITY = Capability(name="reference", kinds=frozenset({"score", "group", "reweight"}))


def unavailable(config, call) -> str | None:
    return None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, K, D) -> (B, H_kv * groups, K, D), query head h reading kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reweight_literally(rule, a: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = max(N a - o, 0)^p``, renormalised, in float64; uniform rows (every w 0) unchanged."""
    a64 = a.double()
    offsets = rule.offsets(rows)
    t = rows.n_visible.double() * a64 - (offsets.double() if isinstance(offsets, torch.Tensor) else offsets)
    w = t.clamp(min=0.0) ** rule.power
    total = w.sum(-1, keepdim=True)
    steered = total > 0
    heads = rule.head_mask(a)
    steered = steered if heads is None else steered & heads
    new = torch.where(steered, w / total.clamp(min=1e-300), a64)
    return new.to(a.dtype), steered.sum()


def attend(steps, call: AttentionCall, query, key, value, stats=None, compute_dtype=torch.float32):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> (out (B, Q, H_q, D) in query.dtype,
    weights (B, H_q, Q, K) in ``compute_dtype``).

    ``compute_dtype`` is float32 for the oracle; tests also run it in bf16/fp16 as the "naive
    same-dtype implementation" of flash-attention's tolerance rule. Soft-capping (Gemma 2) caps
    the logits, ``s = cap * tanh(s / cap)``, before the mask and before any rule.
    """
    groups = query.shape[1] // key.shape[1]
    q = query.to(compute_dtype)
    k = _repeat_kv(key.to(compute_dtype), groups)
    v = _repeat_kv(value.to(compute_dtype), groups)
    visible, bias = call.mask.chunk(0, query.shape[2], query.device)
    rows = call.rows(visible, 0, rows=query.shape[2])
    visible = rows.visible  # the oracle always materialises it

    s = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * call.scaling, call.softcap)
    if bias is not None:
        s = s + bias.to(compute_dtype)
    s = s.masked_fill(~visible, float("-inf"))
    if steps.score:
        s = apply_score_rules(
            steps.score, s, q, k, rows, call, stats, qk=lambda a, b: torch.matmul(a, b.transpose(-1, -2))
        )
    a = torch.softmax(s, dim=-1)
    a = torch.where(visible, a, torch.zeros_like(a))  # fully masked rows: 0, not NaN
    for rule in steps.weight:
        if rule.kind == "group":
            if rule.column_stats and call.is_prefill:
                seen = visible if rows.row_valid is None else visible & rows.row_valid
                set_column_stats(rule, (a * seen).sum(dim=-2), seen.sum(dim=-2, dtype=a.dtype), call)
            a, changed = apply_group_rule(rule, a, rows, call)
        else:
            a, changed = reweight_literally(rule, a, rows)
        if stats is not None:
            stats.record(rule.method, changed)
    a = a.to(compute_dtype)
    out = torch.matmul(a, v)
    return out.transpose(1, 2).contiguous().to(query.dtype), a


def run(steps, call: AttentionCall, query, key, value, stats, config=None):
    """The backend entry (:mod:`attnsteer.attention.router`): ``attend``'s output."""
    return attend(steps, call, query, key, value, stats)[0]
