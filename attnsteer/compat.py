"""Every touchpoint between attnsteer and transformers' internals, in one module.

transformers renames internals between minor releases (5.24 renamed the decoder's
``past_key_values`` argument to ``cache``). Nothing else in attnsteer reaches into transformers:
it calls the functions here, and each function here has a test in ``tests/test_compat.py`` that
fails with a message naming the touchpoint when a release changes it.

Rules this module follows:

* objects are found by **type**, never by argument name: the KV cache is the :class:`Cache`
  among a forward's bound arguments (or an output's fields);
* what the caller needs to pass back *by name* (the cache argument of a model's forward) is read
  from the forward's signature, by the parameter's annotation;
* when a fact cannot be established, raise :class:`CompatibilityError` naming the transformers
  version and what was looked for -- never guess.

Touchpoints: version guard; attention and mask interface registration; the attention
implementation stored on every (sub-)config (``_attn_implementation_internal``) and switched
with ``set_attn_implementation``; the eager attention function of a modeling module; the KV
cache (found by type, its length, the key length a layer will receive, keeping batch rows);
binding a forward's / ``generate``'s arguments; beam search's cache reorders.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from .errors import SteeringError

# Lowest and first-unsupported transformers versions; CI tests the lowest and the newest release
# the range admits (README "Tested versions").
TRANSFORMERS_MIN = "5.17.0"
TRANSFORMERS_MAX_EXCLUSIVE = "6.0.0"
TORCH_MIN = "2.11.0"


class CompatibilityError(SteeringError):
    """The installed transformers does not behave as attnsteer expects at one touchpoint."""

    def __init__(self, touchpoint: str, what: str):
        super().__init__(
            f"transformers {transformers_version()}: {touchpoint}: {what}. attnsteer refuses to guess; this release "
            f"may have changed an internal it relies on. Fix: install a tested transformers "
            f"(>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}, see the README's tested versions) and report "
            "this message"
        )
        self.touchpoint = touchpoint


# ---- versions --------------------------------------------------------------------------------
def _parse(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:  # pragma: no cover - dependency is declared
        return "not installed"


def check_versions() -> None:
    """Raise ``ImportError`` naming the installed and supported versions when they do not fit."""
    tf_version = transformers_version()
    if tf_version == "not installed":  # pragma: no cover - dependency is declared
        raise ImportError(f"attnsteer needs transformers: pip install 'transformers>={TRANSFORMERS_MIN},<6'")
    if not (_parse(TRANSFORMERS_MIN) <= _parse(tf_version) < _parse(TRANSFORMERS_MAX_EXCLUSIVE)):
        raise ImportError(
            f"attnsteer supports transformers >={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}; "
            f"found transformers=={tf_version}. Fix: pip install 'transformers>={TRANSFORMERS_MIN},"
            f"<{TRANSFORMERS_MAX_EXCLUSIVE}'"
        )
    torch_version = metadata.version("torch")
    if _parse(torch_version.split("+")[0]) < _parse(TORCH_MIN):
        raise ImportError(
            f"attnsteer needs torch>={TORCH_MIN}; found torch=={torch_version}. Fix: pip install 'torch>={TORCH_MIN}'"
        )


# ---- attention and mask interfaces -------------------------------------------------------------
def register_attention(name: str, function: Callable, mask_of: str) -> None:
    """Register ``function`` as attention implementation ``name`` (once per process), with the
    mask builder of the implementation ``mask_of`` -- without a mask builder transformers passes
    ``attention_mask=None`` to a custom implementation and padding is silently lost."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, function)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        try:
            mask_builder = ALL_MASK_ATTENTION_FUNCTIONS[mask_of]
        except KeyError:
            raise CompatibilityError("mask interface", f"no mask builder is registered for {mask_of!r}") from None
        AttentionMaskInterface.register(name, mask_builder)


def attention_function(impl: str, module) -> Callable:
    """The attention function implementation ``impl`` runs for ``module``: the modeling file's
    ``eager_attention_forward`` for ``"eager"``, the registered function otherwise."""
    if impl == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise CompatibilityError("eager attention", f"{type(module).__module__} defines no eager_attention_forward")
        return function
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    try:
        return ALL_ATTENTION_FUNCTIONS[impl]
    except KeyError:
        raise CompatibilityError("attention interface", f"no attention function is registered for {impl!r}") from None


# ---- attention implementation on the configs ---------------------------------------------------
def config_tree(config) -> list:
    """The config and every nested sub-config (each once)."""
    seen, out, todo = set(), [], [config]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            todo.append(getattr(cfg, key, None))
    return out


def attn_implementation(config) -> str:
    """The attention implementation a (sub-)config selects (``"eager"`` when unset)."""
    if not hasattr(config, "_attn_implementation"):
        raise CompatibilityError("config attention", f"{type(config).__name__} has no _attn_implementation")
    return config._attn_implementation or "eager"


def snapshot_attn_implementations(model) -> list[tuple[Any, Any]]:
    """What :func:`restore_attn_implementations` needs to undo :func:`set_text_attention`."""
    snapshot = []
    for cfg in config_tree(model.config):
        if "_attn_implementation_internal" not in vars(cfg):
            raise CompatibilityError(
                "config attention", f"{type(cfg).__name__} stores no _attn_implementation_internal to restore"
            )
        snapshot.append((cfg, cfg._attn_implementation_internal))
    return snapshot


def restore_attn_implementations(snapshot) -> None:
    for cfg, value in snapshot:
        cfg._attn_implementation_internal = value


