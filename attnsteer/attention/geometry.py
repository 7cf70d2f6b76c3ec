"""The geometry of one steered attention call, and the masks it is read from.

:class:`AttentionCall` is the one description of a call every backend takes (with ``q``, ``k``,
``v``): its layer, phase, shapes, key offset, padding, mask, scaling, soft-cap and the
:class:`~attnsteer.context.PromptState` of its context. It is built from the decoder forward's
:class:`ForwardInfo` (set by a forward pre-hook, shared by the forward's layers) and what the
attention function received.

The attention function receives the mask transformers built for the model's own implementation:
``None`` (plain causal, or full when Q == 1), a bool (B, 1, Q, K) mask (True = attend; SDPA) or
an additive float mask (0 / very negative; eager). :class:`MaskView` turns any of these into
per-chunk visibility without building anything of size Q x K beyond the chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..context import PromptState
from ..methods.rules import RowView


@dataclass
class ForwardInfo:
    """Facts about the current forward of the steered decoder, set by its forward pre-hook.

    q_len:       new tokens in this forward.
    past_len:    tokens already in the KV cache before it.
    total_len:   past_len + q_len (absolute length in the padded layout).
    first_valid: long (B,) index of each row's first non-pad token, or None (no padding).
    row_valid:   bool (B, Q): False for query rows that are padding themselves (right padding), else
                 None. Such rows still "see" real keys, so statistics over rows skip them.
    batch:       batch rows the decoder saw (None: not recorded, e.g. in unit tests).
    key_lengths: layer -> keys its attention function must receive (from the KV cache), or None.
    """

    q_len: int
    past_len: int
    total_len: int
    first_valid: torch.Tensor | None
    max_pad: int = 0  # int(first_valid.max()), taken once per forward (set in __post_init__)
    row_valid: torch.Tensor | None = None
    batch: int | None = None
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

    def chunk(self, q0: int, q1: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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


class AttentionCall:
    """One steered attention call.

    layer:    decoder layer index.
    info:     the decoder forward's :class:`ForwardInfo`.
    mask:     :class:`MaskView` of the mask the call received.
    scaling:  the softmax scale; softcap: the logit soft-cap or None.
    prompt:   the :class:`~attnsteer.context.PromptState` of the call's context.
    query:    (B, H, Q, D) and ``keys`` (B, H_kv, K, D), after RoPE, as the attention function
              received them -- ``batch, heads, kv_heads, q_len, k_len, head_dim``; keys sit at
              absolute positions ``key_offset .. key_offset + K - 1`` (a sliding-window cache hands
              over only the last keys). Backends take q, k, v as arguments; head rules read these.
    """

    def __init__(
        self,
        layer: int,
        info: ForwardInfo,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: MaskView,
        scaling: float,
        prompt: PromptState,
        softcap: float | None = None,
    ):
        self.layer = layer
        self.info = info
        self.query, self.keys = query, key  # references (no copy), for rules that read them (head rules)
        self.mask = mask
        self.scaling = float(scaling)
        self.softcap = softcap
        self.prompt = prompt
        self.batch, self.heads, self.q_len, self.head_dim = query.shape
        self.kv_heads, self.k_len = key.shape[1], key.shape[2]
        self.device, self.dtype = query.device, query.dtype
        self.key_offset = max(info.total_len - self.k_len, 0)

    @property
    def is_prefill(self) -> bool:
        return self.info.is_prefill

    @property
    def phase(self) -> str:
        """``prefill``, ``decode`` (one new row with a cache) or ``chunk`` (several new rows with one)."""
        return "prefill" if self.is_prefill else ("decode" if self.q_len == 1 else "chunk")

    @functools.cached_property
    def key_abs(self) -> torch.Tensor:
        """long (K,): the absolute (padded-layout) position of each key index."""
        return torch.arange(self.k_len, device=self.device) + self.key_offset

    def rows(self, visible: torch.Tensor | None, q0: int = 0, rows: int | None = None, limit: int | None = None):
        """The :class:`~attnsteer.methods.rules.RowView` of query rows ``q0 .. q0 + rows`` against the
        first ``limit`` keys (all by default); ``visible`` bool (B|1, 1, C, K') or None (all)."""
        info = self.info
        c = rows if rows is not None else visible.shape[-2]
        row_valid = None
        if info.row_valid is not None:
            row_valid = info.row_valid[:, q0 : q0 + c].to(self.device)[:, None, :, None]
        key_abs = self.key_abs if limit is None else self.key_abs[:limit]
        return RowView(
            visible,
            key_abs,
            past_len=info.past_len,
            q0=q0,
            rows=rows,
            first_valid=info.first_valid,
            max_pad=info.max_pad,
            row_valid=row_valid,
        )
