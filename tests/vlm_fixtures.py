"""Tiny random vision-language models of eleven families, built offline in code, with inputs.

Nothing here touches the Hugging Face hub: configs are written in code, weights are random (seeded),
and ``input_ids`` are assembled by hand with exactly the placeholder tokens the modeling code of
transformers 5.x (5.17 to 5.24) expects, next to synthetic pixel tensors of the right shapes.

Families (``model_type``) and their classes::

    llava            LlavaForConditionalGeneration         tiny CLIP vision + tiny Llama text
    llava_next       LlavaNextForConditionalGeneration     tiny CLIP vision (any-res tiles) + tiny Mistral text
    qwen2_vl         Qwen2VLForConditionalGeneration       tiny Qwen2-VL ViT + M-RoPE Qwen2 text
    qwen2_5_vl       Qwen2_5_VLForConditionalGeneration    tiny Qwen2.5-VL window ViT + M-RoPE Qwen2 text
    instructblip     InstructBlipForConditionalGeneration  tiny ViT + Q-Former + tiny Llama (Vicuna) text
    qwen3_vl         Qwen3VLForConditionalGeneration       tiny Qwen3-VL ViT (DeepStack) + M-RoPE Qwen3 text
    llava_onevision  LlavaOnevisionForConditionalGeneration tiny SigLIP (any-res tiles) + tiny Qwen2 text
    internvl         InternVLForConditionalGeneration      tiny InternViT (tiles, pixel shuffle) + tiny Qwen2 text
    gemma3           Gemma3ForConditionalGeneration        tiny SigLIP (avg-pooled) + tiny Gemma3 text
    idefics3         Idefics3ForConditionalGeneration      tiny SigLIP-like ViT (tiles, pixel shuffle) + tiny Llama
    smolvlm          SmolVLMForConditionalGeneration       like idefics3

Token id layout shared by every family (text vocab ``VOCAB`` = 136; idefics3 / smolvlm: ``IDEFICS_VOCAB`` = 138)::

    0 pad, 1 bos, 2 eos, [3, 128) ordinary text, 128 image placeholder, 129 video placeholder,
    130 vision_start, 131 vision_end (Qwen2-VL / Qwen2.5-VL / Qwen3-VL; InternVL's <img> / </img>),
    132 / 133: Gemma3's <start_of_image> / <end_of_image> (boi / eoi), Idefics3's
    <fake_token_around_image> / <global-img>; 134-137 (idefics3 / smolvlm only): <row_r_col_c> for r, c in 1..2.

Text side: hidden 64, 4 layers, 4 query heads / 2 kv heads (head dim 16), like ``tests/conftest.py``.

Usage::

    model = build_vlm("qwen2_vl")
    inputs = make_inputs("qwen2_vl", model, n_images=[2, 0, 1])     # left-padded batch of 3
    logits = model(**inputs, position_ids=generation_position_ids("qwen2_vl", model, inputs)).logits
    out = model.generate(**inputs, max_new_tokens=3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

FAMILIES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "instructblip",
    "qwen3_vl",
    "llava_onevision",
    "internvl",
    "gemma3",
    "idefics3",
    "smolvlm",
)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # vision_start IMG* vision_end, patches + image_grid_thw
IDEFICS_FAMILIES = ("idefics3", "smolvlm")  # tiles in (B, num_images, 3, H, W) + pixel_attention_mask

VOCAB = 136
IDEFICS_VOCAB = 138  # + the four <row_r_col_c> tokens
PAD, BOS, EOS = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 128  # ordinary text ids are drawn from [TEXT_LOW, TEXT_HIGH)
IMAGE_TOKEN = 128
VIDEO_TOKEN = 129
VISION_START = 130
VISION_END = 131
BOI, EOI = 132, 133  # gemma3 (config.boi_token_index / eoi_token_index)
FAKE_IMAGE, GLOBAL_IMAGE = 132, 133  # idefics3 / smolvlm <fake_token_around_image>, <global-img>
ROW_COL = {(1, 1): 134, (1, 2): 135, (2, 1): 136, (2, 2): 137}  # idefics3 / smolvlm <row_r_col_c>

QFORMER_VOCAB = TEXT_HIGH  # the Q-Former reads the same text ids [TEXT_LOW, TEXT_HIGH) as the LM
QFORMER_CLS, QFORMER_SEP = 1, 2  # the Q-Former's own (BERT-like) [CLS] / [SEP]; 0 is its [PAD]
NUM_QUERY_TOKENS = 4

# Whether a prompt may carry several images / none while other rows have images.
MULTI_IMAGE = {family: family != "instructblip" for family in FAMILIES}
TEXT_ONLY_ROWS = {family: family != "instructblip" for family in FAMILIES}  # instructblip: one image per row

# Dotted attribute paths (from the *ForConditionalGeneration model).
TEXT_DECODER_PATH = {  # module owning ``.layers`` (the decoder layers of the language model)
    **{family: "model.language_model" for family in FAMILIES},
    "instructblip": "language_model.model",
    "idefics3": "model.text_model",
    "smolvlm": "model.text_model",
}
VISION_PATHS = {  # vision-side modules whose outputs must not change under text-side steering
    "llava": ("model.vision_tower", "model.multi_modal_projector"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector"),
    "qwen2_vl": ("model.visual",),  # includes the patch merger (model.visual.merger)
    "qwen2_5_vl": ("model.visual",),
    "instructblip": ("vision_model", "qformer", "language_projection"),
    "qwen3_vl": ("model.visual",),  # includes the merger and the DeepStack mergers
    "llava_onevision": ("model.vision_tower", "model.multi_modal_projector"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector"),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector"),
    "idefics3": ("model.vision_model", "model.connector"),
    "smolvlm": ("model.vision_model", "model.connector"),
}

# The shape of every tiny vision tower (CLIP, SigLIP, InternViT, ...): width 32, 2 layers, 2 heads.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Default synthetic image sizes (height, width) in pixels, used in turn for the images of a batch.
LLAVA_IMAGE_SIZE = 16  # CLIP image size, patch 4 -> 4x4 = 16 placeholder tokens per image
LLAVA_NEXT_TILE = 16  # CLIP image size of one tile, patch 8 -> 2x2 = 4 features per tile
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
LLAVA_NEXT_SIZES = [(16, 32), (32, 32), (20, 30), (32, 16)]  # -> 14, 24, 14, 16 placeholder tokens
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
QWEN_SIZES = [(16, 16), (16, 24), (24, 16)]  # grids (1,4,4) (1,4,6) (1,6,4) -> 4, 6, 6 placeholder tokens
INSTRUCTBLIP_IMAGE_SIZE = 16
# llava_onevision: SigLIP tile 16, patch 8 (2x2 = 4 features), llava_next's pinpoints; an image alone in its
# row is any-res (base tile + unpadded grid + a newline per grid row), one of several is its base tile + newline
ONEVISION_SIZES = LLAVA_NEXT_SIZES  # alone in a row -> 14, 24, 14, 16 placeholder tokens; with others: 5 each
INTERNVL_TILE, INTERNVL_MAX_TILES = 16, 4  # tile 16 (patch 4, pixel shuffle 0.5 -> 4 tokens per tile)
INTERNVL_SIZES = [(16, 32), (16, 16), (32, 16)]  # grids 2x1, 1x1, 1x2 -> 3, 1, 3 tiles (+ thumbnail) -> 12, 4, 12
GEMMA3_IMAGE_SIZE, GEMMA3_TOKENS = 16, 4  # SigLIP 16 / patch 4 -> 4x4 patches, avg-pooled to 2x2 = 4 tokens
IDEFICS_TILE = 16  # patch 4 -> 16 patches, pixel shuffle (scale 2) -> 4 tokens per tile
IDEFICS_SIZES = [(16, 32), (16, 16), (32, 16)]  # 1x2 + global, unsplit, 2x1 + global -> 19, 7, 19 tokens
DEFAULT_SIZES = {
    **{family: QWEN_SIZES for family in FAMILIES},  # (qwen sizes; ignored by the fixed-square families)
    "llava_next": LLAVA_NEXT_SIZES,
    "llava_onevision": ONEVISION_SIZES,
    "internvl": INTERNVL_SIZES,
    "idefics3": IDEFICS_SIZES,
    "smolvlm": IDEFICS_SIZES,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; known: {FAMILIES}")


def _text_common(**overrides) -> dict:
    """The tiny text models' shape (conftest.TINY_TEXT) with this vocabulary and its special ids."""
    from conftest import TINY_TEXT

    return {
        **TINY_TEXT,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": False,
        **overrides,
    }


