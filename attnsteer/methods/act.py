"""ACT -- Attention Calibration Technique (docs/methods.md#act).

Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing LLMs without Training
through Attention Calibration", ICML 2024 (arXiv 2406.15765).

Per head and prompt, keys whose mean received attention over the prompt rows that see them,
``m_j = (1/#rows seeing j) * sum_i a_ij``, exceeds ``threshold`` are sinks ``S`` (the first one
is left alone by default). In every prompt row ``i >= 1`` a sink keeps ``beta`` of its weight
and the freed mass goes to the non-sink keys in proportion to their weights:
``a'_is = beta a_is``; ``a'_ij = a_ij (M_N + (1-beta) M_S) / M_N`` for ``j not in S``, with
``M_S``/``M_N`` the row's sink/non-sink masses. Rows stay normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, param, register
from .rules import GroupRule


def sinks_from_column_means(col_mean: torch.Tensor, threshold: float, keep_first_sink: bool) -> torch.Tensor:
    """col_mean: float (B, H, K) mean received attention (0 where no row sees the key).

    Returns bool (B, H, K): keys above ``threshold``, minus the lowest-position one per (b, h)
    when ``keep_first_sink``.
    """
    sinks = col_mean > threshold
    if keep_first_sink:
        first = sinks.int().argmax(dim=-1, keepdim=True)  # (B, H, 1); 0 when there is no sink
        has_any = sinks.any(dim=-1, keepdim=True)
        drop = torch.zeros_like(sinks).scatter_(-1, first, True) & has_any
        sinks = sinks & ~drop
    return sinks


@dataclass(frozen=True)
class ACTParams:
    """ACT's parameters (docs/methods.md#act)."""

    beta: float = param(0.4, "fraction of a sink's weight that is kept", low=0.0, high=1.0)
    threshold: float = param(0.1, "absolute mean-attention threshold for a sink", low=0.0, high=1.0, low_open=True)
    apply_to: str = param(
        "prefill", "which rows are calibrated: prompt rows, or decode rows too", choices=("prefill", "all")
    )
    keep_first_sink: bool = param(True, "leave the first (lowest-position) sink alone")


class Calibration(GroupRule):
    """ACT as a group rule: group 1 = the prompt's sinks of the head, group 0 = every other key.
    A calibrated row keeps ``beta`` of its sink mass and gives the rest to the non-sinks in
    proportion: ``f_sink = beta``, ``f_other = 1 + (1 - beta) M_S / M_N``."""

    num_groups = 2
    per_head = True
    column_stats = True  # sink detection reads the column means of the prompt's own map

    def active(self, is_prefill: bool) -> bool:
        return is_prefill or self.method.p.apply_to == "all"

    def set_column_stats(self, colsum, count, key_abs, prompt) -> None:
        """Sinks from the column means: bool (B, H, P) over absolute prompt positions."""
        p = self.method.p
        col_mean = torch.where(count > 0, colsum / count.clamp(min=1), torch.zeros_like(colsum))
        sinks = sinks_from_column_means(col_mean, p.threshold, p.keep_first_sink)
        length = int(key_abs[-1]) + 1 if key_abs.numel() else 0
        if key_abs.numel() == length:
            table = sinks
        else:  # keys start past position 0 (a sliding-window cache): earlier positions are never sinks
            table = torch.zeros(*sinks.shape[:2], length, dtype=torch.bool, device=sinks.device)
            table[:, :, key_abs] = sinks
        prompt.put(self.key, "sinks", table)

    def group_table(self, prompt) -> torch.Tensor:
        sinks = prompt.require(
            self.key,
            "sinks",
            f"ACT on layer {self.method.layer} (apply_to: all)",
            "decode rows reuse the prompt's prefill sinks: run the prompt through the steered model first "
            "(model.generate does this), or use apply_to: prefill",
        )
        return sinks.view(torch.int8)

    def row_gate(self, rows, prompt):
        """Row 0 of every sequence (its first token) is never calibrated."""
        return None if rows.all_rows_at_least(1) else rows.rel_pos >= 1

    def factors(self, masses, prompt):
        beta = self.method.p.beta
        m_other, m_sink = masses[..., :1], masses[..., 1:2]
        steered = (m_sink > 0) & (m_other > 0)
        f_other = 1.0 + (1.0 - beta) * m_sink / m_other.clamp(min=1e-30)
        return steered, torch.cat([f_other, torch.full_like(f_other, beta)], dim=-1)


@register
class ACT(Method):
    name = "act"
    docs = "docs/methods.md#act"
    citation = "Yu et al., ICML 2024, arXiv 2406.15765"
    default_layers = "2:-1"
    Params = ACTParams
    whole_prompt = "finds each prompt's sinks from the column means of its whole attention map"

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["beta"] == 1.0

    def build_rules(self) -> list:
        return [Calibration(self)]

    def report(self, prompt) -> dict | None:
        """``{"sinks": [per batch row {head: [key positions]}]}`` of the prompt."""
        table = prompt.get(self.key, "sinks")
        if table is None:
            return None
        rows = []
        for b in range(table.shape[0]):
            heads = {h: table[b, h].nonzero().flatten().tolist() for h in range(table.shape[1])}
            rows.append({h: pos for h, pos in heads.items() if pos})
        return {"sinks": rows}
