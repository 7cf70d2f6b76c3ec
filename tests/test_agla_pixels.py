"""AGLA's augmented view on the model's own pixel inputs (attnsteer/methods/agla_pixels.py).

Every layout is checked against the real transformers PIL image processor built in code (no hub):
CLIPImageProcessorPil (llava's "images"), LlavaNextImageProcessorPil ("tiles") and
Qwen2VLImageProcessorPil ("patches"), and against the tiny models of tests/vlm_fixtures.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_fixtures import (
    IMAGE_TOKEN,
    LLAVA_NEXT_PINPOINTS,
    LLAVA_NEXT_TILE,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL,
    build_vlm,
    make_inputs,
    make_processor,
    num_image_tokens,
    token_text,
    vlm_config,
)

from attnsteer.errors import SteeringError, UnsupportedModelError
from attnsteer.methods.agla_pixels import FAMILY_LAYOUT, LAYOUTS, PixelLayout, TilesLayout, layout_for
from attnsteer.methods.agla_views import relevance_mask

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------ helpers
def _image(height: int, width: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): a textured mid-grey background (never black) and a bright square at box
    (y0, y1, x0, x1)."""
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(height, width, 3) * 120 + 60).astype(np.uint8)
    y0, y1, x0, x1 = box
    pixels[y0:y1, x0:x1] = 255
    return pixels


def _relevance(height: int, width: int, box: tuple[int, int, int, int], grid: int = 8) -> torch.Tensor:
    """A coarse (grid, grid) relevance map, high where the square of an (height, width) image is."""
    g = torch.Generator().manual_seed(1)
    rel = torch.rand(grid, grid, generator=g) * 0.2
    y0, y1, x0, x1 = box
    rel[
        math.floor(y0 * grid / height) : math.ceil(y1 * grid / height),
        math.floor(x0 * grid / width) : math.ceil(x1 * grid / width),
    ] = 1.0
    return rel


def _unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255


def _masked(pixels: np.ndarray, keep: torch.Tensor) -> np.ndarray:
    return pixels * keep.numpy()[:, :, None].astype(np.uint8)


