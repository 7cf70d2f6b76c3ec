"""Which request each row of an attention call belongs to, and what the request asked for.

vLLM's attention call carries rows, not requests. Its model runner knows, at every step, the
request behind row ``r`` of the attention metadata (``input_batch.req_ids[r]``) with its
``SamplingParams``; :func:`install` wraps the runner (V1: ``_build_attention_metadata``; V2:
``add_requests`` and ``prepare_attn``, :func:`attnsteer.vllm.compat.wrap_model_runners`) in the
worker (at run time, nothing on disk) to record them for the step. A request passes per-request
steering inputs as ``SamplingParams(extra_args={"attnsteer": {...}})``: ``"focus": [[start, end],
...]``, prompt token spans playing the image role (PAI), as ``handle.focus(mask)`` does on the
Hugging Face path; ``"recipe"``, a recipe of its own when the engine takes per-request recipes.

A request's image keys are vLLM's own multimodal placeholders: every image (or video) item of the
request (``mm_features`` of the runner's request state) covers ``mm_position.offset ..  + length`` of the
prompt, of which the positions ``mm_position.is_embed`` marks (all, when None) hold its embeddings;
those are the positions holding the family's image token on the Hugging Face path. Focus spans, when
a request gives them, take the place of its image keys (as ``handle.focus`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import ContextStore
from ..errors import SteeringError
from ..plan import LayerPlan
from ..roles import PromptRoles
from . import compat


@dataclass
class RequestFacts:
    """One request of the current step: its id, prompt length and focus roles (or None)."""

    req_id: str
    prompt_len: int
    roles: PromptRoles | None
    recipe: object = None  # the recipe the request names (per-request recipes), or None


_STEP: list[RequestFacts] = []  # row r of this step's attention metadata -> its request
_FACTS: dict[str, RequestFacts] = {}  # request id -> its facts, built at its first step
# request id -> the PromptState its methods keep from its prefill for its decode steps (ACT's sinks
# with apply_to: all, VAR's hidden-state sinks): the per-request context of the rule kinds
STATES = ContextStore()
_STEPS = [0]  # steps this worker has built attention metadata for
_PREFILLED: dict[str, int] = {}  # request id -> the step whose prefill started its current PromptState
_DUMMY = [False]  # this step is a dummy step (no requests)
_installed = False
_MODALITIES: tuple[str, ...] = ("image",)  # placeholder modalities whose positions are image keys
_PREPARE: list = []  # callables(runner), run once before the first step (e.g. VAR's decoder-layer hooks)


def install(modalities: tuple[str, ...] = ("image",), prepare=None) -> None:
    """Wrap the model runner once per worker process (idempotent; :func:`attnsteer.vllm.compat.wrap_model_runners`,
    V1 or V2); ``modalities``: the multimodal items whose placeholders are image keys (``("image", "video")``
    where the family's video tokens are image keys on the Hugging Face path); ``prepare(runner)``: run once,
    before the first step, when the runner holds the loaded model."""
    global _installed, _MODALITIES
    _MODALITIES = modalities
    if prepare is not None and prepare not in _PREPARE:
        _PREPARE.append(prepare)
    if _installed:
        return
    compat.wrap_model_runners(_begin_step)
    _installed = True


def _begin_step(runner, rows, held) -> None:
    """Before a step's attention metadata: ``rows`` the :class:`~attnsteer.vllm.compat.RequestView` of
    each request in row order (None: a dummy step), ``held`` the ids the runner holds."""
    while _PREPARE:
        _PREPARE[0](runner)
        _PREPARE.pop(0)
    for gone in [r for r in _FACTS if r not in held]:  # finished or aborted
        del _FACTS[gone]
    STATES.keep_only(held)
    for gone in [r for r in _PREFILLED if r not in held]:
        del _PREFILLED[gone]
    _STEPS[0] += 1
    _DUMMY[0] = rows is None
    _STEP[:] = [] if rows is None else [_facts_of(view) for view in rows]


def prompt_state(facts: RequestFacts, prefill: bool):
    """The request's :class:`~attnsteer.context.PromptState`: a fresh one (with its image keys) at the
    first layer that sees its prefill in this step, the same one at every later layer and decode step."""
    if prefill and _PREFILLED.get(facts.req_id) != _STEPS[0]:
        _PREFILLED[facts.req_id] = _STEPS[0]
        return STATES.new_prompt(facts.req_id, facts.roles)
    return STATES[facts.req_id]


def request_at(row: int) -> RequestFacts | None:
    """The facts of row group ``row`` of this step's metadata; None in a dummy step (profiling, CUDA-graph
    capture), whose outputs vLLM discards."""
    if _DUMMY[0]:
        return None
    if row >= len(_STEP):
        raise SteeringError(
            f"attention row group {row} has no request recorded for this step ({len(_STEP)} recorded); "
            "attnsteer cannot tell which request it belongs to"
        )
    return _STEP[row]


def plan_for_request(steering, layer: int, row: int, subsets: dict):
    """(the LayerPlan steering the request of attention row ``row`` on ``layer`` or None, whether its
    recipe needs whole prompts, its :class:`RequestFacts` or None): the request's own recipe when it
    names one, else the engine's (``steering``: the engine's :class:`~attnsteer.vllm.config.Steering`);
    methods needing image keys only when the request has some (focus spans or image placeholders).
    ``subsets``: the caller's cache, id(plan) -> that plan without its image-key methods."""
    plans, whole = steering.plans, steering.needs_whole_prompt
    facts = request_at(row) if steering.needs_requests else None
    if facts is not None and facts.recipe is not None:
        if not steering.per_request:
            raise SteeringError(
                f'request {facts.req_id}: extra_args["attnsteer"]["recipe"] names a recipe, but this engine takes '
                'none per request. Fix: start it with additional_config={"attnsteer": {"per_request_recipes": '
                "true}} (and enable_prefix_caching=False)"
            )
        plans, whole = steering.request_plans(facts.recipe)
    plan = plans.get(layer)
    if plan is None or not any(m.needs_image for m in plan.methods) or (facts is not None and facts.roles is not None):
        return plan, whole, facts
    if id(plan) not in subsets:
        subset = subsets[id(plan)] = LayerPlan(layer)
        subset.methods = [m for m in plan.methods if not m.needs_image]
    return subsets[id(plan)], whole, facts


