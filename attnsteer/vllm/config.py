"""The recipe that steers one vLLM engine: where it is named, what vLLM can run, and its plans.

A recipe is named by ``additional_config={"attnsteer": {"recipe": ...}}`` (``--additional-config``)
or, for every process of the engine, ``$ATTNSTEER_RECIPE`` (a built-in name, a YAML path, a hub
repo). Everything that can be refused is refused before the first request: methods vLLM cannot
run faithfully, parameters that need per-request state, engine settings that would split a
prompt that ACT must see whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from .. import archs
from ..errors import RecipeError, UnsupportedModelError
from ..plan import LayerPlan, plans_for
from ..recipe import Recipe, load_recipe
from . import RECIPE_ENV

LOG = logging.getLogger("attnsteer.vllm")

# method -> why vLLM cannot run it faithfully (methods not listed run)
REFUSED = {
    "var": "its image keys and hidden-state sinks are per request; vLLM's multimodal placeholders are not wired "
    "into attnsteer's attention backend yet",
    "agla": "it decodes two views of every image in lockstep and assembles their logits; vLLM schedules each "
    "request as one sequence",
}


def engine_section(vllm_config=None) -> dict:
    """``additional_config["attnsteer"]`` checked: ``recipe`` (the engine's recipe) and
    ``per_request_recipes`` (requests may name their own); ``{}`` when absent."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    section = extra.get("attnsteer") if isinstance(extra, dict) else None
    if section is None:
        return {}
    allowed = {"recipe", "per_request_recipes"}
    if not isinstance(section, dict) or not section or set(section) - allowed:
        raise RecipeError(
            f'additional_config["attnsteer"]: got {section!r}; expected keys {sorted(allowed)}: "recipe" (built-in '
            'name, YAML path or hub repo) and/or "per_request_recipes": true. Fix: e.g. --additional-config '
            '\'{"attnsteer": {"recipe": "softplus-gentle"}}\''
        )
    if not isinstance(section.get("per_request_recipes", False), bool):
        raise RecipeError(
            f'additional_config["attnsteer"]["per_request_recipes"]: got {section["per_request_recipes"]!r}; '
            "expected true or false"
        )
    return section


def recipe_source(vllm_config=None) -> str | None:
    """The recipe named for this engine: ``additional_config["attnsteer"]["recipe"]``, else
    ``$ATTNSTEER_RECIPE``; None when neither is set (the backend then delegates unchanged)."""
    section = engine_section(vllm_config)
    if "recipe" in section:
        return section["recipe"]
    return os.environ.get(RECIPE_ENV) or None


def check_methods(recipe: Recipe) -> None:
    """Refuse what vLLM cannot run faithfully (docs/vllm.md), naming the intervention and the fix."""
    for i, iv in enumerate(recipe.interventions):
        where = f"{recipe.name}.interventions[{i}]"
        if iv.method in REFUSED:
            raise RecipeError(
                f"{where}.method: {iv.method} does not run inside vLLM: {REFUSED[iv.method]}. Fix: steer with "
                "attnsteer.apply on the Hugging Face model, or use act / softplus / vhr (selection: fixed) / pai on "
                "focus spans in vLLM"
            )
        if iv.method == "vhr" and iv.params.get("selection") != "fixed":
            raise RecipeError(
                f"{where}.params.selection: per_prompt VHR runs a text-only copy of every prompt in the same "
                "prefill, which a serving engine does not do. Fix: selection: fixed with the heads written by "
                "`attnsteer calibrate vhr --fixed-heads`"
            )
        if iv.method == "pai" and iv.params.get("gamma") is not None:
            raise RecipeError(
                f"{where}.params.gamma: PAI's logit contrast needs a second, text-only decode stream per request, "
                "which a serving engine does not run. Fix: gamma: null (the attention step alone)"
            )
        if iv.method == "act" and iv.params.get("apply_to") == "all":
            raise RecipeError(
                f"{where}.params.apply_to: all reuses each prompt's sinks in its decode steps, per-request state "
                "the vLLM backend does not keep yet. Fix: apply_to: prefill"
            )


def check_environment_recipe() -> Recipe | None:
    """At plugin load (every process): a recipe named by ``$ATTNSTEER_RECIPE`` is loaded and its
    methods checked now, so a refused one fails as the engine starts; logs its name and hash."""
    source = os.environ.get(RECIPE_ENV)
    if not source:
        return None
    recipe = load_recipe(source)
    check_methods(recipe)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise UnsupportedModelError(
            f"${RECIPE_ENV}={source!r}: attnsteer's vLLM backend wraps vLLM's CPU attention (CPU_ATTN) in this "
            "release; the GPU backends (FlashAttention, FlexAttention, Triton) are not wrapped yet. Fix: steer on "
            "the Hugging Face path (attnsteer.apply) on GPUs"
        )
    LOG.warning("attnsteer: vLLM steered by recipe %r (hash %s)", recipe.name, recipe.hash)
    return recipe


@dataclass
class EngineSteering:
    """One engine's recipes, resolved on its model for this tensor-parallel rank.

    plans: decoder layer -> LayerPlan of the engine's recipe (empty without one); head masks are
    this rank's local heads (global query head ``rank * H_local + i`` is local head ``i``).
    per_request: requests may name a recipe of their own (``SamplingParams.extra_args``).
    """

    recipe: Recipe | None
    plans: dict[int, LayerPlan]
    needs_whole_prompt: bool  # ACT: a prompt's column means need all of its rows in one forward
    needs_requests: bool = False  # focus spans or recipes per request (SamplingParams.extra_args)
    per_request: bool = False
    vllm_config: object = None
    arch: archs.ResolvedArch | None = None
    tp: tuple[int, int] = (0, 1)
    _by_request: dict = field(default_factory=dict)

    def request_plans(self, source) -> tuple[dict[int, LayerPlan], bool]:
        """(plans, needs whole prompts) of a recipe a request names, resolved once per engine and
        recipe; raises like the engine's recipe would (refused methods, ACT with chunked prefill)."""
        key = json.dumps(source, sort_keys=True, default=str)
        hit = self._by_request.get(key)
        if hit is None:
            recipe = load_recipe(source)
            hit = self._by_request[key] = _resolve(recipe, self.arch, self.vllm_config, *self.tp)
            LOG.warning("attnsteer: a request's recipe %r (hash %s) steers layers %s", recipe.name, recipe.hash,
                        sorted(hit[0]))  # fmt: skip
        return hit


_RESOLVED: dict[int, EngineSteering | None] = {}


def steering_for(vllm_config, tp_rank: int = 0, tp_size: int = 1) -> EngineSteering | None:
    """The engine's :class:`EngineSteering` (once per process and config), or None when neither
    an engine recipe nor per-request recipes are configured."""
    key = id(vllm_config)
    if key in _RESOLVED:
        return _RESOLVED[key]
    source = recipe_source(vllm_config)
    per_request = bool(engine_section(vllm_config).get("per_request_recipes", False))
    if source is None and not per_request:
        _RESOLVED[key] = None
        return None
    arch = archs.resolve_config(vllm_config.model_config.hf_config)
    if per_request and getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise RecipeError(
            'additional_config["attnsteer"]["per_request_recipes"]: with recipes per request, the KV cache of a '
            "prompt depends on its recipe, and prefix caching would hand one request's blocks to another. Fix: "
            "start the engine with enable_prefix_caching=False (--no-enable-prefix-caching)"
        )
    recipe, plans, whole = None, {}, False
    if source is not None:
        recipe = load_recipe(source)
        plans, whole = _resolve(recipe, arch, vllm_config, tp_rank, tp_size)
    roles = any(m.needs_image for plan in plans.values() for m in plan.methods)
    steering = EngineSteering(
        recipe, plans, whole, roles or per_request, per_request, vllm_config, arch, (tp_rank, tp_size)
    )
    _RESOLVED[key] = steering
    if recipe is not None:
        LOG.warning(
            "attnsteer: vLLM rank %d/%d steers layers %s with recipe %r (hash %s)"
            + (" on the focus spans requests give" if roles else ""),
            tp_rank,
            tp_size,
            sorted(plans),
            recipe.name,
            recipe.hash,
        )
    if per_request:
        LOG.warning("attnsteer: vLLM rank %d/%d takes a recipe per request (extra_args)", tp_rank, tp_size)
    return steering


def _resolve(recipe: Recipe, arch, vllm_config, tp_rank: int, tp_size: int) -> tuple[dict[int, LayerPlan], bool]:
    """(layer -> LayerPlan for this rank, needs whole prompts) of ``recipe``, after every check."""
    check_methods(recipe)
    plans = plans_for(recipe, arch)
    if arch.spec.is_multimodal and any(m.name == "pai" for plan in plans.values() for m in plan.methods):
        raise RecipeError(
            f"recipe {recipe.name!r}: PAI's image keys would come from vLLM's multimodal placeholders, which are not "
            "wired into attnsteer's backend yet (it steers focus spans a request gives, on text models). Fix: steer "
            "this vision-language model with attnsteer.apply on the Hugging Face path"
        )
    if not plans:
        raise RecipeError(f"recipe {recipe.name!r} steers no layer of this model. Fix: check its layers")
    _localise_heads(plans, arch.num_heads, tp_rank, tp_size)
    whole = any(m.name == "act" for plan in plans.values() for m in plan.methods)
    if whole:
        _check_whole_prompts(vllm_config, recipe)
    return plans, whole


def _localise_heads(plans: dict[int, LayerPlan], num_heads: int, rank: int, size: int) -> None:
    """Cut every method's global head mask to this rank's contiguous block of query heads."""
    if num_heads % size:
        raise UnsupportedModelError(f"{num_heads} query heads do not split over tensor-parallel size {size}")
    local = num_heads // size
    for plan in plans.values():
        for method in plan.methods:
            if method.heads is not None:  # None: every head, on every rank
                method.heads = method.heads[rank * local : (rank + 1) * local].clone()


def _check_whole_prompts(vllm_config, recipe: Recipe) -> None:
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    problems = []
    if getattr(scheduler, "enable_chunked_prefill", False):
        problems.append("chunked prefill is on (--no-enable-chunked-prefill / enable_chunked_prefill=False)")
    if getattr(cache, "enable_prefix_caching", False):
        problems.append("prefix caching is on (--no-enable-prefix-caching / enable_prefix_caching=False)")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding is on")
    if problems:
        raise RecipeError(
            f"recipe {recipe.name!r}: ACT finds each prompt's sinks from the column means of its whole attention "
            "map, so every prompt must reach attention in one forward, but " + "; ".join(problems) + ". Fix: turn "
            "them off for this engine"
        )
