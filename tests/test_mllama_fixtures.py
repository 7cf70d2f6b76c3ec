"""The tiny offline Llama-3.2-Vision fixture (tests/mllama_fixtures.py) is what the modeling code expects."""

from __future__ import annotations

import mllama_fixtures as M
import pytest
import torch

TOL = 1e-5

# transformers 5.17 calls its own deprecated ``hidden_state=`` keyword inside the vision tower
pytestmark = pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return M.build_mllama()


def _valid_logits(model, inputs, positions=True):
    kwargs = {"position_ids": M.generation_position_ids(model, inputs)} if positions else {}
    logits = model(**inputs, **kwargs).logits
    return [logits[r][inputs["attention_mask"][r].bool()] for r in range(logits.shape[0])]


def test_build_is_tiny_seeded_with_cross_layers(model):
    again, other = M.build_mllama(), M.build_mllama(seed=1)
    sa, sb, sc = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert model.config.model_type == "mllama" and not model.training
    assert sum(p.numel() for p in model.parameters()) < 400_000
    text = model.config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (64, 4, 2, 136)
    assert model.config.image_token_index == M.IMAGE_TOKEN

    layers = M.text_layers(model)
    assert layers is M.text_decoder(model).layers and len(layers) == M.NUM_LAYERS
    assert M.cross_layer_indices(model) == [1, 3] and M.self_layer_indices(model) == [0, 2, 4]
    for i, layer in enumerate(layers):
        if i in M.cross_layer_indices(model):
            assert type(layer).__name__ == "MllamaCrossAttentionDecoderLayer" and not hasattr(layer, "self_attn")
            assert layer.cross_attn.layer_idx == i and layer.cross_attn.head_dim == 16
            assert hasattr(layer.cross_attn, "q_norm") and hasattr(layer.cross_attn, "k_norm")
            assert layer.cross_attn_attn_gate.item() == layer.cross_attn_mlp_gate.item() == M.CROSS_GATE
        else:
            assert type(layer).__name__ == "MllamaSelfAttentionDecoderLayer" and not hasattr(layer, "cross_attn")
            assert layer.self_attn.layer_idx == i and layer.self_attn.is_causal
    vision_params = {id(p) for m in M.vision_modules(model).values() for p in m.parameters()}
    assert vision_params and not vision_params & {id(p) for p in layers.parameters()}

    eager = M.build_mllama(attn_implementation="eager")
    assert eager.config.text_config._attn_implementation == "eager"
    assert eager.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_inputs_layout(model):
    inputs = M.make_inputs(model, n_images=[2, 0, 1], seed=1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    assert M.images_per_row(model, inputs) == [2, 0, 1]
    tiles = M.MAX_NUM_TILES
    assert inputs["pixel_values"].shape == (batch, 2, tiles, 3, M.IMAGE_SIZE, M.IMAGE_SIZE)
    assert inputs["aspect_ratio_ids"].tolist() == [[2, 1], [0, 0], [3, 0]]  # grids (1,2) (1,1) | - | (2,1)
    assert inputs["aspect_ratio_mask"].tolist() == [[[1, 1], [1, 0]], [[1, 0], [1, 0]], [[1, 1], [1, 0]]]
    cross = inputs["cross_attention_mask"]
    assert cross.shape == (batch, length, 2, tiles) and cross.dtype == torch.long
    assert not cross[1].any()  # the row without images sees no tile
    for r in (0, 2):
        image_pos = (ids[r] == M.IMAGE_TOKEN).nonzero().flatten().tolist()
        seen = cross[r].any(-1)  # (L, images)
        assert not seen[: image_pos[0]].any()  # tokens before the first image see nothing
        for j, start in enumerate(image_pos):
            end = image_pos[j + 1] if j + 1 < len(image_pos) else length
            assert seen[start:end, j].all() and not seen[end:, j].any()
    assert (inputs["pixel_values"][1] == 0).all()
    again = M.make_inputs(model, n_images=[2, 0, 1], seed=1)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)

    text_only = M.make_inputs(model, n_images=[0, 0], seed=2)
    assert set(text_only) == {"input_ids", "attention_mask"}
    row = M.row_inputs(model, inputs, 0)
    assert row["pixel_values"].shape[1] == 2 and row["cross_attention_mask"].shape == (1, int(mask[0].sum()), 2, tiles)
    assert "pixel_values" not in M.row_inputs(model, inputs, 1)
    assert M.row_inputs(model, inputs, 2)["pixel_values"].shape[1] == 1
    assert M.row_inputs(model, inputs, 1, keep_image_slots=True)["pixel_values"].shape[1] == 2
    with pytest.raises(ValueError):
        M.make_inputs(model, prompts=[[M.IMAGE_TOKEN, 5]], n_images=[1])


