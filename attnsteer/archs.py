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
    """One supported family.

    model_type:       ``config.model_type``.
    decoder_paths:    candidate paths (tried in order) to the module that owns ``.layers``.
    text_config_key:  sub-config whose attention implementation is switched ("" = own config);
                      vision towers and Q-Formers keep theirs.
    image_token_attrs: config attributes holding placeholder ids whose positions are image keys.
    wrapper_token_attrs: ids removed together with the image tokens to build the text-only stream
                      (e.g. Qwen2-VL's vision start / end markers).
    batch_state_attrs: per-batch tensors the model keeps between forwards (e.g. Qwen2-VL's
                      ``rope_deltas``) that must follow the batch when a prefill is augmented.
    """

    model_type: str
    decoder_paths: tuple[str, ...] = ("model", "")
    attention_attr: str = "self_attn"
    text_config_key: str = ""
    image_token_attrs: tuple[str, ...] = ()
    wrapper_token_attrs: tuple[str, ...] = ()
    batch_state_attrs: tuple[str, ...] = ()
    # Module (path from the model) whose forward sees the language model's whole input: the
    # model itself, or for InstructBLIP the language model, because its generate() calls
    # language_model.generate(inputs_embeds=...) without going through the top-level forward.
    stream_host: str = ""
    # Attribute of the decoder layers that attend to the image through cross-attention instead of
    # self-attention (Llama-3.2-Vision's ``cross_attn``); those layers' keys are vision states.
    cross_attention_attr: str = ""
    # Attribute of the attention module whose output holds the keys just before RoPE; key rules
    # (:class:`attnsteer.methods.rules.KeyRule`) edit that output. ``key_layout`` says its shape:
    # "flat" (B, T, H_kv * D), or a fused projection (Phi-3's ``qkv_proj``, (B, T, (H_q + 2 H_kv) * D))
    # holding them after the queries; "bthd" (B, T, H_kv, D) and "bhtd" (B, H_kv, T, D): a per-head
    # key norm (Qwen3's and Gemma 3's ``k_norm``), whose output is the key RoPE rotates.
    key_projection: str = "k_proj"
    key_layout: str = "flat"

    @property
    def is_multimodal(self) -> bool:
        return bool(self.image_token_attrs)


_VLM_PATHS = ("model.language_model", "language_model.model", "language_model")
_IMAGE = ("image_token_id",)
_IMAGE_VIDEO = ("image_token_id", "video_token_id")
ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        *(ArchSpec(text_type) for text_type in ("llama", "mistral", "qwen2")),
        *(ArchSpec(qwen3, key_projection="k_norm", key_layout="bthd") for qwen3 in ("qwen3", "qwen3_moe")),
        ArchSpec("phi3", key_projection="qkv_proj"),
        # logit soft-capping (gemma2) and per-layer sliding-window / global attention reach the
        # attention function as its ``softcap`` argument and the layer's own mask
        ArchSpec("gemma2"),
        ArchSpec("gemma3_text", key_projection="k_norm", key_layout="bhtd"),
        ArchSpec("llava", _VLM_PATHS, text_config_key="text_config", image_token_attrs=_IMAGE),
        *(
            ArchSpec(anyres, _VLM_PATHS, text_config_key="text_config", image_token_attrs=_IMAGE_VIDEO)
            for anyres in ("llava_next", "llava_onevision")
        ),
        *(
            ArchSpec(
                qwen_type,
                _VLM_PATHS,
                text_config_key="text_config",
                image_token_attrs=_IMAGE_VIDEO,
                wrapper_token_attrs=("vision_start_token_id", "vision_end_token_id"),
                batch_state_attrs=("model.rope_deltas",),
                **({"key_projection": "k_norm", "key_layout": "bthd"} if qwen_type == "qwen3_vl" else {}),
            )
            for qwen_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
        ),
        # image tokens attend to each other bidirectionally: the mask says so, every backend reads it
        ArchSpec(
            "gemma3",
            _VLM_PATHS,
            text_config_key="text_config",
            image_token_attrs=_IMAGE,
            wrapper_token_attrs=("boi_token_index", "eoi_token_index"),
            key_projection="k_norm",
            key_layout="bhtd",
        ),
        ArchSpec("internvl", _VLM_PATHS, text_config_key="text_config", image_token_attrs=_IMAGE),
        *(
            ArchSpec(idefics, ("model.text_model",), text_config_key="text_config", image_token_attrs=_IMAGE)
            for idefics in ("idefics3", "smolvlm")
        ),
        # the image enters through separate cross-attention layers; ``<|image|>`` in the text only
        # marks where (image_token_id), it is not an image key of the self-attention
        ArchSpec(
            "mllama",
            _VLM_PATHS,
            text_config_key="text_config",
            image_token_attrs=_IMAGE,
            cross_attention_attr="cross_attn",
        ),
        ArchSpec(
            "instructblip",
            _VLM_PATHS,
            text_config_key="text_config",
            image_token_attrs=("image_token_id",),
            stream_host="language_model",
        ),
    )
}


