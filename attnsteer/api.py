"""``attnsteer.apply(model, recipe)`` and the handle it returns."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import archs, compat
from .attention import dispatch
from .errors import AttnsteerWarning, RecipeError, SteeringError, UnsupportedModelError
from .methods import METHODS
from .recipe import Recipe, load_recipe
from .selectors import head_dict_layers, resolve_heads, resolve_layers
from .state import SteeringState

BACKEND_CHOICES = ("auto", "fused", "reference")

# model -> its live handle; a model is steered by at most one handle at a time
_STEERED: "weakref.WeakKeyDictionary[nn.Module, SteeringHandle]" = weakref.WeakKeyDictionary()


class LayerPlan:
    """The methods steering one layer, in recipe order (SPEC section 7 composition)."""

    def __init__(self, layer: int):
        self.layer = layer
        self.methods: list = []

    def score_steps(self, is_prefill: bool) -> list:
        return [m for m in self.methods if m.has_score_step and m.active(is_prefill)]

    def weight_steps(self, is_prefill: bool) -> list:
        return [m for m in self.methods if m.has_weight_step and m.active(is_prefill)]

    def head_steps(self, is_prefill: bool) -> list:
        return [m for m in self.methods if m.has_head_step and m.active(is_prefill)]

    def active(self, is_prefill: bool) -> bool:
        return any(m.active(is_prefill) and (m.has_score_step or m.has_weight_step or m.has_head_step) for m in self.methods)


def _build_plans(recipe: Recipe, arch: archs.ResolvedArch) -> dict[int, LayerPlan]:
    """Resolve every intervention's layers and heads against the model (touches nothing).

    Each method object records the intervention it came from (``method.intervention``)."""
    plans: dict[int, LayerPlan] = {}
    n_layers, n_heads = arch.num_layers, arch.num_heads
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
        for layer in layers:
            heads = resolve_heads(iv.heads, layer, n_layers, n_heads, f"{where}.heads")
            mask = None
            if heads is not None:
                mask = torch.zeros(n_heads, dtype=torch.bool)
                mask[heads] = True
            plan = plans.setdefault(layer, LayerPlan(layer))
            if cls.one_per_layer and any(m.name == iv.method for m in plan.methods):
                first = next(m.intervention for m in plan.methods if m.name == iv.method)
                raise RecipeError(
                    f"{where}: layer {layer} is already steered by {iv.method} from {recipe.name}.interventions[{first}]; "
                    f"{iv.method} keeps one sink set per layer, so two {iv.method} interventions cannot share a layer. "
                    "Fix: give them disjoint layers, or merge them into one intervention"
                )
            method = cls(iv.params, layer, mask)
            method.intervention, method.first_layer = i, layer == layers[0]
            plan.methods.append(method)
    return plans


class SteeringHandle:
    """A recipe applied to a model. ``remove()`` (or leaving a ``with`` block) restores it exactly."""

    def __init__(self, model, recipe, backend, arch, plans, state, snapshot, hooks):
        self.model = model
        self.recipe = recipe
        self.backend = backend
        self.arch = arch
        self.plans = plans
        self._state = state
        self._snapshot = snapshot
        self._hooks = hooks
        self._sites: dict[int, dispatch.LayerSite] = {}
        self.removed = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the model: previous attention implementations, no hooks, no attributes."""
        if self.removed:
            return
        for hook in self._hooks:
            hook.remove()
        for layer in self._sites:
            dispatch.detach(self.arch.attention_modules[layer])
        compat.restore_attn_implementations(self._snapshot)
        _STEERED.pop(self.model, None)
        self.removed = True
        silent = [f"layer {s['layer']} {s['method']}" for s in self.stats() if s["calls"] > 0 and s["fired"] == 0]
        if silent and self._state.forwards:
            warnings.warn(
                f"recipe {self.recipe.name!r}: these sites ran but never changed a row: {', '.join(silent)}. "
                "Check the parameters (e.g. ACT threshold too high for this model)",
                AttnsteerWarning,
                stacklevel=2,
            )

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- inspection --------------------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """One dict per steered (layer, method): forwards it ran in (``calls``), forwards in which
        it changed at least one (head, row) (``fired``) and the (head, row) pairs it changed."""
        out = []
        for layer, site in sorted(self._sites.items()):
            for method in site.plan.methods:
                out.append(
                    {
                        "layer": layer,
                        "method": method.name,
                        "calls": site.stats.calls[id(method)],
                        "fired": site.stats.fired(method),
                        "rows_modified": site.stats.rows(method),
                        **({"rows_without_image": self._state.rows_without_image} if method.needs_image else {}),
                    }
                )
        return out

    def resolved_recipe(self) -> Recipe:
        """The recipe that runs, with every intervention's concrete layers (a list of layer
        indices) and heads (``"all"`` or ``{layer: [heads]}``) resolved against this model.
        Re-applying it steers exactly the same sites; interventions skipped for identity
        parameters are left out (they change nothing)."""
        by_intervention: dict[int, list] = {}
        for layer, plan in sorted(self.plans.items()):
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
                    m.layer: (list(range(self.arch.num_heads)) if m.heads is None else m.heads.nonzero().flatten().tolist())
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

    def focus(self, mask) -> "_Focus":
        """Mark key positions to steer toward, for any model: ``with handle.focus(mask): ...``.

        ``mask``: bool/int (batch, seq) over the padded prompt (same shape as ``input_ids``). The
        marked positions play the "image" role of VAR, PAI and VHR (attention steering in the
        style of PASTA, on text-only LLMs too). Applies to prompts started inside the block.
        """
        mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise ValueError(f"handle.focus(mask): mask must be (batch, seq); got shape {tuple(mask.shape)}")
        return _Focus(self._state, mask.bool())

    def vhr_heads(self) -> dict[int, list[list[int]]]:
        """VHR's heads selected for the last prompt: ``{layer: [per batch row [heads]]}``."""
        out = {}
        for layer, site in sorted(self._sites.items()):
            for method in site.plan.methods:
                heads = method.prompt_state.get("heads") if method.name == "vhr" else None
                if heads is not None:
                    out[layer] = [row.nonzero().flatten().tolist() for row in heads]
        return out

    def sinks(self) -> dict[int, list[dict[int, list[int]]]]:
        """ACT sink sets of the last prompt: ``{layer: [per batch row {head: [key positions]}]}``."""
        out = {}
        for layer, site in sorted(self._sites.items()):
            for method in site.plan.methods:
                table = method.prompt_state.get("sinks") if method.name == "act" else None
                if table is None:
                    continue
                rows = []
                for b in range(table.shape[0]):
                    heads = {h: table[b, h].nonzero().flatten().tolist() for h in range(table.shape[1])}
                    rows.append({h: pos for h, pos in heads.items() if pos})
                out[layer] = rows
        return out

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"SteeringHandle(recipe={self.recipe.name!r}, backend={self.backend!r}, layers={sorted(self.plans)}, {state})"