def test_forward_rows_match_rows_alone(model):
    inputs = M.make_inputs(model, n_images=[1, 0, 1], seed=1)
    with torch.no_grad():
        batched = _valid_logits(model, inputs)
        plain = _valid_logits(model, inputs, positions=False)  # the forward's own arange positions
        for r, n in enumerate(M.images_per_row(model, inputs)):
            # A row without images still runs the cross layers inside a batch with images (see below):
            # alone, it needs the batch's (padding) image slot to compute the same thing.
            row = M.row_inputs(model, inputs, r, keep_image_slots=n == 0)
            (alone,) = _valid_logits(model, row)
            torch.testing.assert_close(batched[r], alone, rtol=0, atol=TOL)
            torch.testing.assert_close(plain[r], alone, rtol=0, atol=TOL)
        assert (batched[0][-1] - batched[2][-1]).abs().max() > 1e-3  # rows really differ

        # the real images reach the rows that hold them, and only those
        real = (inputs["aspect_ratio_ids"] > 0)[..., None] & inputs["aspect_ratio_mask"].bool()
        shaken = dict(inputs, pixel_values=inputs["pixel_values"] + real[..., None, None, None].float())
        moved = [(a - b).abs().max() for a, b in zip(_valid_logits(model, shaken), batched)]
        assert moved[0] > 1e-4 and moved[2] > 1e-4 and moved[1] < TOL, moved

        # eager computes what sdpa does (on real tokens; padding positions differ)
        eager = M.build_mllama(attn_implementation="eager")
        for a, b in zip(_valid_logits(eager, inputs), batched):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_rows_without_image_see_the_padding_image(model):
    """transformers' Mllama quirk the library must live with: a token that sees no image (a row
    without images, tokens before a row's first image, padding) gets an all-zero additive
    cross-attention mask row (``_prepare_cross_attention_mask`` multiplies the mask by
    ``full_text_row_masked_out_mask``), so it attends to every vision state of its row -- padding
    slots included -- and only the cross layer's MLP output is zeroed for it. Such rows therefore
    differ from the same text run alone without images (which skips the cross layers)."""
    inputs = M.make_inputs(model, n_images=[1, 0, 1], seed=1)
    with torch.no_grad():
        batched = _valid_logits(model, inputs)
        (text_alone,) = _valid_logits(model, M.row_inputs(model, inputs, 1))
        assert (batched[1] - text_alone).abs().max() > 1e-3
        ungated = M.build_mllama(cross_gate=0.0)  # tanh(0) = 0: the cross layers are identities
        (a,), b = _valid_logits(ungated, M.row_inputs(ungated, inputs, 1)), _valid_logits(ungated, inputs)[1]
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_generate_with_and_without_cache(model):
    inputs = M.make_inputs(model, n_images=[1, 0, 1], seed=1)
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert out.sequences.shape == (3, width + 4)
        assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
        # the prefill sees exactly the positions generation_position_ids gives
        prefill = model(**inputs, position_ids=M.generation_position_ids(model, inputs)).logits[:, -1]
        torch.testing.assert_close(out.logits[0], prefill, rtol=0, atol=TOL)
        no_cache = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            use_cache=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, no_cache.sequences)
        for a, b in zip(out.logits, no_cache.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)

        text_only = M.make_inputs(model, n_images=[0, 0], seed=2)
        cached = model.generate(**text_only, max_new_tokens=3, do_sample=False)
        assert torch.equal(cached, model.generate(**text_only, max_new_tokens=3, do_sample=False, use_cache=False))
