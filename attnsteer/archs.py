"""Supported model families, declared as data: where the decoder layers live.

Adding a family is one :class:`ArchSpec` entry -- no copied modeling code. ``decoder_paths`` are
tried in order on the loaded model (a ``*ForCausalLM`` or its base model) and name the module
that owns ``layers``; each layer's attention module is ``layer.<attention_attr>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    decoder_paths: tuple[str, ...] = ("model", "")
    attention_attr: str = "self_attn"
    # Key of the sub-config whose attention implementation is switched; "" = the model's own config.
    text_config_key: str = ""
    sliding_window: bool = False


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral", sliding_window=True),
        ArchSpec("qwen2", sliding_window=True),
        ArchSpec("qwen3", sliding_window=True),
    )
}


@dataclass
class ResolvedArch:
    """The parts of one loaded model attnsteer touches."""

    spec: ArchSpec
    decoder: nn.Module  # module with .layers; its forward pre-hook sees every call
    attention_modules: list[nn.Module]  # one per layer, index = layer index
    text_config: object
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)


def _get_path(model: nn.Module, path: str):
    obj = model
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def resolve(model: nn.Module) -> ResolvedArch:
    """Find the decoder, its attention modules and head counts, or raise UnsupportedModelError."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedModelError(
            f"model.config.model_type is {model_type!r}, which attnsteer does not support yet; "
            f"supported: {sorted(ARCHS)}. Fix: use a model of a supported family, or add an ArchSpec "
            "entry in attnsteer/archs.py"
        )
    spec = ARCHS[model_type]
    decoder = None
    for path in spec.decoder_paths:
        candidate = _get_path(model, path)
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            decoder = candidate
            break
    if decoder is None:
        raise UnsupportedModelError(
            f"could not find the decoder layers of this {model_type} model (tried {list(spec.decoder_paths)} + "
            "'.layers'); the transformers modeling code may have moved them. Fix: update ArchSpec.decoder_paths"
        )
    attention = [getattr(layer, spec.attention_attr, None) for layer in decoder.layers]
    if any(a is None for a in attention):
        raise UnsupportedModelError(f"{model_type}: a decoder layer has no '{spec.attention_attr}' module")
    text_config = _get_path(config, spec.text_config_key) if spec.text_config_key else config
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return ResolvedArch(spec, decoder, attention, text_config, heads, kv_heads, head_dim)