def vlm_config(family: str, **text_overrides):
    """The tiny config of ``family``; ``text_overrides`` are set on its ``text_config`` afterwards."""
    _check_family(family)
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig

    if family == "llava":
        from transformers import LlavaConfig

        vision = CLIPVisionConfig(
            **TINY_VISION,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=4,
            projection_dim=32,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**_text_common()),
            image_token_index=IMAGE_TOKEN,
            image_seq_length=(LLAVA_IMAGE_SIZE // 4) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif family == "llava_next":
        from transformers import LlavaNextConfig

        vision = CLIPVisionConfig(
            **TINY_VISION,
            image_size=LLAVA_NEXT_TILE,
            patch_size=8,
            projection_dim=32,
        )
        cfg = LlavaNextConfig(
            vision_config=vision,
            text_config=MistralConfig(**_text_common(sliding_window=None)),
            image_token_index=IMAGE_TOKEN,
            image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
            image_seq_length=(LLAVA_NEXT_TILE // 8) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        specials = dict(
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        # the vision tower's shape every Qwen family shares: 2 blocks, 2 heads, its patching
        vision = dict(
            depth=2,
            num_heads=2,
            in_channels=3,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
        )
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig

            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            cfg = Qwen2VLConfig(text_config=_text_common(rope_parameters=rope), vision_config=vision, **specials)
        elif family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig

            vision.update(
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                window_size=QWEN_PATCH * QWEN_MERGE * 2,  # windows of 2x2 merged tokens
                fullatt_block_indexes=[1],
                tokens_per_second=2,
            )
            cfg = Qwen2_5_VLConfig(text_config=_text_common(rope_parameters=rope), vision_config=vision, **specials)
        else:
            from transformers import Qwen3VLConfig

            vision.update(
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                num_position_embeddings=64,  # an 8x8 learned grid, bilinearly resampled to each image's patch grid
                deepstack_visual_indexes=[0, 1],  # ViT blocks 0, 1 -> added to the outputs of decoder layers 0, 1
            )
            text = _text_common(head_dim=16, rope_parameters={**rope, "mrope_interleaved": True})
            cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **specials)
    elif family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(
            **TINY_VISION,
            image_size=LLAVA_NEXT_TILE,
            patch_size=8,
            vision_use_head=False,
        )
        cfg = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=Qwen2Config(**_text_common()),
            image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN,
            image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token
            tie_word_embeddings=False,
        )
    elif family == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(
            **TINY_VISION,
            image_size=INTERNVL_TILE,
            patch_size=4,
        )
        cfg = InternVLConfig(
            vision_config=vision,
            text_config=Qwen2Config(**_text_common()),
            image_token_id=IMAGE_TOKEN,
            image_seq_length=(INTERNVL_TILE // 4) ** 2 // 4,  # 16 patches, pixel shuffle 0.5 -> 4 tokens per tile
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",  # drops the CLS token
            tie_word_embeddings=False,
        )
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(
            **TINY_VISION,
            image_size=GEMMA3_IMAGE_SIZE,
            patch_size=4,
            vision_use_head=False,
        )
        text = Gemma3TextConfig(
            **_text_common(
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=6,  # sliding-window (6 keys) and global layers alternate
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            )
        )
        cfg = Gemma3Config(
            vision_config=vision,
            text_config=text,
            mm_tokens_per_image=GEMMA3_TOKENS,
            image_token_index=IMAGE_TOKEN,
            boi_token_index=BOI,
            eoi_token_index=EOI,
            tie_word_embeddings=False,
        )
    elif family in IDEFICS_FAMILIES:
        import transformers

        prefix = "Idefics3" if family == "idefics3" else "SmolVLM"
        vision = getattr(transformers, f"{prefix}VisionConfig")(
            **TINY_VISION,
            image_size=IDEFICS_TILE,
            patch_size=4,
        )
        cfg = getattr(transformers, f"{prefix}Config")(
            vision_config=vision,
            text_config=LlamaConfig(**_text_common(vocab_size=IDEFICS_VOCAB)),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        )
    else:  # instructblip
        from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

        vision = InstructBlipVisionConfig(
            **TINY_VISION,
            image_size=INSTRUCTBLIP_IMAGE_SIZE,
            patch_size=4,
            initializer_range=0.02,  # default 1e-10: blind tower
        )
        qformer = InstructBlipQFormerConfig(
            vocab_size=QFORMER_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        cfg = InstructBlipConfig(
            vision_config=vision,
            qformer_config=qformer,
            text_config=LlamaConfig(**_text_common()),
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_TOKEN,
        )
    for key, value in text_overrides.items():
        setattr(cfg.text_config, key, value)
    return cfg


def _model_class(family: str):
    import transformers

    return {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "instructblip": transformers.InstructBlipForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "internvl": transformers.InternVLForConditionalGeneration,
        "gemma3": transformers.Gemma3ForConditionalGeneration,
        "idefics3": transformers.Idefics3ForConditionalGeneration,
        "smolvlm": transformers.SmolVLMForConditionalGeneration,
    }[family]


def vocab_size(family: str) -> int:
    """The text vocabulary of ``family``'s tiny model (``IDEFICS_VOCAB`` for idefics3 / smolvlm, else ``VOCAB``)."""
    _check_family(family)
    return IDEFICS_VOCAB if family in IDEFICS_FAMILIES else VOCAB


def attn_implementation_dict(family: str, attn_implementation: str = "sdpa") -> dict:
    """``attn_implementation`` for the language model (and the top-level config), sdpa for the vision side.

    gemma3 takes sdpa or eager only: its image tokens attend to each other bidirectionally through the
    mask, which flash attention drops (transformers refuses it: ``_supports_flash_attn = False``)."""
    if family == "gemma3" and attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"gemma3's text attention must be 'sdpa' or 'eager', got {attn_implementation!r}")
    impl = {"": attn_implementation, "text_config": attn_implementation, "vision_config": "sdpa"}
    if family == "instructblip":
        impl["qformer_config"] = "sdpa"
    return impl


def build_vlm(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    plant_sinks: bool = True,
    **text_overrides,
):
    """A tiny random ``family`` VLM in eval mode, identical for identical arguments.

    ``attn_implementation`` applies to the language model only (the vision tower / Q-Former keep
    sdpa). ``plant_sinks`` scales the text layers' q/k projections by 3 like ``conftest._plant_sinks``
    so heads have real attention sinks. ``text_overrides`` are set on ``config.text_config`` after
    it is built, like conftest's ``tiny_config`` (e.g. ``sliding_window=6`` for llava_next's Mistral)."""
    cfg = vlm_config(family, **text_overrides)
    torch.manual_seed(seed)
    model = _model_class(family)._from_config(
        cfg, dtype=dtype, attn_implementation=attn_implementation_dict(family, attn_implementation)
    )
    if family == "instructblip":  # initialised to zeros: every query (so every placeholder) would be equal
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 1.0)
    if family == "gemma3":  # initialised to zeros: every image feature would be 0 (a blind model)
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, cfg.initializer_range)
    if plant_sinks:
        with torch.no_grad():
            for layer in text_layers(model):
                layer.self_attn.q_proj.weight.mul_(3.0)
                layer.self_attn.k_proj.weight.mul_(3.0)
    return model.eval()


