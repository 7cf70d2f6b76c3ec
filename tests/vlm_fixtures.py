"""Tiny random vision-language models of five families, built offline in code, with inputs.

Nothing here touches the Hugging Face hub: configs are written in code, weights are random (seeded),
and ``input_ids`` are assembled by hand with exactly the placeholder tokens the modeling code of
transformers 5.x expects, next to synthetic pixel tensors of the right shapes.

Families (``model_type``) and their classes::

    llava         LlavaForConditionalGeneration       tiny CLIP vision + tiny Llama text
    llava_next    LlavaNextForConditionalGeneration   tiny CLIP vision (any-res tiles) + tiny Mistral text
    qwen2_vl      Qwen2VLForConditionalGeneration     tiny Qwen2-VL ViT + M-RoPE Qwen2 text
    qwen2_5_vl    Qwen2_5_VLForConditionalGeneration  tiny Qwen2.5-VL window ViT + M-RoPE Qwen2 text
    instructblip  InstructBlipForConditionalGeneration tiny ViT + Q-Former + tiny Llama (Vicuna) text

Token id layout shared by every family (text vocab ``VOCAB`` = 136)::

    0 pad, 1 bos, 2 eos, [3, 128) ordinary text, 128 image placeholder, 129 video placeholder,
    130 vision_start, 131 vision_end (the last three only mean something to Qwen2-VL / Qwen2.5-VL).

Text side: hidden 64, 4 layers, 4 query heads / 2 kv heads (head dim 16), like ``tests/conftest.py``.

Usage::

    model = build_vlm("qwen2_vl")
    inputs = make_inputs("qwen2_vl", model, n_images=[2, 0, 1])     # left-padded batch of 3
    logits = model(**inputs, position_ids=generation_position_ids("qwen2_vl", model, inputs)).logits
    out = model.generate(**inputs, max_new_tokens=3)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "instructblip")

VOCAB = 136
PAD, BOS, EOS = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 128  # ordinary text ids are drawn from [TEXT_LOW, TEXT_HIGH)
IMAGE_TOKEN = 128
VIDEO_TOKEN = 129
VISION_START = 130
VISION_END = 131

QFORMER_VOCAB = TEXT_HIGH  # the Q-Former reads the same text ids [TEXT_LOW, TEXT_HIGH) as the LM
QFORMER_CLS, QFORMER_SEP = 1, 2  # the Q-Former's own (BERT-like) [CLS] / [SEP]; 0 is its [PAD]
NUM_QUERY_TOKENS = 4

# Whether a prompt may carry several images / none while other rows have images.
MULTI_IMAGE = {"llava": True, "llava_next": True, "qwen2_vl": True, "qwen2_5_vl": True, "instructblip": False}
TEXT_ONLY_ROWS = {"llava": True, "llava_next": True, "qwen2_vl": True, "qwen2_5_vl": True, "instructblip": False}

# Dotted attribute paths (from the *ForConditionalGeneration model).
TEXT_DECODER_PATH = {  # module owning ``.layers`` (the decoder layers of the language model)
    "llava": "model.language_model",
    "llava_next": "model.language_model",
    "qwen2_vl": "model.language_model",
    "qwen2_5_vl": "model.language_model",
    "instructblip": "language_model.model",
}
VISION_PATHS = {  # vision-side modules whose outputs must not change under text-side steering
    "llava": ("model.vision_tower", "model.multi_modal_projector"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector"),
    "qwen2_vl": ("model.visual",),  # includes the patch merger (model.visual.merger)
    "qwen2_5_vl": ("model.visual",),
    "instructblip": ("vision_model", "qformer", "language_projection"),
}

# Default synthetic image sizes (height, width) in pixels, used in turn for the images of a batch.
LLAVA_IMAGE_SIZE = 16  # CLIP image size, patch 4 -> 4x4 = 16 placeholder tokens per image
LLAVA_NEXT_TILE = 16  # CLIP image size of one tile, patch 8 -> 2x2 = 4 features per tile
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
LLAVA_NEXT_SIZES = [(16, 32), (32, 32), (20, 30), (32, 16)]  # -> 14, 24, 14, 16 placeholder tokens
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
QWEN_SIZES = [(16, 16), (16, 24), (24, 16)]  # grids (1,4,4) (1,4,6) (1,6,4) -> 4, 6, 6 placeholder tokens
INSTRUCTBLIP_IMAGE_SIZE = 16


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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
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
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = _text_common(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        specials = dict(
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig

            vision = dict(
                depth=2,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                in_channels=3,
                patch_size=QWEN_PATCH,
                spatial_merge_size=QWEN_MERGE,
                temporal_patch_size=QWEN_TEMPORAL,
            )
            cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **specials)
        else:
            from transformers import Qwen2_5_VLConfig

            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                num_heads=2,
                in_channels=3,
                patch_size=QWEN_PATCH,
                spatial_merge_size=QWEN_MERGE,
                temporal_patch_size=QWEN_TEMPORAL,
                window_size=QWEN_PATCH * QWEN_MERGE * 2,  # windows of 2x2 merged tokens
                fullatt_block_indexes=[1],
                tokens_per_second=2,
            )
            cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **specials)
    else:  # instructblip
        from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

        vision = InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
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
    }[family]


def attn_implementation_dict(family: str, attn_implementation: str = "sdpa") -> dict:
    """``attn_implementation`` for the language model (and the top-level config), sdpa for the vision side."""
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
    """``{"vision_start": id, "vision_end": id}`` for Qwen2-VL / Qwen2.5-VL; ``{}`` for the others."""
    _check_family(family)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {
            "vision_start": int(model.config.vision_start_token_id),
            "vision_end": int(model.config.vision_end_token_id),
        }
    return {}


def image_token_mask(family: str, model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask (same shape as ``input_ids``) of the image-placeholder positions."""
    ids = torch.tensor(sorted(image_token_ids(family, model)), device=input_ids.device)
    return torch.isin(input_ids, ids)


