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

from .errors import SteeringError


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


def real_tokens(mask: torch.Tensor, length: int) -> torch.Tensor:
    """bool (B, length): the prompt's real (non-pad) tokens, from a forward's attention mask --
    a 2D (B, length) padding mask, or the 4D (B, 1, Q, K) mask ``generate()`` builds for compilable
    (static) caches, bool (True = attend) or additive float, where a key is real iff some query row
    sees it (keys past ``length``: the cache's empty slots, dropped)."""
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() != 4:
        raise SteeringError(
            f"attention_mask has {mask.dim()} dimensions (shape {tuple(mask.shape)}); expected a 2D (batch, seq) "
            "padding mask or a 4D (batch, 1, query, key) mask"
        )
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return visible[:, 0].any(-2)[:, :length]


def text_only_stream(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, drop: torch.Tensor, pad_id: int):
    """Remove the ``drop`` (B, L) positions of each row and left-pad back to length L.

    Returns (ids (B, L), mask (B, L) long). Padding positions of the input are dropped too
    (``attention_mask``: any form :func:`real_tokens` reads).
    """
    b, length = input_ids.shape
    keep = ~drop
    if attention_mask is not None:
        keep &= real_tokens(attention_mask, length)
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


def text_only_inputs(ids, embeds, mask, drop: torch.Tensor, pad_id: int):
    """The prompt without its ``drop`` (B, L) positions, left-padded back to length L.

    Built from ``input_ids`` when given, else from ``inputs_embeds`` (whose image positions already
    hold image features, as in InstructBLIP). Returns (ids or None, embeds or None, mask (B, L)).
    """
    if ids is not None:
        text_ids, text_mask = text_only_stream(ids, mask, drop, pad_id)
        return text_ids, None, text_mask
    if embeds is None or tuple(drop.shape) != tuple(embeds.shape[:2]):
        raise SteeringError(
            "the text-only stream (VHR, PAI gamma) is built from input_ids or inputs_embeds of the prompt; "
            "this call passed neither in a usable form"
        )
    index = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2]).contiguous()
    kept, text_mask = text_only_stream(index, mask, drop, 0)
    text_embeds = torch.gather(embeds, 1, kept.unsqueeze(-1).expand_as(embeds))
    return None, text_embeds * text_mask.unsqueeze(-1).to(embeds.dtype), text_mask
