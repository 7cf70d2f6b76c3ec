"""Hidden-state sink detection (VAR, docs/methods.md#var).

For the hidden state ``x_j`` entering decoder layer ``l`` (the residual stream before the
layer's input norm): ``phi_j = max_{d in D} |x_j[d]| / sqrt(mean_d x_j[d]^2 + 1e-6)``;
``S^l = {j : phi_j >= tau}``, shared by all heads. ``D`` is a list of dims, or ``auto``: every
dim where some prompt token of that row reaches ``tau`` at the first steered layer's input.
Computed per prompt at prefill by forward pre-hooks on the decoder layers; generated tokens are
never sinks.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def activation_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D) -> |x_d| / RMS(x) in float32, (B, L, D)."""
    x = hidden.float()
    return x.abs() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


class HiddenSinks:
    """Per-layer sink sets of the current prompt: bool (B, P)."""

    def __init__(self):
        self.by_layer: dict[int, torch.Tensor] = {}
        # intervention index -> bool (B, D) auto dims, found at its first layer's input
        self.auto_dims: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.by_layer.clear()
        self.auto_dims.clear()

    def detect(
        self, layer: int, hidden: torch.Tensor, valid: torch.Tensor, tau: float, dims, first_layer: bool, group: int = 0
    ) -> None:
        """hidden (B, L, D) entering ``layer``; valid bool (B, L) non-pad prompt tokens. ``group``:
        the intervention whose ``first_layer`` fixes the ``auto`` dims of its later layers."""
        ratio = activation_ratio(hidden)
        if dims == "auto":
            if first_layer or group not in self.auto_dims:
                self.auto_dims[group] = ((ratio >= tau) & valid.unsqueeze(-1)).any(dim=1)  # (B, D)
            chosen = self.auto_dims[group].unsqueeze(1)  # (B, 1, D)
            phi = torch.where(chosen, ratio, torch.zeros_like(ratio)).amax(-1)
        else:
            phi = ratio[..., list(dims)].amax(-1)
        self.by_layer[layer] = (phi >= tau) & valid

    def for_keys(self, layer: int, key_abs: torch.Tensor) -> torch.Tensor:
        """bool (B, K) sink flags of the current forward's keys (generated keys: never)."""
        table = self.by_layer[layer]
        length = table.shape[-1]
        inside = key_abs < length
        return table[:, key_abs.clamp(max=max(length - 1, 0))] & inside.view(1, -1)

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (integer (R,)) of every table, in that order."""
        self.by_layer = {k: v[index.to(v.device)] for k, v in self.by_layer.items()}
        self.auto_dims = {k: v[index.to(v.device)] for k, v in self.auto_dims.items()}
