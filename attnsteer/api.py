"""``attnsteer.apply(model, recipe)`` and the handle it returns."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import archs, compat
from .attention import dispatch
from .attention.router import CHOICES as BACKEND_CHOICES
from .attention.router import BackendConfig
from .errors import SilentSiteWarning, SteeringError, UnsupportedModelError
from .methods.act import ACT
from .methods.vhr import VHR
from .plan import Plan, plan
from .recipe import Recipe
from .state import SteeringState

# model -> its live handle; a model is steered by at most one handle at a time
_STEERED: weakref.WeakKeyDictionary[nn.Module, SteeringHandle] = weakref.WeakKeyDictionary()


class SteeringHandle:
    """A recipe applied to a model. ``remove()`` (or leaving a ``with`` block) restores it exactly."""

    def __init__(self, model, plan: Plan, config: BackendConfig, state, snapshot, hooks):
        self.model = model
        self.plan = plan
        self.recipe = plan.recipe
        self.config = config
        self.backend = config.backend
        self.arch = plan.arch
        self.plans = plan.layers  # layer -> LayerPlan
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
                SilentSiteWarning,
                stacklevel=2,
            )

    def _check_active(self, use: str) -> None:
        if self.removed:
            raise SteeringError(
                f"{use}: this handle ({self.recipe.name!r}) was removed, so the model is no longer steered and "
                "nothing would be steered. Fix: apply the recipe again, attnsteer.apply(model, recipe), and use the "
                "new handle"
            )

    def __enter__(self) -> SteeringHandle:
        self._check_active("with handle")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- inspection --------------------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """One dict per steered (layer, method): forwards it ran in (``calls``), forwards in which
        it changed at least one (head, row) (``fired``), the (head, row) pairs it changed, and which
        backend computed the layer's steered calls -- ``paths`` (``"<backend>/<phase>"`` -> calls)
        and ``fallbacks`` (``"<backend>: <reason>"`` -> calls that backend left to the next one)."""
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
                        "paths": dict(site.stats.paths),
                        "fallbacks": dict(site.stats.fallbacks),
                        **({"rows_without_image": self._state.rows_without_image} if method.needs_image else {}),
                    }
                )
        return out

    def resolved_recipe(self) -> Recipe:
        """The recipe that runs, with concrete layers and heads (:meth:`Plan.resolved_recipe`)."""
        return self.plan.resolved_recipe()

    def focus(self, mask) -> _SetState:
        """Mark key positions to steer toward, for any model: ``with handle.focus(mask): ...``.

        ``mask``: bool/int (batch, seq) over the padded prompt (same shape as ``input_ids``). The
        marked positions play the "image" role of VAR, PAI and VHR (attention steering in the
        style of PASTA, on text-only LLMs too). Applies to prompts started inside the block. Under
        ``generate(num_beams=k)`` / ``num_return_sequences=k`` give the mask of the prompts passed
        to ``generate()``; it follows their expansion to ``k`` rows each. A mask that marks no
        position raises when the prompt runs.
        """
        self._check_active("handle.focus(mask)")
        mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise ValueError(f"handle.focus(mask): mask must be (batch, seq); got shape {tuple(mask.shape)}")
        return _SetState(self._state, "focus_mask", mask.bool())

    def report(self) -> dict[int, dict[str, dict]]:
        """What each method found for the last prompt, ``{layer: {method: report}}``; each method
        defines its report (ACT: ``{"sinks": [per batch row {head: [key positions]}]}``, VHR:
        ``{"heads": [per batch row [heads]]}``, VAR: ``{"sinks": [per batch row [positions]]}``).
        Methods with nothing to report, or before the first prompt, are left out."""
        out: dict[int, dict[str, dict]] = {}
        prompt = self._state.prompt
        for layer, site in sorted(self._sites.items()):
            for method in site.plan.methods:
                found = method.report(prompt)
                if found is not None:
                    out.setdefault(layer, {})[method.name] = found
        return out

    def prompt_text(self, texts) -> _SetState:
        """The text each batch row asks about, for methods that read the prompt as text:
        ``with handle.prompt_text(["Is there a dog in the image?"]): model.generate(...)``.

        AGLA's ``blip_itm`` matcher matches the image against it; give the question without
        answer-format suffixes ("Please answer with one word"), as the method's authors did.
        Without it, the prompt's text after its last image is decoded with the processor.
        Applies to prompts started inside the block.
        """
        self._check_active("handle.prompt_text(texts)")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"handle.prompt_text(texts): texts must be a list of strings, one per batch row; got {texts!r}"
            )
        return _SetState(self._state, "prompt_text", list(texts))

    def _report_field(self, method: str, field: str) -> dict:
        return {layer: by[method][field] for layer, by in self.report().items() if method in by}

    def vhr_heads(self) -> dict[int, list[list[int]]]:
        """VHR's heads selected for the last prompt: ``{layer: [per batch row [heads]]}``."""
        return self._report_field(VHR.name, "heads")

    def sinks(self) -> dict[int, list[dict[int, list[int]]]]:
        """ACT sink sets of the last prompt: ``{layer: [per batch row {head: [key positions]}]}``."""
        return self._report_field(ACT.name, "sinks")

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


