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

from .base import Method, param, register
from .rules import ReweightRule, ScoreRule

FIRST_ROWS_WITHOUT_OFFSET = 3


@dataclass(frozen=True)
class SoftplusParams:
    """Softplus re-weighting's parameters (docs/methods.md#softplus)."""

    p: float = param(3.0, "sharpening exponent (1 with offset 0 is the identity)", low=0.0, high=64.0, low_open=True)
    offset: float = param(1.0, "o_i subtracted from N_i a_ij after the first three rows", low=0.0)
    scoring: str = param(
        "softmax", "keep the model's softmax, or LSSA scoring for models trained with it", choices=("softmax", "lssa")
    )


class LSSAScoring(ScoreRule):
    """LSSA scoring, for models trained with it: ``s = log(d) log(N_i) q_i.k_j`` on L2-normalised q,
    k, then ``log softplus(s)`` before the usual normalisation (``a = softplus(s) / sum softplus(s)``)."""

    reads = ("cosine", "head_dim")

    def inputs(self, rows, prompt):
        return {"n_visible": rows.n_visible}

    def modify(self, s, cosine, head_dim, n_visible):
        lssa = math.log(head_dim) * torch.log(n_visible.clamp(min=1)) * cosine
        return torch.log(F.softplus(lssa))


@register
class SoftplusReweight(Method):
    name = "softplus"
    docs = "docs/methods.md#softplus"
    citation = "Gao & Spratling, arXiv 2501.13428"
    default_layers = "all"
    Params = SoftplusParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["scoring"] == "softmax" and params["p"] == 1.0 and params["offset"] == 0.0

    def build_rules(self) -> list:
        rules = [LSSAScoring(self)] if self.p.scoring == "lssa" else []
        reweight = ReweightRule(self, self.p.p, self.p.offset, FIRST_ROWS_WITHOUT_OFFSET)
        return rules + ([] if reweight.identity else [reweight])
