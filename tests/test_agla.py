"""AGLA through plain ``model.generate()``: the assembled logits against an independent emulation.

The emulation never uses attnsteer's steering: each view is a separate, unsteered forward over
the whole sequence so far (no KV cache), recomputed from scratch at every step; the relevance
map of ``lvlm_attention`` is recomputed from an eager copy of the model's ``output_attentions``.
"""

from __future__ import annotations

import math

import pytest
import torch
from vlm_fixtures import IMAGE_TOKEN, VISION_END, VISION_START, build_vlm, make_inputs

import attnsteer
from attnsteer import compat
from attnsteer.errors import RecipeError, SteeringError
from attnsteer.methods.agla_pixels import layout_for
from attnsteer.methods.agla_views import relevance_mask

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ImageProcessor:
    """The part of a model's image processor AGLA reads: its normalisation."""

    image_mean, image_std = MEAN, STD


PROCESSOR = ImageProcessor()


def agla(**params):
    return {
        "name": "agla-test",
        "interventions": [{"method": "agla", "params": {"matcher": "lvlm_attention", **params}}],
    }


def reference_logits(model, inputs, tokens):
    """Last-position logits (B, V) of the unsteered model over prompt + ``tokens`` (B, t), from scratch."""
    call = dict(inputs)
    if tokens.shape[1]:
        call["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
        call["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
        if "mm_token_type_ids" in inputs:
            call["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
    with torch.no_grad():
        return model(**call).logits[:, -1].float()


def prompt_then_tokens(model, inputs, tokens):
    """Last-position logits (B, V) over prompt + ``tokens`` (B, t): the prompt's prefill in a fresh
    cache, then all ``t`` tokens in one forward. A steered model's per-prompt state (VAR's sinks) is
    found at the prompt only, as under generate(); one forward over the whole sequence would let
    generated tokens become sinks."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        if tokens.shape[1] == 0:
            return out.logits[:, -1].float()
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
        cache = compat.with_cache(model, compat.output_cache(out))
        return model(input_ids=tokens, attention_mask=mask, use_cache=True, **cache).logits[:, -1].float()


def assembled(z_orig, z_aug, alpha, beta):
    """The formula, written out: z = z_orig + alpha z_aug; -inf where p_orig < beta max p_orig."""
    p = torch.softmax(z_orig, dim=-1)
    z = z_orig + alpha * z_aug
    return torch.where(p < beta * p.max(-1, keepdim=True).values, torch.full_like(z, -math.inf), z)


def text_rows(inputs):
    ids = inputs["input_ids"]
    image = ids == IMAGE_TOKEN
    pos = torch.arange(ids.shape[1]).view(1, -1)
    last = torch.where(image, pos, torch.full_like(pos, -1)).max(-1).values
    drop = image | (ids == VISION_START) | (ids == VISION_END)
    return (pos > last.view(-1, 1)) & ~drop & inputs["attention_mask"].bool()


def attention_relevance(family, inputs, layers):
    """(B, L): the eager model's attention from each row's text rows to every key, mean over the
    layers, heads and text rows."""
    eager = build_vlm(family, attn_implementation="eager")
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions
    weights = torch.stack([att[layer].float() for layer in layers]).mean(0).mean(1)  # (B, L, L)
    rows = text_rows(inputs)
    return torch.stack([weights[b][rows[b]].mean(0) for b in range(rows.shape[0])])


def image_grids(family, model, inputs):
    """Per row (one image each): (h, w) of its placeholder grid."""
    if family == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return [(side, side)] * inputs["input_ids"].shape[0]
    merge = model.config.vision_config.spatial_merge_size
    return [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]


def generate(model, inputs, steps, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("share_cache", [False, True])
def test_generate_equals_two_independent_views_at_every_step(family, share_cache):
    model = build_vlm(family)
    inputs = make_inputs(family, model, n_images=[1, 1, 1], seed=3)
    alpha, beta, steps = 1.5, 0.85, 5
    with attnsteer.apply(model, agla(alpha=alpha, beta=beta, share_cache=share_cache), processor=PROCESSOR) as h:
        out = generate(model, inputs, steps)
        report = next(iter(h.report().values()))["agla"]
        layers = h.resolved_recipe().interventions[0].layers

    # the relevance map is the model's own attention, text rows -> image tokens
    weights = attention_relevance(family, inputs, layers)
    image = inputs["input_ids"] == IMAGE_TOKEN
    for b, ((gh, gw), view) in enumerate(zip(image_grids(family, model, inputs), report["views"])):
        assert view["row"] == b and view["fraction"] == 0.5
        expected = weights[b][image[b]].reshape(gh, gw)
        torch.testing.assert_close(view["relevance"], expected, rtol=1e-4, atol=1e-6)

    # the augmented pixels from those maps, then both views from scratch at every step
    layout = layout_for(model.config, PROCESSOR)
    pixels = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    new, _ = layout.augment(pixels, [v["relevance"] for v in report["views"]], [0.5] * 3)
    aug_inputs = {**inputs, **new}
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    for step in range(steps):
        z_orig = reference_logits(model, inputs, tokens[:, :step])
        if share_cache and step > 0:
            z_aug = z_orig  # the released code: the augmented view reads the original view's cache
        else:
            z_aug = reference_logits(model, aug_inputs, tokens[:, :step])
        z = assembled(z_orig, z_aug, alpha, beta)
        got = out.logits[step].float()
        assert torch.equal(torch.isinf(got), torch.isinf(z)), f"step {step}: the plausibility cut differs"
        finite = torch.isfinite(z)
        torch.testing.assert_close(got[finite], z[finite], rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens[:, step], z.argmax(-1))


def test_the_plausibility_cut_keeps_exactly_the_tokens_near_the_top():
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[1, 1], seed=5)
    beta = 0.9
    with attnsteer.apply(model, agla(alpha=1.0, beta=beta), processor=PROCESSOR):
        out = generate(model, inputs, 1)
    probs = torch.softmax(reference_logits(model, inputs, inputs["input_ids"][:, :0]), dim=-1)
    keep = probs >= beta * probs.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(out.logits[0]), keep)
    assert 1 <= int(keep.sum(-1).min()) and int(keep.sum(-1).max()) < keep.shape[-1]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_alpha_zero_greedy_is_the_unsteered_output_and_remove_restores_generate(family):
    model = build_vlm(family)
    inputs = make_inputs(family, model, n_images=[1, 1], seed=2)
    base = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with attnsteer.apply(model, agla(alpha=0.0), processor=PROCESSOR):
        same = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, base)
    with attnsteer.apply(model, agla(alpha=3.0, beta=0.0), processor=PROCESSOR):
        steered = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
    assert not torch.equal(steered.logits[0], model(**inputs).logits[:, -1])
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), base)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_left_padded_batch_gives_each_row_what_it_gets_alone(family):
    model = build_vlm(family)
    batch = make_inputs(family, model, n_images=[1, 1, 1], seed=7)
    with attnsteer.apply(model, agla(alpha=2.0, beta=0.1), processor=PROCESSOR):
        together = generate(model, batch, 3)
        for row in range(3):
            keep = batch["attention_mask"][row].bool()
            alone = {
                "input_ids": batch["input_ids"][row : row + 1, keep],
                "attention_mask": batch["attention_mask"][row : row + 1, keep],
            }
            if family == "llava":
                alone["pixel_values"] = batch["pixel_values"][row : row + 1]
            else:
                thw = batch["image_grid_thw"]
                sizes = (thw[:, 0] * thw[:, 1] * thw[:, 2]).tolist()
                start = sum(sizes[:row])
                alone["pixel_values"] = batch["pixel_values"][start : start + sizes[row]]
                alone["image_grid_thw"] = thw[row : row + 1]
                alone["mm_token_type_ids"] = batch["mm_token_type_ids"][row : row + 1, keep]
            single = generate(model, alone, 3)
            assert torch.equal(single.sequences[0, -3:], together.sequences[row, -3:])
            for step in range(3):
                a, b = single.logits[step][0], together.logits[step][row]
                assert torch.equal(torch.isinf(a), torch.isinf(b))
                torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-4, atol=1e-4)


def test_sampling_runs_the_logits_processors_on_the_assembled_logits():
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[1, 1], seed=4)
    with attnsteer.apply(model, agla(alpha=2.0, beta=0.2), processor=PROCESSOR):
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=0,
                             output_logits=True, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    for step, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        finite = torch.isfinite(logits)
        assert torch.equal(finite, torch.isfinite(scores))
        torch.testing.assert_close(scores[finite], logits[finite] / 0.7)
        assert bool(finite.gather(1, tokens[:, step : step + 1]).all()), "a token outside the cut was sampled"


def test_the_masked_image_drops_the_requested_fraction_and_keeps_the_planted_object():
    side = 64
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    relevance = torch.exp(-((yy - 5.5) ** 2 + (xx - 2) ** 2) / 2)  # points at the object's cell
    image = torch.full((3, side, side), 0.5)
    image[:, 40:52, 10:22] = 1.0  # the planted object
    for fraction in (0.25, 0.5, 0.75):
        keep = relevance_mask(relevance, (side, side), fraction)
        masked = image * keep
        black = float((masked == 0).all(0).float().mean())
        assert abs(black - fraction) <= 1.0 / (side * side) + 1e-9
        assert bool(keep[40:52, 10:22].all()), "the object the map points at was masked"


def test_beam_search_is_refused_with_a_clear_error():
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[1], seed=1)
    with attnsteer.apply(model, agla(), processor=PROCESSOR):
        with pytest.raises(SteeringError, match="num_beams"):
            model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)


def test_composes_with_var_both_views_steered():
    family = "llava"
    model = build_vlm(family)
    inputs = make_inputs(family, model, n_images=[1, 1], seed=6)
    # tau 1.5 on dims [3, 7]: a few hidden-state sinks per prompt at every layer of this tiny model,
    # so VAR steers each of its layers (at tau 0.01 every token was a sink and nothing was moved)
    var = {"method": "var", "layers": "1:", "params": {"p": 0.6, "tau": 1.5, "sink_dims": [3, 7]}}
    recipe = {"name": "var+agla", "interventions": [var, agla(alpha=1.0, beta=0.1)["interventions"][0]]}
    with attnsteer.apply(model, recipe, processor=PROCESSOR) as h:
        out = generate(model, inputs, 3)
        report = next(iter(h._report_field("agla", "views").values()))
        var_sites = [s for s in h.stats() if s["method"] == "var"]
    assert [s["layer"] for s in var_sites] == [1, 2, 3]
    assert all(s["rows_modified"] > 0 for s in var_sites), var_sites  # VAR steered every layer
    layout = layout_for(model.config, PROCESSOR)
    new, _ = layout.augment({"pixel_values": inputs["pixel_values"]}, [v["relevance"] for v in report], [0.5] * 2)
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    unsteered = [prompt_then_tokens(model, inputs, tokens[:, :step]) for step in range(3)]
    with attnsteer.apply(model, {"name": "var", "interventions": [var]}):
        for step in range(3):
            z_orig = prompt_then_tokens(model, inputs, tokens[:, :step])
            z_aug = prompt_then_tokens(model, {**inputs, **new}, tokens[:, :step])
            # VAR changes the original view's logits at every step (the views are VAR's, not plain ones)
            assert (z_orig - unsteered[step]).abs().max() > 1e-4, step
            z = assembled(z_orig, z_aug, 1.0, 0.1)
            got = out.logits[step]
            assert torch.equal(torch.isinf(got), torch.isinf(z))
            torch.testing.assert_close(got[torch.isfinite(z)], z[torch.isfinite(z)], rtol=1e-4, atol=1e-4)


def test_recipe_errors_name_the_field_and_the_fix():
    model = build_vlm("llava")
    with pytest.raises(RecipeError, match="mask_ratio"):
        attnsteer.apply(
            model, {"interventions": [{"method": "agla", "params": {"mask_ratio": 0.3}}]}, processor=PROCESSOR
        )
    with pytest.raises(RecipeError, match="matcher_checkpoint"):
        attnsteer.apply(model, agla(matcher_checkpoint="x/y"), processor=PROCESSOR)
    with pytest.raises(SteeringError, match="processor="):
        attnsteer.apply(model, agla())
    pai = {"method": "pai", "params": {"gamma": 1.1}}
    with pytest.raises(RecipeError, match="logits"):
        attnsteer.apply(model, {"interventions": [pai, agla()["interventions"][0]]}, processor=PROCESSOR)
    with pytest.raises(RecipeError, match="blip_itm"):
        attnsteer.apply(build_vlm("instructblip"), agla(), processor=PROCESSOR)


def test_instructblip_with_the_blip_itm_matcher_from_a_local_checkpoint(tmp_path):
    """The faithful matcher, loaded from a saved (tiny, random) BLIP retrieval checkpoint: the
    relevance and fraction are BLIP's for the given question, and decoding equals the two views."""
    from test_agla_blip_matcher import _blip

    from attnsteer.methods.agla_matchers import BlipItmMatcher

    blip, blip_processor = _blip(tmp_path)
    blip.save_pretrained(tmp_path / "blip")
    blip_processor.save_pretrained(tmp_path / "blip")
    model = build_vlm("instructblip")
    inputs = make_inputs("instructblip", model, n_images=[1, 1], seed=2)
    questions = ["Is there a cat on the mat?", "is there a red car"]
    recipe = {"interventions": [{"method": "agla", "params": {"alpha": 1.0, "beta": 0.8,
                                                             "matcher_checkpoint": str(tmp_path / "blip")}}]}  # fmt: skip
    with attnsteer.apply(model, recipe, processor=PROCESSOR) as h, h.prompt_text(questions):
        out = generate(model, inputs, 3)
        views = next(iter(h._report_field("agla", "views").values()))
    expected, fraction = BlipItmMatcher(model=blip, processor=blip_processor).relevance(
        torch.stack([v["original"] for v in views]), questions, "cpu", torch.float32
    )
    for view, r, f in zip(views, expected, fraction):
        torch.testing.assert_close(view["relevance"], r)
        assert view["fraction"] == pytest.approx(float(f))
    layout = layout_for(model.config, PROCESSOR)
    new, _ = layout.augment({"pixel_values": inputs["pixel_values"]}, list(expected), [float(f) for f in fraction])
    tokens = out.sequences[:, -3:] if out.sequences.shape[1] == 3 else out.sequences[:, inputs["input_ids"].shape[1] :]
    for step in range(3):
        z = assembled(
            reference_logits(model, inputs, tokens[:, :step]),
            reference_logits(model, {**inputs, **new}, tokens[:, :step]),
            1.0,
            0.8,
        )
        got = out.logits[step]
        assert torch.equal(torch.isinf(got), torch.isinf(z))
        torch.testing.assert_close(got[torch.isfinite(z)], z[torch.isfinite(z)], rtol=1e-4, atol=1e-4)


def test_a_missing_matcher_checkpoint_names_it_and_says_how_to_get_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[1], seed=1)
    recipe = {"interventions": [{"method": "agla", "params": {"matcher_checkpoint": "nobody/no-such-blip"}}]}
    with attnsteer.apply(model, recipe, processor=PROCESSOR) as h, h.prompt_text(["a dog"]):
        with pytest.raises(SteeringError, match="nobody/no-such-blip.*download|download.*nobody/no-such-blip"):
            model.generate(**inputs, max_new_tokens=2)


def test_without_prompt_text_blip_itm_reads_the_text_after_the_image(tmp_path, monkeypatch):
    from test_agla_blip_matcher import _blip

    from attnsteer.methods import agla_matchers

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(f"t{i}" for i in ids)

    class Processor(ImageProcessor):
        image_processor = ImageProcessor()
        tokenizer = Tokenizer()

    asked = []
    real = agla_matchers.BlipItmMatcher.relevance
    blip = _blip(tmp_path)
    monkeypatch.setattr(agla_matchers, "load_blip", lambda checkpoint: blip)
    monkeypatch.setattr(
        agla_matchers.BlipItmMatcher, "relevance", lambda self, *a: (asked.extend(a[1]), real(self, *a))[1]
    )
    model = build_vlm("llava")
    inputs = make_inputs("llava", model, n_images=[1, 1], seed=3)
    with attnsteer.apply(model, {"interventions": [{"method": "agla"}]}, processor=Processor()):
        model.generate(**inputs, max_new_tokens=1)
    rows = text_rows(inputs)
    expected = [" ".join(f"t{i}" for i in inputs["input_ids"][b][rows[b]].tolist()) for b in range(2)]
    assert asked == expected and all(asked)
