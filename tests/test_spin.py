"""SPIN (docs/methods.md#spin) against a literal per-row reference written from the formula.

The reference steers the unsteered model with two hooks per steered layer: one recomputes the
layer's queries and keys in float32 from its input (``q_proj`` / ``k_proj``, RoPE), the other, on
``o_proj``'s input (the head outputs), ranks each steered row's query heads by ``r_h`` computed
head by head over the keys that row sees (causal, padding, window, soft-cap), keeps the top
``floor(rho H)`` (ties to the lower head) and multiplies the other heads by ``eps``. It runs one
forward over the whole sequence without a cache, so it also stands for a recomputation from
scratch of every generated step. Models: tiny random LLaVA (image keys), tiny Llama and Gemma 2
(focus spans; GQA 4 query / 2 kv heads; Gemma 2 soft-caps at 2 and has 6-key windows), the real
SmolLM2 (GQA 9 / 3).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import VOCAB, build_tiny
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from vlm_fixtures import IMAGE_TOKEN, VIDEO_TOKEN, build_vlm, make_inputs

import attnsteer
from attnsteer import compat
from attnsteer.errors import AttnsteerWarning, RecipeError

NEVER = [IMAGE_TOKEN, VIDEO_TOKEN]  # a generated placeholder would read as an image to the recomputation


def spin(layers="all", heads=None, **params) -> dict:
    return {
        "interventions": [{"method": "spin", "layers": layers, **({"heads": heads} if heads else {}), "params": params}]
    }


# ---- the reference -----------------------------------------------------------------------------
def decoder_layers(model):
    inner = model.model
    return getattr(inner, "language_model", inner).layers


def row_scores(q, k, b, i, keys, image, scaling, softcap, score) -> list[float]:
    """r_h of query row ``i`` of batch row ``b`` for every query head, one head at a time: q (B, H, T, D),
    k (B, H_kv, T, D) float32; ``keys``: the key indices the row sees; ``image``: those that are image keys."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    out = []
    for h in range(heads):
        s = (k[b, h // group, keys] @ q[b, h, i]) * scaling  # (n,) the row's scaled scores
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        w = torch.softmax(s, 0) if score == "mass" else s
        out.append(float(sum(w[n] for n, j in enumerate(keys) if j in image)))
    return out


@contextlib.contextmanager
def literal_spin(model, image, mask, prompt_len, rho, eps, score="sum", layers=None, heads=None, cap=True):
    """Steer ``model`` by SPIN's formula for one forward over a whole sequence (no cache).

    image bool (B, P) the image / focus keys; mask (B, T) the forward's real tokens; rows at padded
    positions >= prompt_len - 1 are steered; layers: set of layer indices (None: all); heads:
    {layer: [heads]} or None; cap: apply the layer's logit soft-cap (if any). Yields ``found``: {"kept": {layer: {row: heads kept at P-1}}, "count": n}."""
    found = {"kept": {}, "count": 0}
    captured, hooks = {}, []

    def capture(module, args, kwargs, layer):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = hidden.shape
        q = module.q_proj(hidden).float().view(b, t, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).float().view(b, t, -1, module.head_dim).transpose(1, 2)
        captured[layer] = apply_rotary_pos_emb(q, k, cos.float(), sin.float())

    def suppress(module, args, layer, attn):
        q, k = captured.pop(layer)
        out = args[0].clone()  # (B, T, H * D): the head outputs before o_proj
        n_heads, d = q.shape[1], attn.head_dim
        keep = math.floor(rho * n_heads + 1e-9)
        window = getattr(attn, "sliding_window", None)
        softcap = getattr(attn, "attn_logit_softcapping", None) if cap else None
        for b in range(out.shape[0]):
            for i in range(max(prompt_len - 1, 0), out.shape[1]):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(i + 1) if mask[b, j] and not (window and j <= i - window)]
                img = {j for j in keys if j < prompt_len and image[b, j]}
                kept = []
                if img:
                    r = row_scores(q, k, b, i, keys, img, attn.scaling, softcap, score)
                    kept = sorted(range(n_heads), key=lambda h: (-r[h], h))[:keep]
                    for h in range(n_heads):
                        if h not in kept and (heads is None or h in heads[layer]):
                            out[b, i, h * d : (h + 1) * d] *= eps
                            found["count"] += 1
                if i == prompt_len - 1:
                    found["kept"].setdefault(layer, {})[b] = sorted(kept)
        return (out,)

    for layer, block in enumerate(decoder_layers(model)):
        if layers is not None and layer not in layers:
            continue
        attn = block.self_attn
        hooks.append(
            attn.register_forward_pre_hook(lambda m, a, kw, layer=layer: capture(m, a, kw, layer), with_kwargs=True)
        )
        hooks.append(
            attn.o_proj.register_forward_pre_hook(lambda m, a, layer=layer, attn=attn: suppress(m, a, layer, attn))
        )
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s position ids for a left-padded mask."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def kept_of(handle) -> dict:
    """{layer: {row: kept heads}} from handle.report()."""
    return {layer: dict(enumerate(by["spin"]["heads"])) for layer, by in handle.report().items()}


def rows_modified(handle) -> int:
    return sum(s["rows_modified"] for s in handle.stats())


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    return build_vlm("llava")


@pytest.fixture(scope="module")
def llava_batch(llava):
    inputs = make_inputs("llava", llava, n_images=[1, 1], seed=3)
    assert not inputs["attention_mask"].bool().all(), "the batch must be left-padded"
    return inputs


def text_batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    focus = torch.zeros_like(ids, dtype=torch.bool)
    focus[:, 6:10] = True
    return ids, mask, focus


def llava_reference(model, inputs, **params):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), literal_spin(model, ids == IMAGE_TOKEN, mask, ids.shape[1], **params) as found:
        logits = model(**inputs).logits
    return logits, found


