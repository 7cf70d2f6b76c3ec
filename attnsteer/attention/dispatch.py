"""The attention function registered with transformers, and the per-layer sites.

One function is registered per *original* implementation (``sdpa`` / ``eager``), under a neutral
name (transformers substring-matches ``flash``, ``sdpa`` and ``flex_attention``), together with
that implementation's mask builder -- so layers without a plan receive exactly the arguments the
model's own implementation would, and are delegated to it unchanged. A steered layer's
:class:`LayerSite` builds the call's :class:`~attnsteer.attention.geometry.AttentionCall`, hands
its score and weight rules to the router (:mod:`attnsteer.attention.router`), which picks the
backend, then applies its head rules.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from .. import compat
from ..errors import SteeringError, UnsupportedModelError
from . import router
from .geometry import AttentionCall, MaskView

# original implementation -> the name attnsteer registers for models that had it
REGISTERED_NAMES = {"sdpa": "attnsteer_sd", "eager": "attnsteer_eg"}

# attention module -> LayerSite, for the modules of every steered model in this process
_SITES: weakref.WeakKeyDictionary[nn.Module, LayerSite] = weakref.WeakKeyDictionary()

# attention module -> callables fn(module, query, key, attention_mask, kwargs) run before its attention,
# steered or not (attnsteer.attention.observe); empty unless something observes
_OBSERVERS: weakref.WeakKeyDictionary[nn.Module, list[Callable]] = weakref.WeakKeyDictionary()


def original_function(impl: str, module: nn.Module) -> Callable:
    """The attention function the model used before steering."""
    return compat.attention_function(impl, module)


def _make_dispatch(impl: str) -> Callable:
    def attnsteer_attention(module, query, key, value, attention_mask, **kwargs):
        if _OBSERVERS:
            for fn in tuple(_OBSERVERS.get(module, ())):
                fn(module, query, key, attention_mask, kwargs)
        site = _SITES.get(module)
        if site is None:
            return original_function(impl, module)(module, query, key, value, attention_mask, **kwargs)
        return site(module, query, key, value, attention_mask, **kwargs)

    attnsteer_attention.__name__ = f"attnsteer_attention_{impl}"
    return attnsteer_attention


def check_implementation(text_config) -> str:
    """The text attention implementation of a model, if attnsteer can steer it (else raise)."""
    impl = compat.attn_implementation(text_config)
    if impl not in REGISTERED_NAMES:
        if impl in REGISTERED_NAMES.values():
            raise SteeringError("this model is already steered by attnsteer. Fix: call .remove() on its handle first")
        raise UnsupportedModelError(
            f"the model's text attention implementation is {impl!r}; attnsteer steers models loaded with "
            f"attn_implementation in {sorted(REGISTERED_NAMES)}. Fix: load with attn_implementation='sdpa' "
            "(or call model.set_attn_implementation('sdpa')) before attnsteer.apply"
        )
    cap = getattr(text_config, "attn_logit_softcapping", None)
    if cap and impl == "sdpa":
        raise UnsupportedModelError(
            f"this model soft-caps its attention logits (attn_logit_softcapping={cap}), which sdpa cannot compute "
            "(transformers before 5.24 silently drops the cap under sdpa), so the model and a steered layer would "
            "disagree. Fix: load it with attn_implementation='eager' before attnsteer.apply"
        )
    return impl


def registered_name(impl: str) -> str:
    """Register (once per process) and return the neutral name standing in for ``impl``."""
    name = REGISTERED_NAMES[impl]
    compat.register_attention(name, _make_dispatch(impl), mask_of=impl)
    return name


class SiteStats:
    """How often each method of one layer ran and fired, and which backend ran the layer's calls.

    Row counts stay on the device and are reduced only when read (no sync, few ops per call).
    ``paths``: ``"<backend>/<phase>"`` -> calls; ``fallbacks``: ``"<backend>: <reason>"`` -> calls
    that backend gave to the next one.
    """

    COLLAPSE_EVERY = 256

    def __init__(self, methods):
        self.calls = {id(m): 0 for m in methods}
        self._per_call = {id(m): [] for m in methods}  # rows changed in each call (tensors or ints)
        self._totals = {id(m): (0, 0) for m in methods}  # collapsed (rows, fired) so far
        self._current: dict[int, list] = {}
        self.paths: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()

    def begin(self, methods) -> None:
        self._current = {id(m): [] for m in methods}

    def record(self, method, rows) -> None:
        self._current[id(method)].append(rows)

    def end(self) -> None:
        for key, parts in self._current.items():
            self.calls[key] += 1
            if parts:
                self._log(key, parts[0] if len(parts) == 1 else sum(parts))
        self._current = {}

    def count(self, method, rows) -> None:
        """One call of ``method`` outside an attention call (a key rule in its projection's hook)."""
        self.calls[id(method)] += 1
        self._log(id(method), rows)

    def _log(self, key, rows) -> None:
        log = self._per_call[key]
        log.append(rows)
        if len(log) >= self.COLLAPSE_EVERY:
            self._collapse(key)

    def ran(self, backend: str, phase: str) -> None:
        self.paths[f"{backend}/{phase}"] += 1

    def fell_back(self, backend: str, reason: str) -> None:
        self.fallbacks[f"{backend}: {reason}"] += 1

    def _collapse(self, key) -> None:
        log = self._per_call[key]
        if log:
            counts = torch.stack([torch.as_tensor(r).reshape(()) for r in log])
            rows, fired = self._totals[key]
            self._totals[key] = (rows + counts.sum(), fired + (counts > 0).sum())
            self._per_call[key] = []

    def rows(self, method) -> int:
        self._collapse(id(method))
        return int(self._totals[id(method)][0])

    def fired(self, method) -> int:
        self._collapse(id(method))
        return int(self._totals[id(method)][1])


# attention-function arguments that change the attention's math beyond the mask and scaling, and
# that attnsteer's backends do not implement: a call carrying one is refused, never run without it
UNSUPPORTED_ARGUMENTS = {
    "s_aux": "learned attention sinks (gpt-oss)",
    "sinks": "learned attention sinks",
    "alibi_slopes": "ALiBi position biases",
}


def attention_softcap(kwargs: dict) -> float | None:
    """The call's logit soft-cap (``softcap``: s -> cap * tanh(s / cap), Gemma 2), after refusing
    any argument the backends do not implement."""
    for name, what in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"the model's attention passes {name}= ({what}), which attnsteer's steered attention does not "
                "implement, so steering it would silently drop them. Fix: steer a supported family "
                "(attnsteer.archs.ARCHS) or leave this model unsteered"
            )
    cap = kwargs.get("softcap")
    return float(cap) if cap else None


