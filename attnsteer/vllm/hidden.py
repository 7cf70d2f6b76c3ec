"""Layer inputs inside vLLM: the residual stream entering each steered decoder layer, cut into each
request's rows at its prefill (VAR's hidden-state sinks read it).

Some methods read the hidden state entering their layer (VAR: :mod:`attnsteer.sinks`), which
vLLM's attention call does not see. :func:`install_hooks` puts a forward pre-hook on those decoder
layers of vLLM's model (in the worker, at run time): each forward it keeps the residual stream of
all the step's rows, (T, hidden). vLLM's decoder layers take ``(positions, hidden_states,
residual)`` with the residual added inside the layer's input norm, so the stream entering the layer
is ``hidden_states + residual`` (``hidden_states`` alone before the first layer). The attention
backend then cuts each prefilling request's rows out of it (:func:`observe`) and hands them to
every method that reads its layer's input (``Method.reads_layer_input``), which keeps what it finds
in the request's :class:`~attnsteer.context.PromptState` for its decode steps. Hooks need eager
execution: torch.compile would trace them away, so such methods are refused unless the engine
runs with ``enforce_eager=True``.
"""

from __future__ import annotations

import inspect

import torch

from ..compat import CompatibilityError
from ..errors import SteeringError

_STREAM: dict[int, torch.Tensor] = {}  # decoder layer -> residual stream (T, hidden) of this step
_hooked: set[int] = set()  # decoder layers with a hook (this process)


def decoder_layer_path(attention_name: str, layer: int) -> str:
    """``model.text_model.layers.3.self_attn.attn`` -> ``model.text_model.layers.3``: the module
    path up to the component naming decoder layer ``layer``."""
    parts = attention_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end - 1] == str(layer):
            return ".".join(parts[:end])
    raise CompatibilityError(
        "vLLM attention layer name",
        f"{attention_name!r} names no decoder layer {layer}; VAR cannot find the hidden states entering it",
    )


def hook_layer_inputs(runner) -> None:
    """Before a model runner's first step: hook the decoder layers whose input a steered method reads
    (``reads_layer_input``; every steered decoder layer when requests may name recipes), found from
    the attention layers whose impl carries ``steering`` (either attnsteer backend's)."""
    from . import compat

    decoder = compat.decoder_attention_type()
    names = {}
    for name, module in compat.attention_layers(runner).items():
        impl = getattr(module, "impl", None)
        if getattr(impl, "steering", None) is None or impl.attn_type != decoder:
            continue
        layer, wanted = compat.layer_index(name), impl.steering.input_layers
        if wanted is None or layer in wanted:
            names[layer] = name
    install_hooks(compat.runner_model(runner), names)


def install_hooks(model: torch.nn.Module, attention_names: dict[int, str]) -> None:
    """Hook the decoder layers of ``attention_names`` (layer -> the name of its vLLM attention
    module) in ``model`` once per process; raises CompatibilityError when vLLM's decoder layers no
    longer take ``hidden_states`` / ``residual``."""
    modules = dict(model.named_modules())
    for layer, name in sorted(attention_names.items()):
        if layer in _hooked:
            continue
        path = decoder_layer_path(name, layer)
        decoder = modules.get(path)
        if decoder is None:
            raise CompatibilityError("vLLM model layout", f"no module {path!r} holds attention layer {name!r}")
        signature = inspect.signature(decoder.forward)
        if "hidden_states" not in signature.parameters or "residual" not in signature.parameters:
            raise CompatibilityError(
                "vLLM decoder layer",
                f"{type(decoder).__name__}.forward{signature} takes no hidden_states / residual; VAR cannot read "
                "the residual stream entering it",
            )
        decoder.register_forward_pre_hook(_keeper(layer, signature), with_kwargs=True)
        _hooked.add(layer)


def _keeper(layer: int, signature: inspect.Signature):
    def keep(module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        hidden, residual = bound["hidden_states"], bound.get("residual")
        _STREAM[layer] = hidden if residual is None else hidden + residual
        return None

    return keep


def observe(method, prompt, q0: int, q1: int) -> None:
    """At a request's prefill: hand ``method`` the residual stream entering its layer for the
    request's prompt rows q0..q1 of this step; it keeps what it finds in ``prompt``."""
    stream = _STREAM.get(method.layer)
    if stream is None or stream.shape[0] < q1:
        raise SteeringError(
            f"layer {method.layer}: no residual stream of this step's {q1} rows was recorded before its attention; "
            f"attnsteer cannot give {method.name} the hidden states entering the layer"
        )
    hidden = stream[q0:q1].unsqueeze(0)  # (1, P, hidden)
    method.observe_layer_input(hidden, torch.ones(1, q1 - q0, dtype=torch.bool, device=stream.device), prompt)
