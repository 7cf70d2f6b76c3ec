"""What the fused backends share about routing a call: which single method a fast path may run,
and the counters that say which path ran.

Each call through a fast path is counted in :data:`COUNTERS` as ``"<path>/<rule>/<phase>"``
(``triton/act/prefill``, ``flash/softplus/decode``, ...) and each fallback to the generic chunked
path as ``"fallback/<reason>"``, so benchmarks and tests can tell what ran.
"""

from __future__ import annotations

import collections

from .fused import fused_attention
from .structure import mask_structure

COUNTERS: collections.Counter = collections.Counter()


def reset_counters() -> None:
    COUNTERS.clear()


def single_weight_step(plan, is_prefill: bool, rules):
    """The one weight-level step of this call if a fast path with glue for ``rules`` (method
    ``kernel_rule`` names) can run it alone, else a string saying why not."""
    if plan.score_steps(is_prefill):
        return "score-level step"
    steps = plan.weight_steps(is_prefill)
    if len(steps) != 1:
        return f"{len(steps)} weight steps on one layer"
    method = steps[0]
    if method.kernel_rule not in rules:
        return f"method {method.name}" + (f" ({method.kernel_rule})" if method.kernel_rule else "")
    return method


def fast_path_inputs(route, query, key, mask, info, softcap=None):
    """(method, Structure) when a fast path can run this call -- ``route`` is the method its router
    chose, or the reason it refused -- else the reason (a string): the route's, logit soft-capping
    (no fast path implements it), or why the mask is not causal + left padding (+ window)."""
    if softcap:
        return "logit soft-capping"
    if isinstance(route, str):
        return route
    b, _, q_len, _ = query.shape
    struct = mask_structure(mask, info, b, q_len, key.shape[2], query.device)
    return struct if isinstance(struct, str) else (route, struct)


def fallback(reason: str, plan, query, key, value, mask, scaling, info, stats, softcap=None):
    """Count the reason and run the call on the generic chunked path (exact, slower)."""
    COUNTERS[f"fallback/{reason}"] += 1
    return fused_attention(plan, query, key, value, mask, scaling, info, stats, softcap=softcap)