# ---- prefill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["sum", "mass"])
def test_prefill_equals_the_literal_reference_on_every_backend(llava, llava_batch, score):
    params = dict(rho=0.5, eps=0.1, score=score)
    valid = llava_batch["attention_mask"].bool()
    with torch.no_grad():
        base = llava(**llava_batch).logits
    ref, found = llava_reference(llava, llava_batch, **params)
    assert (ref - base)[valid].abs().max() > 1e-2  # SPIN changes the logits
    assert found["count"] == 4 * 2 * 2  # 4 layers x 2 rows x 2 suppressed heads of 4
    for backend in ("reference", "chunked", "flash", None):
        kwargs = {} if backend is None else {"backend": backend}
        with torch.no_grad(), attnsteer.apply(llava, spin(**params), **kwargs) as handle:
            out = llava(**llava_batch).logits
            assert kept_of(handle) == found["kept"]
            assert rows_modified(handle) == found["count"]
        torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=2e-5)


def test_left_padded_rows_equal_rows_alone_and_rows_without_image_are_untouched(llava):
    inputs = make_inputs("llava", llava, n_images=[1, 0, 1], seed=5)
    mask = inputs["attention_mask"].bool()
    assert not mask.all()
    with torch.no_grad():
        base = llava(**inputs).logits
        with attnsteer.apply(llava, spin(rho=0.5, eps=0.1)) as handle:
            out = llava(**inputs).logits
            kept = kept_of(handle)
            assert rows_modified(handle) == 4 * 2 * 2  # the image-free row counts nothing
            assert all(by_row[1] == [] and len(by_row[0]) == 2 for by_row in kept.values())
            for row, image in ((0, 0), (2, 1)):
                alone = {
                    "input_ids": inputs["input_ids"][row : row + 1, mask[row]],
                    "attention_mask": inputs["attention_mask"][row : row + 1, mask[row]],
                    "pixel_values": inputs["pixel_values"][image : image + 1],
                }
                single = llava(**alone).logits[0]
                torch.testing.assert_close(out[row, mask[row]], single, atol=2e-5, rtol=2e-5)
                assert (single - base[row, mask[row]]).abs().max() > 1e-2
    assert torch.equal(out[1], base[1])  # no image key: not a bit changed


