"""VAF and HGAI against their formulas written out here (materialised float32, applied literally),
on every backend that claims them, in every phase; the scaled-keys backend's own promises; both
methods on SmolLM2 through ``handle.focus``. The family matrix lives in tests/test_vlm_steering.py."""

from __future__ import annotations

import pytest
import torch
from attention_cases import Stats, attend, inputs, padded_mask, params, plan_of

import attnsteer
from attnsteer.attention import router
from attnsteer.attention.geometry import ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.methods.hgai import HGAI
from attnsteer.methods.pai import PAI
from attnsteer.methods.vaf import VAF
from attnsteer.roles import PromptRoles

PROMPT = 12  # prompt length; images at 3..7 (row 0) and 5..9 (row 1); row 1 has 2 padding tokens
PADS = [0, 2]
PHASES = {"prefill": (PROMPT, PROMPT, 0), "chunk": (3, PROMPT + 3, PROMPT), "decode": (1, PROMPT + 4, PROMPT + 3)}
SCALING = 0.4
HEADS = torch.tensor([True, False, True, True, False, False])


def image_mask() -> torch.Tensor:
    image = torch.zeros(2, PROMPT, dtype=torch.bool)
    image[0, 3:8], image[1, 5:10] = True, True
    return image


def literal(name, p, q, k, v, visible, past, heads=None):
    """The method's rule applied literally to the materialised float32 scores -> out (B, Q, H, D).

    vaf:  rows after their batch row's last image token: s *= alpha on image keys, s *= beta on the
          keys before the first image token.
    hgai: rows at position >= PROMPT - 1: s += alpha * mean over all heads of |s| on image keys."""
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * SCALING  # (B, H, Q, K)
    s = s.masked_fill(~visible, float("-inf"))
    image = image_mask()
    b, h, nq, nk = s.shape
    new = s.clone()
    for bi in range(b):
        img = torch.zeros(nk, dtype=torch.bool)
        img[:PROMPT] = image[bi]
        first, last = int(img.nonzero().min()), int(img.nonzero().max())
        for i in range(nq):
            row = past + i
            for hi in range(h):
                if heads is not None and not heads[hi]:
                    continue
                for j in range(nk):
                    if not visible[bi, 0, i, j]:
                        continue
                    if name == "vaf" and row > last:
                        if img[j]:
                            new[bi, hi, i, j] = p["alpha"] * s[bi, hi, i, j]
                        elif j < first:
                            new[bi, hi, i, j] = p["beta"] * s[bi, hi, i, j]
                    if name == "hgai" and row >= PROMPT - 1 and img[j]:
                        new[bi, hi, i, j] = s[bi, hi, i, j] + p["alpha"] * s[bi, :, i, j].abs().mean()
    a = torch.softmax(new, -1).nan_to_num(0.0)
    return (a @ v).transpose(1, 2)


CASES = {
    "vaf": (VAF, {"alpha": 1.6, "beta": 0.6}),
    "hgai": (HGAI, {"alpha": 0.9}),
}
# backends that claim each method (tests/test_backends_property.py checks the refusals of the others)
BACKENDS = {"vaf": ["reference", "chunked", "keyscale", "auto"], "hgai": ["reference", "chunked", "auto"]}


def setup(name, phase, heads=None, hkv=2, dtype=torch.float32):
    cls, p = CASES[name]
    q_len, k_len, past = PHASES[phase]
    q, k, v = inputs(2, 6, hkv, q_len, k_len, 8, seed=5, dtype=dtype)
    mask = padded_mask(2, q_len, k_len, PADS)
    info = ForwardInfo(q_len, past, k_len, torch.tensor(PADS))
    plan = plan_of(cls(params(cls, **p), 0, heads))
    return p, plan, q, k, v, mask, info, past


