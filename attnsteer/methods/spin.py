"""SPIN -- head suppression by image attention (docs/methods.md#spin).

Sarkar et al., "Mitigating Hallucinations in Vision-Language Models through Image-Guided Head
Suppression", EMNLP 2025 (arXiv 2505.16411).

Head-output rule: in the last prompt row and every later row of a steered layer, the query heads
are ranked by their attention to the image keys the row sees, ``r_h = sum_{j in I_img} s_hj``
(``score: sum``, the released code) or ``sum_{j in I_img} a_hj`` (``score: mass``); the top
``K = floor(rho H)`` heads are kept and every other head's output of that row is multiplied by
``eps`` before ``o_proj``. Heads are ranked again for every row; nothing is profiled.

``score: sum`` without a logit soft-cap is one summed image key per kv head and row,
``r_h = scaling q_h . sum_j k_j`` over the image span only; otherwise the row's scores on its keys
are computed (one row per batch row, O(H K)). The model's own attention runs unchanged either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SteeringError
from .base import Method, param, register
from .rules import HeadRule


@dataclass(frozen=True)
class SPINParams:
    """SPIN's parameters (docs/methods.md#spin)."""

    rho: float = param(
        0.95,
        "share of query heads kept per row: the K = floor(rho H) heads with the most image attention",
        low=0.0,
        high=1.0,
    )
    eps: float = param(0.08, "scale of the other heads' outputs in that row (paper: 0.08 CHAIR, 0.1 POPE)", low=0.0)
    score: str = param(
        "sum",
        "sum: rank heads by their summed scaled scores on the image keys (released code); mass: by the softmax "
        "mass on them",
        choices=("sum", "mass"),
    )


def kept_count(rho: float, heads: int) -> int:
    """K = floor(rho H); ``rho H`` within 1e-9 of an integer counts as it (``rho = k / H`` keeps k)."""
    return min(heads, int(math.floor(rho * heads + 1e-9)))


def top_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores float (..., H) -> bool (..., H): the ``k`` highest per row; ties at the k-th place go
    to the lower head index (a stable descending sort, the same on every device)."""
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return kept.scatter(-1, order, True)


def image_span(image: torch.Tensor) -> tuple[int, int]:
    """image bool (B, P) -> the positions [lo, hi) holding every row's image keys ((0, 0): none)."""
    found = image.any(0).nonzero().flatten().tolist()
    return (found[0], found[-1] + 1) if found else (0, 0)


def grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """query (B, H, C, D) -> (B, H_kv, G, C, D): query head h = g * G + i reads kv head g."""
    b, h, c, d = query.shape
    return query.reshape(b, kv_heads, h // kv_heads, c, d)


class HeadSuppression(HeadRule):
    """``A_{l,h} <- eps A_{l,h}`` for the heads outside each steered row's top ``K`` by image attention."""

    reads_call = True

    def apply(self, out, call, prompt):
        roles, past = prompt.roles, call.info.past_len
        first = 0 if roles is None else max(0, roles.length - 1 - past)  # first steered query row (absolute)
        if roles is None or first >= call.q_len:
            return out, 0
        kept, steered = self.select(call, prompt, first)
        if first + past == roles.length - 1:  # this call holds the prompt's last row
            prompt.put(self.key, "heads", kept[:, 0] & steered[:, :1])
        suppress = ~kept & steered[..., None]  # (B, C, H)
        if self.heads is not None:
            suppress = suppress & self.heads.to(call.device).view(1, 1, -1)
        scale = torch.where(suppress, self.method.p.eps, 1.0).to(out.dtype)[..., None]  # (B, C, H, 1)
        new = out[:, first:] * scale
        return (torch.cat([out[:, :first], new], 1) if first else new), suppress.sum()

    def select(self, call, prompt, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept bool (B, C, H), steered bool (B, C)) for the query rows ``first ..`` of the call:
        the top K heads of each row, and the rows that see an image key (and are not padding)."""
        method, roles = self.method, prompt.roles
        query, keys = call_tensors(call, method.layer)
        rows = call.q_len - first
        k = kept_count(method.p.rho, call.heads)
        visible, _ = call.mask.chunk(first, call.q_len, call.device)  # (B|1, 1|H, C, K) or None: all
        span = prompt.memo(("spin", "image span"), (roles.image,), lambda: image_span(roles.image))
        lo, hi = self.key_window(call, span)
        if visible is None and span[0] >= call.key_offset and method.sums_keys(call):
            # every image key of the prompt visible (a decode row): its summed keys, kept for the prompt
            summed = prompt.memo((self.key, "image key sum"), (roles.image,), lambda: image_key_sum(call, keys, lo, hi))
            steered = roles.has_image.to(call.device)[:, None].expand(-1, rows)
            scores = method.summed_scores(query[:, :, first:], summed[:, :, None], call) if k else None
        else:
            image = roles.keys(call.key_abs[lo:hi]).to(call.device)[:, None, None, :]  # (B, 1, 1, K')
            if visible is not None:
                image = image & visible[..., lo:hi]
            image = image.expand(call.batch, -1, rows, -1)  # (B, 1|H, C, K')
            steered = image.any(-1).any(1)
            valid = call.rows(visible, first, rows=rows).row_valid
            if valid is not None:
                steered = steered & valid[:, 0, :, 0]
            scores = method.head_scores(query[:, :, first:], keys, image, visible, (lo, hi), call) if k else None
        if scores is None:  # rho H < 1: every head of a steered row is scaled
            return torch.zeros(*steered.shape, call.heads, dtype=torch.bool, device=call.device), steered
        return top_heads(scores, k), steered

    def key_window(self, call, span: tuple[int, int]) -> tuple[int, int]:
        """Key indices [lo, hi) of the call that can hold image keys (every key for ``score: mass``,
        whose softmax needs them all); ``span``: the prompt positions holding them."""
        if self.method.p.score == "mass":
            return 0, call.k_len
        offset = call.key_offset
        lo, hi = min(max(span[0] - offset, 0), call.k_len), min(max(span[1] - offset, 0), call.k_len)
        return lo, max(lo, hi)


def image_key_sum(call, keys: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """float32 (B, H_kv, D): each batch row's image keys among key indices [lo, hi), summed."""
    flags = call.prompt.roles.keys(call.key_abs[lo:hi]).to(call.device, torch.float32)  # (B, K')
    return torch.matmul(flags[:, None, None, :], keys[:, :, lo:hi].float())[:, :, 0]


def call_tensors(call, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The call's queries (B, H, Q, D) and keys (B, H_kv, K, D) after RoPE."""
    query, keys = getattr(call, "query", None), getattr(call, "keys", None)
    if query is None or keys is None:
        raise SteeringError(
            f"SPIN on layer {layer}: this attention path hands head rules no queries and keys, and SPIN ranks heads "
            "by q . k on the image keys. Fix: steer with attnsteer.apply on the Hugging Face model"
        )
    return query, keys


@register
class SPIN(Method):
    name = "spin"
    docs = "docs/methods.md#spin"
    citation = "Sarkar et al., EMNLP 2025, arXiv 2505.16411"
    default_layers = "all"
    needs_image = True
    prompt_length_dependent = (
        "steers the prompt's last row and the generated rows, so a block cached for one prompt holds keys of "
        "a steered row at a position a longer prompt does not steer"
    )
    Params = SPINParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["rho"] == 1.0 or params["eps"] == 1.0

    def build_rules(self) -> list:
        return [HeadSuppression(self)]

    def report(self, prompt) -> dict | None:
        """``{"heads": [per batch row [heads]]}``: the K heads kept at the prompt's last row (ranked
        over all heads; empty for a row without image keys, which SPIN leaves unchanged)."""
        heads = prompt.get(self.key, "heads")
        return None if heads is None else {"heads": [row.nonzero().flatten().tolist() for row in heads]}

    def sums_keys(self, call) -> bool:
        """Whether ``r_h`` is a dot product with summed image keys (``score: sum``, no soft-cap)."""
        return self.p.score == "sum" and not call.softcap

    @staticmethod
    def summed_scores(query, summed, call) -> torch.Tensor:
        """query (B, H, C, D), summed float32 (B, H_kv, C|1, D) image keys -> r_h float32 (B, C, H):
        ``scaling q_h . sum_j k_j`` with query head h reading kv head h // G."""
        q = grouped(query.float(), call.kv_heads)  # (B, H_kv, G, C, D)
        r = (q * summed[:, :, None]).sum(-1) * call.scaling  # (B, H_kv, G, C)
        return r.reshape(call.batch, call.heads, -1).transpose(1, 2)

    def head_scores(self, query, keys, image, visible, window, call) -> torch.Tensor:
        """float32 (B, C, H): ``r_h`` of each steered row. query (B, H, C, D) of those rows; keys
        (B, H_kv, K, D); image bool (B, 1|H, C, K') the image keys each row sees among key indices
        ``window`` = [lo, hi); visible bool (B|1, 1|H, C, K) or None (every key)."""
        lo, hi = window
        k = keys[:, :, lo:hi].float()
        if self.sums_keys(call) and image.shape[1] == 1:
            return self.summed_scores(query, torch.matmul(image.float(), k), call)  # summed (B, H_kv, C, D)
        b, h, c, d = query.shape
        q = query.float().reshape(b, call.kv_heads, -1, d)  # (B, H_kv, G C, D): query head h reads kv head h // G
        s = torch.matmul(q, k.transpose(-1, -2)).reshape(b, h, c, hi - lo) * call.scaling  # (B, H, C, K')
        if call.softcap:
            s = torch.tanh(s / call.softcap) * call.softcap
        if self.p.score == "mass":
            if visible is not None:
                s = s.masked_fill(~visible.to(s.device), float("-inf"))
            s = torch.softmax(s, dim=-1).nan_to_num(0.0)
        return (s * image).sum(-1).transpose(1, 2)
