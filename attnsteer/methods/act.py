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

import math
from dataclasses import dataclass

import torch

from ..errors import SteeringError
from .base import Method, RowContext, StepInfo, masked_sum, param, register


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


@register
class ACT(Method):
    name = "act"
    docs = "docs/methods.md#act"
    citation = "Yu et al., ICML 2024, arXiv 2406.15765"
    default_layers = "2:-1"
    has_weight_step = True
    Params = ACTParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["beta"] == 1.0

    def active(self, is_prefill: bool) -> bool:
        return is_prefill or self.p.apply_to == "all"

    # ---- sink sets ---------------------------------------------------------------------------
    def _store_sinks(self, sinks: torch.Tensor, info: StepInfo) -> None:
        """Keep the prompt's sink set in absolute key positions: bool (B, H, P).

        Keys are contiguous absolute positions key_offset .. key_offset + K - 1."""
        if info.key_offset == 0:
            table = sinks
        else:
            table = torch.zeros(
                *sinks.shape[:2], info.key_offset + info.num_keys, dtype=torch.bool, device=sinks.device
            )
            table[:, :, info.key_offset :] = sinks
        self.prompt_state["sinks"] = table

    def sinks_for_keys(self, key_abs: torch.Tensor, batch: int, info: StepInfo | None = None) -> torch.Tensor:
        """bool (B, H, K) sink flags for the keys of the current forward (generated keys: never)."""
        table = self.prompt_state.get("sinks")
        if table is None:
            raise SteeringError(
                f"ACT on layer {self.layer} (apply_to: all) has no sink set for this prompt: decode rows reuse "
                "the prompt's prefill sinks. Fix: run the prompt through the steered model first "
                "(model.generate does this), or use apply_to: prefill"
            )
        if table.shape[0] != batch:
            raise SteeringError(
                f"ACT on layer {self.layer}: the prompt had batch size {table.shape[0]} but this forward has {batch}. "
                "Fix: start a new prompt (a forward without past_key_values) for the new batch"
            )
        length = table.shape[-1]
        if info is not None and info.key_offset == 0 and key_abs.numel() == length:
            return table  # the prompt's own keys (prefill): no gather needed
        in_prompt = key_abs < length
        idx = key_abs.clamp(max=max(length - 1, 0))
        return table[:, :, idx] & in_prompt.view(1, 1, -1)

    def set_column_stats(self, colsum, count, info: StepInfo, key_abs) -> None:
        col_mean = torch.where(count > 0, colsum / count.clamp(min=1), torch.zeros_like(colsum))
        sinks = sinks_from_column_means(col_mean, self.p.threshold, self.p.keep_first_sink)
        self._store_sinks(sinks, info)

    def needs_column_stats(self, is_prefill: bool) -> bool:
        return is_prefill

    def report(self) -> dict | None:
        """``{"sinks": [per batch row {head: [key positions]}]}`` of the last prompt."""
        table = self.prompt_state.get("sinks")
        if table is None:
            return None
        rows = []
        for b in range(table.shape[0]):
            heads = {h: table[b, h].nonzero().flatten().tolist() for h in range(table.shape[1])}
            rows.append({h: pos for h, pos in heads.items() if pos})
        return {"sinks": rows}

    # ---- calibration ---------------------------------------------------------------------------
    kernel_rule = "act"  # the Triton kernels' rule for this method (two key groups: other, sinks)

    def group_factors(self, m_sink, m_other, log: bool = False):
        """The calibration as factors on the row's group masses -- the one rule both fused paths
        (PyTorch and the Triton kernels) apply: sinks keep ``beta`` of their mass, the others take
        the freed ``(1 - beta) M_S`` in proportion, ``f_other = 1 + (1 - beta) M_S / M_N``.

        m_sink, m_other: float tensors of the rows' sink / non-sink masses (same shape).
        Returns (f_sink: float, f_other: tensor like m_other), or their logarithms with ``log``.
        """
        beta = self.p.beta
        ratio = (1.0 - beta) * m_sink / m_other.clamp(min=1e-30)
        if log:
            return (math.log(beta) if beta > 0 else float("-inf")), torch.log1p(ratio)
        return beta, 1.0 + ratio

    def steered_rows(self, m_sink, m_other, rel_pos, like) -> torch.Tensor:
        """bool: rows calibrated -- both groups non-empty, relative position >= 1 (``rel_pos``: long
        positions from each row's first token, broadcastable; None when every row is past row 0),
        and a steered head (``like``: a (B, H_q, ...) tensor the head mask broadcasts against)."""
        rows = (m_sink > 0) & (m_other > 0)
        if rel_pos is not None:
            rows = rows & (rel_pos >= 1)
        hm = self.head_mask(like)
        return rows if hm is None else rows & hm

    def reference_weights(self, a, ctx: RowContext, info: StepInfo):
        """The formula applied literally on the full float32 map a (B, H, Q, K)."""
        if info.is_prefill:
            seen = ctx.visible if ctx.row_valid is None else ctx.visible & ctx.row_valid
            count = seen.sum(dim=-2).to(a.dtype)  # (B|1, 1, K) real prompt rows that see key j
            col_mean = torch.where(count > 0, (a * seen).sum(dim=-2) / count.clamp(min=1), torch.zeros_like(a[:, :, 0]))
            self._store_sinks(sinks_from_column_means(col_mean, self.p.threshold, self.p.keep_first_sink), info)
        if not self.active(info.is_prefill):
            return a, a.new_zeros(())
        sink = self.sinks_for_keys(ctx.key_abs, a.shape[0], info)[:, :, None, :]  # (B, H, 1, K)
        beta = self.p.beta
        sink_sum = (a * sink).sum(-1, keepdim=True)
        other_sum = (a * ~sink).sum(-1, keepdim=True)
        freed = (1.0 - beta) * sink_sum
        calibrated = torch.where(sink, beta * a, a + freed * a / other_sum.clamp(min=1e-30))
        rows = self.steered_rows(sink_sum, other_sum, None if ctx.all_rows_at_least(1) else ctx.rel_pos, a)
        return torch.where(rows, calibrated, a), rows.sum()

    def fused_weights(self, p, ctx: RowContext, info: StepInfo):
        """Group-mass form on one chunk p (B, H, C, K): per-row factors on the sink / non-sink groups."""
        sink = self.sinks_for_keys(ctx.key_abs, p.shape[0], info)[:, :, None, :]
        m_sink = masked_sum(p, sink)
        m_other = masked_sum(p, ~sink)
        f_sink, f_other = self.group_factors(m_sink, m_other)
        rows = self.steered_rows(m_sink, m_other, None if ctx.all_rows_at_least(1) else ctx.rel_pos, p)
        factor = torch.where(sink, torch.full_like(f_other, f_sink), f_other)
        return torch.where(rows, p * factor, p), rows.sum()
