"""VAR, PAI and VHR on hand-made numbers, and focus spans on text-only models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer import compat
from attnsteer.attention.rows import ForwardInfo, row_context
from attnsteer.errors import AttnsteerWarning, SteeringError
from attnsteer.methods.base import StepInfo
from attnsteer.methods.pai import PAI, TextStream, contrast_logits
from attnsteer.methods.var import VAR
from attnsteer.methods.vhr import VHR
from attnsteer.roles import PromptRoles
from attnsteer.sinks import HiddenSinks, activation_ratio


class FakeState:
    def __init__(self, image, sinks=None, layer=0):
        self.roles = PromptRoles(image)
        self.sinks = HiddenSinks()
        if sinks is not None:
            self.sinks.by_layer[layer] = sinks


def _params(cls, **over):
    return cls.finalize_params({name: over.get(name, p.default) for name, p in cls.params.items()})


def _ctx(q_len, k_len, past=0):
    visible = torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
    info = ForwardInfo(q_len, past, past + q_len, None)
    return row_context(visible, info, 0, torch.arange(k_len) + max(past + q_len - k_len, 0))


# ---- VAR ------------------------------------------------------------------------------------
def _var(**over):
    # keys: 0 text sink, 1 visual sink, 2-3 visual non-sinks, 4 text; the query row is at position 5
    image = torch.tensor([[False, True, True, True, False, False]])
    sinks = torch.tensor([[True, True, False, False, False, False]])
    return VAR(_params(VAR, **over), layer=0, heads=None, state=FakeState(image, sinks))


def test_var_redistribution_by_hand():
    var = _var()
    a = torch.tensor([0.25, 0.2, 0.3, 0.2, 0.05, 0.0]).view(1, 1, 1, 6)
    ctx = _ctx(1, 6, past=5)
    ref, rows = var.reference_weights(a, ctx, StepInfo(False, 0, 6))
    # p = 0.6 moved: sinks keep 0.4; Omega = 0.6 * 0.45 = 0.27 goes to keys 2, 3 in proportion 0.3 : 0.2
    expected = torch.tensor([0.1, 0.08, 0.3 + 0.27 * 0.6, 0.2 + 0.27 * 0.4, 0.05, 0.0])
    torch.testing.assert_close(ref[0, 0, 0], expected)
    assert rows == 1 and abs(ref.sum().item() - 1) < 1e-6
    fused, _ = var.fused_weights(a, ctx, StepInfo(False, 0, 6))
    torch.testing.assert_close(fused, ref)


@pytest.mark.parametrize(
    "a, over",
    [
        ([0.25, 0.2, 0.3, 0.2, 0.05, 0.0], {"rho": 0.9}),  # r = 0.5 / 0.7 < 0.9
        ([0.75, 0.05, 0.05, 0.05, 0.1, 0.0], {}),  # image mass 0.15 < 0.2
        ([0.25, 0.2, 0.3, 0.2, 0.05, 0.0], {"p": 0.0}),  # nothing moved
    ],
)
def test_var_rows_failing_the_selection_are_untouched(a, over):
    var = _var(**over)
    a = torch.tensor(a).view(1, 1, 1, 6)
    for fn in (var.reference_weights, var.fused_weights):
        out, rows = fn(a, _ctx(1, 6, past=5), StepInfo(False, 0, 6))
        assert torch.equal(out, a) or over.get("p") == 0.0
        if over.get("p") != 0.0:
            assert rows == 0


def test_var_query_rows_are_after_the_last_image_token():
    var = _var()
    a = torch.full((1, 1, 6, 6), 1 / 6)
    out, rows = var.reference_weights(a, _ctx(6, 6), StepInfo(True, 0, 6))
    assert torch.equal(out[0, 0, :4], a[0, 0, :4])  # rows up to the last image token (3) untouched
    assert rows == 2  # rows 4 and 5


def test_var_released_variant_needs_a_visual_sink():
    image = torch.tensor([[False, True, True, True, False, False]])
    sinks = torch.tensor([[True, False, False, False, False, False]])  # text sink only
    a = torch.tensor([0.25, 0.2, 0.3, 0.2, 0.05, 0.0]).view(1, 1, 1, 6)
    paper = VAR(_params(VAR), 0, None, FakeState(image, sinks))
    released = VAR(_params(VAR, variant="released"), 0, None, FakeState(image, sinks))
    assert released.p.p == 0.4 and VAR.layers_default(dataclasses.asdict(released.p)) == "2:"
    assert paper.reference_weights(a, _ctx(1, 6, past=5), StepInfo(False, 0, 6))[1] == 1
    assert released.reference_weights(a, _ctx(1, 6, past=5), StepInfo(False, 0, 6))[1] == 0


def test_hidden_state_sinks_found_exactly_where_planted():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 1024)  # |x_d| / RMS(x) can reach 20 only when sqrt(D) > 20
    hidden[0, [0, 5], 7] = 400.0
    hidden[1, [2], 19] = 400.0
    valid = torch.ones(2, 9, dtype=torch.bool)
    found = HiddenSinks()
    found.detect(3, hidden, valid, tau=20.0, dims=[7, 19], first_layer=True)
    assert found.by_layer[3][0].nonzero().flatten().tolist() == [0, 5]
    assert found.by_layer[3][1].nonzero().flatten().tolist() == [2]
    auto = HiddenSinks()
    auto.detect(3, hidden, valid, tau=20.0, dims="auto", first_layer=True)
    assert auto.auto_dims[0][0].nonzero().flatten().tolist() == [7]  # per prompt: row 0 uses dim 7 only
    assert auto.auto_dims[0][1].nonzero().flatten().tolist() == [19]
    assert torch.equal(auto.by_layer[3], found.by_layer[3])
    x = hidden[0, 0]
    assert torch.isclose(activation_ratio(hidden)[0, 0, 7], x[7].abs() / (x.pow(2).mean() + 1e-6).sqrt())
    padded = HiddenSinks()
    padded.detect(3, hidden, valid & (torch.arange(9) >= 1), 20.0, [7], True)
    assert padded.by_layer[3][0].nonzero().flatten().tolist() == [5]  # padding is never a sink


# ---- PAI ------------------------------------------------------------------------------------
def test_pai_amplifies_image_scores_of_the_last_row_only():
    image = torch.tensor([[False, True, True, False]])
    pai = PAI(_params(PAI, alpha=0.5), 0, None, FakeState(image))
    s = torch.tensor([[1.0, 2.0, -2.0, 0.5]] * 4).view(1, 1, 4, 4)
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    ctx = row_context(visible, ForwardInfo(4, 0, 4, None), 0, torch.arange(4))
    out = pai.scores(s.masked_fill(~visible, float("-inf")), None, None, ctx, None)
    assert torch.equal(out[0, 0, :3], s.masked_fill(~visible, float("-inf"))[0, 0, :3])  # earlier rows untouched
    assert out[0, 0, 3].tolist() == [1.0, 3.0, -1.0, 0.5]
    assert pai.rows_touched(out) == 1


def test_pai_contrast_by_hand():
    img = torch.tensor([[2.0, 1.0, -3.0]])
    txt = torch.tensor([[1.0, 1.0, 1.0]])
    z = contrast_logits(img, txt, gamma=1.1)
    li, lt = torch.log_softmax(img, -1), torch.log_softmax(txt, -1)
    expected = 1.1 * (li - lt) + lt
    assert z[0, 2] == float("-inf")  # p_img < 0.1 max p_img
    torch.testing.assert_close(z[0, :2], expected[0, :2])


# ---- VHR ------------------------------------------------------------------------------------
def test_vhr_outlier_rule_and_median_selection_by_hand():
    d = 4
    image = torch.zeros(1, 6, d)
    text = torch.zeros(1, 6, d)
    vhd = [1.0, 2.0, 3.0, 4.0, 20.0, 5.0]
    ta = [1.0, 1.0, 1.0, 1.0, 30.0, 1.0]
    for h in range(6):
        text[0, h, 0] = ta[h] ** 0.5
        image[0, h, 0] = text[0, h, 0] + vhd[h]
    selected = VHR.select_heads(image, text)
    # head 4 is an outlier in both VHD and TA -> VHD 0; median of [1,2,3,4,0,5] = 2.5
    assert selected[0].tolist() == [False, False, True, True, False, True]
    text[0, 4, 0] = 1.0  # TA no longer an outlier -> head 4 kept, median 3.5
    image[0, 4, 0] = 1.0 + 20.0
    assert VHR.select_heads(image, text)[0].tolist() == [False, False, False, True, True, True]


# ---- focus spans on a text-only model ----------------------------------------------------------
FOCUS_RECIPES = {
    "var": {
        "interventions": [
            {"method": "var", "layers": "all", "params": {"tau": 3.0, "rho": 0.3, "min_image_attention": 0.05}}
        ]
    },
    "pai": {"interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.8}}]},
    "pai_gamma": {"interventions": [{"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}]},
    "vhr": {"interventions": [{"method": "vhr", "layers": "all"}]},
}


def _batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    focus = torch.zeros_like(ids, dtype=torch.bool)
    focus[:, 6:10] = True
    return ids, mask, focus


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


@pytest.fixture(scope="module", params=FAMILIES)
def text_model(request):
    return build_tiny(request.param)


@pytest.mark.parametrize("method", list(FOCUS_RECIPES))
def test_focus_span_steers_a_text_model_exactly(text_model, method):
    tiny = text_model
    ids, mask, focus = _batch()
    valid = mask.bool()
    with torch.no_grad():
        base = tiny(input_ids=ids, attention_mask=mask).logits
        out = {}
        for backend in ("reference", "fused"):
            with attnsteer.apply(tiny, FOCUS_RECIPES[method], backend=backend) as handle:
                with pytest.raises(SteeringError, match="focus"):
                    tiny(input_ids=ids, attention_mask=mask)
                with handle.focus(focus):
                    out[backend] = tiny(input_ids=ids, attention_mask=mask).logits
                    for row in range(2):  # each row alone == its row in the padded batch
                        keep = valid[row]
                        with handle.focus(focus[row : row + 1, keep]):
                            alone = tiny(input_ids=ids[row : row + 1, keep]).logits
                        torch.testing.assert_close(out[backend][row, keep], alone[0], atol=2e-5, rtol=2e-5)
                assert any(s["fired"] for s in handle.stats())
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], atol=2e-5, rtol=2e-5)
    assert (out["fused"] - base)[valid].abs().max() > 1e-4


def test_var_generate_with_cache_equals_recompute(tiny):
    """VAR's decode rows behave like prefill rows (sinks from the prompt; generated tokens are not
    sinks at tau 2.5 here), so KV-cached generation equals recomputing every step."""
    ids, mask, focus = _batch()
    ids, focus = ids[:1], focus[:1]
    recipe = {"interventions": [{"method": "var", "layers": "all", "params": {"tau": 2.5, "rho": 0.3}}]}
    with attnsteer.apply(tiny, recipe) as handle:
        with handle.focus(focus):
            gen = tiny.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(5):
            extended = torch.cat([focus, torch.zeros(1, seq.shape[1] - focus.shape[1], dtype=torch.bool)], 1)
            with handle.focus(extended), torch.no_grad():
                nxt = tiny(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        sinks_found = handle._state.sinks.by_layer
        assert sum(s["fired"] for s in handle.stats()) > 0  # VAR steered rows in both runs
    assert torch.equal(gen, seq)
    assert all(not table[0, ids.shape[1] :].any() for table in sinks_found.values())


def test_identity_params_of_vision_methods_warn_and_change_nothing(tiny):
    ids, mask, focus = _batch()
    with torch.no_grad():
        base = tiny(input_ids=ids, attention_mask=mask).logits
        for recipe in (
            {"interventions": [{"method": "var", "params": {"p": 0.0}}]},
            {"interventions": [{"method": "pai", "params": {"alpha": 0.0}}]},
            {"interventions": [{"method": "vhr", "layers": "all", "params": {"alpha": 1.0}}]},
        ):
            with pytest.warns(AttnsteerWarning, match="identity"):
                handle = attnsteer.apply(tiny, recipe)
            with handle, handle.focus(focus):
                assert torch.equal(tiny(input_ids=ids, attention_mask=mask).logits, base)


def test_pai_gamma_is_the_contrast_with_the_text_only_stream_once_per_step(tiny, monkeypatch):
    """With alpha 0 the attention is unchanged; the logits of every step must then equal the
    contrast of the unsteered logits with the text-only prompt's, applied once (a recipe steering
    many layers has one logits step per forward, not one per layer)."""
    ids, _, focus = _batch()
    ids, focus = ids[:1], focus[:1]
    text_ids = ids[:, ~focus[0]]
    recipe = {"interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.0, "gamma": 1.1}}]}
    steps = [5, 17]  # tokens fed after the prompt
    with torch.no_grad():
        expected, seq, text_seq = [], ids, text_ids
        for nxt in [None, *steps]:
            if nxt is not None:
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
                text_seq = torch.cat([text_seq, torch.tensor([[nxt]])], 1)
            img = tiny(input_ids=seq).logits[:, -1]
            txt = tiny(input_ids=text_seq).logits[:, -1]
            expected.append(contrast_logits(img, txt, 1.1))
        calls = []
        real_step = TextStream.step
        monkeypatch.setattr(TextStream, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
        with attnsteer.apply(tiny, recipe) as handle, handle.focus(focus):
            out = tiny(input_ids=ids, use_cache=True)
            got = [out.logits[:, -1]]
            cache = compat.output_cache(out)
            for nxt in steps:
                out = tiny(input_ids=torch.tensor([[nxt]]), use_cache=True, **compat.with_cache(tiny, cache))
                cache = compat.output_cache(out)
                got.append(out.logits[:, -1])
    assert len(calls) == 1 + len(steps), f"text-only stream ran {len(calls)} times for {1 + len(steps)} forwards"
    for g, e in zip(got, expected):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite)
        torch.testing.assert_close(g[finite], e[finite], atol=2e-5, rtol=2e-5)
