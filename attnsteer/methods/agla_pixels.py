"""AGLA's augmented view on the model's own pixel inputs (docs/methods.md#agla).

AGLA blacks out the fraction ``f`` of least relevant pixels of every image (the keep mask comes
from :func:`attnsteer.methods.agla_views.relevance_mask`). It works on what ``processor(...)``
returned and ``model.generate(**inputs)`` receives -- no PIL round trip: a blacked-out pixel is
the value 0 in the processor's [0, 1] space, i.e. ``(0 - mean_c) / std_c`` in the normalised
tensor for channel ``c`` (``image_mean`` / ``image_std`` of the model's image processor). Kept
pixels are never touched (``torch.where(keep, pixel_values, black)``): they stay bit-identical,
and fraction 0 gives back the inputs exactly.

Three layouts of pixel inputs, one class each (``FAMILY_LAYOUT`` maps a family to one)::

    "images"   llava, instructblip
               pixel_values (N, 3, H, W): one entry per image, in batch-row order.

    "tiles"    llava_next (any-res)
               pixel_values (N, T_max, 3, t, t), image_sizes (N, 2) = original (height, width).
               Per image: tile 0 is the base -- the whole image resized to t x t (aspect not kept);
               tiles 1..n cut a canvas row-major into t x t tiles. The canvas is the best
               resolution among config.image_grid_pinpoints (transformers' select_best_resolution);
               the image is resized into it keeping its aspect ratio (get_patch_output_size: the
               tight side fills the canvas, the other is ceil-rounded) and centred with black
               padding (top/left = floor of half the slack). Entries past 1 + n are zeros
               (batch padding). Tile counts equal modeling_llava_next.image_size_to_num_patches.

    "patches"  qwen2_vl, qwen2_5_vl, qwen3_vl
               pixel_values (P, 3 * T * p * p), image_grid_thw (N, 3) = (t, h, w) in patches,
               P = sum t * h * w, images in order (p = patch_size, T = temporal_patch_size,
               m = spatial_merge_size, from config.vision_config). Image i's frames
               (t * T, 3, h * p, w * p) are patchified as the Qwen2-VL image processor does:
               frames.reshape(t, T, 3, h/m, m, p, w/m, m, p) permuted to
               (t, h/m, w/m, m, m, 3, T, p, p) and flattened to (t * h * w, 3 * T * p * p) -- the
               m x m windows of one merged token are consecutive, windows row-major. An image is
               one frame repeated T times. Video inputs (pixel_values_videos) are not supported.

Every layout answers: ``count`` (images), ``views`` (per image the whole image as the model sees
it, float32 (3, H, W) in [0, 1]: llava_next the base tile, qwen the first frame), ``augment``
(replacement pixel entries and the augmented views), ``token_grid`` (the spatial grid the image's
first placeholder tokens form) and ``tokens_per_image``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import SteeringError, UnsupportedModelError
from .agla_views import relevance_mask

__all__ = [
    "FAMILY_LAYOUT",
    "LAYOUTS",
    "ImagesLayout",
    "PatchesLayout",
    "PixelLayout",
    "TileGeometry",
    "TilesLayout",
    "layout_for",
]

CHANNELS = 3


def _channel_stats(value, field: str) -> tuple[float, ...]:
    fix = (
        f"Fix: pass the model's image processor's {field} (processor.image_processor.{field}): AGLA needs the "
        "normalisation to know the value of a black pixel"
    )
    if value is None:
        raise UnsupportedModelError(f"{field}: got None. {fix}")
    if isinstance(value, (int, float)):
        value = [value]
    try:
        stats = tuple(float(v) for v in (value.tolist() if hasattr(value, "tolist") else value))
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"{field}: got {value!r}; allowed: a number or {CHANNELS} numbers. {fix}") from None
    if len(stats) == 1:
        stats = stats * CHANNELS
    if len(stats) != CHANNELS or not all(math.isfinite(v) for v in stats):
        raise UnsupportedModelError(f"{field}: got {value!r}; allowed: a number or {CHANNELS} finite numbers. {fix}")
    if field == "image_std" and any(v <= 0 for v in stats):
        raise UnsupportedModelError(f"{field}: got {value!r}; every entry must be > 0. {fix}")
    return stats


def _int_size(value, field: str) -> int:
    """A square size from a config field (an int, or a pair of equal ints)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedModelError(f"{field}: got {value!r}; allowed: a positive int (square patches)")
    return value


