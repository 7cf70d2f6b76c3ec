"""The chunked PyTorch backend: every attention rule kind, any mask, O(N) memory.

Queries are processed in chunks of C rows against all K keys, so the largest tensor is
(B, H_q, C, K) with C chosen from a fixed element budget -- never Q x K. Per chunk:

* **score** rules modify the scores before the softmax (:func:`apply_score_rules`);
* **group** rules get each row's group masses (one scatter-add over the keys) and rescale the
  row's weights by their factors (:func:`apply_group_rule`); a rule with ``column_stats`` first
  needs the column sums of the whole prefill map entering it: a QK^T-only pass (no V)
  accumulates them chunk by chunk;
* **reweight** rules form ``max(N a - o, 0)^p`` in log space (:func:`apply_reweight_rule`).

Weight rules (group, reweight) apply in recipe order. GQA is handled by folding the query heads of
each kv head into the row dimension, so K and V are never repeated. The score and group rule
functions also serve the reference backend (one chunk: the whole map; it re-weights literally in
float64), the CPU flash backend's few-row decode path and :mod:`attnsteer.attention.observe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods.rules import GroupRule, RowView, group_ids_of
from .capability import Capability
from .fused import fused_attention
from .geometry import AttentionCall, soft_cap
from .structure import sees_later_keys

CAPABILITY = Capability(name="chunked", kinds=frozenset({"score", "group", "reweight"}))


def unavailable(config, call) -> str | None:
    return None


# Elements of one (B, H_q, C, K) float32 chunk tensor; a handful of these are alive at once.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(batch: int, heads: int, q_len: int, k_len: int, budget: int | None = None) -> int:
    """Query rows per chunk so that one (B, H_q, C, K) tensor holds at most ``budget`` elements."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(q_len, budget // max(1, batch * heads * k_len)))


def grouped_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H_q, C, D), k (B, H_kv, K, D) -> (B, H_q, C, K) without repeating k."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    folded = q.reshape(b, hkv, (hq // hkv) * c, d)
    return torch.matmul(folded, k.transpose(-1, -2)).view(b, hq, c, k.shape[2])


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H_q, C, K), v (B, H_kv, K, D) -> (B, H_q, C, D) without repeating v."""
    b, hq, c, k_len = p.shape
    hkv = v.shape[1]
    out = torch.matmul(p.reshape(b, hkv, (hq // hkv) * c, k_len), v)
    return out.view(b, hq, c, v.shape[-1])


# ---------------------------------------------------------------------------------------------
# the rule kinds, on materialised chunks
# ---------------------------------------------------------------------------------------------
def apply_score_rules(rules, s, q, k, rows: RowView, call: AttentionCall, stats=None, qk=grouped_qk):
    """Score rules on s float32 (B, H_q, C, K), -inf where invisible: each rule's ``modify`` with
    its inputs, on its steered heads and the visible keys. q (B, H_q, C, D), k (B, H_kv|H_q, K, D)
    float32 (``qk`` forms their products). ``stats``: count the (batch, head, row)s each changed."""
    visible = None if rows.all_visible else rows.visible
    for rule in rules:
        inputs = rule.inputs(rows, call.prompt)
        if "cosine" in rule.reads:
            inputs["cosine"] = qk(F.normalize(q, dim=-1), F.normalize(k, dim=-1))
        if "head_dim" in rule.reads:
            inputs["head_dim"] = q.shape[-1]
        if "head_mean_abs" in rule.reads:  # over every query head of the layer (invisible keys: inf)
            inputs["head_mean_abs"] = s.abs().mean(dim=1, keepdim=True)
        new = rule.modify(s, **inputs)
        target = rule.head_mask(s)
        if visible is not None:
            target = visible if target is None else target & visible
        new = new if target is None else torch.where(target, new, s)
        if stats is not None:
            stats.record(rule.method, (new != s).any(-1).sum())
        s = new
    return s


def group_table(rule: GroupRule, call: AttentionCall) -> torch.Tensor:
    """The rule's group table of the call's prompt, int8 (B, 1|H, P) on the call's device, kept per
    prompt; raises when it was built for another batch."""
    table = rule.group_table(call.prompt)
    if table.shape[0] != call.batch:
        raise _batch_error(rule, table.shape[0], call.batch)
    return table if table.device == call.device else table.to(call.device)


def _batch_error(rule, prompt_rows: int, rows: int):
    from ..errors import SteeringError

    return SteeringError(
        f"{rule.method.name} on layer {rule.method.layer}: the prompt had batch size {prompt_rows} but this forward "
        f"has {rows}. Fix: start a new prompt (a forward without past_key_values) for the new batch"
    )


def group_masses(p: torch.Tensor, gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """p float (B, H, C, K), gid long (B, 1|H, 1, K) -> each row's mass per group (B, H, C, G)."""
    masses = torch.zeros(*p.shape[:-1], num_groups, dtype=p.dtype, device=p.device)
    return masses.scatter_add_(-1, gid.expand_as(p), p)