class _SetState:
    """Sets one attribute of the steering state for a ``with`` block, then restores it."""

    def __init__(self, state, name, value):
        self.state, self.name, self.value = state, name, value

    def __enter__(self):
        self.saved = getattr(self.state, self.name)
        setattr(self.state, self.name, self.value)
        return self

    def __exit__(self, *exc):
        setattr(self.state, self.name, self.saved)


# Test seam: called with each install step's name after that step has changed the model, so
# tests can inject a failure there and check that apply() leaves the model exactly as before.
_after_install_step = None


class _Install:
    """The model changes of one ``apply()``, undone in reverse order if a later one fails."""

    def __init__(self):
        self.undo: list = []

    def step(self, name: str, undo=None) -> None:
        """Record that step ``name`` changed the model (and how to undo it, unless registered
        before the change with :meth:`will_change`)."""
        if undo is not None:
            self.undo.append(undo)
        if _after_install_step is not None:
            _after_install_step(name)

    def will_change(self, undo) -> None:
        """Register ``undo`` before a change that may fail half-way (undoing it must be safe then)."""
        self.undo.append(undo)

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()


def apply(model: nn.Module, recipe, *, backend: str = "auto", processor=None) -> SteeringHandle:
    """Steer a loaded transformers model in place.

    Everything is resolved and validated before the model is touched; if installing fails part
    way, every change made so far is undone and the model is exactly as before.

    Args:
        model: a supported ``*ForCausalLM`` (or base) model; see ``attnsteer.archs.ARCHS``.
        recipe: built-in name, YAML path, dict, Hub repo id or :class:`attnsteer.Recipe`.
        backend: ``"auto"`` (the fastest backend that can run each call: Triton on CUDA, PyTorch's
            flash kernel + corrections on CPU, else the chunked PyTorch path; ``"fused"`` is the
            same), or one of ``"chunked"``, ``"flash"``, ``"triton"``, ``"reference"`` (float32
            eager oracle) -- that backend for every call, or an error naming why it cannot run one.
        processor: the model's processor (``AutoProcessor.from_pretrained(...)``), for methods
            that build inputs of their own (AGLA: the augmented view's pixels, the prompt text).

    Returns:
        A :class:`SteeringHandle`; ``.remove()`` or a ``with`` block restores the model exactly.
    """
    # ---- resolve and validate: nothing below changes the model ----------------------------------
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: got {backend!r}; allowed: {list(BACKEND_CHOICES)}")
    config = BackendConfig.from_settings(backend)
    if model in _STEERED:
        raise SteeringError(
            f"this model is already steered by {_STEERED[model]!r}. Fix: call .remove() on that handle first "
            "(or combine both recipes' interventions into one recipe)"
        )
    planned = plan(model, recipe)
    recipe, arch, plans, impl = planned.recipe, planned.arch, planned.layers, planned.impl
    name = dispatch.registered_name(impl)
    host = archs.get_path(model, arch.spec.stream_host)
    if host is None:
        raise UnsupportedModelError(
            f"{model.config.model_type}: the module {arch.spec.stream_host!r} was not found; pass the full model to attnsteer.apply"
        )
    methods = [m for plan in plans.values() for m in plan.methods]
    needing = sorted({m.name for m in methods if m.needs_processor})
    if needing and processor is None:
        raise SteeringError(
            f"the recipe's {needing} build model inputs of their own (AGLA: the augmented image, read with the "
            "model's image processor) and need the model's processor. Fix: attnsteer.apply(model, recipe, "
            "processor=AutoProcessor.from_pretrained(<the model's repo>))"
        )
    key_modules = _key_projections(arch, plans)
    snapshot = compat.snapshot_attn_implementations(model)
    state = SteeringState(
        arch,
        methods,
        pad_id=int(getattr(arch.text_config, "pad_token_id", None) or 0),
        # self-attention layers: their key counts follow the KV cache (cross-attention keys are vision states)
        steered_layers=sorted(l for l in plans if l not in arch.cross_layers),
        processor=processor,
        model_ref=weakref.ref(model),
    )
    sites = {
        layer: dispatch.LayerSite(
            layer, plan, config, dispatch.original_function(impl, arch.attention_modules[layer]), state
        )
        for layer, plan in plans.items()
    }
    # (register, hook, whether the hook takes the call's keyword arguments)
    hook_specs = [
        (host.register_forward_pre_hook, state.model_pre_hook, True),
        (host.register_forward_hook, state.model_post_hook, True),
        (arch.decoder.register_forward_pre_hook, state.decoder_pre_hook, True),
    ]
    if host is not model:
        hook_specs.append((model.register_forward_pre_hook, state.record_prompt_ids, True))
    for method in methods:
        if method.reads_layer_input:
            layer = arch.decoder.layers[method.layer]
            hook_specs.append((layer.register_forward_pre_hook, state.layer_input_hook(method), True))
    for layer, module in key_modules.items():
        rules = [r for m in plans[layer].methods for r in m.rules_of("key")]
        hook_specs.append((module.register_forward_hook, state.key_projection_hook(rules, sites[layer].stats), False))

    # ---- install: each change is recorded with its undo ------------------------------------------
    install = _Install()
    hooks: list = []
    try:
        install.will_change(lambda: compat.restore_attn_implementations(snapshot))
        compat.set_text_attention(model, arch.spec.text_config_key, name)  # may switch some sub-configs, then fail
        install.step("attention implementation")
        for register, hook, with_kwargs in hook_specs:
            handle_ = register(hook, with_kwargs=with_kwargs)
            hooks.append(handle_)
            install.step("hook", handle_.remove)
        # what each generate() call is given: the prompt's ids above the stream host (InstructBLIP),
        # the pixels (AGLA), the rows before generate() expands them for beams / return sequences
        if hasattr(model, "generate"):
            attribute = _InstanceAttribute(model, "generate", state.wrap_generate(model.generate))
            hooks.append(attribute)
            install.step("generate wrapper", attribute.remove)
        for layer, site in sites.items():
            module = arch.attention_modules[layer]
            dispatch.attach(module, site)
            install.step("attention site", lambda module=module: dispatch.detach(module))
        handle = SteeringHandle(model, planned, config, state, snapshot, hooks)
        handle._sites.update(sites)
        _STEERED[model] = handle
        install.step("registry", lambda: _STEERED.pop(model, None))
    except BaseException:
        install.rollback()
        raise
    return handle


def _key_projections(arch, plans) -> dict[int, nn.Module]:
    """Layer -> the attention module's key projection (``ArchSpec.key_projection``) of every layer
    with a key rule; raises when the family names none."""
    out = {}
    for layer, layer_plan in plans.items():
        if not any(m.rules_of("key") for m in layer_plan.methods):
            continue
        attention = arch.attention_modules[layer]
        module = getattr(attention, arch.spec.key_projection, None) if arch.spec.key_projection else None
        if not isinstance(module, nn.Module):
            names = sorted({m.name for m in layer_plan.methods if m.rules_of("key")})
            raise UnsupportedModelError(
                f"layer {layer}: the recipe's {names} edit keys "
                f"before RoPE in the attention module's key projection, and {type(attention).__name__} has no "
                f"{arch.spec.key_projection or 'key projection'!r}. Fix: steer a family whose ArchSpec names its key "
                "projection (attnsteer.archs)"
            )
        out[layer] = module
    return out
