"""Text family x the methods that steer toward marked keys (VAF, HGAI, SPIN, SEKA) through
``handle.focus``: the fast path equals the reference, left-padded rows equal rows alone, identity
parameters are bit-identical, the logits change, ``remove()`` is exact. Vision families run the
same methods on image tokens in tests/test_vlm_steering.py."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer.errors import AttnsteerWarning

# name -> (recipe, identity recipe); every layer of the tiny models
RECIPES = {
    "vaf": (
        {"interventions": [{"method": "vaf", "layers": "all", "params": {"alpha": 1.6, "beta": 0.6}}]},
        {"interventions": [{"method": "vaf", "layers": "all", "params": {"alpha": 1.0, "beta": 1.0}}]},
    ),
    "hgai": (
        {"interventions": [{"method": "hgai", "layers": "all", "params": {"alpha": 0.8}}]},
        {"interventions": [{"method": "hgai", "layers": "all", "params": {"alpha": 0.0}}]},
    ),
    "spin": (
        {"interventions": [{"method": "spin", "layers": "all", "params": {"rho": 0.5, "eps": 0.1}}]},
        {"interventions": [{"method": "spin", "layers": "all", "params": {"rho": 1.0, "eps": 0.1}}]},
    ),
}
TOL = dict(atol=3e-5, rtol=3e-5)


def batch():
    """ids, mask (3, 16) left-padded by 0 / 5 / 2, and a focus span of 4 real tokens in each row."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    focus = torch.zeros_like(ids, dtype=torch.bool)
    for row, pad in enumerate((0, 5, 2)):
        ids[row, :pad], mask[row, :pad] = 0, 0
        focus[row, pad + 3 : pad + 7] = True
    return ids, mask, focus


def logits(model, handle, ids, mask, focus):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), handle.focus(focus):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.set_num_threads(1)
    return build_tiny(request.param)


@pytest.mark.parametrize("method", list(RECIPES))
def test_focus_fast_equals_reference_rows_alone_and_changes_logits(model, method):
    ids, mask, focus = batch()
    valid = mask.bool()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    out = {}
    for backend in ("reference", "auto"):
        with attnsteer.apply(model, RECIPES[method][0], backend=backend) as handle:
            out[backend] = logits(model, handle, ids, mask, focus)
            assert all(s["fired"] for s in handle.stats())
            if backend == "auto":
                for row in range(ids.shape[0]):
                    keep = valid[row]
                    alone = logits(
                        model, handle, ids[row : row + 1, keep], mask[row : row + 1, keep], focus[row : row + 1, keep]
                    )
                    torch.testing.assert_close(out["auto"][row, keep], alone[0], **TOL)
    assert (out["auto"] - base)[valid].abs().max() > 1e-3
    torch.testing.assert_close(out["auto"][valid], out["reference"][valid], **TOL)
    with torch.no_grad():  # removed exactly
        after = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(after, base)


@pytest.mark.parametrize("method", list(RECIPES))
def test_focus_identity_params_are_bit_identical(model, method):
    ids, mask, focus = batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    with pytest.warns(AttnsteerWarning, match="identity"):
        handle = attnsteer.apply(model, RECIPES[method][1])
    with handle:
        assert torch.equal(logits(model, handle, ids, mask, focus), base)