def steered_rows(rule: GroupRule, steered: torch.Tensor, rows: RowView, call: AttentionCall) -> torch.Tensor:
    """``steered`` (B, H, C, 1) from the rule's factors, cut to its row gate and steered heads."""
    gate = rule.row_gate(rows, call.prompt)
    if gate is not None:
        steered = steered & gate
    heads = rule.head_mask(steered)
    return steered if heads is None else steered & heads


def apply_group_rule(rule: GroupRule, p: torch.Tensor, rows: RowView, call: AttentionCall):
    """A group rule on weights p (B, H, C, K) (keys ``rows.key_abs``) -> (new weights in p's dtype,
    steered (batch, head, row) count). Masses and factors are formed in float32 whatever p's dtype (a
    half-precision reference must not overflow a factor such as 1 + M_1 / M_0)."""
    gid = group_ids_of(group_table(rule, call), rows.key_abs).long()[:, :, None, :]  # (B, 1|H, 1, K)
    weights = p.float()
    steered, factors = rule.factors(group_masses(weights, gid, rule.num_groups), call.prompt)
    steered = steered_rows(rule, steered, rows, call)
    per_key = factors.gather(-1, gid.expand(*factors.shape[:-1], p.shape[-1]))
    return torch.where(steered, (weights * per_key).to(p.dtype), p), steered.sum()


def apply_reweight_rule(rule, p: torch.Tensor, rows: RowView):
    """``max(N a - o, 0)^p`` on weights p float32 (B, H, C, K) in log space -> (new weights, steered
    count); rows where every weight is 0 (uniform rows) keep theirs."""
    t = rows.n_visible * p - rule.offsets(rows)
    keep = t > 0
    log_w = torch.where(keep, rule.power * torch.log(t.clamp(min=1e-38)), torch.full_like(t, float("-inf")))
    steered = keep.any(-1, keepdim=True)
    heads = rule.head_mask(p)
    steered = steered if heads is None else steered & heads
    new = torch.softmax(log_w.masked_fill(~steered, 0.0), dim=-1)
    return torch.where(steered, new, p), steered.sum()


def apply_weight_rules(rules, p: torch.Tensor, rows: RowView, call: AttentionCall, stats=None):
    """Weight rules (group, reweight) on p float32 (B, H, C, K) in recipe order."""
    for rule in rules:
        if rule.kind == "group":
            p, changed = apply_group_rule(rule, p, rows, call)
        else:
            p, changed = apply_reweight_rule(rule, p, rows)
        if stats is not None:
            stats.record(rule.method, changed)
    return p