def set_text_attention(model, text_config_key: str, name: str) -> None:
    """Switch the language model's attention to ``name``; vision towers / Q-Formers keep theirs
    (the dict form of ``set_attn_implementation`` for multimodal configs)."""
    model.set_attn_implementation({text_config_key: name} if text_config_key else name)


# ---- binding a call's arguments ------------------------------------------------------------------
_SIGNATURES: dict = {}


def _signature(function) -> inspect.Signature:
    key = getattr(function, "__func__", function)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(function)
    return sig


def bind_arguments(function, args: tuple, kwargs: dict) -> dict:
    """Every argument of a call by its parameter name, ``**kwargs`` flattened in."""
    try:
        bound = _signature(function).bind_partial(*args, **kwargs).arguments
    except TypeError as exc:
        raise CompatibilityError("binding arguments", f"cannot bind the call to {function!r}: {exc}") from None
    extra = {}
    for name, param in _signature(function).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = bound.pop(name, {}) or {}
    return {**bound, **extra}


def parameter_names(function) -> set[str]:
    """Names of ``function``'s parameters (without ``*args`` / ``**kwargs``)."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {name for name, p in _signature(function).parameters.items() if p.kind not in kinds}


def first_argument(function, args: tuple, kwargs: dict):
    """The value of ``function``'s first parameter in a call (a decoder layer's hidden states)."""
    if args:
        return args[0]
    first = next(iter(_signature(function).parameters), None)
    if first is None or first not in kwargs:
        raise CompatibilityError("binding arguments", f"{function!r} was called without its first argument {first!r}")
    return kwargs[first]


# ---- KV cache ----------------------------------------------------------------------------------------
def _cache_type():
    from transformers.cache_utils import Cache

    return Cache


def find_cache(values: Iterable):
    """The KV cache among ``values`` (a call's bound arguments or an output's fields), by type.

    Returns None when there is none; raises when there are several (ambiguous)."""
    cache_type = _cache_type()
    found = [v for v in values if isinstance(v, cache_type)]
    if len(found) > 1:
        raise CompatibilityError(
            "KV cache", f"{len(found)} Cache objects in one call; cannot tell which is the KV cache"
        )
    return found[0] if found else None


def cache_length(cache) -> int:
    """Tokens already in ``cache`` (0 for None)."""
    return 0 if cache is None else int(cache.get_seq_length())


def expected_key_length(cache, q_len: int, layer_idx: int) -> int:
    """Keys layer ``layer_idx``'s attention function will receive in a forward of ``q_len`` new
    tokens (the mask size transformers builds for it): ``q_len`` without a cache."""
    if cache is None:
        return q_len
    return int(cache.get_mask_sizes(q_len, layer_idx)[0])


def output_cache(output):
    """The KV cache a model output carries (by type), or None."""
    values = output.values() if hasattr(output, "values") else vars(output).values()
    return find_cache(values)


def keep_batch_rows(cache, rows: int, device) -> None:
    """Keep the first ``rows`` batch rows of ``cache`` in place (VHR drops its text-only stream)."""
    import torch

    cache.batch_select_indices(torch.arange(rows, device=device))


def cache_is_static(cache) -> bool:
    """Whether ``cache`` preallocates its tensors for a fixed batch and length (``StaticCache`` and
    the other compilable caches ``generate(cache_implementation="static")`` builds)."""
    flag = getattr(cache, "is_compileable", None)
    if not isinstance(flag, bool):
        raise CompatibilityError("KV cache", f"{type(cache).__name__}.is_compileable is not a bool ({flag!r})")
    return flag


def on_cache_reorder(cache, callback) -> None:
    """Call ``callback(beam_idx)`` each time ``generate()``'s beam search reorders ``cache``'s batch
    rows (``Cache.reorder_cache(beam_idx)``, integer (R,)), after the cache itself. Wraps the method
    on this cache object only; a later call replaces the callback (one prompt per cache)."""
    original = getattr(type(cache), "reorder_cache", None)
    if original is None:
        raise CompatibilityError("KV cache", f"{type(cache).__name__} has no reorder_cache(beam_idx) for beam search")

    def reorder_cache(beam_idx, *args, **kwargs):
        result = original(cache, beam_idx, *args, **kwargs)
        callback(beam_idx)
        return result

    cache.reorder_cache = reorder_cache


def cache_batch_size(cache) -> int:
    """Batch rows ``cache`` holds (after at least one forward): read from its first layer's keys."""
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    if keys is None or not hasattr(keys, "shape") or keys.dim() != 4:
        raise CompatibilityError(
            "KV cache",
            f"{type(cache).__name__} has no .layers[0].keys (batch, heads, tokens, dim) tensor to count rows",
        )
    return int(keys.shape[0])


def with_cache(model, cache) -> dict:
    """``{name: cache}`` to pass ``cache`` to ``model(...)`` under the name its forward takes."""
    return {cache_argument(model.forward): cache}


def cache_argument(forward) -> str:
    """Name of the parameter of ``forward`` that takes the KV cache, read from its annotation."""
    names = [
        name
        for name, param in _signature(forward).parameters.items()
        if param.annotation is not inspect.Parameter.empty and "Cache" in str(param.annotation)
    ]
    if len(names) != 1:
        raise CompatibilityError(
            "KV cache argument",
            f"{getattr(forward, '__qualname__', forward)} has {len(names)} Cache-annotated parameters {names}; "
            "expected exactly one",
        )
    return names[0]
