"""A tiny random Llama-3.2-Vision (``MllamaForConditionalGeneration``), built offline in code, with inputs.

Nothing here touches the Hugging Face hub: configs are written in code, weights are random (seeded),
and the inputs are assembled by hand with exactly the keys and shapes the modeling code of
transformers 5.x (5.17 to 5.24) expects. Unlike the placeholder VLMs of ``tests/vlm_fixtures.py``,
Mllama does not splice image features into the token sequence: each image is one ``<|image|>``
token, and the vision states are read by dedicated *cross-attention* decoder layers
(``config.text_config.cross_attention_layers``), steered by ``cross_attention_mask``.

Token id layout (text vocab ``VOCAB`` = 136, as in ``tests/vlm_fixtures.py``)::

    0 pad, 1 bos, 2 eos, [3, 128) ordinary text, 128 ``<|image|>`` (config.image_token_index)

Text side: hidden 64, 5 layers, 4 query heads / 2 kv heads (head dim 16); layers 1 and 3 are
``MllamaCrossAttentionDecoderLayer`` (attribute ``cross_attn``), layers 0, 2, 4
``MllamaSelfAttentionDecoderLayer`` (attribute ``self_attn``). Vision side: width 32, 2 local + 1
global layers, tiles of 16x16 pixels in 8x8 patches (4 patches + CLS = 5 vision tokens per tile),
at most 2 tiles per image (aspect ratios (1,1), (1,2), (2,1)).

Usage::

    model = build_mllama()
    inputs = make_inputs(model, n_images=[1, 0, 1])            # left-padded batch of 3
    logits = model(**inputs, position_ids=generation_position_ids(model, inputs)).logits
    out = model.generate(**inputs, max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from vlm_fixtures import _get_path, _pad, prompt_rows

VOCAB = 136
PAD, BOS, EOS = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 128  # ordinary text ids are drawn from [TEXT_LOW, TEXT_HIGH)
IMAGE_TOKEN = 128

NUM_LAYERS = 5
CROSS_ATTENTION_LAYERS = (1, 3)
IMAGE_SIZE = 16  # pixels per tile side
PATCH_SIZE = 8  # -> (16 // 8)**2 + 1 = 5 vision tokens per tile
MAX_NUM_TILES = 2
SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [2, 1]]  # get_all_supported_aspect_ratios(2); aspect_ratio_id = index + 1
# Tile grids (width, height in tiles) used in turn for the images of a batch: 2, 1 and 2 tiles.
IMAGE_GRIDS = [(1, 2), (1, 1), (2, 1)]
CROSS_GATE = 1.0  # tanh(1.0) = 0.76; the checkpoints' init (0.0) would make every cross layer a no-op

# Dotted attribute paths (from the MllamaForConditionalGeneration model).
TEXT_DECODER_PATH = "model.language_model"  # MllamaTextModel, owns ``.layers``
VISION_PATHS = ("model.vision_model", "model.multi_modal_projector")  # must not change under text steering


def _text_common(**overrides) -> dict:
    """The tiny text models' shape (conftest.TINY_TEXT) with this vocabulary and its special ids."""
    from conftest import TINY_TEXT

    return {
        **TINY_TEXT,
        "vocab_size": VOCAB,
        "num_hidden_layers": NUM_LAYERS,
        "cross_attention_layers": list(CROSS_ATTENTION_LAYERS),
        "max_position_embeddings": 512,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": False,
        **overrides,
    }