def set_column_stats(rule: GroupRule, colsum, count, call: AttentionCall) -> None:
    """Hand a ``column_stats`` rule the column sums of its prefill map (checked against the batch)."""
    rule.set_column_stats(colsum, count, call.key_abs, call.prompt)


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
def run(steps, call: AttentionCall, query, key, value, stats, config=None, chunk=None, causal: bool = True):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> out (B, Q, H_q, D) in query.dtype.

    ``steps``: the call's :class:`~attnsteer.plan.Steps` (score and weight rules). With ``causal``
    (decoder self-attention), a chunk of rows q0..q1 only reads the keys up to its last row's
    position: the keys after it are masked anyway, so prefill does half the work. A mask that lets
    some row see a later key (Gemma 3's bidirectional image blocks) turns that off.
    """
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    q, k, v = query.float(), key.float(), value.float()
    info, mask = call.info, call.mask
    causal = causal and not sees_later_keys(mask, info, q_len, k_len, query.device)
    score_rules, weight_rules = steps.score, steps.weight
    start = _first_steered_row(steps, call)
    size = chunk or chunk_rows(b, hq, q_len - start, k_len)
    spans = [(s, min(s + size, q_len)) for s in range(start, q_len, size)]

    def key_limit(q1: int) -> int:
        """Keys a causal chunk ending at row q1 can see: indices < limit."""
        return min(k_len, info.past_len + q1 - call.key_offset) if causal else k_len

    def probs(q0: int, q1: int, record: bool = False):
        """Normalised weights of rows q0..q1 over their keys: (B, H_q, C, K') float32 (K' <= K) and
        their RowView."""
        limit = key_limit(q1)
        visible, bias = mask.chunk(q0, q1, query.device)
        if limit < k_len:
            visible = visible[..., :limit] if visible is not None else None
            bias = bias[..., :limit] if bias is not None else None
        rows = call.rows(visible, q0, rows=q1 - q0, limit=limit)
        qc, kc = q[:, :, q0:q1], k[:, :, :limit]
        s = soft_cap(grouped_qk(qc, kc) * call.scaling, call.softcap)
        if bias is not None:
            s = s + bias
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        if score_rules:
            s = apply_score_rules(score_rules, s, qc, kc, rows, call, stats if record else None)
        p = torch.softmax(s, dim=-1)
        if visible is not None:
            p = p.nan_to_num(0.0)  # fully masked rows (padding queries): 0, not NaN
        return p, rows

    out = torch.empty(b, q_len, hq, d, dtype=query.dtype, device=query.device)
    if start:  # rows no rule can change: the model's plain attention, by the fused kernel
        out[:, :start] = fused_attention(call, query, key, value)[:, :start]
        if not spans:
            return out
    needs_columns = [i for i, r in enumerate(weight_rules) if r.kind == "group" and r.column_stats and call.is_prefill]
    if len(spans) == 1 and not start:
        # The whole map fits in one chunk: column statistics come from the same weights.
        p, rows = probs(0, q_len, record=True)
        for i, rule in enumerate(weight_rules):
            if i in needs_columns:
                set_column_stats(rule, *_columns(p, rows), call)
            p = apply_weight_rules([rule], p, rows, call, stats)
        out[:] = grouped_pv(p, v).transpose(1, 2).to(query.dtype)
        return out

    # Column passes (QK^T only): rules that need statistics of the whole map entering them.
    for i in needs_columns:
        colsum = torch.zeros(b, hq, k_len, device=query.device)
        count = None
        for q0, q1 in spans:
            p, rows = probs(q0, q1)
            p = apply_weight_rules(weight_rules[:i], p, rows, call)
            limit = p.shape[-1]
            part_sum, part_count = _columns(p, rows)
            colsum[..., :limit] += part_sum
            if count is None:
                count = torch.zeros(*part_count.shape[:-1], k_len, device=query.device)
            count[..., :limit] += part_count
        set_column_stats(weight_rules[i], colsum, count, call)

    for q0, q1 in spans:
        p, rows = probs(q0, q1, record=True)
        p = apply_weight_rules(weight_rules, p, rows, call, stats)
        out[:, q0:q1] = grouped_pv(p, v[:, :, : p.shape[-1]]).transpose(1, 2).to(query.dtype)
    return out


def _first_steered_row(steps, call: AttentionCall) -> int:
    """The first query row (index into the call) any rule may change: 0 unless the call carries only
    score rules that each name the lowest row they change (:meth:`ScoreRule.first_row`, e.g. the
    prompt's last row) and no soft-cap (the fused kernel computes the rows before it)."""
    if steps.weight or call.softcap or not steps.score:
        return 0
    firsts = [rule.first_row(call.prompt) for rule in steps.score]
    if any(first is None for first in firsts):
        return 0
    return min(max(min(firsts) - call.info.past_len, 0), call.q_len)


def _columns(p: torch.Tensor, rows: RowView):
    """(summed weights over the real query rows (B, H, K), real rows seeing each key (B|1, 1, K)):
    padding query rows do not vote."""
    visible = rows.visible
    if rows.row_valid is not None:
        p, visible = p * rows.row_valid, visible & rows.row_valid
    return p.sum(dim=-2), visible.sum(dim=-2, dtype=torch.float32)