class _InstanceAttribute:
    """Sets an attribute on an instance; ``remove()`` deletes it again (hook-handle interface)."""

    def __init__(self, obj, name, value):
        self.obj, self.name = obj, name
        obj.__dict__[name] = value

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


class _Focus:
    def __init__(self, state, mask):
        self.state, self.mask = state, mask

    def __enter__(self):
        self.saved = self.state.focus_mask
        self.state.focus_mask = self.mask
        return self

    def __exit__(self, *exc):
        self.state.focus_mask = self.saved


# Test seam: called with each install step's name after that step has changed the model, so
# tests can inject a failure there and check that apply() leaves the model exactly as before.
_after_install_step = None


class _Install:
    """The model changes of one ``apply()``, undone in reverse order if a later one fails."""

    def __init__(self):
        self.undo: list = []

    def step(self, name: str, undo) -> None:
        self.undo.append(undo)
        if _after_install_step is not None:
            _after_install_step(name)

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()


def apply(model: nn.Module, recipe, *, backend: str = "auto") -> SteeringHandle:
    """Steer a loaded transformers model in place.

    Everything is resolved and validated before the model is touched; if installing fails part
    way, every change made so far is undone and the model is exactly as before.

    Args:
        model: a supported ``*ForCausalLM`` (or base) model; see ``attnsteer.archs.ARCHS``.
        recipe: built-in name, YAML path, dict, Hub repo id or :class:`attnsteer.Recipe`.
        backend: ``"fused"`` (O(N) memory), ``"reference"`` (float32 eager oracle) or
            ``"auto"`` (= fused).

    Returns:
        A :class:`SteeringHandle`; ``.remove()`` or a ``with`` block restores the model exactly.
    """
    # ---- resolve and validate: nothing below changes the model ----------------------------------
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: got {backend!r}; allowed: {list(BACKEND_CHOICES)}")
    recipe = load_recipe(recipe)
    if model in _STEERED:
        raise SteeringError(
            f"this model is already steered by {_STEERED[model]!r}. Fix: call .remove() on that handle first "
            "(or combine both recipes' interventions into one recipe)"
        )
    arch = archs.resolve(model)
    model_type = model.config.model_type
    if recipe.model_types and model_type not in recipe.model_types:
        raise RecipeError(
            f"{recipe.name}.model_types: the recipe is made for {recipe.model_types}, and this model's model_type is "
            f"{model_type!r}. Fix: use a recipe for {model_type!r}, or drop model_types if it is generic"
        )
    impl = compat.attn_implementation(arch.text_config)
    name = dispatch.registered_name(impl)
    plans = _build_plans(recipe, arch)
    resolved_backend = "fused" if backend == "auto" else backend
    host = archs.get_path(model, arch.spec.stream_host)
    if host is None:
        raise UnsupportedModelError(
            f"{model_type}: the module {arch.spec.stream_host!r} was not found; pass the full model to attnsteer.apply"
        )
    snapshot = compat.snapshot_attn_implementations(model)
    methods = [m for plan in plans.values() for m in plan.methods]
    state = SteeringState(arch, methods)
    state.pad_id = int(getattr(arch.text_config, "pad_token_id", None) or 0)
    state.steered_layers = tuple(sorted(plans))
    for method in methods:
        method.state = state
    sites = {
        layer: dispatch.LayerSite(
            layer, plan, resolved_backend, dispatch.original_function(impl, arch.attention_modules[layer]), state
        )
        for layer, plan in plans.items()
    }
    hook_specs = [
        (host.register_forward_pre_hook, state.model_pre_hook),
        (host.register_forward_hook, state.model_post_hook),
        (arch.decoder.register_forward_pre_hook, state.decoder_pre_hook),
    ]
    if host is not model:
        hook_specs.append((model.register_forward_pre_hook, state.record_prompt_ids))
    for method in methods:
        hook_specs.extend(method.layer_hooks(arch.decoder.layers[method.layer], state))

    # ---- install: each change is recorded with its undo ------------------------------------------
    install = _Install()
    hooks: list = []
    try:
        compat.set_text_attention(model, arch.spec.text_config_key, name)
        install.step("attention implementation", lambda: compat.restore_attn_implementations(snapshot))
        for register, hook in hook_specs:
            handle_ = register(hook, with_kwargs=True)
            hooks.append(handle_)
            install.step("hook", handle_.remove)
        if host is not model:
            attribute = _InstanceAttribute(model, "generate", state.wrap_generate(model.generate))
            hooks.append(attribute)
            install.step("generate wrapper", attribute.remove)
        for layer, site in sites.items():
            module = arch.attention_modules[layer]
            dispatch.attach(module, site)
            install.step("attention site", lambda module=module: dispatch.detach(module))
        handle = SteeringHandle(model, recipe, resolved_backend, arch, plans, state, snapshot, hooks)
        handle._sites.update(sites)
        _STEERED[model] = handle
        install.step("registry", lambda: _STEERED.pop(model, None))
    except BaseException:
        install.rollback()
        raise
    return handle