def run(backend, plan, q, k, v, mask, info, stats=None, **kw):
    prompt = PromptState(PromptRoles(image_mask()))
    return attend(
        backend, plan, q, k, v, MaskView(mask, q.shape[2], k.shape[2]), info, prompt, stats, scaling=SCALING, **kw
    )


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("heads", [None, HEADS], ids=["all-heads", "head-subset"])
def test_every_claiming_backend_equals_the_formula(name, phase, heads):
    p, plan, q, k, v, mask, info, past = setup(name, phase, heads)
    expected = literal(name, p, q, k, v, mask, past, heads)
    unsteered = literal(name, {"alpha": 1.0 if name == "vaf" else 0.0, "beta": 1.0}, q, k, v, mask, past)
    assert (expected - unsteered).abs().max() > 1e-2  # the rule changes this call
    for backend in BACKENDS[name]:
        stats = Stats()
        out = run(backend, plan, q, k, v, mask, info, stats)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=lambda m, b=backend: f"{b}: {m}")
        assert sum(stats.rows.values()) > 0
    torch.testing.assert_close(run("chunked", plan, q, k, v, mask, info, chunk=2), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("phase", list(PHASES))
def test_scaled_keys_in_half_precision_within_the_dtype_rule(phase):
    """bf16 inputs: the scaled-keys path is within twice the error of the literal rule computed in bf16."""
    p, plan, q, k, v, mask, info, past = setup("vaf", phase, dtype=torch.bfloat16)
    expected = literal("vaf", p, q.float(), k.float(), v.float(), mask, past)
    out = run("keyscale", plan, q, k, v, mask, info)
    assert out.dtype == torch.bfloat16
    naive = run("reference", plan, q, k, v, mask, info, compute_dtype=torch.bfloat16)
    naive_err = (naive.float() - expected).abs().max()
    assert (out.float() - expected).abs().max() <= 2 * naive_err + 1e-3


def test_router_takes_scaled_keys_for_vaf_alone_and_chunked_with_another_score_rule():
    _, plan, q, k, v, mask, info, _ = setup("vaf", "prefill")
    stats = Stats()
    run("auto", plan, q, k, v, mask, info, stats)
    assert stats.paths == {"keyscale/prefill": 1} and not stats.fallbacks
    pai = PAI(params(PAI, alpha=0.5), 0, None)
    pai.intervention = 1
    plan.methods.append(pai)
    stats = Stats()
    run("auto", plan, q, k, v, mask, info, stats)
    assert stats.paths == {"chunked/prefill": 1}
    assert "keyscale: score rules of form elementwise (not implemented by keyscale)" in stats.fallbacks
    second = VAF(params(VAF, alpha=0.8), 0, None)
    second.intervention = 1
    plan.methods[1:] = [second]
    with pytest.raises(attnsteer.SteeringError, match="keyscale.*cannot run.*2 score rules on one layer"):
        run("keyscale", plan, q, k, v, mask, info)


def test_scaled_keys_refuses_elementwise_score_rules_and_soft_capping():
    _, plan, q, k, v, mask, info, _ = setup("hgai", "decode")
    with pytest.raises(attnsteer.SteeringError, match="score rules of form elementwise"):
        run("keyscale", plan, q, k, v, mask, info)
    _, plan, q, k, v, mask, info, _ = setup("vaf", "decode")
    with pytest.raises(attnsteer.SteeringError, match="logit soft-capping"):
        run("keyscale", plan, q, k, v, mask, info, softcap=5.0)
    assert "keyscale" not in router.BackendConfig().candidates("cpu")  # only for calls that carry the form


def test_vaf_report_names_its_spans():
    method = VAF(params(VAF), 0, None)
    report = method.report(PromptState(PromptRoles(image_mask())))
    assert report["system"] == [[0, 1, 2], [0, 1, 2, 3, 4]] and report["image"] == [[3, 4, 5, 6, 7], [5, 6, 7, 8, 9]]
    assert report["key_factors"][1] == [0.95] * 5 + [1.15] * 5 + [1.0] * 2


# ---- SmolLM2 through focus -----------------------------------------------------------------------
FOCUS_RECIPES = {
    "vaf": {"interventions": [{"method": "vaf", "layers": "8:20", "params": {"alpha": 1.3, "beta": 0.9}}]},
    "hgai": {"interventions": [{"method": "hgai", "layers": "8:20", "params": {"alpha": 0.5}}]},
}


@pytest.mark.parametrize("name", list(FOCUS_RECIPES))
def test_smollm2_focus_changes_logits_and_fused_equals_reference(smollm2, name):
    tokenizer, model = smollm2
    text = "Context: the museum opened in 1911 and closed in 1987. Question: when did the museum close? Answer:"
    enc = tokenizer([text], return_tensors="pt")
    focus = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    focus[0, 2:14] = True  # the context sentence
    out = {}
    with torch.no_grad():
        base = model(**enc).logits
        for backend in ("reference", "auto"):
            with attnsteer.apply(model, FOCUS_RECIPES[name], backend=backend) as handle, handle.focus(focus):
                out[backend] = model(**enc).logits
                paths = {path for s in handle.stats() for path in s["paths"]}
        after = model(**enc).logits
    assert (out["auto"] - base).abs().max() > 1e-2
    torch.testing.assert_close(out["auto"], out["reference"], atol=5e-4, rtol=1e-4)
    assert paths == ({"keyscale/prefill"} if name == "vaf" else {"chunked/prefill"})
    assert torch.equal(after, base)  # remove() restores the model exactly
