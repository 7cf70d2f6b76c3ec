"""Per-forward side channel: what the attention function cannot see in its own arguments.

``generate()`` rejects unknown kwargs, so padding, cache length and prompt boundaries travel
here: a forward pre-hook on the steered decoder fills :class:`ForwardInfo` before every call, and
resets each method's per-prompt state (e.g. ACT sink sets) when a new prompt starts.
"""

from __future__ import annotations

import inspect

import torch

from .attention.dispatch import forward_info_from_shapes
from .attention.rows import ForwardInfo


def first_valid_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Index of each row's first attended token from a 2D (B, L) padding mask or a 4D mask."""
    if mask is None:
        return None
    if mask.dim() == 2:
        valid = mask != 0
    elif mask.dim() == 4:
        valid = mask[:, 0].any(-2) if mask.dtype == torch.bool else (mask[:, 0] > torch.finfo(mask.dtype).min / 2).any(-2)
    else:
        return None
    if bool(valid.all()):
        return None
    return valid.int().argmax(dim=-1)


class SteeringState:
    """Shared by all sites of one handle."""

    def __init__(self, methods):
        self.methods = list(methods)
        self.info: ForwardInfo | None = None
        self.forwards = 0
        self.prompts = 0
        self._signature = None

    def pre_hook(self, module, args, kwargs):
        if self._signature is None:
            self._signature = inspect.signature(module.forward)
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        get = lambda name: bound.get(name, extra.get(name))  # noqa: E731
        tokens = get("input_ids")
        if tokens is None:
            tokens = get("inputs_embeds")
        if tokens is None:
            self.info = None
            return None
        q_len = tokens.shape[1]
        cache = get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.info = ForwardInfo(
            q_len=q_len, past_len=past, total_len=past + q_len, first_valid=first_valid_positions(get("attention_mask"))
        )
        self.forwards += 1
        if past == 0:
            self.prompts += 1
            for method in self.methods:
                method.reset_prompt()
        return None

    def info_for(self, query: torch.Tensor, key: torch.Tensor) -> ForwardInfo:
        info = self.info
        if info is None or info.q_len != query.shape[2] or (
            info.first_valid is not None and info.first_valid.shape[0] != query.shape[0]
        ):
            return forward_info_from_shapes(query, key)
        return info