# ---- decode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", ["padded batch", "one row"])  # one row: decode steps see every key unmasked
def test_cached_generation_equals_recomputation_and_the_reference(llava, llava_batch, rows):
    params = dict(rho=0.75, eps=0.05, score="sum")
    if rows == "one row":
        keep = llava_batch["attention_mask"][1].bool()
        llava_batch = {
            "input_ids": llava_batch["input_ids"][1:, keep],
            "attention_mask": llava_batch["attention_mask"][1:, keep],
            "pixel_values": llava_batch["pixel_values"][1:],
        }
    steps, prompt_len = 4, llava_batch["input_ids"].shape[1]
    with attnsteer.apply(llava, spin(**params)) as handle:
        with torch.no_grad():
            gen = llava.generate(
                **llava_batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                suppress_tokens=NEVER, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            assert handle.stats()[0]["calls"] == steps  # the prefill and three decode steps
            # recomputation: the prompt's prefill in a fresh cache, then every generated token in one forward
            mask = torch.cat([llava_batch["attention_mask"], torch.ones_like(gen.sequences[:, prompt_len:])], 1)
            pos = positions(mask)
            first = llava(**llava_batch, position_ids=pos[:, :prompt_len], use_cache=True)
            rest = llava(
                input_ids=gen.sequences[:, prompt_len:-1], attention_mask=mask[:, :-1], position_ids=pos[:, prompt_len:-1],
                use_cache=True, **compat.with_cache(llava, compat.output_cache(first)),
            )  # fmt: skip
    recomputed = torch.cat([first.logits[:, -1:], rest.logits], 1)  # (B, steps, V)
    whole = {**llava_batch, "input_ids": gen.sequences[:, :-1], "attention_mask": mask[:, :-1]}
    image = gen.sequences[:, :prompt_len] == IMAGE_TOKEN
    with torch.no_grad(), literal_spin(llava, image, mask[:, :-1], prompt_len, **params):
        ref = llava(**whole, position_ids=pos[:, :-1]).logits[:, prompt_len - 1 :]
    with torch.no_grad():
        base = llava(**whole, position_ids=pos[:, :-1]).logits[:, prompt_len - 1 :]
    assert (ref - base).abs().max() > 1e-2
    cached = torch.stack(gen.logits, 1)
    torch.testing.assert_close(cached, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(recomputed, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("score", ["sum", "mass"])
def test_soft_cap_windows_and_focus_in_generation(score):
    """Gemma 2: scores soft-capped at 2, layers 0 and 2 see 6 keys (the focus span slides out of
    their window during generation: those rows are left alone); focus span on a text model. Queries
    scaled by 8 so that the cap changes which heads are kept."""
    model = build_tiny("gemma2")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids, mask, focus = text_batch()
    params = dict(rho=0.5, eps=0.1, score=score)
    steps = 4
    with attnsteer.apply(model, spin(**params)) as handle:
        with handle.focus(focus), torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        kept = kept_of(handle)
    full = torch.cat([mask, torch.ones(2, steps - 1, dtype=mask.dtype)], 1)
    with torch.no_grad(), literal_spin(model, focus, full, ids.shape[1], **params) as found:
        ref = model(input_ids=gen.sequences[:, :-1], attention_mask=full, position_ids=positions(full)).logits
    with torch.no_grad():
        base = model(input_ids=gen.sequences[:, :-1], attention_mask=full, position_ids=positions(full)).logits
    ref, base = ref[:, ids.shape[1] - 1 :], base[:, ids.shape[1] - 1 :]
    assert (ref - base).abs().max() > 1e-2
    assert kept == found["kept"]
    torch.testing.assert_close(torch.stack(gen.logits, 1), ref, atol=2e-5, rtol=2e-5)
    with torch.no_grad(), literal_spin(model, focus, mask, ids.shape[1], cap=False, **params) as uncapped:
        model(input_ids=ids, attention_mask=mask)
    assert uncapped["kept"] != kept  # the soft-cap matters to the selection here


# ---- heads, identity, removal ---------------------------------------------------------------------
def test_heads_selector_suppresses_only_its_heads_ranked_over_all():
    model = build_tiny("llama")
    ids, mask, focus = text_batch()
    heads = {1: [0, 3], 2: [0, 2]}
    params = dict(rho=0.5, eps=0.0)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with literal_spin(model, focus, mask, ids.shape[1], layers={1, 2}, heads=heads, **params) as found:
            ref = model(input_ids=ids, attention_mask=mask).logits
        with attnsteer.apply(model, spin(layers=[1, 2], heads=heads, **params)) as handle:
            with handle.focus(focus):
                out = model(input_ids=ids, attention_mask=mask).logits
            assert kept_of(handle) == found["kept"]  # K = 2 of all 4 heads kept, whatever the selector
            assert all(len(by_row[row]) == 2 for by_row in kept_of(handle).values() for row in (0, 1))
            assert rows_modified(handle) == found["count"] > 0
    valid = mask.bool()
    assert (ref - base)[valid].abs().max() > 1e-3
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("params", [{"rho": 1.0, "eps": 0.1}, {"rho": 0.5, "eps": 1.0}])
def test_identity_params_are_bit_identical_and_remove_restores(llava, llava_batch, params):
    with torch.no_grad():
        base = llava(**llava_batch).logits
        with pytest.warns(AttnsteerWarning, match="identity"):
            handle = attnsteer.apply(llava, spin(**params))
        with handle:
            assert torch.equal(llava(**llava_batch).logits, base)
        with attnsteer.apply(llava, spin(rho=0.5, eps=0.1)):
            assert (llava(**llava_batch).logits - base).abs().max() > 1e-2
        assert torch.equal(llava(**llava_batch).logits, base)  # remove() is exact


def test_parameters_are_checked():
    with pytest.raises(RecipeError, match=r"params\.rho.*1\.5.*\[0, 1\]"):
        attnsteer.load_recipe(spin(rho=1.5))
    with pytest.raises(RecipeError, match=r"params\.score.*'sum', 'mass'"):
        attnsteer.load_recipe(spin(score="max"))


# ---- a real model --------------------------------------------------------------------------------
def test_smollm2_focus_span_equals_the_reference(smollm2):
    tokenizer, model = smollm2
    tokenizer.padding_side = "left"
    texts = [
        "The cat sat on the mat. The dog ran in the park. Where did the dog run?",
        "Name a fruit that is blue and grows on small bushes in cold forests.",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    focus = torch.zeros_like(ids, dtype=torch.bool)
    focus[:, -12:-6] = True  # inside both prompts (15 and 20 tokens)
    valid = mask.bool()
    params = dict(rho=0.8, eps=0.1)  # K = 7 of 9 heads
    with torch.no_grad():
        base = model(**batch).logits
        with literal_spin(model, focus, mask, ids.shape[1], **params) as found:
            ref = model(**batch).logits
        with attnsteer.apply(model, spin(**params)) as handle:
            with handle.focus(focus):
                out = model(**batch).logits
            assert kept_of(handle) == found["kept"]
            assert rows_modified(handle) == found["count"] == 30 * 2 * 2
    assert (out - base)[valid].abs().max() > 0.1
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
