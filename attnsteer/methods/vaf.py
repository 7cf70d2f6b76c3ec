"""VAF -- Visual Amplification Fusion, from ClearSight (docs/methods.md#vaf).

Yin et al., "ClearSight: Visual Signal Enhancement for Object Hallucination Mitigation in
Multimodal Large Language Models", CVPR 2025 (arXiv 2503.13107).

In the chosen (middle) layers, on every query row after the last image token of its batch row
(prefill rows past it, and every decode row): ``s_ij <- alpha s_ij`` for image keys ``j`` and
``s_ij <- beta s_ij`` for the system-prompt keys (every real token before the first image token);
other keys unchanged; then the usual softmax. A per-group temperature on the scores.

The spans come from each prompt (image tokens, or a ``handle.focus`` span on any model), not from
LLaVA-1.5's fixed offsets. Since ``alpha (q . k) = q . (alpha k)``, the rule is a
:class:`~attnsteer.methods.rules.KeyScaleRule`: fused attention over a scaled copy of the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, param, register
from .rules import KeyScaleRule, at_keys


@dataclass(frozen=True)
class VAFParams:
    """VAF's parameters (docs/methods.md#vaf)."""

    alpha: float = param(1.15, "factor on image-key scores (released LLaVA-1.5-7B POPE setting 1.15)", low=0.0)
    beta: float = param(0.95, "factor on system-prompt key scores (released setting 0.95)", low=0.0)


def before_first_image(image: torch.Tensor) -> torch.Tensor:
    """image bool (B, P) -> bool (B, P): the positions before each row's first image (or focus)
    token, the system prompt (left padding included: it is never visible); all False without one."""
    positions = torch.arange(image.shape[-1], device=image.device)
    first = torch.where(image, positions, image.shape[-1]).min(-1, keepdim=True).values  # (B, 1)
    return (positions < first) & image.any(-1, keepdim=True)


class GroupTemperature(KeyScaleRule):
    """``s_ij <- alpha s_ij`` on image keys and ``beta s_ij`` on system keys, rows after the image."""

    def spans(self, prompt) -> torch.Tensor:
        """float32 (B, P) per prompt position: alpha on image keys, beta on system keys, 1
        elsewhere; kept per prompt."""
        image = prompt.roles.image
        return prompt.memo((self.key, "vaf scales"), (image,), lambda: self.method.key_factors(image))

    def key_scales(self, key_abs, prompt):
        return at_keys(self.spans(prompt), key_abs, 1.0)

    def row_gate(self, rows, prompt):
        roles = prompt.roles
        last = roles.last_image.view(-1, 1, 1, 1)
        return (rows.row_abs > last) & roles.has_image.view(-1, 1, 1, 1)


@register
class VAF(Method):
    name = "vaf"
    docs = "docs/methods.md#vaf"
    citation = "Yin et al., CVPR 2025, arXiv 2503.13107"
    default_layers = "9:15"  # LLaVA-1.5-7B's layers 9..14 (0-based), the released setting
    needs_image = True
    prompt_length_dependent = (
        "steers the rows after the prompt's last image, so a block cached for one prompt holds steered states at "
        "positions that a longer prompt with a later image does not steer"
    )
    Params = VAFParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["alpha"] == 1.0 and params["beta"] == 1.0

    def build_rules(self) -> list:
        return [GroupTemperature(self)]

    def key_factors(self, image: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """image bool (B, P) -> (B, P) in ``dtype``: alpha on image keys, beta on the system prompt, 1
        elsewhere."""
        factors = torch.ones(image.shape, dtype=dtype, device=image.device)
        return factors.masked_fill(before_first_image(image), self.p.beta).masked_fill(image, self.p.alpha)

    def report(self, prompt) -> dict | None:
        """Per batch row: ``system`` and ``image``, the prompt positions whose scores VAF scales by
        beta (system prompt, left padding included) and by alpha (image or focus keys), and
        ``key_factors``, the factor of every prompt position (1 elsewhere)."""
        if prompt.roles is None:
            return None
        image = prompt.roles.image
        return {
            "system": [row.nonzero().flatten().tolist() for row in before_first_image(image)],
            "image": [row.nonzero().flatten().tolist() for row in image],
            "key_factors": self.key_factors(image, torch.float64).tolist(),
        }
