"""Token roles of a prompt (image / focus keys) and the text-only stream some methods need.

Roles are read from ``input_ids`` at prefill: every position holding an image or video
placeholder id of the family (``archs.ArchSpec.image_token_attrs``) is an *image key*; a
user-marked focus span (``handle.focus(mask)``) plays the same role for any model. Generated
tokens are never image keys. Shapes: ``(B, P)`` over the prompt in its padded layout.

The text-only stream (VHR, PAI's ``gamma``) is the same prompt with the image tokens (and the
family's wrapper tokens) removed, left-padded to the prompt's length so it can share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptRoles:
    """image: bool (B, P) image/focus keys; last_image: long (B,) last such position (-1: none)."""

    image: torch.Tensor

    @property
    def has_image(self) -> torch.Tensor:
        return self.image.any(-1)

    @property
    def last_image(self) -> torch.Tensor:
        positions = torch.arange(self.image.shape[-1], device=self.image.device)
        return torch.where(self.image, positions, torch.full_like(positions, -1)).max(-1).values

    @property
    def length(self) -> int:
        return self.image.shape[-1]

    def keys(self, key_abs: torch.Tensor) -> torch.Tensor:
        """bool (B, K): image flags of the current forward's keys (generated keys: False)."""
        length = self.length
        inside = key_abs < length
        return self.image[:, key_abs.clamp(max=max(length - 1, 0))] & inside.view(1, -1)

    def select(self, rows) -> PromptRoles:
        return PromptRoles(self.image[rows])


def image_mask(input_ids: torch.Tensor, ids) -> torch.Tensor:
    """bool (B, L): positions of any of ``ids``."""
    if not ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return torch.isin(input_ids, torch.tensor(list(ids), device=input_ids.device))


def text_only_stream(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, drop: torch.Tensor, pad_id: int):
    """Remove the ``drop`` (B, L) positions of each row and left-pad back to length L.

    Returns (ids (B, L), mask (B, L) long). Padding positions of the input are dropped too.
    """
    b, length = input_ids.shape
    keep = ~drop
    if attention_mask is not None:
        keep &= attention_mask.bool()
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(input_ids, dtype=torch.long)
    for row in range(b):
        kept = input_ids[row, keep[row]]
        n = kept.numel()
        if n:
            ids[row, length - n :] = kept
            mask[row, length - n :] = 1
    return ids, mask


def positions_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first token, shaped like ``like`` (..., B, L): text-only
    rows have 1D positions, which M-RoPE (Qwen2-VL) spells as identical components."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.expand(*like.shape[:-2], *pos.shape).to(like.dtype)
