"""The scaled-keys backend: a layer's lone score rule of the ``key_scale`` form on any fused kernel.

A :class:`~attnsteer.methods.rules.KeyScaleRule` states ``s_ij <- c_j s_ij`` on the rows its gate
admits. Since ``c_j (q_i . k_j) = q_i . (c_j k_j)``, those rows' attention is the plain attention
of a scaled copy of the keys, which PyTorch's fused ``scaled_dot_product_attention`` computes
without materialising a score: one pass over the scaled keys when every row is gated (decode),
one over the plain keys when none is, both (and a per-row choice) when a prefill has rows on each
side of the gate. The mask is the one the model's attention received (causal, padding, window).

It runs only that: no other score or weight rule on the layer (the router then takes the chunked
backend), no logit soft-capping (``c cap tanh(s / cap)`` is not ``cap tanh(c s / cap)``), no
additive mask bias. With a subset of the query heads steered, the keys are copied per query head
(a factor on a kv head's keys would reach every query head reading it).
"""

from __future__ import annotations

import torch

from .capability import Capability
from .fused import fused_attention

CAPABILITY = Capability(
    name="keyscale",
    kinds=frozenset({"score"}),
    softcap=False,
    weight_rules=0,
    score_forms=frozenset({"key_scale"}),
    score_rules=1,
)


def unavailable(config, call) -> str | None:
    return None


def _scaled_keys(key, scales, heads, num_heads: int) -> torch.Tensor:
    """key (B, H_kv, K, D) with each key scaled by ``scales`` (B, K): per kv head when every query
    head is steered, else one copy per query head (B, H_q, K, D) scaled on the steered heads only."""
    factor = scales[:, None, :, None]  # (B, 1, K, 1)
    if heads is not None:
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
        factor = torch.where(heads.to(factor.device), factor, 1.0)
    return (key.float() * factor).to(key.dtype)


def run(steps, call, query, key, value, stats, config=None):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> out (B, Q, H_q, D) in query.dtype."""
    rule = steps.score[0]
    prompt = call.prompt
    gate = rule.row_gate(call.rows(None, 0, rows=call.q_len), prompt)  # (B|1, 1, Q|1, 1)
    gate = gate.to(call.device).expand(call.batch, 1, call.q_len, 1)[:, 0, :, 0]  # (B, Q)
    scales = rule.key_scales(call.key_abs, prompt).to(call.device)  # (B, K) float32
    changes = (scales != 1.0).any(-1, keepdim=True)  # (B, 1): rows of this batch row change at all
    heads = rule.head_mask(query)  # (1, H_q, 1, 1) or None
    steered_heads = call.heads if heads is None else int(heads.sum())
    stats.record(rule.method, (gate & changes).sum() * steered_heads)
    if not bool(gate.any()):
        return fused_attention(call, query, key, value).to(query.dtype)
    scaled_key = _scaled_keys(key, scales, heads, call.heads)
    if scaled_key.shape[1] != value.shape[1]:  # one copy per query head: values follow
        value_per_head = value.repeat_interleave(scaled_key.shape[1] // value.shape[1], dim=1)
    else:
        value_per_head = value
    scaled = fused_attention(call, query, scaled_key, value_per_head)
    if bool(gate.all()):
        return scaled.to(query.dtype)
    plain = fused_attention(call, query, key, value)
    return torch.where(gate[:, :, None, None], scaled, plain).to(query.dtype)