# ------------------------------------------------------------------------------ placeholder counting
def num_image_tokens(family: str, model, image_size: tuple[int, int] | None = None) -> int:
    """Placeholder tokens one image of ``image_size`` (height, width; pixels) takes in ``input_ids``.

    llava: (image_size // patch)**2 (CLS dropped); instructblip: num_query_tokens; llava_next:
    base tile + unpadded any-res grid with one newline per row (computed with the modeling code's own
    helpers); qwen: t*h*w / merge**2 with (h, w) = size // patch."""
    _check_family(family)
    cfg = model.config
    if family == "llava":
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        return n if cfg.vision_feature_select_strategy == "default" else n + 1
    if family == "instructblip":
        return int(cfg.num_query_tokens)
    if family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        size = tuple(image_size or LLAVA_NEXT_SIZES[0])
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        base = side * side + (0 if cfg.vision_feature_select_strategy == "default" else 1)
        grid_h, grid_w = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        unpadded = unpad_image(torch.zeros(1, grid_h * side, grid_w * side), list(size))
        rows, cols = unpadded.shape[1:]
        return base + rows * (cols + 1)
    grid = _qwen_grid(cfg, image_size or QWEN_SIZES[0])
    return int(grid[0] * grid[1] * grid[2]) // cfg.vision_config.spatial_merge_size**2


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
    Row layouts::

        llava, llava_next  [bos] text[:k] (IMG * n  sep) per image  text[k:]
        qwen2_vl, 2.5      text[:k] (vision_start  IMG * n  vision_end) per image  text[k:]
        instructblip       IMG * num_query_tokens  [bos] text          (exactly one image per row)

    ``image_sizes`` (height, width in pixels), used in turn over the batch's images, matter for
    llava_next (tile grid + unpadding) and qwen (patch grid; multiples of 8); defaults
    ``LLAVA_NEXT_SIZES`` / ``QWEN_SIZES``. Keys: input_ids, attention_mask and
    llava: pixel_values (N,3,16,16) | llava_next: pixel_values (N,max_tiles,3,16,16), image_sizes (N,2) |
    qwen: pixel_values (patches, 96), image_grid_thw (N,3), mm_token_type_ids (B,L; 1 at IMG) |
    instructblip: pixel_values (B,3,16,16), qformer_input_ids, qformer_attention_mask (right-padded).
    Pixel keys are left out when the batch has no image (not possible for instructblip)."""
    _check_family(family)
    if pad not in ("left", "right"):
        raise ValueError(f"pad must be 'left' or 'right', got {pad!r}")
    gen = torch.Generator().manual_seed(seed)
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
    specials = image_token_ids(family, model) | set(vision_wrapper_ids(family, model).values())
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
    default_sizes = LLAVA_NEXT_SIZES if family == "llava_next" else QWEN_SIZES
    sizes = list(image_sizes) if image_sizes is not None else default_sizes
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
            count = num_image_tokens(family, model, size)
            if family in ("qwen2_vl", "qwen2_5_vl"):
                blocks += [int(cfg.vision_start_token_id)] + [image_token] * count + [int(cfg.vision_end_token_id)]
            else:  # a text separator ("\n") between images keeps their placeholder runs apart
                blocks += [image_token] * count + [int(torch.randint(TEXT_LOW, TEXT_HIGH, (1,), generator=gen))]
        bos = [] if family in ("qwen2_vl", "qwen2_5_vl") else [BOS]
        rows.append(bos + head + blocks + tail)

    input_ids, attention_mask = _pad(rows, PAD, pad)
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    vdtype = _vision_dtype(family, model)
    n_total = sum(n_images)

    if family == "llava":
        side = cfg.vision_config.image_size
        if n_total:
            inputs["pixel_values"] = torch.randn(n_total, 3, side, side, generator=gen).to(vdtype)
    elif family == "llava_next":
        tile = cfg.vision_config.image_size
        if n_total:
            tiles = [_llava_next_num_tiles(cfg, s) for s in per_image]
            pixel_values = torch.zeros(n_total, max(tiles), 3, tile, tile)
            for i, t in enumerate(tiles):
                pixel_values[i, :t] = torch.randn(t, 3, tile, tile, generator=gen)
            inputs["pixel_values"] = pixel_values.to(vdtype)
            inputs["image_sizes"] = torch.tensor(per_image, dtype=torch.long)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vc = cfg.vision_config
        if n_total:
            grids = torch.tensor([_qwen_grid(cfg, s) for s in per_image], dtype=torch.long)
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            inputs["pixel_values"] = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=gen).to(vdtype)
            inputs["image_grid_thw"] = grids
        inputs["mm_token_type_ids"] = (input_ids == image_token).to(torch.int32)
    else:  # instructblip
        side = cfg.vision_config.image_size
        inputs["pixel_values"] = torch.randn(len(rows), 3, side, side, generator=gen).to(vdtype)
        q_rows = [[QFORMER_CLS] + p + [QFORMER_SEP] for p in prompts]
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = _pad(q_rows, 0, "right")
    return inputs


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
    """How many images each row of ``inputs`` holds (read back from its placeholder tokens)."""
    _check_family(family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    if family == "instructblip":
        return [1] * ids.shape[0]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return ((ids == model.config.vision_start_token_id) & mask).sum(-1).tolist()
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
    if family in ("qwen2_vl", "qwen2_5_vl"):
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][r][keep][None]
        if n:
            grids = inputs["image_grid_thw"]
            offsets = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
            out["pixel_values"] = inputs["pixel_values"][offsets[first] : offsets[first + n]]
            out["image_grid_thw"] = grids[first : first + n]
        return out
    if n:
        out["pixel_values"] = inputs["pixel_values"][first : first + n]
        if family == "llava_next":
            out["image_sizes"] = inputs["image_sizes"][first : first + n]
    return out


def generation_position_ids(family: str, model, inputs: dict) -> torch.Tensor:
    """The ``position_ids`` ``model.generate(**inputs)`` computes for the prompt (prefill) forward.

    llava / llava_next: ``attention_mask.cumsum(-1) - 1`` (0 on padding), shape (B, L).
    qwen2_vl / qwen2_5_vl: (4, B, L) = [text positions; M-RoPE t, h, w from ``get_rope_index``]
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
    if family == "llava":
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    elif family == "llava_next":
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    else:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


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


def make_processor(family: str, model=None):
    """A real transformers processor for ``family``, built offline (no hub).

    Tokenizer: a ``tokenizers`` WordLevel vocab in code -- ordinary text id ``i`` is the word ``w<i>``
    (see ``token_text``), placeholders are ``<image>`` (llava, llava_next, instructblip) or
    ``<|image_pad|>``/``<|video_pad|>``/``<|vision_start|>``/``<|vision_end|>`` (qwen), bos ``<s>``
    prepended (not for qwen). Image processor: the PIL backend class of the family, sized like
    ``build_vlm``'s vision tower. Qwen processors get no video processor (it needs torchvision)."""
    _check_family(family)
    cfg = model.config if model is not None else vlm_config(family)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

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
    if family in ("qwen2_vl", "qwen2_5_vl"):
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
        else:
            from transformers import Qwen2_5_VLProcessor as Processor

        # Without torchvision there is no video processor class to check a ``None`` against: skip that check.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return Processor.check_argument_for_proper_class(self, argument_name, argument)

        no_video = type(
            Processor.__name__, (Processor,), {"check_argument_for_proper_class": check_argument_for_proper_class}
        )
        return no_video(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
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
