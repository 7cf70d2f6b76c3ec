"""The ``triton`` backend: Triton kernels on CUDA (CPU tensors only under ``TRITON_INTERPRET=1``).

The kernels (:mod:`attnsteer.kernels`) implement rule kinds, never methods:

* **group rules**: pass 1 (QK only) gives each row's log-sum-exp and group masses ``M_g``; the
  rule turns them into factors ``f_g`` (PyTorch, (B, H, Q, G) numbers); pass 2 is fused attention
  with the per-row bias ``log f_g`` on each key's group -- exact, since rescaling a group's mass
  is an additive bias on its scores. A mass-conserving rule's final weights are formed directly
  as ``exp(s + bias - lse)``. A rule with ``column_stats`` first gets the column sums of the
  prefill map (one more QK-only pass with the known LSE). Decode (one query row) is one split-K
  sweep returning each group's mass and normalised output; the rule's factors combine them.
* **reweight rules**: pass 1 also returns the row max; pass 2 forms ``max(N a - o, 0)^p``
  online; decode runs two sweeps.

Masks are causal + left padding (+ a sliding window), taken as a :class:`~attnsteer.kernels.MaskSpec`
(the capability table refuses anything else); fp16 / bf16 / fp32, head dim <= 256, one weight rule
per call, no soft-capping.

Before the kernels serve a (rule kind, dtype, head dim) for the first time in a process, they check
themselves on a small synthetic call against the chunked path (:mod:`attnsteer.attention.selfcheck`;
``ATTNSTEER_TRITON_SELFCHECK=0`` skips it). A combination that fails its check, or whose kernel
fails to compile or launch on a real call, is warned once and its calls go to the next backend for
the rest of the process (with ``strict``: raised instead); other combinations keep the kernels.
"""

from __future__ import annotations

import torch

from .. import kernels as K
from . import chunked, selfcheck
from .capability import HALF_AND_FLOAT, Capability
from .geometry import AttentionCall
from .router import Refusal
from .structure import call_structure

NAME = "triton"
CAPABILITY = Capability(
    name=NAME,
    kinds=frozenset({"group", "reweight"}),
    devices=frozenset({"cuda", "cpu"}),  # cpu: the interpreter only (``unavailable`` says so)
    dtypes=HALF_AND_FLOAT,
    softcap=False,
    any_mask=False,
    weight_rules=1,
    max_head_dim=K.MAX_HEAD_DIM,
)


def unavailable(config, call) -> str | None:
    """Why the kernels cannot serve this call in this process, or None (a (rule kind, dtype, head
    dim) that failed is refused by :func:`run`, which knows the rule)."""
    if config.triton == "off":
        return "Triton kernels turned off (ATTNSTEER_TRITON=0)"
    if not K.available():
        return "triton is not installed"
    asked = config.triton == "interpret" or config.backend == "triton"
    if call.device.type == "cpu" and not (asked and K.interpreting()):
        return "cpu tensors (the kernels run on CPU only under TRITON_INTERPRET=1, with backend='triton' or ATTNSTEER_TRITON=1)"
    return None


def run(steps, call: AttentionCall, query, key, value, stats, config):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> out (B, Q, H_q, D) in query.dtype, or a
    :class:`Refusal` when the call's (rule kind, dtype, head dim) failed its self-check or a kernel
    failed (now or earlier in the process)."""
    rule = steps.weight[0]
    if config.selfcheck:
        failed = selfcheck.ensure(NAME, rule.kind, call, kernel_output, strict=config.strict)
    else:
        failed = selfcheck.failure(NAME, rule.kind, call.dtype, call.head_dim)
    if failed:
        return Refusal(failed)
    try:
        out, rows = compute(steps, call, query, key, value)
    except K.KernelLaunchError as exc:
        if config.strict:
            raise
        return Refusal(selfcheck.record_failure(NAME, rule.kind, call.dtype, call.head_dim, f"kernel failure: {exc}"))
    stats.record(rule.method, rows)
    return out


def compute(steps, call: AttentionCall, query, key, value):
    """The kernels' computation of the call's one weight rule -> (out (B, Q, H_q, D), steered rows);
    raises :class:`~attnsteer.kernels.KernelLaunchError` when a kernel fails."""
    rule = steps.weight[0]
    return (_group if rule.kind == "group" else _reweight)(rule, query, key, value, call_structure(call), call)


def kernel_output(steps, call: AttentionCall, query, key, value) -> torch.Tensor:
    """:func:`compute`'s output alone (what the self-check compares)."""
    return compute(steps, call, query, key, value)[0]


def _steer_flags(rule, call: AttentionCall) -> torch.Tensor:
    """int8 (H,) 1 for the rule's steered query heads, kept per prompt and device."""
    return call.prompt.memo(
        (rule.key, "triton heads", str(call.device)),
        (rule.heads,),
        lambda: (torch.ones(call.heads, dtype=torch.int8) if rule.heads is None else rule.heads.to(torch.int8)).to(
            call.device
        ),
    )


def _groups(rule, call: AttentionCall) -> K.Groups:
    return K.Groups(chunked.group_table(rule, call), rule.num_groups, offset=call.key_offset)


def _factors(rule, masses: torch.Tensor, call: AttentionCall):
    """(steered bool (B, H, Q, 1), factors (B, H, Q, G)) of the rule on masses (B, H, Q, G)."""
    steered, factors = rule.factors(masses, call.prompt)
    return chunked.steered_rows(rule, steered, call.rows(None, 0, rows=call.q_len), call), factors


def _group(rule, query, key, value, struct, call: AttentionCall):
    spec, scaling = struct.spec, call.scaling
    if rule.column_stats and call.is_prefill:
        lse, _ = K.row_stats(query, key, spec, scaling)
        colsum, count = K.column_stats(query, key, lse, spec, scaling)
        chunked.set_column_stats(rule, colsum, count, call)
        _, masses = K.row_stats(query, key, spec, scaling, groups=_groups(rule, call), lse=lse)
    elif call.q_len == 1 and not call.is_prefill:
        out, (masses, outputs) = K.decode(query, key, value, spec, scaling, groups=_groups(rule, call))
        steered, factors = _factors(rule, masses[:, :, None, :], call)  # (B, H, 1, 1), (B, H, 1, G)
        new = (factors * masses[:, :, None, :]).unsqueeze(-1).mul(outputs[:, :, None]).sum(-2)  # (B, H, 1, D)
        out = torch.where(steered.transpose(1, 2), new.transpose(1, 2).to(out.dtype), out)
        return out, steered.sum()
    else:
        lse, masses = K.row_stats(query, key, spec, scaling, groups=_groups(rule, call))
    steered, factors = _factors(rule, masses, call)
    bias = torch.where(steered, torch.log(factors), torch.zeros_like(factors))
    out, _ = K.attention(
        query,
        key,
        value,
        spec,
        scaling,
        groups=_groups(rule, call),
        bias=bias,
        lse=lse if rule.conserves_mass else None,
    )
    return out, steered.sum()


def _reweight(rule, query, key, value, struct, call: AttentionCall):
    args = K.ReweightArgs(
        power=rule.power, offset=rule.offset, free_rows=rule.free_rows, steer=_steer_flags(rule, call), rel0=struct.rel0
    )
    if call.q_len == 1 and not call.is_prefill:
        out, modified = K.decode(query, key, value, struct.spec, call.scaling, reweight=args)
        return out, modified.sum()
    args.lse, _, args.rowmax = K.row_stats(query, key, struct.spec, call.scaling, with_max=True)
    out, modified = K.attention(query, key, value, struct.spec, call.scaling, reweight=args)
    return out, modified.sum()