def _config_field(config, path: str):
    obj = config
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UnsupportedModelError(
                f"config.{path}: missing on {type(config).__name__}; pass the VLM's own model.config to the pixel layout"
            )
    return obj


def _shape_error(field: str, tensor, expected: str, fix: str = "") -> SteeringError:
    got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
    return SteeringError(
        f"{field}: got {got}; expected {expected}. "
        + (fix or "Fix: pass the inputs exactly as the model's processor returned them")
    )


class PixelLayout:
    """How one family's pixel inputs hold its images (see the module docstring)."""

    name: str = ""

    def __init__(self, image_mean, image_std, config):
        self.image_mean = _channel_stats(image_mean, "image_mean")
        self.image_std = _channel_stats(image_std, "image_std")
        self.config = config

    # ---- shared helpers ----------------------------------------------------------------------
    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=device)
        return mean, std

    def black(self, like: torch.Tensor) -> torch.Tensor:
        """(3, 1, 1) normalised value of a black pixel, in ``like``'s dtype and device."""
        mean, std = self._stats(like.device)
        return ((0.0 - mean) / std).to(like.dtype)[:, None, None]

    def to_unit(self, normalised: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) normalised pixels -> float32 in [0, 1] (the processor's rescaled space)."""
        mean, std = self._stats(normalised.device)
        return (normalised.float() * std[:, None, None] + mean[:, None, None]).clamp(0.0, 1.0)

    def _mask(self, relevance: torch.Tensor, size: tuple[int, int], fraction: float, device) -> torch.Tensor:
        return relevance_mask(relevance.to(device=device, dtype=torch.float32), size, fraction)

    def _check_augment(self, inputs: dict, relevance, fractions) -> int:
        n = self.count(inputs)
        if len(relevance) != n or len(fractions) != n:
            raise SteeringError(
                f"augment: got {len(relevance)} relevance maps and {len(fractions)} fractions for {n} images in "
                f"the pixel inputs; pass one of each per image, in order"
            )
        for i, (rel, fraction) in enumerate(zip(relevance, fractions)):
            if not isinstance(rel, torch.Tensor) or rel.ndim != 2 or 0 in rel.shape:
                raise _shape_error(
                    f"relevance[{i}]", rel, "a float tensor (h, w)", "Fix: pass one 2-d relevance map per image"
                )
            if not 0.0 <= float(fraction) < 1.0:
                raise SteeringError(f"fractions[{i}]: got {fraction!r}; allowed: a share of pixels in [0, 1)")
        return n

    def _check_index(self, inputs: dict, index: int) -> None:
        n = self.count(inputs)
        if not 0 <= index < n:
            raise SteeringError(f"image index: got {index}; these pixel inputs hold {n} images")

    # ---- the interface -------------------------------------------------------------------------
    def count(self, inputs: dict) -> int:
        """Number of images in these pixel inputs."""
        raise NotImplementedError

    def views(self, inputs: dict) -> list[torch.Tensor]:
        """Per image: float32 (3, H, W) in [0, 1], the whole image as the model sees it."""
        raise NotImplementedError

    def augment(
        self, inputs: dict, relevance: Sequence[torch.Tensor], fractions: Sequence[float]
    ) -> tuple[dict, list[torch.Tensor]]:
        """Black out ``fractions[i]`` of image i's least relevant pixels (relevance map ``relevance[i]``).

        Returns (replacement entries for ``inputs`` -- same shapes, dtype and device --, per image
        the augmented view float32 (3, H, W) in [0, 1], framed like :meth:`views`: the original view
        with the dropped pixels exactly 0)."""
        raise NotImplementedError

    def token_grid(self, inputs: dict, index: int) -> tuple[int, int, int]:
        """(frames, h, w): image ``index``'s first frames*h*w placeholder tokens, in order, form this
        grid over the whole image."""
        raise NotImplementedError

    def tokens_per_image(self, inputs: dict) -> list[int] | None:
        """Placeholder tokens each image takes in ``input_ids``; None where the layout does not know."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ images
class ImagesLayout(PixelLayout):
    """llava, instructblip: pixel_values (N, 3, H, W), one image per entry."""

    name = "images"

    def _pixels(self, inputs: dict) -> torch.Tensor | None:
        pv = inputs.get("pixel_values")
        if pv is None:
            return None
        if not isinstance(pv, torch.Tensor) or pv.ndim != 4 or pv.shape[1] != CHANNELS or not pv.is_floating_point():
            raise _shape_error("pixel_values", pv, f"a float tensor (N, {CHANNELS}, H, W)")
        return pv

    def count(self, inputs: dict) -> int:
        pv = self._pixels(inputs)
        return 0 if pv is None else int(pv.shape[0])

    def views(self, inputs: dict) -> list[torch.Tensor]:
        pv = self._pixels(inputs)
        return [] if pv is None else list(self.to_unit(pv))

    def augment(self, inputs, relevance, fractions):
        if not self._check_augment(inputs, relevance, fractions):
            return {}, []
        pv = self._pixels(inputs)
        size = tuple(pv.shape[-2:])
        keep = torch.stack([self._mask(r, size, float(f), pv.device) for r, f in zip(relevance, fractions)])
        new = torch.where(keep[:, None], pv, self.black(pv))
        views = torch.where(keep[:, None], self.to_unit(pv), 0.0)
        return {"pixel_values": new}, list(views)

    def _queries(self) -> int | None:
        n = getattr(self.config, "num_query_tokens", None)
        return None if n is None else int(n)

    def _side(self) -> int:
        size = _int_size(_config_field(self.config, "vision_config.image_size"), "config.vision_config.image_size")
        patch = _int_size(_config_field(self.config, "vision_config.patch_size"), "config.vision_config.patch_size")
        return size // patch

    def _strategy(self) -> str:
        return getattr(self.config, "vision_feature_select_strategy", "default")

    def token_grid(self, inputs, index):
        if self._queries() is not None:
            raise SteeringError(
                f"token_grid: {getattr(self.config, 'model_type', 'this model')}'s image placeholders are "
                f"{self._queries()} Q-Former queries, not a spatial grid over the image, so the LVLM's own attention "
                "cannot be read back as a relevance map. Fix: use the matcher `blip_itm` instead of `lvlm_attention`"
            )
        self._check_index(inputs, index)
        if self._strategy() != "default":
            raise SteeringError(
                f"token_grid: config.vision_feature_select_strategy is {self._strategy()!r}: the CLS feature comes "
                "first among the image placeholders, before the patch grid; attnsteer reads the grid only with the "
                "'default' strategy. Fix: use the matcher `blip_itm`, or a checkpoint with strategy 'default'"
            )
        side = self._side()
        return (1, side, side)

    def tokens_per_image(self, inputs):
        n = self.count(inputs)
        queries = self._queries()
        if queries is not None:
            return [queries] * n
        per = self._side() ** 2 + (0 if self._strategy() == "default" else 1)
        return [per] * n


# ------------------------------------------------------------------------------------------- tiles
class TileGeometry(NamedTuple):
    """Where an image lies in llava_next's any-res input (all sizes (height, width) in pixels)."""

    canvas: tuple[int, int]  # the best resolution among the pinpoints
    resized: tuple[int, int]  # the image resized into the canvas, aspect ratio kept
    offset: tuple[int, int]  # (top, left) of the resized image in the canvas (centred padding)
    grid: tuple[int, int]  # tiles (rows, cols) of the canvas, row-major after the base tile
    num_tiles: int  # 1 (base) + rows * cols


class TilesLayout(PixelLayout):
    """llava_next: pixel_values (N, T_max, 3, t, t) with image_sizes (N, 2); see the module docstring."""

    name = "tiles"

    def __init__(self, image_mean, image_std, config):
        super().__init__(image_mean, image_std, config)
        pinpoints = _config_field(config, "image_grid_pinpoints")
        try:
            self.pinpoints = [(int(h), int(w)) for h, w in pinpoints]
        except (TypeError, ValueError):
            raise UnsupportedModelError(
                f"config.image_grid_pinpoints: got {pinpoints!r}; expected a list of [height, width]"
            ) from None
        if not self.pinpoints:
            raise UnsupportedModelError(
                "config.image_grid_pinpoints: got an empty list; expected [height, width] pairs"
            )

    def _pixels(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        pv = inputs.get("pixel_values")
        if pv is None:
            return None
        if (
            not isinstance(pv, torch.Tensor)
            or pv.ndim != 5
            or pv.shape[2] != CHANNELS
            or pv.shape[3] != pv.shape[4]
            or not pv.is_floating_point()
        ):
            raise _shape_error(
                "pixel_values",
                pv,
                f"a float tensor (N, T_max, {CHANNELS}, t, t) of square tiles",
                "Fix: pass the inputs exactly as LlavaNextProcessor returned them (return_tensors='pt', padded)",
            )
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise SteeringError(
                "image_sizes: missing; llava_next pixel inputs need image_sizes (N, 2) next to pixel_values. "
                "Fix: pass the processor's image_sizes too"
            )
        sizes = torch.as_tensor(sizes)
        if sizes.ndim != 2 or sizes.shape != (pv.shape[0], 2):
            raise _shape_error("image_sizes", sizes, f"({pv.shape[0]}, 2): one (height, width) per image")
        return pv, sizes

    def count(self, inputs: dict) -> int:
        got = self._pixels(inputs)
        return 0 if got is None else int(got[0].shape[0])

    def geometry(self, height: int, width: int, tile: int) -> TileGeometry:
        """The any-res geometry of an image of (height, width) pixels with tiles of ``tile`` pixels."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = int(height), int(width)
        if height <= 0 or width <= 0:
            raise SteeringError(f"image_sizes: got ({height}, {width}); expected positive (height, width)")
        canvas_h, canvas_w = select_best_resolution((height, width), self.pinpoints)
        if canvas_h % tile or canvas_w % tile:
            raise UnsupportedModelError(
                f"config.image_grid_pinpoints: the canvas ({canvas_h}, {canvas_w}) is not a multiple of the tile size "
                f"{tile}; attnsteer supports only pinpoints that are multiples of the tile (as llava-next checkpoints)"
            )
        # as transformers' get_patch_output_size: the tighter side fills the canvas, the other is ceil-rounded
        scale_w, scale_h = canvas_w / width, canvas_h / height
        if scale_w < scale_h:
            new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
        else:
            new_h, new_w = canvas_h, min(math.ceil(width * scale_h), canvas_w)
        # as LlavaNextImageProcessor(Pil)._get_padding_size: the odd pixel of slack goes bottom / right
        offset = ((canvas_h - new_h) // 2, (canvas_w - new_w) // 2)
        grid = (canvas_h // tile, canvas_w // tile)
        return TileGeometry((canvas_h, canvas_w), (new_h, new_w), offset, grid, 1 + grid[0] * grid[1])

    def _geometries(self, inputs: dict) -> list[TileGeometry]:
        pv, sizes = self._pixels(inputs)
        tile = int(pv.shape[-1])
        out = []
        for i, (h, w) in enumerate(sizes.tolist()):
            g = self.geometry(h, w, tile)
            if g.num_tiles > pv.shape[1]:
                raise SteeringError(
                    f"pixel_values: image {i} of size ({h}, {w}) needs {g.num_tiles} tiles with the config's "
                    f"image_grid_pinpoints, but pixel_values has {pv.shape[1]} per image. Fix: use the processor whose "
                    "image_grid_pinpoints match model.config.image_grid_pinpoints"
                )
            out.append(g)
        return out

    def canvas(self, inputs: dict, index: int) -> tuple[torch.Tensor, TileGeometry]:
        """Image ``index``'s tiles 1..n stitched back: the normalised canvas (3, H, W) in the pixels'
        dtype (padding included), and its geometry."""
        self._check_index(inputs, index)
        pv, _ = self._pixels(inputs)
        g = self._geometries(inputs)[index]
        return self._stitch(pv[index, 1 : g.num_tiles], g), g

    @staticmethod
    def _stitch(tiles: torch.Tensor, g: TileGeometry) -> torch.Tensor:
        rows, cols = g.grid
        t = tiles.shape[-1]
        return tiles.reshape(rows, cols, CHANNELS, t, t).permute(2, 0, 3, 1, 4).reshape(CHANNELS, rows * t, cols * t)

    @staticmethod
    def _cut(canvas: torch.Tensor, g: TileGeometry, tile: int) -> torch.Tensor:
        rows, cols = g.grid
        return canvas.reshape(CHANNELS, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, CHANNELS, tile, tile)

    def views(self, inputs: dict) -> list[torch.Tensor]:
        got = self._pixels(inputs)
        return [] if got is None else list(self.to_unit(got[0][:, 0]))

    def augment(self, inputs, relevance, fractions):
        if not self._check_augment(inputs, relevance, fractions):
            return {}, []
        pv, _ = self._pixels(inputs)
        tile = int(pv.shape[-1])
        black = self.black(pv)
        new, views = pv.clone(), []
        for i, (g, rel, fraction) in enumerate(zip(self._geometries(inputs), relevance, fractions)):
            fraction = float(fraction)
            base_keep = self._mask(rel, (tile, tile), fraction, pv.device)
            new[i, 0] = torch.where(base_keep, pv[i, 0], black)
            views.append(torch.where(base_keep, self.to_unit(pv[i, 0]), 0.0))
            canvas_keep = torch.ones(g.canvas, dtype=torch.bool, device=pv.device)  # padding is not image content
            (top, left), (h, w) = g.offset, g.resized
            canvas_keep[top : top + h, left : left + w] = self._mask(rel, g.resized, fraction, pv.device)
            canvas = torch.where(canvas_keep, self._stitch(pv[i, 1 : g.num_tiles], g), black)
            new[i, 1 : g.num_tiles] = self._cut(canvas, g, tile)
        return {"pixel_values": new}, views

    def token_grid(self, inputs, index):
        self._check_index(inputs, index)
        if getattr(self.config, "vision_feature_select_strategy", "default") != "default":
            raise SteeringError(
                "token_grid: config.vision_feature_select_strategy is "
                f"{self.config.vision_feature_select_strategy!r}: the base tile's CLS feature comes first among the "
                "image placeholders; attnsteer reads the grid only with the 'default' strategy. Fix: use the matcher "
                "`blip_itm`, or a checkpoint with strategy 'default'"
            )
        size = _int_size(_config_field(self.config, "vision_config.image_size"), "config.vision_config.image_size")
        patch = _int_size(_config_field(self.config, "vision_config.patch_size"), "config.vision_config.patch_size")
        return (1, size // patch, size // patch)

    def tokens_per_image(self, inputs):
        return None


# ----------------------------------------------------------------------------------------- patches
class PatchesLayout(PixelLayout):
    """qwen2_vl, qwen2_5_vl: pixel_values (P, 3*T*p*p) with image_grid_thw (N, 3); see the module docstring."""

    name = "patches"

    def __init__(self, image_mean, image_std, config):
        super().__init__(image_mean, image_std, config)
        self.patch = _int_size(_config_field(config, "vision_config.patch_size"), "config.vision_config.patch_size")
        self.merge = _int_size(
            _config_field(config, "vision_config.spatial_merge_size"), "config.vision_config.spatial_merge_size"
        )
        self.temporal = _int_size(
            _config_field(config, "vision_config.temporal_patch_size"), "config.vision_config.temporal_patch_size"
        )

    @staticmethod
    def _no_videos(inputs: dict) -> None:
        for key in ("pixel_values_videos", "video_grid_thw"):
            if inputs.get(key) is not None:
                raise SteeringError(
                    f"{key}: video inputs are not supported by AGLA's augmented view (only images: pixel_values with "
                    "image_grid_thw). Fix: pass images, or steer this prompt without AGLA"
                )

    def _pixels(self, inputs: dict) -> tuple[torch.Tensor, list[tuple[int, int, int]], list[int]] | None:
        self._no_videos(inputs)
        pv = inputs.get("pixel_values")
        if pv is None:
            return None
        dim = CHANNELS * self.temporal * self.patch**2
        if not isinstance(pv, torch.Tensor) or pv.ndim != 2 or pv.shape[1] != dim or not pv.is_floating_point():
            raise _shape_error("pixel_values", pv, f"a float tensor (patches, {dim} = 3 * temporal * patch * patch)")
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise SteeringError(
                "image_grid_thw: missing; qwen pixel inputs need image_grid_thw (N, 3) next to pixel_values. "
                "Fix: pass the processor's image_grid_thw too"
            )
        grid = torch.as_tensor(grid)
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise _shape_error("image_grid_thw", grid, "(N, 3): (t, h, w) in patches per image")
        grids = [tuple(int(v) for v in row) for row in grid.tolist()]
        for i, (t, h, w) in enumerate(grids):
            if t <= 0 or h <= 0 or w <= 0 or h % self.merge or w % self.merge:
                raise SteeringError(
                    f"image_grid_thw[{i}]: got {(t, h, w)}; expected positive (t, h, w) with h and w multiples of "
                    f"spatial_merge_size={self.merge}. Fix: pass the processor's image_grid_thw unchanged"
                )
        offsets = [0]
        for t, h, w in grids:
            offsets.append(offsets[-1] + t * h * w)
        if offsets[-1] != pv.shape[0]:
            raise SteeringError(
                f"pixel_values: got {pv.shape[0]} patches but image_grid_thw {grids} accounts for {offsets[-1]}. "
                "Fix: pass pixel_values and image_grid_thw of the same processor call"
            )
        return pv, grids, offsets

    def count(self, inputs: dict) -> int:
        got = self._pixels(inputs)
        return 0 if got is None else len(got[1])

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(t*T, 3, h*p, w*p) frames -> (t*h*w, 3*T*p*p) patches, in the image processor's order."""
        p, m, T = self.patch, self.merge, self.temporal
        frames_n, c, height, width = frames.shape
        t, h, w = frames_n // T, height // p, width // p
        x = frames.reshape(t, T, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, c, T, p, p)
        return x.reshape(t * h * w, c * T * p * p)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(t*h*w, 3*T*p*p) patches of one image with ``grid`` (t, h, w) -> frames (t*T, 3, h*p, w*p)."""
        p, m, T = self.patch, self.merge, self.temporal
        t, h, w = grid
        x = patches.reshape(t, h // m, w // m, m, m, CHANNELS, T, p, p)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, T, c, h/m, m, p, w/m, m, p)
        return x.reshape(t * T, CHANNELS, h * p, w * p)

    def frames(self, inputs: dict, index: int) -> torch.Tensor:
        """Image ``index``'s normalised frames (t*T, 3, H, W) in the pixels' dtype (decoded exactly)."""
        self._check_index(inputs, index)
        pv, grids, offsets = self._pixels(inputs)
        return self.unpatchify(pv[offsets[index] : offsets[index + 1]], grids[index])

    def views(self, inputs: dict) -> list[torch.Tensor]:
        got = self._pixels(inputs)
        if got is None:
            return []
        pv, grids, offsets = got
        return [self.to_unit(self.unpatchify(pv[a:b], g)[0]) for g, a, b in zip(grids, offsets, offsets[1:])]

    def augment(self, inputs, relevance, fractions):
        if not self._check_augment(inputs, relevance, fractions):
            return {}, []
        pv, grids, offsets = self._pixels(inputs)
        black = self.black(pv)
        parts, views = [], []
        for g, a, b, rel, fraction in zip(grids, offsets, offsets[1:], relevance, fractions):
            frames = self.unpatchify(pv[a:b], g)
            keep = self._mask(rel, tuple(frames.shape[-2:]), float(fraction), pv.device)
            views.append(torch.where(keep, self.to_unit(frames[0]), 0.0))
            parts.append(self.patchify(torch.where(keep, frames, black)))  # the same mask on every frame
        return {"pixel_values": torch.cat(parts)}, views

    def token_grid(self, inputs, index):
        self._check_index(inputs, index)
        t, h, w = self._pixels(inputs)[1][index]
        return (t, h // self.merge, w // self.merge)

    def tokens_per_image(self, inputs):
        got = self._pixels(inputs)
        return [] if got is None else [t * h * w // self.merge**2 for t, h, w in got[1]]


LAYOUTS: dict[str, type[PixelLayout]] = {"images": ImagesLayout, "tiles": TilesLayout, "patches": PatchesLayout}
FAMILY_LAYOUT = {
    "llava": "images",
    "instructblip": "images",
    "llava_next": "tiles",
    "qwen2_vl": "patches",
    "qwen2_5_vl": "patches",
    "qwen3_vl": "patches",  # the Qwen2-VL image processor's patches (Qwen3-VL reuses it)
}


def layout_for(config, image_processor) -> PixelLayout:
    """The pixel layout of a VLM (``model.config``), normalised like ``image_processor`` (an image
    processor, or a processor holding one as ``.image_processor``)."""
    family = getattr(config, "model_type", None)
    if family not in FAMILY_LAYOUT:
        raise UnsupportedModelError(
            f"model_type: got {family!r}; AGLA's augmented view supports the families {sorted(FAMILY_LAYOUT)}"
        )
    processor = getattr(image_processor, "image_processor", image_processor)
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return LAYOUTS[FAMILY_LAYOUT[family]](mean, std, config)
