"""VAR -- Visual Attention Redistribution (docs/methods.md#var).

Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models",
ICLR 2025 (arXiv 2503.03321).

Sinks ``S`` (per layer, per prompt) are tokens whose hidden state entering the layer has a
massive activation: ``phi_j = max_{d in D} |x_j[d]| / RMS(x_j) >= tau`` (see
:mod:`attnsteer.sinks`). In an image-centric (head, row) -- image mass ``m_img >=
min_image_attention`` and visual non-sink share ``r >= rho`` -- every sink gives up the
fraction ``p`` of its weight, and the budget goes to the visual non-sinks ``V = I_img \\ S`` in
proportion to their weights. Query rows: text after the last image token, and generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..sinks import hidden_sinks, massive_dims
from .base import Method, param, register
from .rules import GroupRule, group_ids_of


def _check_dims(value):
    if value == "auto":
        return value
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value)
    ):
        raise ValueError(value)
    return sorted(set(value))


VARIANT_DEFAULTS = {"paper": {"p": 0.6, "layers": "2:-1"}, "released": {"p": 0.4, "layers": "2:"}}


@dataclass(frozen=True)
class VARParams:
    """VAR's parameters (docs/methods.md#var)."""

    tau: float = param(20.0, "massive-activation threshold on |x_d| / RMS(x)", low=0.0, low_open=True)
    rho: float = param(0.5, "minimum visual non-sink share of the row's image mass", low=0.0, high=1.0)
    p: float | None = param(
        None,
        "fraction of sink weight moved (paper meaning; default 0.6, or 0.4 with variant: released)",
        low=0.0,
        high=1.0,
    )
    min_image_attention: float = param(0.2, "minimum total attention on image keys", low=0.0, high=1.0)
    sink_dims: object = param(
        "auto",
        "hidden dims D of the sink score",
        check=_check_dims,
        allowed_text='"auto" or a non-empty list of hidden-dim indices, e.g. [1415, 2533]',
    )
    variant: str = param("paper", "paper semantics, or the released code's defaults", choices=("paper", "released"))


class Redistribution(GroupRule):
    """VAR as a group rule on four key groups per batch row: 0 other, 1 text sink, 2 image sink,
    3 visual non-sink. In a steered row every sink keeps ``1 - p`` of its mass and the visual
    non-sinks share the budget ``p M_S`` in proportion: ``f_vis = 1 + p M_S / M_V``; others keep theirs."""

    num_groups = 4
    rest_unchanged = True

    def group_table(self, prompt) -> torch.Tensor:
        sinks = prompt.require(
            self.key,
            "sinks",
            f"VAR on layer {self.method.layer}",
            "run the prompt through the steered model first (model.generate does this): its sinks are found at "
            "its prefill",
        )
        image = prompt.roles.image

        def build():
            gid = sinks.to(torch.int8) * (1 + image.to(torch.int8)) + (image & ~sinks).to(torch.int8) * 3
            return gid.unsqueeze(1)

        return prompt.memo((self.key, "groups"), (sinks, image), build)

    def row_gate(self, rows, prompt):
        """Query rows after the row's last image token, in a batch row with an image (variant
        ``released``: and a visual sink among this forward's keys)."""
        roles = prompt.roles
        gate = (rows.row_abs > roles.last_image.view(-1, 1, 1, 1)) & roles.has_image.view(-1, 1, 1, 1)
        if self.method.p.variant == "released":  # no visual sink in this layer -> layer untouched
            image_sinks = group_ids_of(self.group_table(prompt), rows.key_abs) == 2  # (B, 1, K)
            gate = gate & image_sinks.any(-1).view(-1, 1, 1, 1)
        return gate

    def factors(self, masses, prompt):
        p = self.method.p
        m_text_sink, m_image_sink, m_vis = masses[..., 1:2], masses[..., 2:3], masses[..., 3:4]
        m_sink, m_img = m_text_sink + m_image_sink, m_image_sink + m_vis
        steered = (m_img >= p.min_image_attention) & (m_vis >= p.rho * m_img) & (m_sink > 0) & (m_vis > 0)
        keep = torch.full_like(m_vis, 1.0 - p.p)
        f_vis = 1.0 + p.p * m_sink / m_vis.clamp(min=1e-30)
        return steered, torch.cat([torch.ones_like(m_vis), keep, keep, f_vis], dim=-1)


@register
class VAR(Method):
    name = "var"
    docs = "docs/methods.md#var"
    citation = "Kang et al., ICLR 2025, arXiv 2503.03321"
    default_layers = "2:-1"
    needs_image = True
    one_per_layer = True
    reads_layer_input = True
    whole_prompt = (
        "finds each prompt's hidden-state sinks (and, with sink_dims: auto, their dims) over its whole prompt"
    )
    Params = VARParams

    @classmethod
    def finalize_params(cls, params):
        params = dict(params)
        if params.get("p") is None:
            params["p"] = VARIANT_DEFAULTS[params["variant"]]["p"]
        return params

    @classmethod
    def layers_default(cls, params, arch=None):
        return VARIANT_DEFAULTS[params.get("variant", "paper")]["layers"]

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["p"] == 0.0

    @classmethod
    def check_model(cls, params, arch, where) -> None:
        dims = params["sink_dims"]
        hidden = arch.text_config.hidden_size
        if dims != "auto" and max(dims) >= hidden:
            raise RecipeError(
                f"{where}.params.sink_dims: {dims} names hidden dims the model does not have (hidden size {hidden}). "
                "Fix: use the dims of this backbone (e.g. [1415, 2533] for Llama-2-7B) or sink_dims: auto"
            )

    def build_rules(self) -> list:
        return [Redistribution(self)]

    # ---- hidden-state sinks at prefill -----------------------------------------------------
    def observe_layer_input(self, hidden, valid, prompt) -> None:
        """Sinks of this layer from the hidden states entering it; ``auto`` dims are found at the
        intervention's first layer and kept for its later layers."""
        p = self.p
        dims = p.sink_dims
        if dims == "auto":
            auto = ("var auto dims", self.intervention)
            if self.first_layer or prompt.get(auto, "dims") is None:
                prompt.put(auto, "dims", massive_dims(hidden, valid, p.tau))
            dims = prompt.get(auto, "dims")
        prompt.put(self.key, "sinks", hidden_sinks(hidden, valid, p.tau, dims))

    def report(self, prompt) -> dict | None:
        """``{"sinks": [per batch row [prompt positions]]}``: this layer's hidden-state sinks."""
        table = prompt.get(self.key, "sinks")
        return None if table is None else {"sinks": [row.nonzero().flatten().tolist() for row in table]}
