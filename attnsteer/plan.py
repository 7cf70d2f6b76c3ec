"""``attnsteer.plan(model, recipe)``: what a recipe will steer on a model, resolved without touching it.

A :class:`Plan` holds, per decoder layer, the method objects of every intervention that steers it
(layers and heads resolved against the model, parameters validated, family defaults filled in).
``attnsteer.apply`` is ``plan`` followed by installing the plan; ``attnsteer recipes validate``,
the evaluation runners and result records use the plan alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import archs
from .attention import dispatch
from .errors import AttnsteerError, AttnsteerWarning, RecipeError, UsageError
from .methods import METHODS
from .methods.rules import WEIGHT_KINDS
from .recipe import Recipe, load_recipe
from .selectors import head_dict_layers, resolve_heads, resolve_layers


@dataclass(frozen=True)
class Steps:
    """The rules of one layer that act in one phase, by kind, in composition order: score rules,
    then weight rules (group, reweight) in recipe order, then head rules."""

    score: tuple
    weight: tuple
    head: tuple

    @property
    def attention(self) -> bool:
        """Whether a backend must compute the attention itself (a score or weight rule acts)."""
        return bool(self.score or self.weight)

    def __bool__(self) -> bool:
        return bool(self.score or self.weight or self.head)


class LayerPlan:
    """The methods steering one layer, in recipe order (composition: docs/methods.md#composition)."""

    def __init__(self, layer: int):
        self.layer = layer
        self.methods: list = []

    def rules(self, kind: str, is_prefill: bool) -> tuple:
        """The layer's rules of ``kind`` that act in this phase, in recipe order."""
        return tuple(r for m in self.methods for r in m.rules if r.kind == kind and r.active(is_prefill))

    def steps(self, is_prefill: bool) -> Steps:
        weight = tuple(r for m in self.methods for r in m.rules if r.kind in WEIGHT_KINDS and r.active(is_prefill))
        return Steps(self.rules("score", is_prefill), weight, self.rules("head", is_prefill))

    def active(self, is_prefill: bool) -> bool:
        return bool(self.steps(is_prefill))


def _build_plans(recipe: Recipe, arch: archs.ResolvedArch) -> dict[int, LayerPlan]:
    """Resolve every intervention's layers and heads against the model (touches nothing).

    Each method object records the intervention it came from (``method.intervention``)."""
    plans: dict[int, LayerPlan] = {}
    n_layers, n_heads = arch.num_layers, arch.num_heads
    logits = [
        f"{recipe.name}.interventions[{i}] ({iv.method})"
        for i, iv in enumerate(recipe.interventions)
        if METHODS[iv.method].replaces_logits(iv.params)
    ]
    if len(logits) > 1:
        raise RecipeError(
            f"{' and '.join(logits)} each replace the next-token logits (AGLA's assembly, PAI's gamma contrast); "
            "one recipe can hold one of them. Fix: keep one (PAI without gamma still steers attention)"
        )
    for i, iv in enumerate(recipe.interventions):
        where = f"{recipe.name}.interventions[{i}]"
        cls = METHODS[iv.method]
        cls.check_model(iv.params, arch, where)
        if cls.is_identity_params(iv.params):
            warnings.warn(
                f"{where} ({iv.method} with {iv.params}) uses identity parameters and leaves attention unchanged; "
                "it is skipped. Fix: set real parameters (see `attnsteer recipes show`) or remove it",
                AttnsteerWarning,
                stacklevel=3,
            )
            continue
        if isinstance(iv.heads, dict):
            head_layers = head_dict_layers(iv.heads, n_layers, f"{where}.heads")
            if iv.layers is None:
                layers = head_layers
            else:
                explicit = set(resolve_layers(iv.layers, n_layers, f"{where}.layers"))
                outside = [l for l in head_layers if l not in explicit]
                if outside:
                    raise RecipeError(
                        f"{where}.heads: names layer(s) {outside}, which {where}.layers={iv.layers!r} does not select. "
                        "Fix: drop `layers` (the head mapping then decides) or add those layers to it"
                    )
                layers = head_layers
        else:
            default = cls.layers_default(iv.params, arch)
            layers = resolve_layers(iv.layers if iv.layers is not None else default, n_layers, f"{where}.layers")
        if arch.cross_layers:
            layers = _layers_of_its_kind(cls, iv, layers, arch, where)
        for layer in layers:
            heads = resolve_heads(iv.heads, layer, n_layers, n_heads, f"{where}.heads")
            mask = None
            if heads is not None:
                mask = torch.zeros(n_heads, dtype=torch.bool)
                mask[heads] = True
            plan = plans.setdefault(layer, LayerPlan(layer))
            if cls.one_per_layer and any(type(m) is cls for m in plan.methods):
                first = next(m.intervention for m in plan.methods if type(m) is cls)
                raise RecipeError(
                    f"{where}: layer {layer} is already steered by {iv.method} from {recipe.name}.interventions[{first}]; "
                    f"{iv.method} keeps one sink set per layer, so two {iv.method} interventions cannot share a layer. "
                    "Fix: give them disjoint layers, or merge them into one intervention"
                )
            method = cls(iv.params, layer, mask)
            method.intervention, method.first_layer = i, layer == layers[0]
            method.cross_attention = layer in arch.cross_layers
            plan.methods.append(method)
    return plans


def _layers_of_its_kind(cls, iv, layers: list[int], arch: archs.ResolvedArch, where: str) -> list[int]:
    """On a model whose image enters through cross-attention layers (mllama): the selected layers
    of the kind ``cls`` steers -- cross-attention layers for methods with ``on_cross_attention``,
    self-attention layers otherwise. A range ("all", "2:") keeps the layers of that kind; a layer
    named by its index (in ``layers`` or a ``heads`` mapping) that is of the other kind, or an empty
    result, raises."""
    family, cross = arch.spec.model_type, sorted(arch.cross_layers)
    if cls.needs_image and not cls.on_cross_attention:
        raise RecipeError(
            f"{where}.method: {cls.name} moves attention toward image tokens inside the self-attention, but {family} "
            f"has no image tokens there: the image enters only through its cross-attention layers {cross}, whose keys "
            f"are all image states (the attention to the image always sums to 1 there), so {cls.name} has no faithful "
            "meaning on this model. Fix: use vhr (reinforces cross-attention heads), or act / softplus on the "
            "self-attention layers"
        )
    wanted = set(cross) if cls.on_cross_attention else set(arch.self_attention_layers)
    kind = "cross-attention" if cls.on_cross_attention else "self-attention"
    spec = iv.layers if isinstance(iv.layers, list) else [iv.layers]
    named = {int(x) % arch.num_layers for x in spec if isinstance(x, int) or str(x).lstrip("-").isdigit()}
    if isinstance(iv.heads, dict):  # a {layer: heads} mapping names its layers
        named |= set(layers)
    wrong = sorted(l for l in named if l not in wanted)
    kept = [l for l in layers if l in wanted]
    if wrong or not kept:
        raise RecipeError(
            f"{where}.layers: {cls.name} steers the {kind} layers of {family} ({sorted(wanted)}); "
            + (f"layer(s) {wrong} are not among them" if wrong else f"{iv.layers!r} selects none of them")
            + f". Fix: pick {kind} layers, e.g. layers: {sorted(wanted)[:3]}"
        )
    return kept


@dataclass
class Plan:
    """A recipe resolved against one model.

    recipe:     the validated :class:`Recipe`.
    arch:       the model's :class:`attnsteer.archs.ResolvedArch` (decoder, attention modules, heads).
    layers:     layer index -> :class:`LayerPlan` (only layers something steers).
    impl:       the model's text attention implementation (``sdpa`` / ``eager``) it will delegate to.
    """

    recipe: Recipe
    arch: archs.ResolvedArch
    layers: dict[int, LayerPlan]
    impl: str

    @property
    def methods(self) -> list:
        """Every method object, layer by layer, in recipe order within a layer."""
        return [m for layer in sorted(self.layers) for m in self.layers[layer].methods]

    def sites(self) -> list[dict[str, Any]]:
        """One row per steered (layer, method): ``layer``, ``method``, ``heads`` (list or ``"all"``)."""
        return [
            {
                "layer": m.layer,
                "method": m.name,
                "heads": "all" if m.heads is None else m.heads.nonzero().flatten().tolist(),
            }
            for m in self.methods
        ]

    def resolved_recipe(self) -> Recipe:
        """The recipe that runs, with every intervention's concrete layers (a list of layer
        indices) and heads (``"all"`` or ``{layer: [heads]}``) resolved against the model.
        Re-applying it steers exactly the same sites; interventions skipped for identity
        parameters are left out (they change nothing)."""
        by_intervention: dict[int, list] = {}
        for _layer, plan in sorted(self.layers.items()):
            for method in plan.methods:
                by_intervention.setdefault(method.intervention, []).append(method)
        items = []
        for index, methods in sorted(by_intervention.items()):
            source = self.recipe.interventions[index]
            layers = [m.layer for m in methods]
            if all(m.heads is None for m in methods):
                heads: Any = "all"
            else:
                heads = {
                    m.layer: (
                        list(range(self.arch.num_heads)) if m.heads is None else m.heads.nonzero().flatten().tolist()
                    )
                    for m in methods
                }
                heads = {layer: h for layer, h in heads.items() if h}
            item = {"method": source.method, "layers": layers, "heads": heads, "params": dict(source.params)}
            if isinstance(heads, dict):
                item.pop("layers")  # the head mapping decides the layers
            items.append(item)
        data = self.recipe.to_dict()
        data["interventions"] = items
        return Recipe.from_dict(data, origin=f"resolved recipe {self.recipe.name!r}")


def plan(model: nn.Module, recipe) -> Plan:
    """Resolve ``recipe`` against ``model`` without changing it.

    Raises the same errors ``apply`` would (unsupported family or attention implementation, a
    recipe made for another model type, layers or heads the model does not have, parameters that
    do not fit); warns (:class:`AttnsteerWarning`) for interventions with identity parameters,
    which are skipped, and for another model type under ``model_types_policy: warn``.
    """
    recipe = load_recipe(recipe)
    arch = archs.resolve(model)
    recipe.check_model_type(model.config.model_type)  # raises, or warns under model_types_policy: warn
    impl = dispatch.check_implementation(arch.text_config)
    return Plan(recipe, arch, _build_plans(recipe, arch), impl)


def plans_for(recipe, arch: archs.ResolvedArch) -> dict[int, LayerPlan]:
    """Layer index -> :class:`LayerPlan` of ``recipe`` on a resolved model (``archs.resolve`` or,
    for an engine that owns the model, ``archs.resolve_config``), checking the model type."""
    recipe = load_recipe(recipe)
    recipe.check_model_type(arch.spec.model_type)
    return _build_plans(recipe, arch)


def image_methods(planned: Plan) -> list[str]:
    """Names of the plan's methods that steer attention toward image keys (``method.needs_image``:
    VAR, PAI, AGLA, VHR with per-prompt selection); they need image tokens in the input, or a span
    marked with ``handle.focus(mask)``."""
    return sorted({m.name for m in planned.methods if m.needs_image})


def check_image_keys(planned: Plan, label: str, model_id: str, images: bool | None = None) -> None:
    """Raise :class:`UsageError` when ``planned`` steers toward image keys that the run cannot have.

    ``images``: whether the run's inputs carry image tokens (or a focus span); ``None``: they do
    exactly when the model has image tokens (a vision-language model fed images). The command line
    cannot mark a focus span on a text model, so such a recipe would fail on its first forward
    (``SteeringError``), after the baseline ran; this check refuses it before any work."""
    needing = image_methods(planned)
    if not needing or images is True:
        return
    has_tokens = bool(planned.arch.image_token_ids)
    if images is None and has_tokens:
        return
    if has_tokens:
        why = f"this run's prompts carry no image, so --model {model_id!r} sees no image tokens to steer toward"
        fix = "Fix: run it with images (e.g. --image PATH), or use a text recipe such as act-default"
    else:
        why = (
            f"--model {model_id!r} ({planned.arch.spec.model_type}) is a text-only model: its inputs have no image "
            "tokens, and the command line cannot mark a focus span on a text model"
        )
        fix = (
            "Fix: use a vision-language --model (e.g. llava-hf/llava-1.5-7b-hf) with images, or from Python mark the "
            "span yourself with `with handle.focus(mask): ...` (attnsteer.apply); text recipes such as act-default "
            "run here"
        )
    raise UsageError(
        f"--recipe {label!r} cannot run here: its method(s) {needing} steer attention toward image tokens, and {why}. "
        f"{fix}"
    )


def check_recipes(
    model: nn.Module, recipes, model_id: str, *, images: bool | None = None
) -> tuple[list[str], dict[str, dict]]:
    """Plan each ``(label, recipe)`` on ``model`` before any work starts (nothing is changed).

    Returns the warnings the plans gave (identity parameters, ...) and, per label, the recipe
    with the concrete layers and heads it steers on this model (:meth:`Plan.resolved_recipe`).
    A recipe that does not fit raises :class:`UsageError` naming ``--recipe`` and ``--model``;
    so does one whose methods steer toward image tokens the run's inputs will not have
    (``images``: see :func:`check_image_keys`).
    """
    notes: list[str] = []
    applied: dict[str, dict] = {}
    for label, recipe in recipes:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always", AttnsteerWarning)
            try:
                planned = plan(model, recipe)
                applied[label] = planned.resolved_recipe().to_dict()
            except AttnsteerError as exc:
                raise UsageError(
                    f"--recipe {label!r} cannot steer --model {model_id!r}: {exc}. The baseline (--recipe none) needs "
                    "no steering and still runs"
                ) from None
        check_image_keys(planned, label, model_id, images)
        notes += [str(w.message) for w in record if issubclass(w.category, AttnsteerWarning)]
    return list(dict.fromkeys(notes)), applied
