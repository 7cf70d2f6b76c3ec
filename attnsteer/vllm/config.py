"""The recipe that steers one vLLM engine: where it is named, what vLLM can run, and its plans.

A recipe is named by ``additional_config={"attnsteer": {"recipe": ...}}`` (``--additional-config``)
or, for every process of the engine, ``$ATTNSTEER_RECIPE`` (a built-in name, a YAML path, a hub
repo). Everything that can be refused is refused before the first request: methods vLLM cannot
run faithfully, parameters that need per-request state, engine settings that would split a
prompt that a method must see whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from .. import archs, settings
from ..errors import RecipeError, UnsupportedModelError
from ..methods import METHODS
from ..plan import LayerPlan, plans_for
from ..recipe import Recipe, load_recipe

LOG = logging.getLogger("attnsteer.vllm")

# What vLLM runs is read from each method's declared facts (attnsteer.methods): its rules' kinds (a
# model step -- an extra stream, new logits -- is refused with the step's own reason), ``whole_prompt``
# (needs each prompt in one forward: no chunked prefill, prefix caching or speculation),
# ``prompt_length_dependent`` (no prefix caching) and ``reads_layer_input`` (decoder-layer hooks:
# eager execution).


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
    return settings.current().recipe


def _configured(vllm_config) -> tuple[str | None, bool]:
    """(the engine's recipe source or None, whether requests may name their own)."""
    return recipe_source(vllm_config), bool(engine_section(vllm_config).get("per_request_recipes", False))


_SERVED: dict[int, dict | None] = {}


def served_recipe(vllm_config) -> dict | None:
    """``{"recipe": name, "hash": ..., "per_request_recipes": bool}`` of the engine's steering (what
    ``/v1/models`` and :func:`attnsteer.vllm.recipe_info` show), or None when unsteered."""
    key = id(vllm_config)
    if key not in _SERVED:
        source, per_request = _configured(vllm_config)
        info = None
        if source is not None or per_request:
            recipe = load_recipe(source) if source is not None else None
            info = {
                "recipe": recipe.name if recipe else None,
                "hash": recipe.hash if recipe else None,
                "per_request_recipes": per_request,
            }
        _SERVED[key] = info
    return _SERVED[key]


def check_methods(recipe: Recipe) -> None:
    """Refuse what vLLM cannot run faithfully (docs/vllm.md): an intervention whose method has a
    model step with these parameters, naming the intervention, the step's reason and its fix."""
    for i, iv in enumerate(recipe.interventions):
        # the method's rules with these parameters (on a stand-in layer with every head selected)
        probe = METHODS[iv.method](iv.params, 0, torch.ones(1, dtype=torch.bool))
        step = probe.model_step
        if step is not None:
            raise RecipeError(
                f"{recipe.name}.interventions[{i}]: {iv.method} does not run inside vLLM: {step.serving}, and vLLM "
                f"schedules each request as one sequence. Fix: {step.serving_fix}"
            )
        if probe.rules_of("key"):
            raise RecipeError(
                f"{recipe.name}.interventions[{i}]: {iv.method} edits keys before RoPE (a key rule), which this "
                "plugin does not yet hook into vLLM's key projections, so it would change nothing. Fix: steer with "
                "attnsteer.apply on the Hugging Face model"
            )


def check_environment_recipe() -> Recipe | None:
    """At plugin load (every process): a recipe named by ``$ATTNSTEER_RECIPE`` is loaded and its
    methods checked now, so a refused one fails as the engine starts; logs its name and hash."""
    source = settings.current().recipe
    if not source:
        return None
    recipe = load_recipe(source)
    check_methods(recipe)
    from . import compat

    if not compat.is_cpu_platform():
        check_flex_methods(recipe)
    LOG.warning("attnsteer: vLLM steered by recipe %r (hash %s)", recipe.name, recipe.hash)
    return recipe


def check_flex_methods(recipe: Recipe) -> None:
    """Refuse what the FlexAttention path (GPUs) cannot run, from the rule kinds: a score rule reading
    what a ``score_mod`` never sees, more than one weight rule on a layer (:mod:`attnsteer.vllm.flex_rules`)."""
    from .flex_rules import refusal

    for i, iv in enumerate(recipe.interventions):
        probe = METHODS[iv.method](iv.params, 0, torch.ones(1, dtype=torch.bool))
        why = refusal(probe.rules)
        if why is not None:
            raise RecipeError(
                f"{recipe.name}.interventions[{i}]: {iv.method} does not run on vLLM's FlexAttention path: {why}. "
                "Fix: steer with attnsteer.apply on the Hugging Face model, or serve on the CPU build"
            )


def check_gpu_backend(vllm_config) -> None:
    """At engine start on a GPU platform: a steered engine must run vLLM's FLEX_ATTENTION backend,
    the one attnsteer wraps there (FlashAttention, FlashInfer and Triton offer no hook)."""
    from . import compat

    if compat.is_cpu_platform() or _configured(vllm_config) == (None, False):
        return
    backend = compat.attention_backend_name(vllm_config)
    if backend != "FLEX_ATTENTION":
        raise UnsupportedModelError(
            f"attention backend {backend or 'auto'!r}: attnsteer steers vLLM on GPUs through the FLEX_ATTENTION "
            "backend only (FlashAttention, FlashInfer and Triton attention offer no score or output hook). Fix: "
            "start the engine with --attention-backend FLEX_ATTENTION (attention_config={'backend': 'FLEX_ATTENTION'})"
        )


@dataclass
class EngineSteering:
    """One engine's recipes, resolved on its model for this tensor-parallel rank.

    plans: decoder layer -> LayerPlan of the engine's recipe (empty without one); head masks are
    this rank's local heads (global query head ``rank * H_local + i`` is local head ``i``).
    per_request: requests may name a recipe of their own (``SamplingParams.extra_args``).
    """

    recipe: Recipe | None
    plans: dict[int, LayerPlan]
    needs_whole_prompt: bool  # a method with ``whole_prompt`` (column means, layer inputs of the whole prompt)
    needs_requests: bool = False  # per-request facts: image keys, recipes, prompt lengths
    per_request: bool = False
    vllm_config: object = None
    arch: archs.ResolvedArch | None = None
    tp: tuple[int, int] = (0, 1)
    _by_request: dict = field(default_factory=dict)

    @property
    def input_layers(self) -> set[int] | None:
        """Decoder layers whose entering hidden states a method reads (``reads_layer_input``);
        None (every layer) when requests may name recipes of their own."""
        if not _eager(self.vllm_config):
            return set()  # methods reading layer inputs are refused (torch.compile would trace the hooks away)
        if self.per_request:
            return None
        return {layer for layer, plan in self.plans.items() if any(m.reads_layer_input for m in plan.methods)}

    @property
    def modalities(self) -> tuple[str, ...]:
        """vLLM multimodal items whose placeholders are image keys: images, and videos where the
        family's video tokens are image keys on the Hugging Face path."""
        attrs = self.arch.spec.image_token_attrs if self.arch is not None else ()
        return ("image", "video") if any("video" in attr for attr in attrs) else ("image",)

    def request_plans(self, source) -> tuple[dict[int, LayerPlan], bool]:
        """(plans, needs whole prompts) of a recipe a request names, resolved once per engine and
        recipe; raises like the engine's recipe would (refused methods, whole prompts with chunked prefill)."""
        key = json.dumps(source, sort_keys=True, default=str)
        hit = self._by_request.get(key)
        if hit is None:
            recipe = load_recipe(source)
            hit = self._by_request[key] = _resolve(recipe, self.arch, self.vllm_config, *self.tp)
            LOG.warning("attnsteer: a request's recipe %r (hash %s) steers layers %s", recipe.name, recipe.hash,
                        sorted(hit[0]))  # fmt: skip
        return hit


_RESOLVED: dict[int, EngineSteering | None] = {}


def steering_for(vllm_config, tp_rank: int = 0, tp_size: int = 1, announce: bool = True) -> EngineSteering | None:
    """The engine's :class:`EngineSteering` (once per process and config), or None when neither
    an engine recipe nor per-request recipes are configured; ``announce``: log the recipe and the
    steered layers (the workers do; the front end, which checks requests with it, does not)."""
    key = id(vllm_config)
    if key in _RESOLVED:
        return _RESOLVED[key]
    source, per_request = _configured(vllm_config)
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
    check_gpu_backend(vllm_config)
    recipe, plans, whole = None, {}, False
    if source is not None:
        recipe = load_recipe(source)
        plans, whole = _resolve(recipe, arch, vllm_config, tp_rank, tp_size)
    methods = [m for plan in plans.values() for m in plan.methods]
    roles = any(m.needs_image for m in methods)
    # state kept per request from its prefill to its decode steps: a group rule's groups, layer inputs
    stateful = any(m.reads_layer_input or m.rules_of("group") for m in methods)
    steering = EngineSteering(
        recipe,
        plans,
        whole,
        roles or whole or stateful or per_request,
        per_request,
        vllm_config,
        arch,
        (tp_rank, tp_size),
    )
    _RESOLVED[key] = steering
    if recipe is not None and announce:
        LOG.warning(
            "attnsteer: vLLM rank %d/%d steers layers %s with recipe %r (hash %s)"
            + (" on each request's image placeholders or focus spans" if roles else ""),
            tp_rank,
            tp_size,
            sorted(plans),
            recipe.name,
            recipe.hash,
        )
    if per_request and announce:
        LOG.warning("attnsteer: vLLM rank %d/%d takes a recipe per request (extra_args)", tp_rank, tp_size)
    return steering


def _resolve(recipe: Recipe, arch, vllm_config, tp_rank: int, tp_size: int) -> tuple[dict[int, LayerPlan], bool]:
    """(layer -> LayerPlan for this rank, needs whole prompts) of ``recipe``, after every check."""
    check_methods(recipe)
    from . import compat

    if not compat.is_cpu_platform():
        check_flex_methods(recipe)
    plans = plans_for(recipe, arch)
    if not plans:
        raise RecipeError(f"recipe {recipe.name!r} steers no layer of this model. Fix: check its layers")
    _localise_heads(plans, arch.num_heads, tp_rank, tp_size)
    methods = [m for plan in plans.values() for m in plan.methods]
    _check_engine(vllm_config, recipe, methods)
    return plans, any(m.whole_prompt for m in methods)


def _localise_heads(plans: dict[int, LayerPlan], num_heads: int, rank: int, size: int) -> None:
    """Cut every method's global head mask to this rank's contiguous block of query heads."""
    if num_heads % size:
        raise UnsupportedModelError(f"{num_heads} query heads do not split over tensor-parallel size {size}")
    local = num_heads // size
    for plan in plans.values():
        for method in plan.methods:
            if method.heads is not None:  # None: every head, on every rank
                method.heads = method.heads[rank * local : (rank + 1) * local].clone()


def _eager(vllm_config) -> bool:
    return bool(getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False))


