"""Plain (unsteered) attention of a call by PyTorch's fused ``scaled_dot_product_attention``, under
the mask the model's attention received: for the rows of a call no rule changes, and for the
scaled-keys backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask(call) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for ``scaled_dot_product_attention``: (bool (B|1, 1, Q, K) / additive
    float mask, or None; is_causal). A missing mask on a call with cached keys is causal with the
    queries at the end, which ``is_causal`` (top-left aligned) does not express: it is built."""
    mask = call.mask
    if mask.mask is not None:
        return mask.mask, False
    if call.q_len == 1:
        return None, False
    if call.q_len == call.k_len:
        return None, True
    visible, _ = mask.chunk(0, call.q_len, call.device)
    return visible, False


def fused_attention(call, query, key, value) -> torch.Tensor:
    """Plain attention of the call: query (B, H_q, Q, D), key/value (B, H_kv|H_q, K, D) -> out
    (B, Q, H_q, D) in the inputs' dtype, by PyTorch's fused kernels; fully masked (padding) rows give 0."""
    mask, causal = _mask(call)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=causal,
        scale=call.scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.nan_to_num(0.0).transpose(1, 2)
