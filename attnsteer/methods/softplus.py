"""Softplus attention with re-weighting (docs/methods.md#softplus).

Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in LLMs",
arXiv 2501.13428.

Re-weighting (training-free on a softmax model): ``w_ij = max(N_i a_ij - o_i, 0)^p`` with
``o_i = 0`` for the first three positions of a row and ``offset`` after, ``a'_ij = w_ij / sum_k w_ik``;
uniform rows (every ``w`` zero) are left unchanged.
Scoring ``lssa`` (only for models trained with it) replaces the softmax scores:
``s_ij = log(d) log(N_i) q_i.k_j`` on L2-normalised q, k and ``a = softplus(s) / sum softplus(s)``,
i.e. the score becomes ``log softplus(s)`` before the usual normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, RowContext, StepInfo, param, register

FIRST_ROWS_WITHOUT_OFFSET = 3


@dataclass(frozen=True)
class SoftplusParams:
    """Softplus re-weighting's parameters (docs/methods.md#softplus)."""

    p: float = param(3.0, "sharpening exponent (1 with offset 0 is the identity)", low=0.0, high=64.0, low_open=True)
    offset: float = param(1.0, "o_i subtracted from N_i a_ij after the first three rows", low=0.0)
    scoring: str = param(
        "softmax", "keep the model's softmax, or LSSA scoring for models trained with it", choices=("softmax", "lssa")
    )


@register
class SoftplusReweight(Method):
    name = "softplus"
    docs = "docs/methods.md#softplus"
    citation = "Gao & Spratling, arXiv 2501.13428"
    default_layers = "all"
    has_weight_step = True
    Params = SoftplusParams

    def __init__(self, params, layer, heads):
        super().__init__(params, layer, heads)
        self.has_score_step = self.p.scoring == "lssa"
        self.weight_identity = self.p.p == 1.0 and self.p.offset == 0.0

    @property
    def kernel_rule(self) -> str | None:
        """The Triton kernels run re-weighting on softmax scores (not LSSA scoring)."""
        return "softplus" if self.p.scoring == "softmax" and not self.weight_identity else None

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["scoring"] == "softmax" and params["p"] == 1.0 and params["offset"] == 0.0

    def _offsets(self, ctx: RowContext):
        """o_i: (B, 1, C, 1) float, or a python float when every row is past the first three."""
        if ctx.all_rows_at_least(FIRST_ROWS_WITHOUT_OFFSET):
            return self.p.offset
        off = torch.full(ctx.rel_pos.shape, self.p.offset, dtype=torch.float32, device=ctx.rel_pos.device)
        return torch.where(ctx.rel_pos < FIRST_ROWS_WITHOUT_OFFSET, torch.zeros_like(off), off)

    # ---- LSSA scoring (score level) -------------------------------------------------------
    def scores(self, s, q, k, ctx: RowContext, qk):
        """LSSA: q (B, H_q, C, D), k (B, H_kv|H_q, K, D) float32; ``qk(q, k)`` -> (B, H_q, C, K)
        handles GQA. Returns log softplus(s_lssa) (-inf where invisible) on steered heads."""
        d = q.shape[-1]
        scale = math.log(d) * torch.log(ctx.n_visible.clamp(min=1))  # (B|1, 1, C, 1)
        lssa = scale * qk(F.normalize(q, dim=-1), F.normalize(k, dim=-1))
        new = torch.log(F.softplus(lssa)).masked_fill(~ctx.visible, float("-inf"))
        return self.select_heads(new, s)

    # ---- re-weighting (weight level) ------------------------------------------------------
    def reference_weights(self, a, ctx: RowContext, info: StepInfo):
        """Literal formula in float64 (so large p cannot overflow the oracle)."""
        if self.weight_identity:
            return a, a.new_zeros(())
        a64 = a.double()
        offsets = self._offsets(ctx)
        t = ctx.n_visible.double() * a64 - (offsets.double() if isinstance(offsets, torch.Tensor) else offsets)
        w = t.clamp(min=0.0) ** self.p.p
        total = w.sum(-1, keepdim=True)
        rows = total > 0
        hm = self.head_mask(a)
        rows = rows if hm is None else rows & hm
        new = torch.where(rows, w / total.clamp(min=1e-300), a64)
        return new.to(a.dtype), rows.sum()

    def fused_weights(self, p, ctx: RowContext, info: StepInfo):
        """Log-space form on one chunk p (B, H, C, K): log w = p log(N p - o) on keys above the offset."""
        if self.weight_identity:
            return p, p.new_zeros(())
        t = ctx.n_visible * p - self._offsets(ctx)
        keep = t > 0
        log_w = torch.where(keep, self.p.p * torch.log(t.clamp(min=1e-38)), torch.full_like(t, float("-inf")))
        rows = keep.any(-1, keepdim=True)
        hm = self.head_mask(p)
        rows = rows if hm is None else rows & hm
        new = torch.softmax(log_w.masked_fill(~rows, 0.0), dim=-1)
        return torch.where(rows, new, p), rows.sum()