def mllama_config(**text_overrides):
    """The tiny ``MllamaConfig``; ``text_overrides`` are set on its ``text_config`` afterwards."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    vision = MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=MAX_NUM_TILES,
        supported_aspect_ratios=[list(r) for r in SUPPORTED_ASPECT_RATIOS],
        intermediate_layers_indices=[0, 1],
        vision_output_dim=32 * 3,  # final hidden state + 2 intermediate layers
    )
    cfg = MllamaConfig(
        vision_config=vision, text_config=MllamaTextConfig(**_text_common()), image_token_index=IMAGE_TOKEN
    )
    for key, value in text_overrides.items():
        setattr(cfg.text_config, key, value)
    return cfg


def attn_implementation_dict(attn_implementation: str = "sdpa") -> dict:
    """``attn_implementation`` for the language model (and the top-level config), sdpa for the vision tower."""
    return {"": attn_implementation, "text_config": attn_implementation, "vision_config": "sdpa"}


def build_mllama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    plant_sinks: bool = True,
    cross_gate: float = CROSS_GATE,
    **text_overrides,
):
    """A tiny random ``MllamaForConditionalGeneration`` in eval mode, identical for identical arguments.

    ``attn_implementation`` applies to the language model only -- its self-attention *and* its
    cross-attention layers read ``config.text_config._attn_implementation``; the vision tower keeps
    sdpa. ``plant_sinks`` scales the self-attention layers' q/k projections by 3 like
    ``conftest._plant_sinks`` (the cross-attention layers RMS-normalise q and k per head, so scaling
    their projections would change nothing). ``cross_gate`` is written into every cross layer's
    ``cross_attn_attn_gate`` and ``cross_attn_mlp_gate`` (the model's own init is 0: images unseen).
    ``text_overrides`` are set on ``config.text_config`` after it is built."""
    from transformers import MllamaForConditionalGeneration

    cfg = mllama_config(**text_overrides)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration._from_config(
        cfg, dtype=dtype, attn_implementation=attn_implementation_dict(attn_implementation)
    )
    with torch.no_grad():
        for i, layer in enumerate(text_layers(model)):
            if i in cross_layer_indices(model):
                layer.cross_attn_attn_gate.fill_(cross_gate)
                layer.cross_attn_mlp_gate.fill_(cross_gate)
            elif plant_sinks:
                layer.self_attn.q_proj.weight.mul_(3.0)
                layer.self_attn.k_proj.weight.mul_(3.0)
    return model.eval()


# ----------------------------------------------------------------------------------------- structure
def text_decoder(model) -> nn.Module:
    """The language model's decoder (``MllamaTextModel``, the module that owns ``.layers``)."""
    return _get_path(model, TEXT_DECODER_PATH)


def text_layers(model) -> nn.ModuleList:
    """The language model's decoder layers (the model's own ``nn.ModuleList``), self and cross alike."""
    return text_decoder(model).layers


def cross_layer_indices(model) -> list[int]:
    """Indices into ``text_layers`` (= their ``layer_idx`` in the cache) of the cross-attention layers."""
    return sorted(int(i) for i in model.config.text_config.cross_attention_layers)


def self_layer_indices(model) -> list[int]:
    """Indices into ``text_layers`` of the self-attention layers."""
    cross = set(cross_layer_indices(model))
    return [i for i in range(len(text_layers(model))) if i not in cross]


def vision_module(model) -> nn.Module:
    """The vision tower (``MllamaVisionModel``)."""
    return _get_path(model, VISION_PATHS[0])


def vision_modules(model) -> dict[str, nn.Module]:
    """Every vision-side module (tower, projector), keyed by dotted path."""
    return {path: _get_path(model, path) for path in VISION_PATHS}


def image_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask (same shape as ``input_ids``) of the ``<|image|>`` positions."""
    return input_ids == int(model.config.image_token_index)


def vision_tokens_per_tile(model) -> int:
    """Vision states one tile adds to the cross-attention keys: (image_size // patch)**2 + 1 (CLS)."""
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def _vision_dtype(model) -> torch.dtype:
    return next(vision_module(model).parameters()).dtype


# ------------------------------------------------------------------------------------------- inputs
def make_inputs(
    model,
    prompts: list[list[int]] | None = None,
    n_images: Sequence[int] = (1, 0, 1),
    seed: int = 0,
    pad: str = "left",
    grids: Sequence[tuple[int, int]] | None = None,
    text_before_images: int = 2,
) -> dict:
    """A padded batch that ``model(**inputs)`` and ``model.generate(**inputs)`` accept.

    Row ``r`` holds ``n_images[r]`` images (``n_images`` of length 1 is broadcast over ``prompts``).
    ``prompts`` are the rows' text ids (default: random lengths 3-8, seeded, ids in
    [TEXT_LOW, TEXT_HIGH)); the first ``text_before_images`` of them come before the images.
    Row layout (like the Llama 3.2 Vision chat template: text, then the image)::

        [bos] text[:k] (IMG sep) per image text[k:]

    Image ``i`` of the batch (in row order) is cut into ``grids[i % len(grids)]`` (width, height)
    tiles (default ``IMAGE_GRIDS``: 2, 1, 2 tiles). With B rows, I = max images per row, T =
    ``max_num_tiles`` (2), S = 16 pixels, the keys are input_ids, attention_mask (B, L) and, when
    the batch holds an image:

    - pixel_values (B, I, T, 3, S, S): random on real tiles, 0 on padding tiles / image slots;
    - aspect_ratio_ids (B, I) long: index + 1 into ``SUPPORTED_ASPECT_RATIOS``, 0 on padding slots;
    - aspect_ratio_mask (B, I, T) long: 1 on real tiles, and on tile 0 of padding slots (as the
      image processor does);
    - cross_attention_mask (B, L, I, T) long, built with the processor's own
      ``get_cross_attention_token_mask`` / ``convert_sparse_cross_attention_mask_to_dense``: token
      ``t`` sees image ``j``'s real tiles from image ``j``'s ``<|image|>`` token up to the next
      ``<|image|>`` (the last image: to the end). Tokens before a row's first image, padding, and
      every token of a row without images see no tile (all-zero rows).

    A row without images in a batch with images is what the 5.24 processor builds too (5.17's refuses
    such batches; the model takes them either way). A batch without any image has no pixel keys and
    no ``cross_attention_mask``: the cross-attention layers are then skipped."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    if pad not in ("left", "right"):
        raise ValueError(f"pad must be 'left' or 'right', got {pad!r}")
    gen = torch.Generator().manual_seed(seed)
    prompts, n_images = prompt_rows(prompts, n_images, gen)
    image_token = int(model.config.image_token_index)
    for p in prompts:
        if image_token in p:
            raise ValueError(f"prompt {p} contains the image token {image_token}")
    if any(n < 0 for n in n_images):
        raise ValueError("n_images must be >= 0")

    vc = model.config.vision_config
    max_tiles = int(vc.max_num_tiles)
    supported = [tuple(r) for r in vc.supported_aspect_ratios]
    grid_cycle = [tuple(g) for g in (grids if grids is not None else IMAGE_GRIDS)]
    for g in grid_cycle:
        if g not in supported:
            raise ValueError(f"tile grid {g} is not one of the supported aspect ratios {supported}")

    rows: list[list[int]] = []
    row_grids: list[list[tuple[int, int]]] = []  # tile grid of every image, per row
    seen = 0
    for prompt, n in zip(prompts, n_images):
        k = min(text_before_images, len(prompt))
        blocks: list[int] = []
        mine = []
        for _ in range(n):  # a text separator ("\n") after every image token
            mine.append(grid_cycle[seen % len(grid_cycle)])
            seen += 1
            blocks += [image_token, int(torch.randint(TEXT_LOW, TEXT_HIGH, (1,), generator=gen))]
        row_grids.append(mine)
        rows.append([BOS] + prompt[:k] + blocks + prompt[k:])

    input_ids, attention_mask = _pad(rows, PAD, pad)
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    max_images = max(n_images) if n_images else 0
    if not max_images:
        return inputs

    batch, side = len(rows), int(vc.image_size)
    pixel_values = torch.zeros(batch, max_images, max_tiles, int(vc.num_channels), side, side)
    aspect_ratio_ids = torch.zeros(batch, max_images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(batch, max_images, max_tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1  # padding slots keep tile 0, like build_aspect_ratio_mask
    num_tiles: list[list[int]] = []
    for r, mine in enumerate(row_grids):
        num_tiles.append([])
        for j, (w, h) in enumerate(mine):
            t = w * h
            pixel_values[r, j, :t] = torch.randn(t, int(vc.num_channels), side, side, generator=gen)
            aspect_ratio_ids[r, j] = supported.index((w, h)) + 1
            aspect_ratio_mask[r, j, :t] = 1
            num_tiles[r].append(t)
    token_masks = [get_cross_attention_token_mask(row.tolist(), image_token) for row in input_ids]
    dense = convert_sparse_cross_attention_mask_to_dense(
        token_masks, num_tiles=num_tiles, max_num_tiles=max_tiles, length=input_ids.shape[1]
    )
    cross = torch.zeros(batch, input_ids.shape[1], max_images, max_tiles, dtype=torch.long)
    cross[:, :, : dense.shape[2]] = torch.from_numpy(dense)
    inputs["pixel_values"] = pixel_values.to(_vision_dtype(model))
    inputs["aspect_ratio_ids"] = aspect_ratio_ids
    inputs["aspect_ratio_mask"] = aspect_ratio_mask
    inputs["cross_attention_mask"] = cross
    return inputs


def images_per_row(model, inputs: dict) -> list[int]:
    """How many images each row of ``inputs`` holds (its ``<|image|>`` tokens; one per image)."""
    return (image_token_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(-1).tolist()


def row_inputs(model, inputs: dict, r: int, keep_image_slots: bool = False) -> dict:
    """Row ``r`` of a ``make_inputs`` batch as a batch of one, padding removed, with its own images.

    A row without images then has no pixel keys (its cross-attention layers are skipped).
    ``keep_image_slots=True`` keeps all the batch's image slots of the row instead (padding slots
    included, also for a row without images): exactly what the row sees inside the batch."""
    keep = inputs["attention_mask"][r].bool()
    out = {"input_ids": inputs["input_ids"][r][keep][None], "attention_mask": inputs["attention_mask"][r][keep][None]}
    if "pixel_values" not in inputs:
        return out
    n = inputs["pixel_values"].shape[1] if keep_image_slots else images_per_row(model, inputs)[r]
    if n:
        out["pixel_values"] = inputs["pixel_values"][r : r + 1, :n]
        out["aspect_ratio_ids"] = inputs["aspect_ratio_ids"][r : r + 1, :n]
        out["aspect_ratio_mask"] = inputs["aspect_ratio_mask"][r : r + 1, :n]
        out["cross_attention_mask"] = inputs["cross_attention_mask"][r : r + 1, keep, :n]
    return out


def generation_position_ids(model, inputs: dict) -> torch.Tensor:
    """The ``position_ids`` ``model.generate(**inputs)`` computes for the prompt (prefill) forward:
    ``attention_mask.cumsum(-1) - 1``, 0 on padding, shape (B, L). A plain ``model(**inputs)``
    without ``position_ids`` uses ``arange(L)`` for every row instead (the same logits: RoPE only
    sees position differences)."""
    mask = inputs["attention_mask"]
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def cross_attention_states(model, inputs: dict) -> torch.Tensor:
    """The projected vision states the cross-attention layers read, (B, I * T * tokens_per_tile, hidden),
    computed the way ``MllamaModel.forward`` does; (B, 0, hidden) when ``inputs`` has no image."""
    hidden = model.config.text_config.hidden_size
    if "pixel_values" not in inputs:
        return torch.empty(inputs["input_ids"].shape[0], 0, hidden)
    states = vision_module(model)(
        pixel_values=inputs["pixel_values"],
        aspect_ratio_ids=inputs["aspect_ratio_ids"],
        aspect_ratio_mask=inputs["aspect_ratio_mask"],
    ).last_hidden_state
    states = model.model.multi_modal_projector(states)
    return states.reshape(inputs["pixel_values"].shape[0], -1, hidden)
