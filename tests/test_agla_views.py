"""AGLA's model-free parts (attnsteer/methods/agla_views.py): the augmented view's mask and the
logits assembly. AGLA itself is not available yet; these are tested on their own."""

from __future__ import annotations

import math

import pytest
import torch

from attnsteer.methods.agla_views import assemble_logits, black_out, gaussian_blur, relevance_mask


def _planted(h=24, w=24, box=(6, 12, 8, 16)):
    """A relevance map with noise everywhere and a high block where the object is."""
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(h, w, generator=g) * 0.2
    y0, y1, x0, x1 = box
    rel[y0:y1, x0:x1] = 1.0
    return rel


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.35, 0.5, 0.8])
def test_the_requested_fraction_of_the_least_relevant_pixels_is_dropped(fraction):
    rel = _planted()
    keep = relevance_mask(rel, (96, 80), fraction)
    n = 96 * 80
    dropped = int((~keep).sum())
    assert abs(dropped - fraction * n) <= 2  # floor and the threshold pixel itself
    # the dropped pixels are exactly the lowest of the blurred map
    r = torch.nn.functional.interpolate(((rel - rel.min()) / (rel.max() - rel.min()))[None, None], size=(96, 80),
                                        mode="bicubic", align_corners=False)[0, 0]  # fmt: skip
    blurred = gaussian_blur(r, 0.02 * 96)
    if dropped:
        assert blurred[~keep].max() <= blurred[keep].min()


def test_the_planted_object_is_kept_and_the_image_blacked_out_elsewhere():
    rel = _planted()
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1
    keep = relevance_mask(rel, (48, 48), 0.5)
    out = black_out(image, keep)
    # the object's block (rows 12:24, cols 16:32 at 48 px) keeps every pixel
    assert bool(keep[12:24, 16:32].all())
    assert torch.equal(out[:, keep], image[:, keep]) and bool((out[:, ~keep] == 0).all())
    assert abs(float((out.sum(0) == 0).float().mean()) - 0.5) < 0.01


def test_blur_sigma_scales_with_the_side_and_preserves_a_constant():
    flat = torch.full((20, 30), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 3.0), flat)
    spike = torch.zeros(41, 41)
    spike[20, 20] = 1.0
    out = gaussian_blur(spike, 2.0)
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-5)
    ys = torch.arange(41, dtype=torch.float32) - 20
    variance = float((out.sum(1) * ys**2).sum())
    assert math.isclose(variance, 4.0, rel_tol=0.02)  # sigma 2


def test_fraction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="fraction"):
        relevance_mask(torch.rand(4, 4), (8, 8), 1.0)


def test_assembly_is_the_sum_with_the_plausibility_cut():
    g = torch.Generator().manual_seed(2)
    z_o, z_a = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    z = assemble_logits(z_o, z_a, alpha=2.0, beta=0.5)
    p_o = torch.softmax(z_o, -1)
    cut = p_o < 0.5 * p_o.max(-1, keepdim=True).values
    assert torch.equal(torch.isinf(z), cut)
    torch.testing.assert_close(z[~cut], (z_o + 2.0 * z_a)[~cut])
    # identical views: (1 + alpha) z_orig, masked; alpha 0: the original's argmax survives
    same = assemble_logits(z_o, z_o, alpha=2.0, beta=0.5)
    torch.testing.assert_close(same[~cut], 3.0 * z_o[~cut])
    assert torch.equal(assemble_logits(z_o, z_a, 0.0, 0.5).argmax(-1), z_o.argmax(-1))
