"""Masks and per-row facts, shared by both backends.

The attention function receives the mask transformers built for the model's own implementation:
``None`` (plain causal, or full when Q == 1), a bool (B, 1, Q, K) mask (True = attend; SDPA)
or an additive float mask (0 / very negative; eager). :class:`MaskView` turns any of these into
per-chunk visibility without building anything of size Q x K beyond the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import RowContext


@dataclass
class ForwardInfo:
    """Facts about the current forward of the steered decoder, set by its forward pre-hook.

    q_len:       new tokens in this forward.
    past_len:    tokens already in the KV cache before it.
    total_len:   past_len + q_len (absolute length in the padded layout).
    first_valid: long (B,) index of each row's first non-pad token, or None (no padding).
    """

    q_len: int
    past_len: int
    total_len: int
    first_valid: torch.Tensor | None
    max_pad: int = 0  # int(first_valid.max()), taken once per forward (set in __post_init__)
    # bool (B, Q): False for query rows that are padding themselves (right padding), else None.
    # Such rows still "see" real keys, so statistics over rows (ACT's column means) skip them.
    row_valid: torch.Tensor | None = None
    batch: int | None = None  # batch rows the decoder saw (None: not recorded, e.g. in unit tests)
    # layer -> keys its attention function must receive (from the KV cache); None: not recorded
    key_lengths: dict | None = None

    def __post_init__(self):
        if self.first_valid is not None:
            self.max_pad = int(self.first_valid.max())

    @property
    def is_prefill(self) -> bool:
        return self.past_len == 0


class MaskView:
    """Chunked view of the attention mask. Shapes: mask (B|1, 1|H, Q, K)."""

    def __init__(self, mask: torch.Tensor | None, q_len: int, k_len: int):
        if mask is not None and mask.dim() != 4:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} reached attnsteer; expected a 4D mask or None"
            )
        self.mask = mask
        self.q_len = q_len
        self.k_len = k_len
        self.is_bool = mask is not None and mask.dtype == torch.bool
        if mask is not None:
            # transformers may build a mask for more keys than the cache holds (e.g. static caches).
            self.mask = mask[..., -q_len:, :k_len] if mask.shape[-2] != q_len else mask[..., :k_len]

    def chunk(self, q0: int, q1: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visibility bool (B|1, 1|H, C, K) and additive float bias (or None) for rows q0..q1.

        Visibility is None when every row sees every key (a decode step without padding)."""
        if self.mask is None:
            if self.q_len == 1:
                return None, None
            offset = self.k_len - self.q_len  # query i sits at key index offset + i
            rows = torch.arange(q0, q1, device=device).view(1, 1, -1, 1) + offset
            keys = torch.arange(self.k_len, device=device).view(1, 1, 1, -1)
            return keys <= rows, None
        part = self.mask[..., q0:q1, :]
        if self.is_bool:
            return part, None
        visible = part > torch.finfo(part.dtype).min / 2
        return visible, part.float()


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logit soft-capping ``cap * tanh(scores / cap)`` (Gemma 2's ``attn_logit_softcapping``), or
    ``scores`` unchanged when ``cap`` is None. Applied to the scaled q.k logits, before the mask."""
    return scores if not cap else torch.tanh(scores / cap) * cap


def key_positions(info: ForwardInfo, k_len: int, device) -> torch.Tensor:
    """Absolute (padded-layout) position of each key index: long (K,).

    Full-attention caches hold every position (index = position); sliding-window caches hand
    over only the last keys, which sit at ``total_len - K ...``.
    """
    offset = max(info.total_len - k_len, 0)
    return torch.arange(k_len, device=device) + offset


def row_context(
    visible: torch.Tensor | None, info: ForwardInfo, q0: int, key_abs: torch.Tensor, rows: int | None = None
) -> RowContext:
    """Per-row facts for rows q0..q0+C of the current forward (``visible`` None: all keys)."""
    c = rows if rows is not None else visible.shape[-2]
    row_valid = None
    if info.row_valid is not None:
        row_valid = info.row_valid[:, q0 : q0 + c].to(key_abs.device)[:, None, :, None]
    return RowContext(
        visible,
        key_abs,
        past_len=info.past_len,
        q0=q0,
        rows=rows,
        first_valid=info.first_valid,
        max_pad=info.max_pad,
        row_valid=row_valid,
    )
