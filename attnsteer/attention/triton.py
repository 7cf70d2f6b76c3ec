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
per call, no soft-capping. A kernel that fails to compile or launch disables the kernels for the
rest of the process with one warning (or raises, with ``strict``); their calls go to the next backend.
"""

from __future__ import annotations

import warnings

import torch

from .. import kernels as K
from ..errors import AttnsteerWarning
from . import chunked
from .capability import HALF_AND_FLOAT, Capability
from .geometry import AttentionCall
from .router import Refusal
from .structure import call_structure

CAPABILITY = Capability(
    name="triton",
    kinds=frozenset({"group", "reweight"}),
    devices=frozenset({"cuda", "cpu"}),  # cpu: the interpreter only (``unavailable`` says so)
    dtypes=HALF_AND_FLOAT,
    softcap=False,
    any_mask=False,
    weight_rules=1,
    max_head_dim=K.MAX_HEAD_DIM,
)

# kernels that failed to compile or launch in this process -> why (their calls take the next backend)
DISABLED: dict[str, str] = {}


def unavailable(config, call) -> str | None:
    """Why the kernels cannot serve this call in this process, or None."""
    if config.triton == "off":
        return "Triton kernels turned off (ATTNSTEER_TRITON=0)"
    if DISABLED:
        return f"Triton kernels disabled after a failure ({next(iter(DISABLED.values()))})"
    if not K.available():
        return "triton is not installed"
    asked = config.triton == "interpret" or config.backend == "triton"
    if call.device.type == "cpu" and not (asked and K.interpreting()):
        return "cpu tensors (the kernels run on CPU only under TRITON_INTERPRET=1, with backend='triton' or ATTNSTEER_TRITON=1)"
    return None


def run(steps, call: AttentionCall, query, key, value, stats, config):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> out (B, Q, H_q, D) in query.dtype, or a
    :class:`Refusal` after a kernel failure."""
    rule = steps.weight[0]
    struct = call_structure(call)
    try:
        out, rows = (_group if rule.kind == "group" else _reweight)(rule, query, key, value, struct, call)
    except K.KernelLaunchError as exc:
        if config.strict:
            raise
        DISABLED[str(exc).split(":")[0]] = str(exc)
        warnings.warn(
            f"attnsteer: a Triton kernel failed ({exc}); this process now computes steered attention without the "
            "kernels. Set ATTNSTEER_TRITON_STRICT=1 to raise instead, and please report it",
            AttnsteerWarning,
            stacklevel=2,
        )
        return Refusal(f"kernel failure: {exc}")
    stats.record(rule.method, rows)
    return out


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
