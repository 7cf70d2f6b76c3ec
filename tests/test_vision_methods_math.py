"""VAR, PAI and VHR on hand-made numbers, and focus spans on text-only models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attention_cases import Stats, attend, call_of, plan_of, weights_as_attention
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer import compat
from attnsteer.attention import chunked
from attnsteer.attention.geometry import ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.errors import AttnsteerWarning, SteeringError
from attnsteer.methods.pai import PAI, Contrast, ImageAmplification, TextStream, contrast_logits
from attnsteer.methods.var import VAR, Redistribution
from attnsteer.methods.vhr import VHR
from attnsteer.roles import PromptRoles
from attnsteer.sinks import activation_ratio, hidden_sinks, massive_dims


def _params(cls, **over):
    return cls.finalize_params({name: over.get(name, p.default) for name, p in cls.params.items()})


def _attended_weights(backend, plan, a, mask, info, prompt, stats=None):
    """The steered weights (1, 1, Q, K) of ``backend`` on the attention whose weights are ``a``."""
    q, k, v = weights_as_attention(a)
    out = attend(backend, plan, q, k, v, mask, info, prompt, stats, scaling=1.0)
    return out[:, :, :, : a.shape[-1]].transpose(1, 2)


# ---- VAR ------------------------------------------------------------------------------------
# keys: 0 text sink, 1 visual sink, 2-3 visual non-sinks, 4 text; the decode row is at position 5
IMAGE = torch.tensor([[False, True, True, True, False, False]])
SINKS = torch.tensor([[True, True, False, False, False, False]])
DECODE = MaskView(None, 1, 6), ForwardInfo(1, 5, 6, None)


def _var(**over):
    var = VAR(_params(VAR, **over), layer=0, heads=None)
    assert [type(r) for r in var.rules] == [Redistribution]
    return var


def _prompt(var, sinks=SINKS):
    prompt = PromptState(PromptRoles(IMAGE))
    prompt.put(var.key, "sinks", sinks)
    return prompt


def _redistribute(var, a, mask, info, prompt):
    """(new weights, steered rows) of VAR's rule on the weights ``a`` (1, 1, Q, K) of a call."""
    q, k, _ = weights_as_attention(a)
    call = call_of(q, k, mask, info, prompt, scaling=1.0)
    visible, _ = mask.chunk(0, info.q_len, "cpu")
    return chunked.apply_group_rule(var.rules[0], a, call.rows(visible, 0, rows=info.q_len), call)


def test_var_redistribution_by_hand():
    var = _var()
    a = torch.tensor([0.25, 0.2, 0.3, 0.2, 0.05, 0.0]).view(1, 1, 1, 6)
    ref, rows = _redistribute(var, a, *DECODE, _prompt(var))
    # p = 0.6 moved: sinks keep 0.4; Omega = 0.6 * 0.45 = 0.27 goes to keys 2, 3 in proportion 0.3 : 0.2
    expected = torch.tensor([0.1, 0.08, 0.3 + 0.27 * 0.6, 0.2 + 0.27 * 0.4, 0.05, 0.0])
    torch.testing.assert_close(ref[0, 0, 0], expected)
    assert rows == 1 and abs(ref.sum().item() - 1) < 1e-6
    for backend in ("reference", "chunked", "flash"):  # each backend's own computation of the rule
        stats = Stats()
        got = _attended_weights(backend, plan_of(var), a, *DECODE, _prompt(var), stats)
        torch.testing.assert_close(got, ref, msg=backend)
        assert stats.rows == {id(var): 1}, backend


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
    out, rows = _redistribute(var, a, *DECODE, _prompt(var))
    assert torch.equal(out, a)  # p = 0: the row passes the selection, and every factor is 1
    if over.get("p") != 0.0:
        assert rows == 0
    for backend in ("reference", "chunked", "flash"):
        stats = Stats()
        got = _attended_weights(backend, plan_of(var), a, *DECODE, _prompt(var), stats)
        torch.testing.assert_close(got, a, msg=backend)
        if over.get("p") != 0.0:
            assert stats.rows == {id(var): 0}, backend