def _family_of(model) -> str:
    family = model.config.model_type
    _check_family(family)
    return family


def _get_path(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------- structure
def text_decoder(model) -> nn.Module:
    """The language model's decoder (the module that owns ``.layers``)."""
    return _get_path(model, TEXT_DECODER_PATH[_family_of(model)])


def text_layers(model) -> nn.ModuleList:
    """The language model's decoder layers (the model's own ``nn.ModuleList``)."""
    return text_decoder(model).layers


def vision_module(model) -> nn.Module:
    """The vision tower; for InstructBLIP a fresh ``nn.ModuleDict`` of ``vision_model`` and ``qformer``
    (never called itself: hook its children, or use ``vision_modules``)."""
    family = _family_of(model)
    if family == "instructblip":
        return nn.ModuleDict({"vision_model": model.vision_model, "qformer": model.qformer})
    return _get_path(model, VISION_PATHS[family][0])


def vision_modules(model) -> dict[str, nn.Module]:
    """Every vision-side module (tower, projector / merger, Q-Former), keyed by dotted path."""
    return {path: _get_path(model, path) for path in VISION_PATHS[_family_of(model)]}


def image_token_ids(family: str, model) -> set[int]:
    """Placeholder ids whose positions are image tokens: ``image_token_id`` (+ ``video_token_id``)."""
    _check_family(family)
    ids = {int(model.config.image_token_id)}
    if getattr(model.config, "video_token_id", None) is not None:
        ids.add(int(model.config.video_token_id))
    return ids


def vision_wrapper_ids(family: str, model) -> dict[str, int]:
    """Ids removed together with the image tokens to build the text-only stream (attnsteer's
    ``ArchSpec.wrapper_token_attrs``): ``{"vision_start", "vision_end"}`` for the Qwen families,
    ``{"boi", "eoi"}`` for gemma3; ``{}`` for the others (whose image markup stays in the text stream,
    see ``image_markup_ids``)."""
    _check_family(family)
    if family in QWEN_FAMILIES:
        return {
            "vision_start": int(model.config.vision_start_token_id),
            "vision_end": int(model.config.vision_end_token_id),
        }
    if family == "gemma3":
        return {"boi": int(model.config.boi_token_index), "eoi": int(model.config.eoi_token_index)}
    return {}


def image_markup_ids(family: str, model) -> set[int]:
    """Non-text ids the layout puts around images besides the placeholders and ``vision_wrapper_ids``
    (kept in the text-only stream): InternVL's ``<img>`` / ``</img>``, Idefics3's / SmolVLM's
    ``<fake_token_around_image>``, ``<global-img>`` and ``<row_r_col_c>``; empty for the others."""
    _check_family(family)
    if family == "internvl":
        return {VISION_START, VISION_END}
    if family in IDEFICS_FAMILIES:
        return {FAKE_IMAGE, GLOBAL_IMAGE, *ROW_COL.values()}
    return set()


def image_token_mask(family: str, model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask (same shape as ``input_ids``) of the image-placeholder positions."""
    ids = torch.tensor(sorted(image_token_ids(family, model)), device=input_ids.device)
    return torch.isin(input_ids, ids)


# ------------------------------------------------------------------------------ placeholder counting
def num_image_tokens(family: str, model, image_size: tuple[int, int] | None = None, images_in_row: int = 1) -> int:
    """Placeholder tokens one image of ``image_size`` (height, width; pixels) takes in ``input_ids``.

    llava: (image_size // patch)**2 (CLS dropped); instructblip: num_query_tokens; llava_next:
    base tile + unpadded any-res grid with one newline per row (computed with the modeling code's own
    helpers); qwen: t*h*w / merge**2 with (h, w) = size // patch. llava_onevision: like llava_next
    (SigLIP: no CLS) when the image is alone in its row, its base tile + one newline when
    ``images_in_row`` > 1 (the processor's and the model's multi-image rule); internvl:
    ``image_seq_length`` per tile (1 tile, or the grid's tiles + a thumbnail); gemma3:
    ``mm_tokens_per_image``; idefics3 / smolvlm: ``image_seq_len`` per tile (the split tiles and
    the global image) -- markup tokens (``image_markup_ids``, boi / eoi, vision_start / end) not counted."""
    _check_family(family)
    cfg = model.config
    size = tuple(image_size or DEFAULT_SIZES[family][0])
    if family == "llava":
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        return n if cfg.vision_feature_select_strategy == "default" else n + 1
    if family == "instructblip":
        return int(cfg.num_query_tokens)
    if family in ("llava_next", "llava_onevision"):
        import importlib

        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        get_anyres_image_grid_shape, unpad_image = modeling.get_anyres_image_grid_shape, modeling.unpad_image
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if family == "llava_next":
            base = side * side + (0 if cfg.vision_feature_select_strategy == "default" else 1)
        else:  # SigLIP: no CLS to drop or keep
            base = side * side
            if images_in_row > 1:
                return base + 1
        grid_h, grid_w = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        unpadded = unpad_image(torch.zeros(1, grid_h * side, grid_w * side), list(size))
        rows, cols = unpadded.shape[1:]
        if family == "llava_onevision":  # "anyres_max_9": grids above 9 tiles' worth are downsampled
            max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
            ratio = math.sqrt(rows * cols / (max_tiles * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return base + rows * (cols + 1)
    if family == "internvl":
        return int(cfg.image_seq_length) * _internvl_num_tiles(size)
    if family == "gemma3":
        return int(cfg.mm_tokens_per_image)
    if family in IDEFICS_FAMILIES:
        rows, cols = _idefics_grid(size)
        return _idefics_seq_len(cfg) * (rows * cols + 1)
    grid = _qwen_grid(cfg, size)
    return int(grid[0] * grid[1] * grid[2]) // cfg.vision_config.spatial_merge_size**2


def _internvl_num_tiles(image_size) -> int:
    """Tiles of one image: 1, or the best grid of at most ``INTERNVL_MAX_TILES`` tiles + a thumbnail
    (GotOcr2's ``get_optimal_tiled_canvas`` + ``crop_to_patches``, the rule of InternVL's processor)."""
    height, width = image_size
    tiles = range(1, INTERNVL_MAX_TILES + 1)
    grids = sorted([(c, r) for c in tiles for r in tiles if c * r <= INTERNVL_MAX_TILES], key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:  # closest aspect ratio; ties: more tiles while they cover under twice the image
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * INTERNVL_TILE**2 * cols * rows:
            best = (cols, rows)
    return 1 if best[0] * best[1] == 1 else best[0] * best[1] + 1


def _idefics_grid(image_size) -> tuple[int, int]:
    """(rows, cols) of split tiles of one image (0, 0 when it fits one tile), sizes multiples of the tile."""
    height, width = image_size
    if height % IDEFICS_TILE or width % IDEFICS_TILE or max(height, width) > 2 * IDEFICS_TILE:
        raise ValueError(
            f"idefics image sizes must be multiples of {IDEFICS_TILE} up to {2 * IDEFICS_TILE}; got {image_size}"
        )
    if height == width == IDEFICS_TILE:
        return 0, 0
    return height // IDEFICS_TILE, width // IDEFICS_TILE


def _idefics_seq_len(cfg) -> int:
    vc = cfg.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // cfg.scale_factor**2


def _qwen_grid(cfg, image_size) -> tuple[int, int, int]:
    vc = cfg.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    height, width = image_size
    if height % unit or width % unit:
        raise ValueError(f"qwen image sizes must be multiples of patch*merge={unit}; got {image_size}")
    return 1, height // vc.patch_size, width // vc.patch_size


def _llava_next_num_tiles(cfg, image_size) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(list(image_size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def _vision_dtype(family: str, model) -> torch.dtype:
    return next(vision_module(model).parameters()).dtype


# ------------------------------------------------------------------------------------------- inputs
def make_inputs(
    family: str,
    model,
    prompts: list[list[int]] | None = None,
    n_images: Sequence[int] = (1,),
    seed: int = 0,
    pad: str = "left",
    image_sizes: Sequence[tuple[int, int]] | None = None,
    text_before_images: int = 2,
) -> dict:
    """A padded batch that ``model(**inputs)`` and ``model.generate(**inputs)`` accept.

    Row ``r`` holds ``n_images[r]`` images (``n_images`` of length 1 is broadcast over ``prompts``).
    ``prompts`` are the rows' text ids (default: random lengths 3-8, seeded, ids in
    [TEXT_LOW, TEXT_HIGH)); the first ``text_before_images`` of them come before the images.
    Row layouts (``sep``: one random text id; ``IMG * n``: the image's placeholders, ``num_image_tokens``)::

        llava, llava_next  [bos] text[:k] (IMG * n  sep) per image  text[k:]
        qwen2_vl, 2.5, 3   text[:k] (vision_start  IMG * n  vision_end) per image  text[k:]
        instructblip       IMG * num_query_tokens  [bos] text          (exactly one image per row)
        llava_onevision    text[:k] (IMG * n  sep) per image  text[k:]
        internvl           text[:k] (<img>  IMG * n  </img>) per image  text[k:]
        gemma3             [bos] text[:k] (boi  IMG * 4  eoi) per image  text[k:]
        idefics3, smolvlm  [bos] text[:k] image block per image  text[k:], the block of an image split
                           into R x C tiles being (fake <row_r_col_c> IMG * 4) for each tile, row-major,
                           then fake <global-img> IMG * 4 fake; of an unsplit image (one tile):
                           fake <global-img> IMG * 4 fake

    (The real processors' newlines -- idefics3's after each tile row, gemma3's around the image --
    are whitespace to ``make_processor``'s word tokenizer, so neither side has them.)

    ``image_sizes`` (height, width in pixels), used in turn over the batch's images, matter for
    llava_next / llava_onevision (tile grid + unpadding), qwen (patch grid; multiples of 8),
    internvl (tile grid) and idefics3 / smolvlm (tile grid; multiples of 16 up to 32, as the
    processor's images after its resize); defaults ``DEFAULT_SIZES[family]``. Keys: input_ids,
    attention_mask and
    llava: pixel_values (N,3,16,16) | llava_next: pixel_values (N,max_tiles,3,16,16), image_sizes (N,2) |
    qwen: pixel_values (patches, 96), image_grid_thw (N,3), mm_token_type_ids (B,L; 1 at IMG) |
    instructblip: pixel_values (B,3,16,16), qformer_input_ids, qformer_attention_mask (right-padded) |
    llava_onevision: pixel_values (N,max_tiles,3,16,16) (one tile for an image of a multi-image row),
    image_sizes (N,2), batch_num_images (B,) (0 for a text-only row; the real processor leaves such rows
    out of it) | internvl: pixel_values (tiles,3,16,16) |
    gemma3: pixel_values (N,3,16,16), token_type_ids (B,L; 1 at IMG: the bidirectional image blocks) |
    idefics3, smolvlm: pixel_values (B,max_tiles,3,16,16) (all-zero tiles are padding), pixel_attention_mask
    (B,max_tiles,16,16). Pixel keys are left out when the batch has no image (not possible for instructblip)."""
    _check_family(family)
    if pad not in ("left", "right"):
        raise ValueError(f"pad must be 'left' or 'right', got {pad!r}")
    gen = torch.Generator().manual_seed(seed)
    prompts, n_images = prompt_rows(prompts, n_images, gen)
    specials = image_token_ids(family, model) | set(vision_wrapper_ids(family, model).values())
    specials |= image_markup_ids(family, model)
    for p in prompts:
        if specials & set(p):
            raise ValueError(f"prompt {p} contains placeholder ids {sorted(specials & set(p))}")
    if family == "instructblip" and any(n != 1 for n in n_images):
        raise ValueError("instructblip takes exactly one image per prompt (n_images must be all 1)")
    if any(n < 0 for n in n_images):
        raise ValueError("n_images must be >= 0")
    if not MULTI_IMAGE[family] and any(n > 1 for n in n_images):
        raise ValueError(f"{family} takes at most one image per prompt")

    cfg = model.config
    sizes = list(image_sizes) if image_sizes is not None else DEFAULT_SIZES[family]
    image_token = int(cfg.image_token_id)

    rows: list[list[int]] = []
    per_image: list[tuple[int, int]] = []  # size of every image of the batch, in row order
    for prompt, n in zip(prompts, n_images):
        k = min(text_before_images, len(prompt))
        head, tail = prompt[:k], prompt[k:]
        if family == "instructblip":
            rows.append([image_token] * num_image_tokens(family, model) + [BOS] + prompt)
            continue
        blocks: list[int] = []
        for _ in range(n):
            size = tuple(sizes[len(per_image) % len(sizes)])
            per_image.append(size)
            count = num_image_tokens(family, model, size, images_in_row=n)
            if family in QWEN_FAMILIES:
                blocks += [int(cfg.vision_start_token_id)] + [image_token] * count + [int(cfg.vision_end_token_id)]
            elif family == "internvl":
                blocks += [VISION_START] + [image_token] * count + [VISION_END]
            elif family == "gemma3":
                blocks += [int(cfg.boi_token_index)] + [image_token] * count + [int(cfg.eoi_token_index)]
            elif family in IDEFICS_FAMILIES:
                seq = [image_token] * _idefics_seq_len(cfg)
                grid_rows, grid_cols = _idefics_grid(size)
                for r in range(grid_rows):
                    for c in range(grid_cols):
                        blocks += [FAKE_IMAGE, ROW_COL[(r + 1, c + 1)]] + seq
                blocks += [FAKE_IMAGE, GLOBAL_IMAGE] + seq + [FAKE_IMAGE]
            else:  # a text separator ("\n") between images keeps their placeholder runs apart
                blocks += [image_token] * count + [int(torch.randint(TEXT_LOW, TEXT_HIGH, (1,), generator=gen))]
        bos = [] if family in (*QWEN_FAMILIES, "llava_onevision", "internvl") else [BOS]
        rows.append(bos + head + blocks + tail)

    input_ids, attention_mask = _pad(rows, PAD, pad)
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    vdtype = _vision_dtype(family, model)
    n_total = sum(n_images)

    if family in ("llava", "gemma3"):
        side = cfg.vision_config.image_size
        if n_total:
            inputs["pixel_values"] = torch.randn(n_total, 3, side, side, generator=gen).to(vdtype)
        if family == "gemma3":
            inputs["token_type_ids"] = (input_ids == image_token).long()
    elif family in ("llava_next", "llava_onevision"):
        tile = cfg.vision_config.image_size
        if n_total:
            alone = [n == 1 for n in n_images for _ in range(n)]  # onevision: only a lone image is tiled
            tiles = [
                _llava_next_num_tiles(cfg, s) if family == "llava_next" or a else 1 for s, a in zip(per_image, alone)
            ]
            pixel_values = torch.zeros(n_total, max(tiles), 3, tile, tile)
            for i, t in enumerate(tiles):
                pixel_values[i, :t] = torch.randn(t, 3, tile, tile, generator=gen)
            inputs["pixel_values"] = pixel_values.to(vdtype)
            inputs["image_sizes"] = torch.tensor(per_image, dtype=torch.long)
            if family == "llava_onevision":
                inputs["batch_num_images"] = torch.tensor(n_images, dtype=torch.long)
    elif family in QWEN_FAMILIES:
        vc = cfg.vision_config
        if n_total:
            grids = torch.tensor([_qwen_grid(cfg, s) for s in per_image], dtype=torch.long)
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            inputs["pixel_values"] = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=gen).to(vdtype)
            inputs["image_grid_thw"] = grids
        inputs["mm_token_type_ids"] = (input_ids == image_token).to(torch.int32)
    elif family == "internvl":
        side = cfg.vision_config.image_size[0]
        tiles = sum(_internvl_num_tiles(s) for s in per_image)
        if n_total:
            inputs["pixel_values"] = torch.randn(tiles, 3, side, side, generator=gen).to(vdtype)
    elif family in IDEFICS_FAMILIES:
        side = cfg.vision_config.image_size
        if n_total:
            tiles, start = [], 0
            for n in n_images:
                tiles.append(sum(_idefics_grid(s)[0] * _idefics_grid(s)[1] + 1 for s in per_image[start : start + n]))
                start += n
            pixel_values = torch.zeros(len(rows), max(tiles), 3, side, side)
            pixel_attention_mask = torch.zeros(len(rows), max(tiles), side, side, dtype=torch.long)
            for r, t in enumerate(tiles):
                pixel_values[r, :t] = torch.randn(t, 3, side, side, generator=gen)
                pixel_attention_mask[r, :t] = 1
            inputs["pixel_values"] = pixel_values.to(vdtype)
            inputs["pixel_attention_mask"] = pixel_attention_mask
    else:  # instructblip
        side = cfg.vision_config.image_size
        inputs["pixel_values"] = torch.randn(len(rows), 3, side, side, generator=gen).to(vdtype)
        q_rows = [[QFORMER_CLS] + p + [QFORMER_SEP] for p in prompts]
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = _pad(q_rows, 0, "right")
    return inputs


def prompt_rows(prompts, n_images, gen: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """(text ids per row, images per row): ``prompts`` as given (random lengths 3-8 of ids in
    [TEXT_LOW, TEXT_HIGH) from ``gen`` when None); ``n_images`` of length 1 is broadcast."""
    n_images = list(n_images)
    if prompts is None:
        lengths = torch.randint(3, 9, (len(n_images),), generator=gen).tolist()
        prompts = [torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist() for n in lengths]
    else:
        prompts = [list(map(int, p)) for p in prompts]
        if len(n_images) == 1 and len(prompts) > 1:
            n_images = n_images * len(prompts)
    if len(n_images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but n_images has {len(n_images)} entries")
    return prompts, n_images


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def images_per_row(family: str, model, inputs: dict) -> list[int]:
    """How many images each row of ``inputs`` holds (read back from its placeholder / markup tokens)."""
    _check_family(family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    if family == "instructblip":
        return [1] * ids.shape[0]
    marker = {"internvl": VISION_START, "gemma3": BOI, "idefics3": GLOBAL_IMAGE, "smolvlm": GLOBAL_IMAGE}.get(family)
    if family in QWEN_FAMILIES:
        marker = int(model.config.vision_start_token_id)
    if marker is not None:
        return ((ids == marker) & mask).sum(-1).tolist()
    is_img = (ids == model.config.image_token_id) & mask
    starts = is_img & ~torch.cat([torch.zeros_like(is_img[:, :1]), is_img[:, :-1]], dim=1)
    return starts.sum(-1).tolist()


def row_inputs(family: str, model, inputs: dict, r: int) -> dict:
    """Row ``r`` of a ``make_inputs`` batch as a batch of one, padding removed, with its own images."""
    _check_family(family)
    keep = inputs["attention_mask"][r].bool()
    out = {"input_ids": inputs["input_ids"][r][keep][None], "attention_mask": inputs["attention_mask"][r][keep][None]}
    counts = images_per_row(family, model, inputs)
    first, n = sum(counts[:r]), counts[r]
    if family == "instructblip":
        qkeep = inputs["qformer_attention_mask"][r].bool()
        out["pixel_values"] = inputs["pixel_values"][r : r + 1]
        out["qformer_input_ids"] = inputs["qformer_input_ids"][r][qkeep][None]
        out["qformer_attention_mask"] = inputs["qformer_attention_mask"][r][qkeep][None]
        return out
    for key in ("mm_token_type_ids", "token_type_ids"):  # qwen / gemma3: per-token, like input_ids
        if key in inputs:
            out[key] = inputs[key][r][keep][None]
    if not n:
        return out
    if family in QWEN_FAMILIES:
        grids = inputs["image_grid_thw"]
        offsets = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
        out["pixel_values"] = inputs["pixel_values"][offsets[first] : offsets[first + n]]
        out["image_grid_thw"] = grids[first : first + n]
    elif family == "internvl":  # tiles of the rows before, from their placeholder counts
        seq = int(model.config.image_seq_length)
        start = sum(int((inputs["input_ids"][i] == model.config.image_token_id).sum()) // seq for i in range(r))
        tiles = int((out["input_ids"] == model.config.image_token_id).sum()) // seq
        out["pixel_values"] = inputs["pixel_values"][start : start + tiles]
    elif family in IDEFICS_FAMILIES:  # this row's tiles, without the batch's padding tiles
        tiles = int(inputs["pixel_attention_mask"][r].flatten(1).any(-1).sum())
        out["pixel_values"] = inputs["pixel_values"][r : r + 1, :tiles]
        out["pixel_attention_mask"] = inputs["pixel_attention_mask"][r : r + 1, :tiles]
    else:
        out["pixel_values"] = inputs["pixel_values"][first : first + n]
        if family == "llava_onevision":
            out["batch_num_images"] = inputs["batch_num_images"][r : r + 1]
        if family in ("llava_next", "llava_onevision"):
            out["image_sizes"] = inputs["image_sizes"][first : first + n]
    return out


def shifted_pixels(family: str, inputs: dict, delta: float) -> torch.Tensor:
    """``inputs["pixel_values"]`` with ``delta`` added to every real image; idefics3 / smolvlm's
    all-zero padding tiles stay zero (the model tells padding tiles from images by that)."""
    _check_family(family)
    pixel_values = inputs["pixel_values"]
    if family in IDEFICS_FAMILIES:
        real = inputs["pixel_attention_mask"].flatten(2).any(-1)[..., None, None, None]
        return pixel_values + delta * real.to(pixel_values.dtype)
    return pixel_values + delta


def generation_position_ids(family: str, model, inputs: dict) -> torch.Tensor:
    """The ``position_ids`` ``model.generate(**inputs)`` computes for the prompt (prefill) forward.

    llava / llava_next / llava_onevision / internvl / gemma3 / idefics3 / smolvlm:
    ``attention_mask.cumsum(-1) - 1`` (0 on padding), shape (B, L).
    qwen2_vl / qwen2_5_vl / qwen3_vl: (4, B, L) = [text positions; M-RoPE t, h, w from ``get_rope_index``]
    (as generate does, this also sets ``model.model.rope_deltas``). instructblip: its ``generate``
    hands ``inputs_embeds`` to the Llama's ``generate``, which uses the cumsum positions; its
    ``forward`` passes no positions unless given (``position_ids`` travels to the LM via kwargs)."""
    _check_family(family)
    if family == "instructblip":
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))


@torch.no_grad()
def image_features(family: str, model, inputs: dict) -> torch.Tensor:
    """The vision-side features scattered into the image placeholders, (n_placeholders, text_hidden)."""
    _check_family(family)
    if family == "instructblip":
        out = model.get_image_features(
            inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs.get("qformer_attention_mask"),
            return_dict=True,
        )
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
    if "pixel_values" not in inputs:
        return torch.empty(0, model.config.text_config.hidden_size)
    pixel_values = inputs["pixel_values"]
    if family in ("llava", "internvl", "gemma3"):
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    elif family == "llava_next":
        out = model.model.get_image_features(pixel_values, inputs["image_sizes"], return_dict=True)
    elif family == "llava_onevision":
        out = model.model.get_image_features(
            pixel_values, inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images"), return_dict=True
        )
    elif family in IDEFICS_FAMILIES:
        out = model.model.get_image_features(pixel_values, inputs.get("pixel_attention_mask"), return_dict=True)
    else:  # qwen; qwen3_vl's DeepStack features (out.deepstack_features) are added inside the decoder
        out = model.model.get_image_features(pixel_values, inputs["image_grid_thw"], return_dict=True)
    features = out.pooler_output  # a tensor (internvl, gemma3; idefics3 / smolvlm on 5.17) or one per image / row
    hidden = model.config.text_config.hidden_size
    if isinstance(features, torch.Tensor):
        return features.reshape(-1, hidden)
    return torch.cat([f.reshape(-1, hidden) for f in features], dim=0)


# ---------------------------------------------------------------------------------------- processor
def token_text(ids: Sequence[int]) -> str:
    """Text that ``make_processor``'s tokenizer turns back into the ordinary text ``ids`` (``w<id>`` words)."""
    for i in ids:
        if not TEXT_LOW <= int(i) < TEXT_HIGH:
            raise ValueError(f"{i} is not an ordinary text id [{TEXT_LOW}, {TEXT_HIGH})")
    return " ".join(f"w{int(i)}" for i in ids)


def _word_tokenizer(names: dict[int, str], size: int, bos: bool, extra_special: dict[str, str]):
    """A ``TokenizersBackend`` over a WordLevel vocab: ``names`` for special ids, ``w<i>`` otherwise."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {names[i] if i in names else f"w{i}": i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names[PAD]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names[BOS]} $A", pair=f"{names[BOS]} $A {names[BOS]} $B", special_tokens=[(names[BOS], BOS)]
        )
    special = dict(pad_token=names[PAD], unk_token=names[PAD])
    if BOS in names and EOS in names:
        special.update(bos_token=names[BOS], eos_token=names[EOS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", extra_special_tokens=extra_special or None, **special
    )
    specials = [v for k, v in names.items() if k >= TEXT_HIGH]
    if specials:  # split placeholders out of words ("w5<image>" -> w5, <image>) like a real tokenizer
        tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


# Text each image takes in a prompt to ``make_processor``'s processor (it expands it to the placeholders).
PROCESSOR_IMAGE_TEXT = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "instructblip": "",  # the processor puts the query placeholders in front itself
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>",
    "internvl": "<IMG_CONTEXT>",  # -> <img> <IMG_CONTEXT> * (4 * tiles) </img>
    "gemma3": "<start_of_image>",  # -> <start_of_image> <image_soft_token> * 4 <end_of_image>
    "idefics3": "<image>",  # -> the image block (fake / row-col / global markup around the placeholders)
    "smolvlm": "<image>",
}


def processor_text(family: str, model, row_ids: Sequence[int]) -> str:
    """Text ``make_processor``'s processor expands back into the ``make_inputs`` row ``row_ids``
    (padding removed): ordinary ids as ``token_text`` words, each image as ``PROCESSOR_IMAGE_TEXT``."""
    _check_family(family)
    image, words = int(model.config.image_token_id), []
    if family in IDEFICS_FAMILIES:
        anchor = GLOBAL_IMAGE  # one per image; the markup and placeholders around it come from the processor
    elif family == "gemma3":
        anchor = int(model.config.boi_token_index)
    else:
        anchor = None
    skip = {BOS, image} | image_markup_ids(family, model) | set(vision_wrapper_ids(family, model).values())
    prev = None
    for t in map(int, row_ids):
        if t == anchor or (anchor is None and t == image and prev != image and family != "instructblip"):
            words.append(PROCESSOR_IMAGE_TEXT[family])
        elif t not in skip:
            words.append(token_text([t]))
        prev = t
    return " ".join(words)


def _without_video(processor_class):
    """``processor_class`` accepting ``video_processor=None``: without torchvision there is no video
    processor class to check ``None`` against (images only)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


def make_processor(family: str, model=None):
    """A real transformers processor for ``family``, built offline (no hub).

    Tokenizer: a ``tokenizers`` WordLevel vocab in code -- ordinary text id ``i`` is the word ``w<i>``
    (see ``token_text``), placeholders are ``<image>`` (llava, llava_next, llava_onevision, instructblip,
    idefics3, smolvlm), ``<|image_pad|>``/``<|video_pad|>``/``<|vision_start|>``/``<|vision_end|>``
    (qwen), ``<IMG_CONTEXT>`` / ``<img>`` / ``</img>`` (internvl), ``<image_soft_token>`` /
    ``<start_of_image>`` / ``<end_of_image>`` (gemma3), ``<fake_token_around_image>`` /
    ``<global-img>`` / ``<row_r_col_c>`` (idefics3, smolvlm); bos prepended for the families whose
    ``make_inputs`` rows start with bos. Image processor: the PIL backend class of the family, sized
    like ``build_vlm``'s vision tower (idefics3 / smolvlm: no resize, so images keep the sizes
    ``make_inputs`` takes). Processors that have a video processor get none (it needs torchvision).
    smolvlm's processor needs the ``num2words`` package: without it this raises ``ValueError``."""
    _check_family(family)
    cfg = model.config if model is not None else vlm_config(family)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if family == "smolvlm":
        from transformers.utils import is_num2words_available

        if not is_num2words_available():
            raise ValueError(
                "smolvlm: SmolVLMProcessor cannot be built here: it needs the `num2words` package "
                "(pip install num2words), which is not installed"
            )

    if family in ("llava", "llava_next"):
        names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", IMAGE_TOKEN: "<image>"}
        tokenizer = _word_tokenizer(names, VOCAB, bos=True, extra_special={"image_token": "<image>"})
        vc = cfg.vision_config
        common = dict(
            tokenizer=tokenizer,
            patch_size=vc.patch_size,
            num_additional_image_tokens=1,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        square = dict(
            size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
        )
        if family == "llava":
            from transformers import LlavaProcessor

            return LlavaProcessor(image_processor=LlavaImageProcessorPil(**square), **common)
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            **square, image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]
        )
        return LlavaNextProcessor(image_processor=image_processor, **common)
    if family in QWEN_FAMILIES:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        names = {
            PAD: "<|endoftext|>",
            EOS: "<|im_end|>",
            IMAGE_TOKEN: "<|image_pad|>",
            VIDEO_TOKEN: "<|video_pad|>",
            VISION_START: "<|vision_start|>",
            VISION_END: "<|vision_end|>",
        }
        tokenizer = _word_tokenizer(
            names,
            VOCAB,
            bos=False,
            extra_special={
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "vision_bos_token": "<|vision_start|>",
                "vision_eos_token": "<|vision_end|>",
            },
        )
        vc = cfg.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
            size={"shortest_edge": unit * unit, "longest_edge": 64 * 64},
        )
        if family == "qwen2_vl":
            from transformers import Qwen2VLProcessor as Processor
        elif family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLProcessor as Processor
        else:
            from transformers import Qwen3VLProcessor as Processor
        return _without_video(Processor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        names = {PAD: "<|endoftext|>", EOS: "<|im_end|>", IMAGE_TOKEN: "<image>", VIDEO_TOKEN: "<video>"}
        tokenizer = _word_tokenizer(
            names, VOCAB, bos=False, extra_special={"image_token": "<image>", "video_token": "<video>"}
        )
        vc = cfg.vision_config
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": vc.image_size, "width": vc.image_size},
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        )
        return _without_video(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
        )
    if family == "internvl":
        from transformers import InternVLProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        names = {
            PAD: "<|endoftext|>",
            EOS: "<|im_end|>",
            IMAGE_TOKEN: "<IMG_CONTEXT>",
            VIDEO_TOKEN: "<video>",
            VISION_START: "<img>",
            VISION_END: "</img>",
        }
        tokenizer = _word_tokenizer(
            names,
            VOCAB,
            bos=False,
            extra_special={
                "context_image_token": "<IMG_CONTEXT>",
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "video_token": "<video>",
            },
        )
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=INTERNVL_MAX_TILES,
        )
        return _without_video(InternVLProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=int(cfg.image_seq_length),
        )
    if family == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        names = {
            PAD: "<pad>",
            BOS: "<bos>",
            EOS: "<eos>",
            IMAGE_TOKEN: "<image_soft_token>",
            BOI: "<start_of_image>",
            EOI: "<end_of_image>",
        }
        tokenizer = _word_tokenizer(
            names,
            VOCAB,
            bos=True,
            extra_special={
                "image_token": "<image_soft_token>",
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
            },
        )
        side = cfg.vision_config.image_size
        image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side})
        return Gemma3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=int(cfg.mm_tokens_per_image)
        )
    if family in IDEFICS_FAMILIES:
        names = {
            PAD: "<pad>",
            BOS: "<s>",
            EOS: "</s>",
            IMAGE_TOKEN: "<image>",
            FAKE_IMAGE: "<fake_token_around_image>",
            GLOBAL_IMAGE: "<global-img>",
            **{i: f"<row_{r}_col_{c}>" for (r, c), i in ROW_COL.items()},
        }
        extra = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>"}
        if family == "smolvlm":
            extra["global_image_token"] = "<global-img>"
        tokenizer = _word_tokenizer(names, IDEFICS_VOCAB, bos=True, extra_special=extra)
        sizes = dict(
            do_resize=False,  # images keep their size (make_inputs' image_sizes), only split into tiles
            size={"longest_edge": 2 * IDEFICS_TILE},
            max_image_size={"longest_edge": IDEFICS_TILE},
            do_image_splitting=True,
        )
        if family == "idefics3":
            from transformers import Idefics3Processor
            from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

            return Idefics3Processor(
                image_processor=Idefics3ImageProcessorPil(**sizes),
                tokenizer=tokenizer,
                image_seq_len=_idefics_seq_len(cfg),
            )
        from transformers import SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        return _without_video(SmolVLMProcessor)(
            image_processor=SmolVLMImageProcessorPil(**sizes),
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_len=_idefics_seq_len(cfg),
        )
    # instructblip
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", IMAGE_TOKEN: "<image>"}
    # no ``image_token`` attribute: InstructBlipProcessor then registers "<image>" itself (an AddedToken it needs)
    tokenizer = _word_tokenizer(names, VOCAB, bos=True, extra_special={})
    qnames = {PAD: "[PAD]", QFORMER_CLS: "[CLS]", QFORMER_SEP: "[SEP]"}
    qformer_tokenizer = _word_tokenizer(qnames, QFORMER_VOCAB, bos=False, extra_special={})
    from tokenizers import processors

    qformer_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", QFORMER_CLS), ("[SEP]", QFORMER_SEP)]
    )
    qformer_tokenizer.padding_side = "right"
    side = cfg.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": side, "width": side})
    return InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=cfg.num_query_tokens,
    )


def random_pil_image(height: int, width: int, seed: int = 0):
    """A seeded random RGB ``PIL.Image`` of ``height`` x ``width`` pixels."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
