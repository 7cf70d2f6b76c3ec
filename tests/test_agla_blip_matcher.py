"""AGLA's BLIP-ITM matcher (attnsteer/methods/agla_matchers.py) on a tiny random BLIP, offline.

The reference computations here take another route than the implementation: the retrieval
model's own forward (``model(...)``) on the processor's PIL pipeline, the cross-attention
probabilities caught by a forward hook, the gradient with respect to them per sample, and the
Grad-CAM formed element by element, row by row.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from attnsteer.compat import CompatibilityError
from attnsteer.errors import AttnsteerWarning, SteeringError, UsageError
from attnsteer.methods import agla_matchers
from attnsteer.methods.agla_matchers import BlipItmMatcher, clean_caption

WORDS = "a cat dog on the mat is there red car in image small big".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LAYERS, HEADS, SIDE, PATCH = 8, 4, 32, 8
GRID = SIDE // PATCH
TEXTS = ["a cat on the mat", "is there a red car in the image", "dog"]


def _tokenizer(tmp_path, with_enc=True):
    from transformers import BertTokenizer

    vocab = SPECIALS + (["[ENC]"] if with_enc else []) + WORDS
    path = tmp_path / ("vocab_enc.txt" if with_enc else "vocab.txt")
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path))


def _blip(tmp_path, with_enc=True, seed=0):
    """A random BlipForImageTextRetrieval (8 text layers, 32 px images, 8 px patches -> 4 x 4) and
    its processor, its weights scaled up so that the gradients are far from zero."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessorPil, BlipProcessor

    tokenizer = _tokenizer(tmp_path, with_enc)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS)
    text |= dict(num_attention_heads=HEADS, max_position_embeddings=64, encoder_hidden_size=48)
    text |= dict(pad_token_id=0, bos_token_id=2, sep_token_id=3)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    vision |= dict(image_size=SIDE, patch_size=PATCH)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": SIDE, "width": SIDE}), tokenizer)
    return model, processor


def _images(n, size=SIDE, seed=1):
    """n images (n, 3, size, size) in [0, 1] on the uint8 grid (so that PIL sees the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def _reference(model, processor, image, text, layer=6, enc_id=None):
    """Grad-CAM (GRID, GRID) of one pair through the retrieval model's own forward."""
    pil = Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())
    inputs = processor(images=pil, text=text, return_tensors="pt")
    ids = inputs["input_ids"].clone()
    if enc_id is not None:
        ids[0, 0] = enc_id
    caught = []
    module = model.text_encoder.encoder.layer[layer].crossattention.self
    hook = module.register_forward_hook(lambda mod, args, out: caught.append(out[1]))
    try:
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(input_ids=ids, pixel_values=pixels, attention_mask=inputs["attention_mask"])
            (probs,) = caught
            (grad,) = torch.autograd.grad(out.itm_score[0, 1], probs)
    finally:
        hook.remove()
    n = int(inputs["attention_mask"].sum())
    rows = list(range(1, n - 1)) or [0]
    total = torch.zeros(probs.shape[-1])
    for t in rows:
        for h in range(probs.shape[1]):
            total += probs[0, h, t].detach() * torch.where(grad[0, h, t] > 0, grad[0, h, t], 0.0)
    return (total / (len(rows) * probs.shape[1]))[1:].reshape(GRID, GRID)


def _close(actual, expected, rel=1e-4):
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture
def blip(tmp_path):
    return _blip(tmp_path)


def test_the_relevance_is_the_grad_cam_of_the_itm_head_at_layer_6(blip):
    model, processor = blip
    enc_id = processor.tokenizer.get_vocab()["[ENC]"]
    images = _images(3)
    reference = [_reference(model, processor, images[i], TEXTS[i], enc_id=enc_id) for i in range(3)]
    matcher = BlipItmMatcher(model=model, processor=processor)
    relevance, fraction = matcher.relevance(images, TEXTS, "cpu", torch.float32)
    assert relevance.shape == (3, GRID, GRID) and relevance.dtype == torch.float32
    assert fraction.shape == (3,) and fraction.dtype == torch.float32
    for i in range(3):
        assert reference[i].std() > 0  # a non-trivial map
        _close(relevance[i], reference[i])
    # the ITM pass reads [ENC], not [CLS] (transformers' forward) -- and the two differ
    assert not torch.allclose(relevance[0], _reference(model, processor, images[0], TEXTS[0]), rtol=1e-3)
    # another layer gives another map, and it is the Grad-CAM of that layer
    other = BlipItmMatcher(layer=3, model=model, processor=processor).relevance(
        images[:1], TEXTS[:1], "cpu", torch.float32
    )
    _close(other[0][0], _reference(model, processor, images[0], TEXTS[0], layer=3, enc_id=enc_id))