def _dropped_ok(dropped: int, n: int, fraction: float) -> bool:
    """relevance_mask's rule: the threshold sits at index floor(n (1 - f)) and ties with it are kept."""
    return n - math.floor(n * (1 - fraction)) - 1 - 2 <= dropped <= n - math.floor(n * (1 - fraction))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(3, H, W) x2 -> bool (H, W): pixels where any channel differs."""
    return (a != b).any(0)


def _check_selection(old: torch.Tensor, new: torch.Tensor, black: torch.Tensor) -> None:
    """Every entry of new is bit-identical to old or equal to the black value of its channel."""
    changed = new != old
    assert torch.equal(new[~changed], old[~changed])
    assert bool((new == black.expand_as(new))[changed].all())


def _centroid(bright: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(bright, as_tuple=True)
    return float(ys.float().mean()), float(xs.float().mean())


# ----------------------------------------------------------------------------------------- images
def _clip_processor(side: int = 16):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _llava_layout():
    processor = _clip_processor()
    return processor, LAYOUTS["images"](processor.image_mean, processor.image_std, vlm_config("llava"))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6])
def test_images_layout_views_and_augment_match_the_clip_processor(fraction):
    processor, layout = _llava_layout()
    box = (3, 8, 9, 14)
    images = [_image(16, 16, box, seed=s) for s in range(2)]
    pv = processor([Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    inputs = {"pixel_values": pv, "input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert layout.count(inputs) == 2
    for view, a in zip(layout.views(inputs), images):  # a 16x16 image: the processor's resize is the identity
        assert view.dtype == torch.float32 and view.shape == (3, 16, 16)
        torch.testing.assert_close(view, _unit(a), atol=1e-6, rtol=0)

    rel = [_relevance(16, 16, box), _relevance(16, 16, box).T.contiguous()]
    fractions = [fraction, 0.0]
    new, views = layout.augment(inputs, rel, fractions)
    assert set(new) == {"pixel_values"}
    out = new["pixel_values"]
    assert out.shape == pv.shape and out.dtype == pv.dtype
    assert torch.equal(out[1], pv[1])  # fraction 0: unchanged, exactly
    _check_selection(pv, out, layout.black(pv))
    keep = relevance_mask(rel[0], (16, 16), fraction)
    expected = processor(Image.fromarray(_masked(images[0], keep)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(out[0][:, keep], pv[0][:, keep])
    # the augmented view: the dropped pixels black, the square kept
    dropped = views[0].sum(0) == 0
    assert torch.equal(dropped, ~keep)
    assert _dropped_ok(int(dropped.sum()), 256, fraction)
    assert bool(keep[3:8, 9:14].all())
    torch.testing.assert_close(views[1], layout.views(inputs)[1])


def test_images_layout_fraction_zero_is_the_identity_and_empty_batches_work():
    processor, layout = _llava_layout()
    pv = processor(Image.fromarray(_image(16, 16, (0, 4, 0, 4))), return_tensors="pt")["pixel_values"]
    new, _ = layout.augment({"pixel_values": pv}, [torch.rand(5, 7)], [0.0])
    assert torch.equal(new["pixel_values"], pv)
    assert layout.count({"input_ids": torch.zeros(1, 2)}) == 0
    assert layout.views({}) == [] and layout.augment({}, [], []) == ({}, [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_augment_selects_in_the_pixels_own_dtype(dtype):
    _, layout = _llava_layout()
    pv = torch.randn(2, 3, 16, 16).to(dtype)
    new, views = layout.augment({"pixel_values": pv}, [torch.rand(4, 4), torch.rand(4, 4)], [0.5, 0.25])
    out = new["pixel_values"]
    assert out.dtype == dtype and out.shape == pv.shape
    black = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=torch.float32).to(dtype)
    _check_selection(pv, out, black[:, None, None])
    for view, before, old, changed in zip(views, layout.views({"pixel_values": pv}), pv, out):
        dropped = _changed(changed, old)
        assert view.dtype == torch.float32 and bool(dropped.any())
        assert torch.equal(view, torch.where(dropped, 0.0, before))  # dropped pixels exactly black in the view


# ------------------------------------------------------------------------------------------ tiles
def _llava_next_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tile = LLAVA_NEXT_TILE
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
    )


def _tiles_layout():
    processor = _llava_next_processor()
    return processor, LAYOUTS["tiles"](processor.image_mean, processor.image_std, vlm_config("llava_next"))


# (height, width), and a bright square (y0, y1, x0, x1) in it
# (20, 30): canvas (32, 32), resized (22, 32) at (5, 0); (21, 30): odd slack, resized (23, 32) at (4, 0);
# (40, 24): resized (32, 20) at (0, 6); (16, 32): fits exactly; (33, 33): downscaled, no padding
TILE_CASES = [
    ((20, 30), (4, 10, 18, 26)),
    ((21, 30), (12, 19, 3, 11)),
    ((16, 32), (2, 9, 3, 12)),
    ((40, 24), (24, 34, 4, 12)),
    ((33, 33), (8, 20, 8, 20)),
]


def test_tile_geometry_matches_transformers():
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    processor, layout = _tiles_layout()
    for height in range(5, 70, 3):
        for width in range(5, 70, 4):
            g = layout.geometry(height, width, LLAVA_NEXT_TILE)
            best = select_best_resolution((height, width), LLAVA_NEXT_PINPOINTS)
            assert g.canvas == tuple(best)
            resized = get_patch_output_size(np.zeros((3, height, width)), best, ChannelDimension.FIRST)
            assert g.resized == tuple(resized)
            (top, _), (left, _) = processor._get_padding_size(resized, best)
            assert g.offset == (top, left)
            assert g.num_tiles == image_size_to_num_patches((height, width), LLAVA_NEXT_PINPOINTS, LLAVA_NEXT_TILE)


def test_tiles_layout_decodes_the_base_tile_and_the_canvas_of_the_real_processor():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    processor, layout = _tiles_layout()
    images = [_image(h, w, box, seed=i) for i, ((h, w), box) in enumerate(TILE_CASES)]
    out = processor([Image.fromarray(a) for a in images], return_tensors="pt")
    inputs = dict(out)
    assert layout.count(inputs) == len(images)
    views = layout.views(inputs)
    t = LLAVA_NEXT_TILE
    for i, (((h, w), (y0, y1, x0, x1)), a) in enumerate(zip(TILE_CASES, images)):
        n = image_size_to_num_patches((h, w), LLAVA_NEXT_PINPOINTS, t)
        canvas, g = layout.canvas(inputs, i)
        assert g.num_tiles == n
        assert bool((out["pixel_values"][i, n:] == 0).all())  # batch padding past the image's tiles
        # base tile: the whole image squashed to the tile, the square where it was, scaled
        torch.testing.assert_close(views[i], _unit(np.array(Image.fromarray(a).resize((t, t), Image.BICUBIC))))
        cy, cx = _centroid(views[i].min(0).values > 0.97)
        assert abs(cy - ((y0 + y1) / 2 * t / h - 0.5)) < 1.0 and abs(cx - ((x0 + x1) / 2 * t / w - 0.5)) < 1.0
        # canvas: the image resized keeping its aspect, centred, black padding around it
        (top, left), (rh, rw) = g.offset, g.resized
        unit = layout.to_unit(canvas)
        assert unit.shape[-2:] == g.canvas
        inside = torch.zeros(g.canvas, dtype=torch.bool)
        inside[top : top + rh, left : left + rw] = True
        padding = canvas[:, ~inside]
        torch.testing.assert_close(padding, layout.black(canvas)[:, :, 0].expand_as(padding), atol=1e-6, rtol=0)
        resized = _unit(np.array(Image.fromarray(a).resize((rw, rh), Image.BICUBIC)))
        torch.testing.assert_close(unit[:, top : top + rh, left : left + rw], resized, atol=1e-6, rtol=0)
        cy, cx = _centroid(unit.min(0).values > 0.97)
        assert abs(cy - (top + (y0 + y1) / 2 * rh / h - 0.5)) < 1.0
        assert abs(cx - (left + (x0 + x1) / 2 * rw / w - 0.5)) < 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.55])
def test_tiles_layout_augment_blacks_out_the_fraction_of_image_pixels_in_base_and_canvas(fraction):
    processor, layout = _tiles_layout()
    images = [_image(h, w, box, seed=i) for i, ((h, w), box) in enumerate(TILE_CASES)]
    inputs = dict(processor([Image.fromarray(a) for a in images], return_tensors="pt"))
    pv = inputs["pixel_values"]
    rel = [_relevance(h, w, box) for (h, w), box in TILE_CASES]
    fractions = [fraction] * (len(images) - 1) + [0.0]
    new, views = layout.augment(inputs, rel, fractions)
    out = new["pixel_values"]
    assert set(new) == {"pixel_values"} and out.shape == pv.shape and out.dtype == pv.dtype
    _check_selection(pv, out, layout.black(pv))
    assert torch.equal(out[-1], pv[-1])  # fraction 0: unchanged
    t = LLAVA_NEXT_TILE
    augmented = dict(inputs, pixel_values=out)
    for i, ((h, w), (y0, y1, x0, x1)) in enumerate(TILE_CASES):
        f = fractions[i]
        g = layout.geometry(h, w, t)
        assert torch.equal(out[i, g.num_tiles :], pv[i, g.num_tiles :])  # batch padding untouched
        # base tile
        dropped = _changed(out[i, 0], pv[i, 0])
        assert _dropped_ok(int(dropped.sum()), t * t, f)
        assert torch.equal(views[i], torch.where(dropped, 0.0, layout.views(inputs)[i]))
        assert not bool(dropped[int(y0 * t / h) + 1 : int(y1 * t / h), int(x0 * t / w) + 1 : int(x1 * t / w)].any())
        # canvas: the fraction of the *image* region, padding untouched, the square kept
        before, _ = layout.canvas(inputs, i)
        after, _ = layout.canvas(augmented, i)
        changed = _changed(after, before)
        (top, left), (rh, rw) = g.offset, g.resized
        region = changed[top : top + rh, left : left + rw]
        assert int(region.sum()) == int(changed.sum())  # nothing outside the image (padding) changes
        assert _dropped_ok(int(region.sum()), rh * rw, f)
        sy0, sy1 = math.ceil(y0 * rh / h), math.floor(y1 * rh / h)
        sx0, sx1 = math.ceil(x0 * rw / w), math.floor(x1 * rw / w)
        assert not bool(region[sy0:sy1, sx0:sx1].any())


def test_tiles_layout_bf16_and_errors():
    processor, layout = _tiles_layout()
    (h, w), box = TILE_CASES[0]
    inputs = dict(processor(Image.fromarray(_image(h, w, box)), return_tensors="pt"))
    pv = inputs["pixel_values"].to(torch.bfloat16)
    new, _ = layout.augment(dict(inputs, pixel_values=pv), [_relevance(h, w, box)], [0.4])
    assert new["pixel_values"].dtype == torch.bfloat16
    _check_selection(pv, new["pixel_values"], layout.black(pv))
    with pytest.raises(SteeringError, match="image_sizes"):
        layout.count({"pixel_values": pv})
    with pytest.raises(SteeringError, match="pixel_values"):
        layout.count({"pixel_values": pv[0], "image_sizes": inputs["image_sizes"]})
    with pytest.raises(SteeringError, match="tiles"):  # a (64, 64) image needs more tiles than pixel_values has
        layout.augment(
            dict(inputs, image_sizes=torch.tensor([[64, 64]]), pixel_values=pv[:, :3]), [torch.rand(4, 4)], [0.1]
        )


# ---------------------------------------------------------------------------------------- patches
def _qwen_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        temporal_patch_size=QWEN_TEMPORAL,
        merge_size=QWEN_MERGE,
        size={"shortest_edge": 64, "longest_edge": 64 * 64},
    )


def _qwen_layout(family: str = "qwen2_vl"):
    processor = _qwen_processor()
    return processor, LAYOUTS["patches"](processor.image_mean, processor.image_std, vlm_config(family))


QWEN_CASES = [((16, 24), (3, 9, 13, 21)), ((24, 16), (14, 22, 2, 9)), ((16, 16), (0, 6, 0, 6))]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_patches_layout_decodes_the_processors_patch_order_exactly(family):
    processor, layout = _qwen_layout(family)
    images = [_image(h, w, box, seed=i) for i, ((h, w), box) in enumerate(QWEN_CASES)]
    inputs = dict(processor([Image.fromarray(a) for a in images], return_tensors="pt"))
    assert [tuple(g) for g in inputs["image_grid_thw"].tolist()] == [(1, h // 4, w // 4) for (h, w), _ in QWEN_CASES]
    assert layout.count(inputs) == 3
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    offsets = [0, *inputs["image_grid_thw"].prod(-1).cumsum(0).tolist()]
    views = layout.views(inputs)
    for i, a in enumerate(images):
        frames = layout.frames(inputs, i)
        assert frames.shape == (QWEN_TEMPORAL, 3, *a.shape[:2])
        assert torch.equal(frames[0], frames[1])  # an image is one frame repeated
        torch.testing.assert_close(frames[0], (_unit(a) - mean) / std, atol=1e-5, rtol=0)
        torch.testing.assert_close(views[i], _unit(a), atol=1e-6, rtol=0)
        assert torch.equal(layout.patchify(frames), inputs["pixel_values"][offsets[i] : offsets[i + 1]])


def test_patches_layout_augment_equals_processing_the_masked_image():
    processor, layout = _qwen_layout()
    images = [_image(h, w, box, seed=i) for i, ((h, w), box) in enumerate(QWEN_CASES)]
    inputs = dict(processor([Image.fromarray(a) for a in images], return_tensors="pt"))
    inputs["input_ids"] = torch.zeros(1, 4, dtype=torch.long)
    pv = inputs["pixel_values"]
    rel = [_relevance(h, w, box) for (h, w), box in QWEN_CASES]
    fractions = [0.45, 0.0, 0.2]
    new, views = layout.augment(inputs, rel, fractions)
    out = new["pixel_values"]
    assert set(new) == {"pixel_values"} and out.shape == pv.shape and out.dtype == pv.dtype
    keeps = [relevance_mask(r, (h, w), f) for r, ((h, w), _), f in zip(rel, QWEN_CASES, fractions)]
    masked = [_masked(a, k) for a, k in zip(images, keeps)]
    expected = processor([Image.fromarray(a) for a in masked], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    _check_selection(pv, out, layout.black(pv)[:, 0, 0].repeat_interleave(QWEN_TEMPORAL * QWEN_PATCH**2))
    offsets = [0, *inputs["image_grid_thw"].prod(-1).cumsum(0).tolist()]
    assert torch.equal(out[offsets[1] : offsets[2]], pv[offsets[1] : offsets[2]])  # fraction 0
    for i, (((h, w), (y0, y1, x0, x1)), keep) in enumerate(zip(QWEN_CASES, keeps)):
        frames = layout.frames(dict(inputs, pixel_values=out), i)
        original = layout.frames(inputs, i)
        assert torch.equal(frames[:, :, keep], original[:, :, keep])  # kept pixels bit-identical, every frame
        dropped = views[i].sum(0) == 0
        assert torch.equal(dropped, ~keep)
        assert _dropped_ok(int(dropped.sum()), h * w, fractions[i])
        assert bool(keep[y0:y1, x0:x1].all())


def test_patches_layout_bf16_videos_and_malformed_inputs():
    processor, layout = _qwen_layout()
    (h, w), box = QWEN_CASES[0]
    inputs = dict(processor(Image.fromarray(_image(h, w, box)), return_tensors="pt"))
    pv = inputs["pixel_values"].to(torch.bfloat16)
    new, _ = layout.augment(dict(inputs, pixel_values=pv), [_relevance(h, w, box)], [0.3])
    assert new["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(layout.augment(dict(inputs, pixel_values=pv), [torch.rand(3, 3)], [0.0])[0]["pixel_values"], pv)
    for key in ("pixel_values_videos", "video_grid_thw"):
        with pytest.raises(SteeringError, match=key):
            layout.count(dict(inputs, **{key: torch.zeros(4, 96)}))
    with pytest.raises(SteeringError, match="image_grid_thw"):
        layout.count({"pixel_values": pv})
    with pytest.raises(SteeringError, match="pixel_values: got 23 patches"):
        layout.count(dict(inputs, pixel_values=pv[1:]))
    with pytest.raises(SteeringError, match="pixel_values"):
        layout.count(dict(inputs, pixel_values=pv[:, :50]))


def test_qwen_token_grid_is_the_row_major_grid_of_merged_windows():
    """Token k of an image merges m*m consecutive patches (the patch merger); these cover block k of
    the (h/m, w/m) grid, row-major."""
    _, layout = _qwen_layout()
    h, w = 16, 24
    unit = QWEN_PATCH * QWEN_MERGE
    blocks = torch.arange((h // unit) * (w // unit), dtype=torch.float32).reshape(h // unit, w // unit)
    frame = blocks.repeat_interleave(unit, 0).repeat_interleave(unit, 1)
    patches = layout.patchify(frame.expand(QWEN_TEMPORAL, 3, h, w))
    inputs = {"pixel_values": patches, "image_grid_thw": torch.tensor([[1, h // QWEN_PATCH, w // QWEN_PATCH]])}
    t, gh, gw = layout.token_grid(inputs, 0)
    assert (t, gh, gw) == (1, h // unit, w // unit)
    merged = patches.reshape(t * gh * gw, -1)  # one row per placeholder token
    for k in range(t * gh * gw):
        assert bool((merged[k] == k).all())


# ----------------------------------------------------------------------- token grids vs the fixtures
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tokens_per_image_and_token_grid_match_the_processors_placeholders(family):
    processor = make_processor(family)
    cfg = vlm_config(family)
    layout = layout_for(cfg, processor)
    assert isinstance(layout, LAYOUTS[FAMILY_LAYOUT[family]])
    sizes = [(16, 16), (16, 24), (24, 16)]
    images = [Image.fromarray(_image(h, w, (0, 2, 0, 2), seed=i)) for i, (h, w) in enumerate(sizes)]
    placeholder = processor.image_token
    text = [f"{token_text([5])} {placeholder} {token_text([6])} {placeholder}", f"{placeholder} {token_text([7])}"]
    inputs = dict(processor(text=text, images=images, return_tensors="pt", padding=True))
    counts = layout.tokens_per_image(inputs)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == sum(counts)
    model = type("M", (), {"config": cfg})()
    for i, (h, w) in enumerate(sizes):
        t, gh, gw = layout.token_grid(inputs, i)
        assert t * gh * gw == counts[i] == num_image_tokens(family, model, (h, w))
    with pytest.raises(SteeringError, match="index"):
        layout.token_grid(inputs, 3)


def test_llava_next_base_tile_tokens_come_first():
    """The first side*side placeholders of each image are the base tile's features: they move when
    the base tile changes and not when the high-resolution tiles do."""
    from vlm_fixtures import image_features

    model = build_vlm("llava_next")
    inputs = make_inputs("llava_next", model, n_images=[2, 1])
    layout = layout_for(model.config, _llava_next_processor())
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    per_image = [num_image_tokens("llava_next", model, s) for s in sizes]
    assert layout.tokens_per_image(inputs) is None
    starts = [0, *np.cumsum(per_image).tolist()]
    features = image_features("llava_next", model, inputs)
    assert features.shape[0] == sum(per_image)
    for i in range(len(sizes)):
        t, gh, gw = layout.token_grid(inputs, i)
        assert (t, gh, gw) == (1, 2, 2) and t * gh * gw < per_image[i]
        first = slice(starts[i], starts[i] + gh * gw)
        rest = slice(starts[i] + gh * gw, starts[i + 1])
        tiles = inputs["pixel_values"].clone()
        tiles[i, 1:] += 1.0
        moved = image_features("llava_next", model, dict(inputs, pixel_values=tiles))
        torch.testing.assert_close(moved[first], features[first])
        assert not torch.allclose(moved[rest], features[rest])
        base = inputs["pixel_values"].clone()
        base[i, 0] += 1.0
        moved = image_features("llava_next", model, dict(inputs, pixel_values=base))
        assert not torch.allclose(moved[first], features[first])
        torch.testing.assert_close(moved[rest], features[rest])


def test_llava_token_grid_matches_the_fixture_models():
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[2, 0, 1])
    layout = layout_for(model.config, make_processor("llava"))
    n = num_image_tokens("llava", model)
    assert layout.count(inputs) == 3
    assert layout.tokens_per_image(inputs) == [n] * 3
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 3 * n
    assert math.prod(layout.token_grid(inputs, 2)) == n


# ------------------------------------------------------------------------------------------ errors
def test_instructblip_has_no_token_grid():
    cfg = vlm_config("instructblip")
    layout = layout_for(cfg, make_processor("instructblip"))
    assert layout.name == "images"
    inputs = {"pixel_values": torch.zeros(2, 3, 16, 16)}
    assert layout.tokens_per_image(inputs) == [cfg.num_query_tokens] * 2
    with pytest.raises(SteeringError, match="blip_itm"):
        layout.token_grid(inputs, 0)
    new, views = layout.augment(inputs, [torch.rand(4, 4)] * 2, [0.5, 0.0])  # the view itself works
    assert new["pixel_values"].shape == (2, 3, 16, 16) and len(views) == 2


def test_llava_full_strategy_has_no_token_grid():
    cfg = vlm_config("llava")
    cfg.vision_feature_select_strategy = "full"
    layout = LAYOUTS["images"](CLIP_MEAN, CLIP_STD, cfg)
    inputs = {"pixel_values": torch.zeros(1, 3, 16, 16)}
    with pytest.raises(SteeringError, match="vision_feature_select_strategy"):
        layout.token_grid(inputs, 0)
    assert layout.tokens_per_image(inputs) == [17]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_missing_or_malformed_normalisation_is_a_clear_error(name):
    family = {"images": "llava", "tiles": "llava_next", "patches": "qwen2_vl"}[name]
    cfg = vlm_config(family)
    with pytest.raises(UnsupportedModelError, match="image_mean: got None"):
        LAYOUTS[name](None, CLIP_STD, cfg)
    with pytest.raises(UnsupportedModelError, match="image_std"):
        LAYOUTS[name](CLIP_MEAN, [0.5, 0.5], cfg)
    with pytest.raises(UnsupportedModelError, match="image_std"):
        LAYOUTS[name](CLIP_MEAN, [0.5, 0.0, 0.5], cfg)
    with pytest.raises(UnsupportedModelError, match="image_mean"):
        layout_for(cfg, object())
    layout = LAYOUTS[name](0.5, 0.5, cfg)  # a scalar applies to every channel
    assert isinstance(layout, PixelLayout) and layout.image_mean == (0.5,) * 3


def test_malformed_inputs_name_the_field():
    _, layout = _llava_layout()
    with pytest.raises(SteeringError, match=r"pixel_values: got \(3, 16, 16\)"):
        layout.count({"pixel_values": torch.zeros(3, 16, 16)})
    pv = torch.zeros(2, 3, 16, 16)
    with pytest.raises(SteeringError, match="2 images"):
        layout.augment({"pixel_values": pv}, [torch.rand(4, 4)], [0.5])
    with pytest.raises(SteeringError, match=r"fractions\[1\]"):
        layout.augment({"pixel_values": pv}, [torch.rand(4, 4)] * 2, [0.5, 1.0])
    with pytest.raises(SteeringError, match=r"relevance\[0\]"):
        layout.augment({"pixel_values": pv}, [torch.rand(4)] * 2, [0.5, 0.5])
    with pytest.raises(UnsupportedModelError, match="image_grid_pinpoints"):
        TilesLayout(CLIP_MEAN, CLIP_STD, vlm_config("llava"))
    with pytest.raises(UnsupportedModelError, match="model_type"):
        layout_for(type("C", (), {"model_type": "gemma3"})(), _clip_processor())


@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUT))
def test_the_augmented_inputs_run_through_the_model(family):
    from vlm_fixtures import generation_position_ids

    model = build_vlm(family)
    n_images = [1, 1] if family == "instructblip" else [2, 1]
    inputs = make_inputs(family, model, n_images=n_images)
    layout = layout_for(model.config, make_processor(family, model))
    n = layout.count(inputs)
    assert n == sum(n_images)
    rel = [torch.rand(6, 6, generator=torch.Generator().manual_seed(i)) for i in range(n)]

    @torch.no_grad()
    def logits(extra: dict) -> torch.Tensor:
        batch = {**inputs, **extra}
        return model(**batch, position_ids=generation_position_ids(family, model, batch)).logits

    same, _ = layout.augment(inputs, rel, [0.0] * n)
    assert torch.equal(logits(same), logits({}))
    new, views = layout.augment(inputs, rel, [0.5] * n)
    assert len(views) == n and all(v.ndim == 3 and v.shape[0] == 3 for v in views)
    assert not torch.allclose(logits(new), logits({}))
