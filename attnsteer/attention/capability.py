"""What a backend can run, as data the router reads: one :class:`Capability` per backend.

A backend claims rule kinds (never methods), devices, dtypes, the masks it reads, whether it
implements logit soft-capping, and how many weight rules one call may carry. :meth:`refusal`
checks a call against the table and says why not, so the router can pick the next backend (or,
for a forced backend, raise naming the reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .structure import call_structure


@dataclass(frozen=True)
class Capability:
    """name: the backend's name (``apply(..., backend=name)``); kinds: rule kinds it implements
    (``score``, ``group``, ``reweight``; head, key and model rules run outside every backend);
    devices: device types (None: any); dtypes: query dtypes (None: any; the backend computes in
    float32 and casts back); softcap: implements logit soft-capping; any_mask: reads any mask
    (else only causal + left padding + a sliding window); weight_rules: the most weight rules one
    call may carry (None: any); max_head_dim: the largest head dim (None: any); score_forms: the
    forms of score rule it runs (None: every score rule; ``{"key_scale"}``: only
    :class:`~attnsteer.methods.rules.KeyScaleRule`); score_rules: the most score rules one call may
    carry (None: any)."""

    name: str
    kinds: frozenset
    devices: frozenset | None = None
    dtypes: frozenset | None = None
    softcap: bool = True
    any_mask: bool = True
    weight_rules: int | None = None
    max_head_dim: int | None = None
    score_forms: frozenset | None = None
    score_rules: int | None = None

    def refusal(self, steps, call) -> str | None:
        """Why this backend cannot run ``steps`` (:class:`~attnsteer.plan.Steps`) on ``call``
        (:class:`~attnsteer.attention.geometry.AttentionCall`), or None when the table allows it.
        The mask's structure (when ``any_mask`` is false) is checked last: it costs a pass over the
        mask, once per forward."""
        kinds = {rule.kind for rule in (*steps.score, *steps.weight)}
        missing = sorted(kinds - self.kinds)
        if missing:
            return f"{' and '.join(missing)} rule{'s' if len(missing) > 1 else ''} (not implemented by {self.name})"
        if self.score_forms is not None:
            forms = sorted({rule.form for rule in steps.score} - self.score_forms)
            if forms:
                return f"score rules of form {', '.join(forms)} (not implemented by {self.name})"
        if self.score_rules is not None and len(steps.score) > self.score_rules:
            return f"{len(steps.score)} score rules on one layer ({self.name} runs {self.score_rules})"
        if self.weight_rules is not None and len(steps.weight) > self.weight_rules:
            return f"{len(steps.weight)} weight rules on one layer ({self.name} runs {self.weight_rules})"
        if self.devices is not None and call.device.type not in self.devices:
            return f"{call.device.type} tensors ({self.name} runs on {', '.join(sorted(self.devices))})"
        if self.dtypes is not None and call.dtype not in self.dtypes:
            return f"dtype {str(call.dtype).removeprefix('torch.')}"
        if self.max_head_dim is not None and call.head_dim > self.max_head_dim:
            return f"head dim {call.head_dim} > {self.max_head_dim}"
        if call.heads % call.kv_heads or call.k_len == 0:
            return "query heads not a multiple of the kv heads, or no keys"
        if call.softcap and not self.softcap:
            return "logit soft-capping"
        if not self.any_mask:
            structure = call_structure(call)
            if isinstance(structure, str):
                return structure
        return None


HALF_AND_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})