def test_var_query_rows_are_after_the_last_image_token():
    var = _var()
    a = torch.full((1, 1, 6, 6), 1 / 6)
    every_key = MaskView(torch.ones(1, 1, 6, 6, dtype=torch.bool), 6, 6)  # every row sees every key
    info = ForwardInfo(6, 0, 6, None)
    out, rows = _redistribute(var, a, every_key, info, _prompt(var))
    assert torch.equal(out[0, 0, :4], a[0, 0, :4])  # rows up to the last image token (3) untouched
    assert not torch.allclose(out[0, 0, 4:], a[0, 0, 4:], atol=1e-3)
    assert rows == 2  # rows 4 and 5
    for backend in ("reference", "chunked"):  # backends reading any mask
        stats = Stats()
        got = _attended_weights(backend, plan_of(var), a, every_key, info, _prompt(var), stats)
        torch.testing.assert_close(got, out, msg=backend)
        assert stats.rows == {id(var): 2}, backend


def test_var_released_variant_needs_a_visual_sink():
    sinks = torch.tensor([[True, False, False, False, False, False]])  # text sink only
    a = torch.tensor([0.25, 0.2, 0.3, 0.2, 0.05, 0.0]).view(1, 1, 1, 6)
    paper = _var()
    released = _var(variant="released")
    assert released.p.p == 0.4 and VAR.layers_default(dataclasses.asdict(released.p)) == "2:"
    assert _redistribute(paper, a, *DECODE, _prompt(paper, sinks))[1] == 1
    assert _redistribute(released, a, *DECODE, _prompt(released, sinks))[1] == 0
    assert _redistribute(released, a, *DECODE, _prompt(released))[1] == 1  # with the visual sink (key 1)


def test_hidden_state_sinks_found_exactly_where_planted():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 1024)  # |x_d| / RMS(x) can reach 20 only when sqrt(D) > 20
    hidden[0, [0, 5], 7] = 400.0
    hidden[1, [2], 19] = 400.0
    valid = torch.ones(2, 9, dtype=torch.bool)
    found = hidden_sinks(hidden, valid, 20.0, [7, 19])
    assert found[0].nonzero().flatten().tolist() == [0, 5]
    assert found[1].nonzero().flatten().tolist() == [2]
    dims = massive_dims(hidden, valid, 20.0)
    assert dims[0].nonzero().flatten().tolist() == [7]  # per prompt: row 0 uses dim 7 only
    assert dims[1].nonzero().flatten().tolist() == [19]
    assert torch.equal(hidden_sinks(hidden, valid, 20.0, dims), found)
    # VAR (sink_dims: auto) stores them: the dims found at the intervention's first layer, kept for
    # its later layers (a dim massive only at a later layer's input does not make sinks there)
    first, later = (VAR(_params(VAR, tau=20.0), layer, None) for layer in (3, 5))
    later.first_layer = False
    prompt = PromptState()
    first.observe_layer_input(hidden, valid, prompt)
    assert torch.equal(prompt.get(first.key, "sinks"), found)
    assert torch.equal(prompt.get(("var auto dims", 0), "dims"), dims)
    moved = hidden.clone()
    moved[0, 1, 3] = 400.0
    later.observe_layer_input(moved, valid, prompt)
    assert torch.equal(prompt.get(later.key, "sinks"), found)
    x = hidden[0, 0]
    assert torch.isclose(activation_ratio(hidden)[0, 0, 7], x[7].abs() / (x.pow(2).mean() + 1e-6).sqrt())
    padded = hidden_sinks(hidden, valid & (torch.arange(9) >= 1), 20.0, [7])
    assert padded[0].nonzero().flatten().tolist() == [5]  # padding is never a sink