def check_whole_prompt(layer: int, whole: bool, past: int, rows: int, prompt_len: int) -> None:
    """Raise when a request whose recipe needs whole prompts (``whole``: the flag
    :func:`plan_for_request` gives for *this* request) reaches attention with a chunk of its prompt
    of ``rows`` rows after ``past`` tokens (chunked prefill, a prefix-cache hit), i.e. with
    ``0 < past < prompt_len``; several rows after the whole prompt (a recomputed preempted request's
    generated tokens) are decode rows."""
    if whole and rows > 1 and 0 < past < prompt_len:
        raise SteeringError(
            f"layer {layer}: a request reached attention as a prompt chunk after {past} tokens (chunked prefill or "
            "a prefix-cache hit), and its recipe has methods that read each prompt whole in one forward (they declare "
            "whole_prompt). Fix: disable chunked prefill "
            "and prefix caching for this engine"
        )


def _facts_of(state: compat.RequestView) -> RequestFacts:
    """The request's facts, built at its first step and kept (its prompt, inputs and placeholders
    do not change while vLLM holds it)."""
    facts = _FACTS.get(state.req_id)
    if facts is None:
        facts = _FACTS[state.req_id] = _facts(state)
    return facts


def _facts(state: compat.RequestView) -> RequestFacts:
    params = state.sampling_params
    extra = (getattr(params, "extra_args", None) or {}).get("attnsteer") or {}
    prompt_len = state.prompt_len
    spans = extra.get("focus")
    if spans is not None:
        roles = focus_roles(spans, prompt_len)
    else:
        roles = placeholder_roles(state.mm_features, prompt_len, _MODALITIES)
    return RequestFacts(state.req_id, prompt_len, roles, extra.get("recipe"))


def placeholder_roles(features, prompt_len: int, modalities=("image",)) -> PromptRoles | None:
    """Image keys (1, prompt_len) of a request from its multimodal items (``MultiModalFeatureSpec``:
    ``modality``, ``mm_position`` with ``offset``, ``length``, ``is_embed`` bool (length,) or None);
    None when it has no item of ``modalities``."""
    mask = torch.zeros(1, prompt_len, dtype=torch.bool)
    for feature in features:
        modality, offset, length, embed = compat.placeholder_span(feature)
        if modality not in modalities:
            continue
        if offset < 0 or offset + length > prompt_len:
            raise SteeringError(
                f"a {modality} placeholder at {offset}..{offset + length} lies outside the "
                f"prompt of {prompt_len} tokens; attnsteer cannot tell which keys are image keys"
            )
        span = torch.ones(length, dtype=torch.bool) if embed is None else embed.to("cpu", torch.bool)
        mask[0, offset : offset + length] |= span
    return PromptRoles(mask) if bool(mask.any()) else None


REQUEST_KEYS = ("focus", "recipe")


def check_request(vllm_config, extra, prompt_len: int) -> None:
    """A request's ``extra_args["attnsteer"]`` against its prompt of ``prompt_len`` tokens and the
    engine's steering, as vLLM admits it; raises an AttnsteerError naming the field and the fix."""
    from .config import steering_for

    where = 'extra_args["attnsteer"]'
    if not isinstance(extra, dict) or not extra or set(extra) - set(REQUEST_KEYS):
        raise SteeringError(
            f"{where}: got {extra!r}; expected a dict with keys among {list(REQUEST_KEYS)}: "
            '"focus": [[start, end], ...] prompt spans, "recipe": a recipe of its own'
        )
    steering = steering_for(vllm_config, announce=False)
    if steering is None:
        raise SteeringError(
            f"{where}: this engine runs without an attnsteer recipe and takes none per request, so these inputs "
            'would change nothing. Fix: start it with additional_config={"attnsteer": {"recipe": ...}} or '
            '{"per_request_recipes": true}'
        )
    plans = steering.plans
    if "recipe" in extra:
        if not steering.per_request:
            raise SteeringError(
                f'{where}["recipe"]: this engine takes no recipe per request. Fix: start it with '
                'additional_config={"attnsteer": {"per_request_recipes": true}} (and enable_prefix_caching=False)'
            )
        plans, _ = steering.request_plans(extra["recipe"])
    if "focus" in extra:
        focus_roles(extra["focus"], prompt_len)
        if not any(m.needs_image for plan in plans.values() for m in plan.methods):
            raise SteeringError(
                f'{where}["focus"]: the recipe steering this request has no method that reads focus spans '
                "(pai, var), so they would change nothing. Fix: drop the spans or use such a recipe"
            )


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