def test_without_enc_in_the_vocabulary_the_itm_pass_reads_cls_and_warns(tmp_path):
    model, processor = _blip(tmp_path, with_enc=False)
    with pytest.warns(AttnsteerWarning, match=r"\[ENC\]"):
        matcher = BlipItmMatcher(model=model, processor=processor)
    images = _images(1)
    relevance, _ = matcher.relevance(images, TEXTS[:1], "cpu", torch.float32)
    _close(relevance[0], _reference(model, processor, images[0], TEXTS[0]))


def test_a_prompt_without_words_uses_the_first_row(blip):
    model, processor = blip
    enc_id = processor.tokenizer.get_vocab()["[ENC]"]
    images = _images(2)
    relevance, _ = BlipItmMatcher(model=model, processor=processor).relevance(
        images, ["", "a cat"], "cpu", torch.float32
    )
    _close(relevance[0], _reference(model, processor, images[0], "", enc_id=enc_id))
    _close(relevance[1], _reference(model, processor, images[1], "a cat", enc_id=enc_id))


def test_each_pair_of_a_batch_gets_its_own_map(blip):
    model, processor = blip
    matcher = BlipItmMatcher(model=model, processor=processor)
    images = _images(3, seed=5)
    batch, batch_fraction = matcher.relevance(images, TEXTS, "cpu", torch.float32)
    for i in range(3):
        alone, alone_fraction = matcher.relevance(images[i : i + 1], TEXTS[i : i + 1], "cpu", torch.float32)
        _close(batch[i], alone[0], rel=1e-5)
        torch.testing.assert_close(batch_fraction[i], alone_fraction[0], rtol=1e-5, atol=1e-6)
    # and the maps do depend on the pair
    assert not torch.allclose(batch[0], batch[1], rtol=1e-3)


def test_the_fraction_is_half_the_itc_similarity_clamped(blip):
    model, processor = blip
    images = _images(3, seed=7)
    flipped = copy.deepcopy(model)  # the same model with the opposite image projection: s -> -s
    with torch.no_grad():
        flipped.vision_proj.weight.neg_()
        flipped.vision_proj.bias.neg_()
    pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]
    inputs = processor(images=pils, text=TEXTS, padding=True, return_tensors="pt")
    seen = []
    for m in (model, flipped):
        with torch.no_grad():
            sim = m(**inputs, use_itm_head=False).itm_score  # (images, texts) cosine similarities
        s = torch.diagonal(sim)
        _, fraction = BlipItmMatcher(model=m, processor=processor).relevance(images, TEXTS, "cpu", torch.float32)
        torch.testing.assert_close(fraction, (s / 2).clamp(0, 0.5), rtol=1e-5, atol=1e-6)
        seen.append(fraction)
    # negative similarities drop nothing: for every pair, one of the two models gives 0
    assert bool(((seen[0] == 0) ^ (seen[1] == 0)).all())
    torch.testing.assert_close(seen[0] + seen[1], seen[0].maximum(seen[1]))


def test_caption_cleaning():
    assert clean_caption('Is there a Cat?  (Yes!) "quoted" #tag: a;b~c*d.') == "is there a cat? yes quoted tag a b c d"
    assert clean_caption("  A\tred\n\nCAR...  ") == "a red car"
    assert clean_caption("") == ""
    words = [f"w{i}" for i in range(40)]
    assert clean_caption(" ".join(words)) == " ".join(words[:35])
    assert clean_caption(". ".join(words)).split() == words[:35]  # punctuation does not count as a word


def test_the_prompt_is_cleaned_before_tokenizing(blip):
    model, processor = blip
    matcher = BlipItmMatcher(model=model, processor=processor)
    images = _images(2, seed=3).repeat(1, 1, 1, 1)
    raw = matcher.relevance(
        images, ["A CAT... (on) the MAT!!", "Is there a red car: in the image?"], "cpu", torch.float32
    )
    clean = matcher.relevance(images, ["a cat on the mat", "is there a red car in the image?"], "cpu", torch.float32)
    torch.testing.assert_close(raw, clean)


