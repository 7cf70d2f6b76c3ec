"""The tiny offline VLM fixtures (tests/vlm_fixtures.py) are what the modeling code expects."""

from __future__ import annotations

import pytest
import torch
import vlm_fixtures as F

import attnsteer.archs

FAMILIES = list(F.FAMILIES)
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and far faster on a busy machine
    (2 OpenMP threads on 2 shared cores made one forward 1.4 s instead of 0.02 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = F.build_vlm(family)
        return cache[family]

    return get


def _mixed(family):
    """Image counts of a 3-row batch: several, none and one image where the family allows it."""
    if F.MULTI_IMAGE[family]:
        return [2, 0, 1]
    return [1, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_tiny_seeded_and_keeps_vision_on_sdpa(family):
    a, b, c = F.build_vlm(family), F.build_vlm(family), F.build_vlm(family, seed=1)
    assert a.config.model_type == family and not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    text = a.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        4,
        4,
        2,
    )
    assert sum(p.numel() for p in a.parameters()) < 400_000

    eager = F.build_vlm(family, attn_implementation="eager")
    assert eager.config.text_config._attn_implementation == "eager"
    assert eager.config.vision_config._attn_implementation == "sdpa"
    if family == "instructblip":
        assert eager.config.qformer_config._attn_implementation == "sdpa"
    assert a.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_helpers(family, models):
    model = models(family)
    layers = F.text_layers(model)
    assert len(layers) == 4 and all(hasattr(layer.self_attn, "q_proj") for layer in layers)
    assert F.text_decoder(model).layers is layers
    vision_params = {id(p) for p in F.vision_module(model).parameters()}
    text_params = {id(p) for p in layers.parameters()}
    assert vision_params and not vision_params & text_params
    for path, module in F.vision_modules(model).items():
        assert not {id(p) for p in module.parameters()} & text_params, path

    ids = F.image_token_ids(family, model)
    assert model.config.image_token_id in ids
    wrappers = F.vision_wrapper_ids(family, model)
    with_video = family in (*F.QWEN_FAMILIES, "llava_onevision")
    assert ids == ({F.IMAGE_TOKEN, F.VIDEO_TOKEN} if with_video else {F.IMAGE_TOKEN})
    if family in F.QWEN_FAMILIES:
        assert wrappers == {"vision_start": F.VISION_START, "vision_end": F.VISION_END}
    elif family == "gemma3":
        assert wrappers == {"boi": F.BOI, "eoi": F.EOI}
    else:
        assert wrappers == {}
    assert model.config.text_config.vocab_size == F.vocab_size(family)

    # attnsteer reads the same structure and ids from the model
    resolved = attnsteer.archs.resolve(model)
    assert resolved.decoder is F.text_decoder(model)
    assert [id(a) for a in resolved.attention_modules] == [id(layer.self_attn) for layer in layers]
    assert (resolved.num_heads, resolved.num_kv_heads, resolved.head_dim) == (4, 2, 16)
    assert set(resolved.image_token_ids) == ids
    assert set(resolved.wrapper_token_ids) == set(wrappers.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_counts_and_layout(family, models):
    model = models(family)
    n_images = _mixed(family)
    inputs = F.make_inputs(family, model, n_images=n_images, seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == F.PAD).all()  # left padding
    assert F.images_per_row(family, model, inputs) == n_images

    sizes = F.DEFAULT_SIZES[family]
    in_row = [n for n in n_images for _ in range(n)]
    per_image = [F.num_image_tokens(family, model, sizes[i % len(sizes)], in_row[i]) for i in range(sum(n_images))]
    image_mask = F.image_token_mask(family, model, ids)
    got, start = image_mask.sum(-1).tolist(), 0
    for r, n in enumerate(n_images):
        assert got[r] == sum(per_image[start : start + n]), (r, got, per_image)
        start += n
    features = F.image_features(family, model, inputs)
    assert features.shape == (int(image_mask.sum()), model.config.text_config.hidden_size)
    if family in ("llava_next", "llava_onevision"):  # one learned `image_newline` closes every any-res grid row
        is_newline = (features - model.model.image_newline).abs().amax(-1) < 1e-6
        assert 0 < int(is_newline.sum()) < len(features) // 2
        features = features[~is_newline]
    assert torch.cdist(features, features).add(torch.eye(len(features))).min() > 1e-3  # no two placeholders alike

    text = ids[mask.bool() & ~image_mask]
    wrappers = set(F.vision_wrapper_ids(family, model).values())
    markup = F.image_markup_ids(family, model)
    ordinary = text[~torch.isin(text, torch.tensor(sorted(wrappers | markup | {F.BOS}), dtype=torch.long))]
    assert ((ordinary >= F.TEXT_LOW) & (ordinary < F.TEXT_HIGH)).all()

    if wrappers or markup:  # markup only around images: none in the text-only row
        assert not torch.isin(ids[1], torch.tensor(sorted(wrappers | markup))).any()
    if family in F.QWEN_FAMILIES:
        vs, ve = F.VISION_START, F.VISION_END
        for r in range(3):
            row = ids[r][mask[r].bool()].tolist()
            assert row.count(vs) == row.count(ve) == n_images[r]
        assert torch.equal(inputs["mm_token_type_ids"].bool(), image_mask)
        assert inputs["image_grid_thw"].prod(-1).sum() == inputs["pixel_values"].shape[0]
    if family in ("llava_next", "llava_onevision"):
        assert tuple(inputs["image_sizes"].tolist()[0]) == F.DEFAULT_SIZES[family][0]
    if family == "llava_onevision":
        assert inputs["batch_num_images"].tolist() == n_images
        assert (inputs["pixel_values"][:2, 1:] == 0).all()  # images of a multi-image row: one (base) tile
    if family == "internvl":
        seq = model.config.image_seq_length
        assert inputs["pixel_values"].shape[0] * seq == int(image_mask.sum())
        for r in range(3):
            row = ids[r][mask[r].bool()].tolist()
            assert row.count(F.VISION_START) == row.count(F.VISION_END) == n_images[r]
    if family == "gemma3":
        assert torch.equal(inputs["token_type_ids"].bool(), image_mask)
        for r in range(3):
            row = ids[r][mask[r].bool()].tolist()
            assert row.count(F.BOI) == row.count(F.EOI) == n_images[r]
    if family in F.IDEFICS_FAMILIES:
        seq = F.num_image_tokens(family, model, (16, 16))  # one tile
        tiles = inputs["pixel_attention_mask"].flatten(2).any(-1)
        assert tiles.sum(-1).tolist() == [int(n) // seq for n in image_mask.sum(-1)]
        assert (inputs["pixel_values"][~tiles] == 0).all()  # padding tiles are all zero
    if family == "instructblip":
        assert (inputs["qformer_attention_mask"][:, 0] == 1).all()  # Q-Former text is right-padded

    again = F.make_inputs(family, model, n_images=n_images, seed=3)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    prompts = [[5, 6, 7], [9]]
    fixed = F.make_inputs(family, model, prompts=prompts, n_images=[1])
    assert F.images_per_row(family, model, fixed) == [1, 1]
    with pytest.raises(ValueError):
        F.make_inputs(family, model, prompts=[[F.IMAGE_TOKEN, 5]], n_images=[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_generate_and_padding_equivalence(family, models):
    model = models(family)
    n_images = _mixed(family)
    inputs = F.make_inputs(family, model, n_images=n_images, seed=1)
    with torch.no_grad():
        positions = F.generation_position_ids(family, model, inputs)
        batched = model(**inputs, position_ids=positions).logits[:, -1]
        plain = model(**inputs).logits[:, -1]  # the forward's own positions (RoPE: shift-invariant)
        for r in range(len(n_images)):
            row = F.row_inputs(family, model, inputs, r)
            alone = model(**row, position_ids=F.generation_position_ids(family, model, row)).logits[0, -1]
            torch.testing.assert_close(batched[r], alone, rtol=0, atol=TOL)
            torch.testing.assert_close(plain[r], model(**row).logits[0, -1], rtol=0, atol=TOL)
        assert (batched[0] - batched[1]).abs().max() > 1e-3  # rows really differ

        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert out.sequences.shape == (3, inputs["input_ids"].shape[1] + 3)
        # generate's prefill sees exactly the positions generation_position_ids gives
        torch.testing.assert_close(out.logits[0], batched, rtol=0, atol=TOL)

        # the images reach the language model (and only the rows that have some)
        shaken = dict(inputs, pixel_values=F.shifted_pixels(family, inputs, 1.0))
        moved = (model(**shaken, position_ids=positions).logits[:, -1] - batched).abs().amax(-1)
        for r, n in enumerate(n_images):
            assert (moved[r] > 1e-5) if n else (moved[r] < TOL), (r, moved)


@pytest.mark.parametrize("family", [f for f in FAMILIES if F.TEXT_ONLY_ROWS[f]])
def test_text_only_batch_and_right_padding(family, models):
    model = models(family)
    inputs = F.make_inputs(family, model, n_images=[0, 0], seed=2)
    assert "pixel_values" not in inputs
    with torch.no_grad():
        model(**inputs)
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2
        right = F.make_inputs(family, model, n_images=_mixed(family), seed=2, pad="right")
        assert (right["attention_mask"][:, 0] == 1).all()
        model(**right)


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_processor_agrees_with_make_inputs(family, models):
    pytest.importorskip("PIL")
    model = models(family)
    try:
        processor = F.make_processor(family, model)
    except ValueError as exc:  # smolvlm without num2words
        pytest.skip(str(exc))
    inputs = F.make_inputs(family, model, n_images=[2] if F.MULTI_IMAGE[family] else [1], seed=4)
    ids = inputs["input_ids"][0].tolist()
    n = F.images_per_row(family, model, inputs)[0]
    if family in ("llava_next", "llava_onevision"):
        sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    elif family in F.QWEN_FAMILIES:
        sizes = [(h * F.QWEN_PATCH, w * F.QWEN_PATCH) for _, h, w in inputs["image_grid_thw"].tolist()]
    elif family in ("internvl", *F.IDEFICS_FAMILIES):  # tiled by size: the default sizes in turn
        sizes = [F.DEFAULT_SIZES[family][i % len(F.DEFAULT_SIZES[family])] for i in range(n)]
    else:
        sizes = [(20, 30)] * n  # resized to the fixed square
    images = [F.random_pil_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    # images nested per prompt: llava_onevision's processor tiles an image only when it is alone in its prompt
    out = processor(images=[images], text=[F.processor_text(family, model, ids)], return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    keys = ("image_sizes", "image_grid_thw", "mm_token_type_ids", "qformer_input_ids", "batch_num_images")
    for key in (*keys, "token_type_ids", "pixel_attention_mask"):
        if key in inputs:
            assert torch.equal(out[key].to(inputs[key].dtype), inputs[key]), key
    assert out["pixel_values"].shape == inputs["pixel_values"].shape
    with torch.no_grad():
        assert model(**out).logits.shape[:2] == out["input_ids"].shape