def key_view(output, layout: str, num_heads: int, num_kv_heads: int, head_dim: int):
    """The keys inside a key site's ``output`` (``ArchSpec.key_projection``, shaped by ``layout``)
    as (B, T, H_kv, D), and ``put(output, keys) -> new output`` writing edited keys back (a copy).
    Raises :class:`~attnsteer.compat.CompatibilityError` when the output has another shape."""
    from .compat import CompatibilityError

    q_width, k_width = num_heads * head_dim, num_kv_heads * head_dim
    shape = tuple(output.shape)
    if layout == "bthd" and output.dim() == 4 and shape[2:] == (num_kv_heads, head_dim):
        return output, lambda out, keys: keys.to(out.dtype)
    if layout == "bhtd" and output.dim() == 4 and (shape[1], shape[3]) == (num_kv_heads, head_dim):
        return output.transpose(1, 2), lambda out, keys: keys.transpose(1, 2).to(out.dtype)
    width = shape[-1]
    if layout == "flat" and output.dim() == 3 and width in (k_width, q_width + 2 * k_width):
        start = q_width if width == q_width + 2 * k_width else 0
        b, t = shape[:2]
        keys = output[..., start : start + k_width].reshape(b, t, num_kv_heads, head_dim)

        def put(out, edited):
            new = out.clone()
            new[..., start : start + k_width] = edited.reshape(b, t, k_width).to(out.dtype)
            return new

        return keys, put
    raise CompatibilityError(
        "key projection",
        f"the key site returned shape {shape} for layout {layout!r}; expected {num_kv_heads} kv heads of dim "
        f"{head_dim} ({k_width} keys, or a fused q/k/v of {q_width + 2 * k_width}, for 'flat')",
    )


def get_path(obj, path: str):
    """Attribute path ("a.b.c") from ``obj``; "" is ``obj`` itself; None if missing."""
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


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
    image_token_ids: tuple[int, ...] = ()
    wrapper_token_ids: tuple[int, ...] = ()
    # layers whose attention module is a cross-attention to vision states (ArchSpec.cross_attention_attr)
    cross_layers: frozenset[int] = frozenset()

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)

    @property
    def self_attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.cross_layers]


def _spec_of(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedModelError(
            f"model.config.model_type is {model_type!r}, which attnsteer does not support yet; "
            f"supported: {sorted(ARCHS)}. Fix: use a model of a supported family, or add an ArchSpec "
            "entry in attnsteer/archs.py"
        )
    return ARCHS[model_type]


def resolve(model: nn.Module) -> ResolvedArch:
    """Find the decoder, its attention modules and head counts, or raise UnsupportedModelError."""
    config = getattr(model, "config", None)
    spec = _spec_of(config)
    model_type = spec.model_type
    decoder = None
    for path in spec.decoder_paths:
        candidate = get_path(model, path)
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            decoder = candidate
            break
    if decoder is None:
        raise UnsupportedModelError(
            f"could not find the decoder layers of this {model_type} model (tried {list(spec.decoder_paths)} + "
            "'.layers'); the transformers modeling code may have moved them. Fix: update ArchSpec.decoder_paths"
        )
    attention, cross = [], set()
    for index, layer in enumerate(decoder.layers):
        module = getattr(layer, spec.attention_attr, None)
        if module is None and spec.cross_attention_attr:
            module = getattr(layer, spec.cross_attention_attr, None)
            cross.add(index)
        if module is None:
            names = " or ".join(repr(a) for a in (spec.attention_attr, spec.cross_attention_attr) if a)
            raise UnsupportedModelError(
                f"{model_type}: decoder layer {index} has no {names} module; the transformers modeling code may "
                "have renamed it. Fix: update ArchSpec.attention_attr / cross_attention_attr in attnsteer/archs.py"
            )
        attention.append(module)
    text_config = get_path(config, spec.text_config_key) if spec.text_config_key else config
    return _with_config(spec, config, text_config, decoder, attention, frozenset(cross))


def resolve_config(config) -> ResolvedArch:
    """The facts of a model that attnsteer does not hold as a transformers module (an engine such
    as vLLM owns it): the config's family, head counts and token ids; ``decoder`` is None and
    ``attention_modules`` holds one None per layer. Cross-attention families are not resolved this
    way (their layer kinds live in the modules)."""
    spec = _spec_of(config)
    if spec.cross_attention_attr:
        raise UnsupportedModelError(
            f"{spec.model_type}: its cross-attention layers are found on the loaded model; this engine path "
            "resolves self-attention families only. Fix: use the Hugging Face path (attnsteer.apply)"
        )
    text_config = get_path(config, spec.text_config_key) if spec.text_config_key else config
    return _with_config(spec, config, text_config, None, [None] * text_config.num_hidden_layers, frozenset())


def _with_config(spec: ArchSpec, config, text_config, decoder, attention: list, cross: frozenset) -> ResolvedArch:
    """The ResolvedArch of ``spec`` with the config-derived facts: head counts and token ids."""
    model_type = spec.model_type
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads

    def ids(attrs):
        found = []
        for attr in attrs:
            value = getattr(config, attr, None)
            if value is None:
                value = getattr(text_config, attr, None)
            if value is not None:
                found.append(int(value))
        return tuple(found)

    image_ids = ids(spec.image_token_attrs)
    if spec.is_multimodal and not image_ids:
        raise UnsupportedModelError(
            f"this {model_type} config has none of {list(spec.image_token_attrs)} set, so image tokens cannot be "
            "found. Fix: set config.image_token_id to the placeholder id the processor inserts"
        )
    return ResolvedArch(
        spec,
        decoder,
        attention,
        text_config,
        heads,
        kv_heads,
        head_dim,
        image_ids,
        ids(spec.wrapper_token_attrs),
        cross,
    )