def test_images_are_resized_and_normalised_like_blip_processor(blip):
    model, processor = blip
    g = torch.Generator().manual_seed(11)
    coarse = torch.rand(2, 3, 6, 5, generator=g)  # smooth images: resampling filters agree on them
    images = torch.nn.functional.interpolate(coarse, size=(80, 64), mode="bilinear", align_corners=False)
    images = (images * 255).round() / 255
    ours = BlipItmMatcher(model=model, processor=processor)._pixel_values(images, "cpu", torch.float32)
    pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]
    theirs = processor.image_processor(images=pils, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, SIDE, SIDE)
    assert float((ours - theirs).abs().mean()) < 0.02  # PIL rounds to uint8 after resizing (1/255/std ~ 0.015)


def test_a_layer_out_of_range_is_refused(blip, monkeypatch):
    model, processor = blip
    with pytest.raises(UsageError, match=r"layer: got 8; allowed: 0\.\.7"):
        BlipItmMatcher(layer=LAYERS, model=model, processor=processor)
    with pytest.raises(UsageError, match="layer: got -1"):
        BlipItmMatcher(layer=-1, model=model, processor=processor)
    with pytest.raises(UsageError, match="both"):
        BlipItmMatcher(model=model)
    # a loaded checkpoint is checked too, on first use
    monkeypatch.setattr(agla_matchers, "load_blip", lambda checkpoint: (model, processor))
    matcher = BlipItmMatcher("local/blip", layer=12)
    with pytest.raises(UsageError, match=r"layer: got 12.*'local/blip'"):
        matcher.relevance(_images(1), ["a cat"], "cpu", torch.float32)


def test_a_missing_checkpoint_offline_says_how_to_get_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    matcher = BlipItmMatcher("nobody/no-such-blip")  # nothing is loaded yet
    with pytest.raises(SteeringError) as info:
        matcher.relevance(_images(1), ["a cat"], "cpu", torch.float32)
    message = str(info.value)
    assert "'nobody/no-such-blip'" in message
    assert "huggingface-cli download nobody/no-such-blip" in message and "hf download nobody/no-such-blip" in message
    assert "matcher_checkpoint" in message


def test_the_checkpoint_is_loaded_once(blip, monkeypatch):
    model, processor = blip
    calls = []

    def fake_load(checkpoint):
        calls.append(checkpoint)
        return model, processor

    monkeypatch.setattr(agla_matchers, "load_blip", fake_load)
    matcher = BlipItmMatcher("some/blip")
    assert calls == []  # lazily
    first = matcher.relevance(_images(1), ["a cat"], "cpu", torch.float32)
    second = matcher.relevance(_images(1), ["a cat"], "cpu", torch.float32)
    assert calls == ["some/blip"]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_it_works_without_autograd_and_leaves_no_gradient(blip, context):
    model, processor = blip
    matcher = BlipItmMatcher(model=model, processor=processor)
    images = _images(2)
    expected = matcher.relevance(images, TEXTS[:2], "cpu", torch.float32)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        inner = images.clone()  # an inference tensor under inference_mode
        got = matcher.relevance(inner, TEXTS[:2], "cpu", torch.float32)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not got[0].requires_grad and not got[1].requires_grad


def test_half_precision_runs_in_that_dtype_and_returns_float32(blip):
    model, processor = blip
    matcher = BlipItmMatcher(model=model, processor=processor)
    relevance, fraction = matcher.relevance(_images(2), TEXTS[:2], "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert relevance.dtype == fraction.dtype == torch.float32
    assert relevance.shape == (2, GRID, GRID) and bool(torch.isfinite(relevance).all())


@pytest.mark.parametrize("broken", ["missing", "detached"])
def test_a_capture_that_is_not_the_forward_attention_fails_loudly(blip, monkeypatch, broken):
    """If transformers stops returning the probabilities the forward uses, no map is made."""
    model, processor = blip
    forward = model.text_encoder.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.cross_attentions is not None:
            out.cross_attentions = (
                None
                if broken == "missing"
                else tuple(a.detach().clone().requires_grad_() for a in out.cross_attentions)
            )
        return out

    monkeypatch.setattr(model.text_encoder, "forward", patched)
    matcher = BlipItmMatcher(model=model, processor=processor)
    with pytest.raises(CompatibilityError, match=r"transformers \d+\.\d+.*cross_attentions"):
        matcher.relevance(_images(1), ["a cat"], "cpu", torch.float32)
