"""Hidden-state sink detection (VAR, docs/methods.md#var).

For the hidden state ``x_j`` entering decoder layer ``l`` (the residual stream before the
layer's input norm): ``phi_j = max_{d in D} |x_j[d]| / sqrt(mean_d x_j[d]^2 + 1e-6)``;
``S^l = {j : phi_j >= tau}``, shared by all heads. ``D`` is a list of dims, or ``auto``: every
dim where some prompt token of that row reaches ``tau`` at the first steered layer's input.
Computed per prompt at prefill; generated tokens are never sinks.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def activation_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D) -> |x_d| / RMS(x) in float32, (B, L, D)."""
    x = hidden.float()
    return x.abs() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def massive_dims(hidden: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """bool (B, D): the hidden dims where some real prompt token (``valid`` bool (B, L)) of the row
    reaches ``|x_d| / RMS(x) >= tau`` (``sink_dims: auto``)."""
    return ((activation_ratio(hidden) >= tau) & valid.unsqueeze(-1)).any(dim=1)


def hidden_sinks(hidden: torch.Tensor, valid: torch.Tensor, tau: float, dims) -> torch.Tensor:
    """bool (B, L): the real prompt tokens whose ``phi >= tau`` over ``dims`` -- a list of dims, or a
    bool (B, D) of chosen dims per row (:func:`massive_dims`)."""
    ratio = activation_ratio(hidden)
    if isinstance(dims, torch.Tensor):
        phi = torch.where(dims.unsqueeze(1), ratio, torch.zeros_like(ratio)).amax(-1)
    else:
        phi = ratio[..., list(dims)].amax(-1)
    return (phi >= tau) & valid