# ---- PAI ------------------------------------------------------------------------------------
def test_pai_amplifies_image_scores_of_the_last_row_only():
    image = torch.tensor([[False, True, True, False]])
    pai = PAI(_params(PAI, alpha=0.5), 0, None)
    assert [type(r) for r in pai.rules] == [ImageAmplification]  # no gamma: no logits step
    s = torch.tensor([[1.0, 2.0, -2.0, 0.5]] * 4).view(1, 1, 4, 4)
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    q = k = torch.zeros(1, 1, 4, 2)  # ImageAmplification reads only the scores
    call = call_of(q, k, MaskView(visible, 4, 4), ForwardInfo(4, 0, 4, None), PromptState(PromptRoles(image)))
    masked = s.masked_fill(~visible, float("-inf"))
    stats = Stats()
    out = chunked.apply_score_rules(pai.rules, masked, q, k, call.rows(visible, 0, rows=4), call, stats)
    assert torch.equal(out[0, 0, :3], masked[0, 0, :3])  # earlier rows untouched
    assert out[0, 0, 3].tolist() == [1.0, 3.0, -1.0, 0.5]
    assert stats.rows == {id(pai): 1}


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
# VAR on these tiny models: hidden-state sinks at tau 2.45 on every layer's input (at 3.0 later
# layers have none, at 2.0 nearly every token is one), and rows of any image mass; every layer of
# every family then steers rows of these prompts
VAR_FOCUS = {"tau": 2.45, "rho": 0.3, "min_image_attention": 0.0}
FOCUS_RECIPES = {
    "var": {"interventions": [{"method": "var", "layers": "all", "params": VAR_FOCUS}]},
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
        for backend in ("reference", "auto"):
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
                stats = handle.stats()
                assert stats and all(s["fired"] > 0 and s["rows_modified"] > 0 for s in stats), stats
    assert (out["auto"] - base)[valid].abs().max() > 1e-3
    torch.testing.assert_close(out["auto"][valid], out["reference"][valid], atol=2e-5, rtol=2e-5)


def test_var_generate_with_cache_equals_recompute(tiny):
    """VAR's decode rows behave like prefill rows (sinks from the prompt; generated tokens are not
    sinks at tau 2.45 here), so KV-cached generation equals recomputing every step: the same
    tokens, and the same logits at every step."""
    ids, mask, focus = _batch()
    ids, focus = ids[:1], focus[:1]
    recipe = {"interventions": [{"method": "var", "layers": "all", "params": VAR_FOCUS}]}
    gen_kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = tiny(input_ids=ids).logits
    with attnsteer.apply(tiny, recipe) as handle:
        with handle.focus(focus), torch.no_grad():
            steered = tiny(input_ids=ids).logits
        assert (steered - base).abs().max() > 1e-3  # VAR changes this prompt's logits
        with handle.focus(focus):
            gen = tiny.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **gen_kwargs)
        # every layer steered rows in every forward: the prompt's, and generate()'s prefill and decode steps
        stats = handle.stats()
        assert all(s["calls"] == 6 and s["fired"] == 6 for s in stats), stats
        seq, logits = ids, []
        for _ in range(5):
            extended = torch.cat([focus, torch.zeros(1, seq.shape[1] - focus.shape[1], dtype=torch.bool)], 1)
            with handle.focus(extended), torch.no_grad():
                logits.append(tiny(input_ids=seq, use_cache=False).logits[:, -1])
            seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], 1)
        sinks_found = [handle._state.prompt.get(m.key, "sinks") for m in handle.plan.methods]
    assert torch.equal(gen.sequences, seq)
    for cached, recomputed in zip(gen.logits, logits):
        torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=2e-5)
    assert len(sinks_found) == 4 and all(table[0, : ids.shape[1]].any() for table in sinks_found)
    assert all(not table[0, ids.shape[1] :].any() for table in sinks_found)


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
            assert not handle.plans  # the intervention is skipped: no site
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
        expected, plain, seq, text_seq = [], [], ids, text_ids
        for nxt in [None, *steps]:
            if nxt is not None:
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
                text_seq = torch.cat([text_seq, torch.tensor([[nxt]])], 1)
            img = tiny(input_ids=seq).logits[:, -1]
            txt = tiny(input_ids=text_seq).logits[:, -1]
            plain.append(img)
            expected.append(contrast_logits(img, txt, 1.1))
        calls = []
        real_step = TextStream.step
        monkeypatch.setattr(TextStream, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
        with attnsteer.apply(tiny, recipe) as handle, handle.focus(focus):
            # alpha 0: no attention rule on any layer (no site computes attention, none can be silent),
            # one logits step for the intervention
            assert all([type(r) for r in m.rules] == [Contrast] for m in handle.plan.methods)
            out = tiny(input_ids=ids, use_cache=True)
            got = [out.logits[:, -1]]
            cache = compat.output_cache(out)
            for nxt in steps:
                out = tiny(input_ids=torch.tensor([[nxt]]), use_cache=True, **compat.with_cache(tiny, cache))
                cache = compat.output_cache(out)
                got.append(out.logits[:, -1])
            assert all(s["calls"] == 0 for s in handle.stats()), handle.stats()
    assert len(calls) == 1 + len(steps), f"text-only stream ran {len(calls)} times for {1 + len(steps)} forwards"
    for g, e, p in zip(got, expected, plain):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite)
        assert (torch.log_softmax(p, -1)[finite] - g[finite]).abs().max() > 1e-3  # the contrast changes the logits
        torch.testing.assert_close(g[finite], e[finite], atol=2e-5, rtol=2e-5)
