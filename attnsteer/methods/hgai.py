"""HGAI -- heads-guided attention intervention (docs/methods.md#hgai).

Jiang et al., "Devils in Middle Layers of Large Vision-Language Models: Interpreting, Detecting and
Mitigating Object Hallucinations via Attention Lens", CVPR 2025 (arXiv 2411.16724).

In the chosen (middle) layers, on the last prompt row and every decode row, before the softmax:
``s_hj <- s_hj + alpha mean_h' |s_h'j|`` for image keys ``j``, the mean over every query head of
the layer (same row and key): image keys that the layer's heads agree on get the same boost in
every head. A score rule reading ``head_mean_abs`` from the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, param, register
from .rules import AnsweringRowsScoreRule


@dataclass(frozen=True)
class HGAIParams:
    """HGAI's parameters (docs/methods.md#hgai)."""

    alpha: float = param(0.5, "weight of the head-mean |score| added to image-key scores (paper 0.5)", low=0.0)


class HeadGuidedBoost(AnsweringRowsScoreRule):
    """``s_hj <- s_hj + alpha mean_h' |s_h'j|`` on image keys, last prompt row and decode rows."""

    reads = ("head_mean_abs",)

    def modify(self, s, target, head_mean_abs):
        return torch.where(target, s + self.method.p.alpha * head_mean_abs, s)


@register
class HGAI(Method):
    name = "hgai"
    docs = "docs/methods.md#hgai"
    citation = "Jiang et al., CVPR 2025, arXiv 2411.16724"
    default_layers = "5:19"  # LLaVA-1.5-7B's layers 5..18 (0-based, inclusive)
    needs_image = True
    prompt_length_dependent = (
        "steers the prompt's last row and the generated rows, so a block cached for one prompt holds steered "
        "keys at positions a longer prompt does not steer"
    )
    Params = HGAIParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["alpha"] == 0.0

    def build_rules(self) -> list:
        return [HeadGuidedBoost(self)]