def _reasons(methods, fact: str) -> dict[str, str]:
    """method name -> its declared reason ``fact`` (``whole_prompt`` / ``prompt_length_dependent``)."""
    return {m.name: getattr(m, fact) for m in methods if getattr(m, fact)}


def _check_engine(vllm_config, recipe: Recipe, methods: list) -> None:
    """Refuse engine settings under which the recipe's ``methods`` would give results other than
    the Hugging Face path's: prompts split across forwards (``whole_prompt``), KV blocks shared
    between prompts (``prompt_length_dependent``), decoder-layer hooks compiled away
    (``reads_layer_input``)."""
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    whole = _reasons(methods, "whole_prompt")
    if whole:
        problems = []
        if getattr(scheduler, "enable_chunked_prefill", False):
            problems.append("chunked prefill is on (--no-enable-chunked-prefill / enable_chunked_prefill=False)")
        if getattr(cache, "enable_prefix_caching", False):
            problems.append("prefix caching is on (--no-enable-prefix-caching / enable_prefix_caching=False)")
        if getattr(vllm_config, "speculative_config", None) is not None:
            problems.append("speculative decoding is on")
        if problems:
            why = "; ".join(f"{name.upper()} {reason}" for name, reason in sorted(whole.items()))
            raise RecipeError(
                f"recipe {recipe.name!r}: {why}, so every prompt must reach attention in one forward, but "
                + "; ".join(problems) + ". Fix: turn them off for this engine"
            )  # fmt: skip
    readers = sorted({m.name.upper() for m in methods if m.reads_layer_input})
    if readers and not _eager(vllm_config):
        raise RecipeError(
            f"recipe {recipe.name!r}: {', '.join(readers)} read the hidden states entering their layers through hooks "
            "on vLLM's decoder layers, which torch.compile and CUDA graphs would bypass. Fix: start the engine with "
            "enforce_eager=True (--enforce-eager)"
        )
    shared = _reasons(methods, "prompt_length_dependent")
    if shared and getattr(cache, "enable_prefix_caching", False):
        why = "; ".join(f"{name.upper()} {reason}" for name, reason in sorted(shared.items()))
        raise RecipeError(
            f"recipe {recipe.name!r}: prefix caching hands a request KV blocks another prompt computed, but {why}. "
            "Fix: start the engine with enable_prefix_caching=False (--no-enable-prefix-caching)"
        )