class LayerSite:
    """Everything one steered attention module needs at call time."""

    def __init__(self, layer: int, plan, config: router.BackendConfig, original: Callable, state):
        self.layer = layer
        self.plan = plan
        self.config = config
        self.original = original
        self.state = state
        self.stats = SiteStats(plan.methods)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        state = self.state
        if state.is_paused:
            return self.original(module, query, key, value, attention_mask, **kwargs)
        info = state.info_for(self.layer, query, key)
        steps = self.plan.steps(info.is_prefill)
        if not steps:
            return self.original(module, query, key, value, attention_mask, **kwargs)
        if module.training and kwargs.get("dropout", 0.0):
            raise SteeringError("attnsteer steers inference only; call model.eval() before steering")
        self.stats.begin({rule.method for rule in (*steps.score, *steps.weight, *steps.head)})
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        own_key, own_value = key, value  # the model's own attention takes what it was given (its mask is that wide)
        if key.shape[2] > info.total_len:
            # a preallocated (static) cache: slots past the sequence so far are empty
            key, value = key[:, :, : info.total_len], value[:, :, : info.total_len]
        mask = MaskView(attention_mask, query.shape[2], key.shape[2])
        call = AttentionCall(self.layer, info, query, key, mask, scaling, state.prompt, attention_softcap(kwargs))
        if steps.attention:
            out = router.run(self.config, steps, call, query, key, value, self.stats)
            weights = None
        else:  # head rules only (VHR): the model's own attention, then per-head scaling
            out, weights = self.original(module, query, own_key, own_value, attention_mask, **kwargs)
        for rule in steps.head:
            out, rows = rule.apply(out, call, call.prompt)
            self.stats.record(rule.method, rows)
        self.stats.end()
        return out, weights


def attach(module: nn.Module, site: LayerSite) -> None:
    _SITES[module] = site


def detach(module: nn.Module) -> None:
    _SITES.pop(module, None)


def add_observer(module: nn.Module, fn: Callable) -> None:
    """Call ``fn(module, query, key, attention_mask, kwargs)`` before every attention call of ``module``
    that goes through attnsteer's registered function (see :mod:`attnsteer.attention.observe`)."""
    _OBSERVERS.setdefault(module, []).append(fn)


def remove_observer(module: nn.Module, fn: Callable) -> None:
    fns = _OBSERVERS.get(module)
    if fns is None:
        return
    fns[:] = [f for f in fns if f is not fn]
    if not fns:
        del _OBSERVERS[module]
