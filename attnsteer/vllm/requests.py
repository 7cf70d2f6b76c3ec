"""Which request each row of an attention call belongs to, and what the request asked for.

vLLM's attention call carries rows, not requests. Its model runner knows, at every step, the
request behind row ``r`` of the attention metadata (``input_batch.req_ids[r]``) with its
``SamplingParams``; :func:`install` wraps the runner's ``_build_attention_metadata`` in the worker
(at run time, nothing on disk) to record them for the step. A request passes per-request
steering inputs as ``SamplingParams(extra_args={"attnsteer": {...}})``: ``"focus": [[start, end],
...]``, prompt token spans playing the image role (PAI), as ``handle.focus(mask)`` does on the
Hugging Face path; ``"recipe"``, a recipe of its own when the engine takes per-request recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import CompatibilityError
from ..errors import SteeringError
from ..roles import PromptRoles


@dataclass
class RequestFacts:
    """One request of the current step: its id, prompt length and focus roles (or None)."""

    req_id: str
    prompt_len: int
    roles: PromptRoles | None
    recipe: object = None  # the recipe the request names (per-request recipes), or None


_STEP: list[RequestFacts] = []  # row r of this step's attention metadata -> its request
_installed = False


def install() -> None:
    """Wrap the model runner once per worker process (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_build_attention_metadata", None)
    if original is None:
        raise CompatibilityError(
            "vLLM model runner",
            "GPUModelRunner._build_attention_metadata is gone; per-request steering inputs "
            "cannot be matched to attention rows",
        )

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        _STEP[:] = [_facts(self.requests[r]) for r in list(self.input_batch.req_ids[:num_reqs])]
        return original(self, num_tokens, num_reqs, *args, **kwargs)

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    _installed = True


def request_at(row: int) -> RequestFacts:
    if row >= len(_STEP):
        raise SteeringError(
            f"attention row group {row} has no request recorded for this step ({len(_STEP)} recorded); "
            "attnsteer cannot tell which request it belongs to"
        )
    return _STEP[row]


def _facts(state) -> RequestFacts:
    params = getattr(state, "sampling_params", None)
    extra = (getattr(params, "extra_args", None) or {}).get("attnsteer") or {}
    prompt_len = int(state.num_prompt_tokens)
    spans = extra.get("focus")
    roles = None if spans is None else focus_roles(spans, prompt_len)
    return RequestFacts(state.req_id, prompt_len, roles, extra.get("recipe"))


def focus_roles(spans, prompt_len: int) -> PromptRoles:
    """``[[start, end), ...]`` prompt positions -> PromptRoles (1, prompt_len)."""
    fix = 'Fix: SamplingParams(extra_args={"attnsteer": {"focus": [[start, end], ...]}}) with 0 <= start < end <= prompt length'
    if not isinstance(spans, list) or not spans:
        raise SteeringError(
            f'extra_args["attnsteer"]["focus"]: got {spans!r}; expected a non-empty list of spans. {fix}'
        )
    mask = torch.zeros(1, prompt_len, dtype=torch.bool)
    for span in spans:
        ok = isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(x, int) for x in span)
        if not ok or not 0 <= span[0] < span[1] <= prompt_len:
            raise SteeringError(
                f'extra_args["attnsteer"]["focus"]: span {span!r} is not [start, end) within the prompt of '
                f"{prompt_len} tokens. {fix}"
            )
        mask[0, span[0] : span[1]] = True
    return PromptRoles(mask)
