"""Building blocks of AGLA (docs/methods.md#agla): the augmented view and the logits assembly.

AGLA itself (``method: agla``) is not available yet -- recipes naming it still fail with a clear
error. These pure functions are the parts of the rule that need no model, tested on their own:

* :func:`relevance_mask`: from a relevance map of the image for the prompt (from a matcher:
  BLIP-ITM Grad-CAM, or the LVLM's own attention), which pixels the augmented view keeps: min-max
  normalise, bicubic resize to the image, Gaussian blur with ``sigma = 0.02 * side``, min-max
  again, then drop the fraction ``f`` of pixels with the lowest relevance.
* :func:`black_out`: the augmented image -- the dropped pixels set to 0 (black).
* :func:`assemble_logits`: ``z = z_orig + alpha * z_aug`` with the plausibility cut: tokens with
  ``p_orig(v) < beta * max_v p_orig(v)`` get ``-inf``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLUR_SIGMA_PER_SIDE = 0.02  # sigma of the blur as a fraction of the image side
BLUR_TRUNCATE = 4.0  # the kernel reaches 4 sigma on each side (as common Gaussian filters do)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x: float (H, W) -> blurred (H, W); separable kernel, edges extended (nearest)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(BLUR_TRUNCATE * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    y = x[None, None]
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return y[0, 0]


def relevance_mask(relevance: torch.Tensor, size: tuple[int, int], fraction: float) -> torch.Tensor:
    """Pixels the augmented view keeps.

    relevance: float (h, w) map of the image's relevance to the prompt (any scale).
    size: (H, W) of the image. fraction: f in [0, 1), the share of pixels to drop.
    Returns bool (H, W), False for the dropped pixels: with the blurred map's values sorted in
    descending order, the threshold is the value at index ``floor(H * W * (1 - f))`` and pixels
    below it are dropped (the reference code's rule: about ``f * H * W`` pixels, the lowest ones;
    ties at the threshold are kept).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: got {fraction!r}; allowed: a share of pixels in [0, 1)")
    height, width = size
    r = _minmax(relevance.float())
    r = F.interpolate(r[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    r = _minmax(gaussian_blur(r, BLUR_SIGMA_PER_SIDE * max(height, width)))
    n = height * width
    index = min(int(math.floor(n * (1.0 - fraction))), n - 1)
    threshold = r.flatten().sort(descending=True).values[index]
    return r >= threshold


def black_out(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """image: (C, H, W) pixels; keep: bool (H, W) -> the image with the other pixels set to 0."""
    return image * keep.to(image.dtype)[None]


def assemble_logits(z_orig: torch.Tensor, z_aug: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(B, V) next-token logits of the original and augmented views -> AGLA's assembled logits
    (B, V) float32: ``z_orig + alpha * z_aug``, ``-inf`` where ``p_orig < beta * max p_orig``."""
    z_orig, z_aug = z_orig.float(), z_aug.float()
    z = z_orig + alpha * z_aug
    if beta <= 0.0:  # no cut
        return z
    cutoff = z_orig.max(-1, keepdim=True).values + math.log(beta)
    return z.masked_fill(z_orig < cutoff, float("-inf"))
