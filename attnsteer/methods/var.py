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

import math
from dataclasses import dataclass

import torch

from .. import compat
from ..errors import RecipeError
from .base import Method, RowContext, StepInfo, masked_sum, param, register


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


@register
class VAR(Method):
    name = "var"
    docs = "docs/methods.md#var"
    citation = "Kang et al., ICLR 2025, arXiv 2503.03321"
    default_layers = "2:-1"
    has_weight_step = True
    needs_image = True
    one_per_layer = True
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

    # ---- hidden-state sinks at prefill -----------------------------------------------------
    def layer_hooks(self, decoder_layer, state) -> list:
        return [(decoder_layer.register_forward_pre_hook, self._detect_sinks)]

    def _detect_sinks(self, module, args, kwargs):
        """Pre-hook on this layer's decoder layer: sinks from the hidden states entering it."""
        hidden = compat.first_argument(module.forward, args, kwargs)
        valid = self.state.prompt_tokens(hidden)
        if valid is not None:
            self.state.sinks.detect(
                self.layer, hidden, valid, self.p.tau, self.p.sink_dims, self.first_layer, self.intervention
            )
        return None

    def report(self) -> dict | None:
        """``{"sinks": [per batch row [prompt positions]]}``: this layer's hidden-state sinks."""
        table = self.state.sinks.by_layer.get(self.layer) if self.state is not None else None
        return None if table is None else {"sinks": [row.nonzero().flatten().tolist() for row in table]}

    # ---- groups -------------------------------------------------------------------------
    def key_groups(self, key_abs: torch.Tensor):
        """image and sink flags, bool (B, K), of the keys at absolute positions ``key_abs`` (K,)."""
        return self.state.roles.keys(key_abs), self.state.sinks.for_keys(self.layer, key_abs)

    def row_gate(self, row_abs: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
        """bool (B, C): query rows VAR may steer -- rows after the row's last image token, in a row
        with an image (variant ``released``: and a visual sink among the keys ``image``/``sinks``
        (B, K) of this forward). row_abs: long (C,) absolute positions of the query rows."""
        roles = self.state.roles
        gate = (row_abs.view(1, -1) > roles.last_image.view(-1, 1)) & roles.has_image.view(-1, 1)
        if self.p.variant == "released":  # no visual sink in this layer -> layer untouched
            gate = gate & (image & sinks).any(-1, keepdim=True)
        return gate

    def group_ids(self, key_abs: torch.Tensor) -> torch.Tensor:
        """int8 (B, K) group of each key for the group-mass kernels: 0 other, 1 text sink, 2 image
        sink, 3 visual non-sink. M_img = M_2 + M_3, M_sink = M_1 + M_2, M_vis = M_3."""
        image, sinks = self.key_groups(key_abs)
        return sinks.to(torch.int8) * (1 + image.to(torch.int8)) + (image & ~sinks).to(torch.int8) * 3

    def _groups(self, ctx: RowContext):
        """image keys, sinks (B, 1, 1, K) and the query-row gate (B, 1, C, 1)."""
        image, sinks = self.key_groups(ctx.key_abs)
        gate = self.row_gate(ctx.row_abs.view(-1), image, sinks)
        return image[:, None, None, :], sinks[:, None, None, :], gate[:, None, :, None]

    kernel_rule = "var"  # the Triton kernels' rule (four key groups, see group_ids)

    def group_factors(self, m_sink, m_vis, log: bool = False):
        """The redistribution as factors on the row's group masses -- the one rule both fused
        paths (PyTorch and the Triton kernels) apply: every sink keeps ``1 - p`` of its mass, the
        visual non-sinks share the budget ``p M_S`` in proportion, ``f_vis = 1 + p M_S / M_V``;
        other keys keep theirs.

        m_sink, m_vis: float tensors of the rows' sink / visual non-sink masses (same shape).
        Returns (f_sink: float, f_vis: tensor like m_vis), or their logarithms with ``log``.
        """
        p = self.p.p
        ratio = p * m_sink / m_vis.clamp(min=1e-30)
        if log:
            return (math.log(1.0 - p) if p < 1.0 else float("-inf")), torch.log1p(ratio)
        return 1.0 - p, 1.0 + ratio

    def select_rows(self, gate, m_img, m_sink, m_vis, like):
        """Steered (batch, head, row)s: gate & m_img >= min_image_attention & m_vis >= rho m_img &
        both the sink and visual groups non-empty (& the head mask); broadcasts like ``like``."""
        rows = gate & (m_img >= self.p.min_image_attention) & (m_vis >= self.p.rho * m_img) & (m_sink > 0) & (m_vis > 0)
        hm = self.head_mask(like)
        return rows if hm is None else rows & hm

    def reference_weights(self, a, ctx: RowContext, info: StepInfo):
        """The formula applied literally on the float32 map a (B, H, Q, K)."""
        image, sinks, gate = self._groups(ctx)
        visual = image & ~sinks
        m_img = (a * image).sum(-1, keepdim=True)
        m_sink = (a * sinks).sum(-1, keepdim=True)
        m_vis = (a * visual).sum(-1, keepdim=True)
        r = m_vis / m_img.clamp(min=1e-30)
        rows = gate & (m_img >= self.p.min_image_attention) & (r >= self.p.rho) & (m_sink > 0) & (m_vis > 0)
        hm = self.head_mask(a)
        rows = rows if hm is None else rows & hm
        p = self.p.p
        omega = p * m_sink
        new = torch.where(sinks, (1.0 - p) * a, torch.where(visual, a + omega * a / m_vis.clamp(min=1e-30), a))
        return torch.where(rows, new, a), rows.sum()

    def fused_weights(self, w, ctx: RowContext, info: StepInfo):
        """Group-mass form on one chunk w (B, H, C, K): factors on the sink / visual / other groups."""
        image, sinks, gate = self._groups(ctx)
        visual = image & ~sinks
        m_img, m_sink, m_vis = masked_sum(w, image), masked_sum(w, sinks), masked_sum(w, visual)
        rows = self.select_rows(gate, m_img, m_sink, m_vis, w)
        f_sink, f_vis = self.group_factors(m_sink, m_vis)
        factor = torch.where(sinks, torch.full_like(m_vis, f_sink), torch.where(visual, f_vis, torch.ones_like(m_vis)))
        return torch.where(rows, w * factor, w), rows.sum()
