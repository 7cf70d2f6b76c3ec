"""Vision-language families x VAR / PAI / VHR: the promises of issue #3 on tiny random VLMs."""

from __future__ import annotations

import pytest
import torch
import vlm_fixtures as F

import attnsteer
from attnsteer.errors import AttnsteerWarning, SteeringError

RECIPES = {
    "var": {"interventions": [{"method": "var", "params": {"tau": 3.0, "rho": 0.3, "min_image_attention": 0.05}}]},
    "pai": {"interventions": [{"method": "pai", "params": {"alpha": 0.8}}]},
    "pai_gamma": {"interventions": [{"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}]},
    "vhr": {"interventions": [{"method": "vhr", "layers": "all"}]},
    "vaf": {"interventions": [{"method": "vaf", "layers": "all", "params": {"alpha": 1.6, "beta": 0.6}}]},
    "hgai": {"interventions": [{"method": "hgai", "layers": "all", "params": {"alpha": 0.8}}]},
    "spin": {"interventions": [{"method": "spin", "layers": "all", "params": {"rho": 0.5, "eps": 0.1}}]},
}
IDENTITY = {
    "var": {"interventions": [{"method": "var", "params": {"p": 0.0}}]},
    "pai": {"interventions": [{"method": "pai", "params": {"alpha": 0.0}}]},
    "vhr": {"interventions": [{"method": "vhr", "layers": "all", "params": {"alpha": 1.0}}]},
    "vaf": {"interventions": [{"method": "vaf", "layers": "all", "params": {"alpha": 1.0, "beta": 1.0}}]},
    "hgai": {"interventions": [{"method": "hgai", "layers": "all", "params": {"alpha": 0.0}}]},
    "spin": {"interventions": [{"method": "spin", "layers": "all", "params": {"rho": 1.0, "eps": 0.1}}]},
}
TOL = dict(atol=3e-5, rtol=3e-5)
# VAR's parameters for the KV-cache test (test_generate_with_kv_cache): every layer of each tiny
# model finds sinks in the prompt and steers it, and no generated token reaches tau
VAR_DECODE = {
    family: {"rho": 0.3, "min_image_attention": 0.05, **params}
    for family, params in {
        "llava": {"tau": 2.8},
        "llava_next": {"tau": 2.1, "sink_dims": [30, 43]},
        "qwen2_vl": {"tau": 3.0},
        "qwen2_5_vl": {"tau": 1.8, "sink_dims": [5, 22]},
        "instructblip": {"tau": 2.8},
        "qwen3_vl": {"tau": 2.2, "sink_dims": [18, 42]},
        "llava_onevision": {"tau": 3.0},
        "internvl": {"tau": 2.2, "sink_dims": [43, 49]},
        "gemma3": {"tau": 1.8, "sink_dims": [24, 58]},
        "idefics3": {"tau": 3.0},
        "smolvlm": {"tau": 3.0},
    }.items()
}


@pytest.fixture(scope="module", params=F.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def vlm(family):
    torch.set_num_threads(1)
    return F.build_vlm(family)


def batch(family, model):
    counts = [2, 0, 1] if F.TEXT_ONLY_ROWS[family] else [1, 1]
    return F.make_inputs(family, model, n_images=counts, seed=3)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", list(IDENTITY))
def test_identity_params_equal_unsteered(family, vlm, method):
    inputs = batch(family, vlm)
    base = logits(vlm, inputs)
    with pytest.warns(AttnsteerWarning, match="identity"):
        handle = attnsteer.apply(vlm, IDENTITY[method])
    with handle:
        assert torch.equal(logits(vlm, inputs), base)


@pytest.mark.parametrize("method", list(RECIPES))
def test_fused_equals_reference_and_changes_logits(family, vlm, method):
    inputs = batch(family, vlm)
    valid = inputs["attention_mask"].bool()
    base = logits(vlm, inputs)
    out = {}
    for backend in ("reference", "fused"):
        with attnsteer.apply(vlm, RECIPES[method], backend=backend) as handle:
            out[backend] = logits(vlm, inputs)
            assert any(s["fired"] for s in handle.stats())
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], **TOL)
    assert (out["fused"] - base)[valid].abs().max() > 1e-4


@pytest.mark.parametrize("method", list(RECIPES))
def test_padded_batch_with_different_image_counts_equals_rows_alone(family, vlm, method):
    inputs = batch(family, vlm)
    with attnsteer.apply(vlm, RECIPES[method]):
        together = logits(vlm, inputs)
        for row in range(inputs["input_ids"].shape[0]):
            alone_inputs = F.row_inputs(family, vlm, inputs, row)
            keep = inputs["attention_mask"][row].bool()
            if not F.image_token_mask(family, vlm, alone_inputs["input_ids"]).any():
                continue  # a text-only prompt alone is refused (no image); checked below in the batch
            alone = logits(vlm, alone_inputs)
            torch.testing.assert_close(together[row, keep], alone[0], **TOL)


@pytest.mark.parametrize("method", ["var", "pai", "vhr", "vaf", "hgai", "spin"])
def test_rows_without_images_are_untouched_and_counted(family, vlm, method):
    if not F.TEXT_ONLY_ROWS[family]:
        pytest.skip(f"{family} takes exactly one image per row")
    inputs = batch(family, vlm)  # row 1 has no image
    base = logits(vlm, inputs)
    with attnsteer.apply(vlm, RECIPES[method]) as handle:
        steered = logits(vlm, inputs)
        stats = handle.stats()
    keep = inputs["attention_mask"][1].bool()
    torch.testing.assert_close(steered[1, keep], base[1, keep], atol=1e-6, rtol=1e-6)
    assert stats[0]["rows_without_image"] == 1


def test_no_image_anywhere_raises_naming_the_token(family, vlm):
    if not F.TEXT_ONLY_ROWS[family]:
        pytest.skip(f"{family} always carries its query tokens")
    inputs = F.make_inputs(family, vlm, n_images=[0, 0], seed=1)
    with attnsteer.apply(vlm, RECIPES["var"]):
        with pytest.raises(SteeringError, match=str(F.IMAGE_TOKEN)):
            logits(vlm, inputs)


@pytest.mark.parametrize("method", list(RECIPES))
def test_generate_with_kv_cache(family, vlm, method):
    inputs = batch(family, vlm)
    # never sample a placeholder id: recomputation would read it as another image
    kwargs = dict(
        max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=[128, 129, 130, 131]
    )
    with attnsteer.apply(vlm, RECIPES[method]) as handle:
        cached = vlm.generate(**inputs, **kwargs)
        assert all(s["calls"] >= 4 for s in handle.stats())
    if method == "var":
        # Decode rows behave like prefill rows, so cached generation equals recomputing every step
        # (up to VAR's rule that generated tokens are never sinks, which recomputation cannot know).
        # Per family, a tau (and, where the automatic dims let generated tokens reach it, fixed sink
        # dims) with which every layer finds sinks in the prompt and steers it, and no generated token
        # is a sink when recomputation reads it as prompt (checked below).
        recipe = {"interventions": [{"method": "var", "layers": "all", "params": VAR_DECODE[family]}]}
        base_logits = logits(vlm, inputs)
        with attnsteer.apply(vlm, recipe) as handle:
            steered_logits = logits(vlm, inputs)
            cached = vlm.generate(**inputs, **kwargs)
            steered = [s["rows_modified"] for s in handle.stats()]
            recomputed = vlm.generate(**inputs, use_cache=False, **kwargs)
            # the last recomputed step read the prompt and 3 generated tokens as its prompt
            sinks = {layer: found["var"]["sinks"] for layer, found in handle.report().items()}
        valid = inputs["attention_mask"].bool()
        assert (steered_logits - base_logits)[valid].abs().max() > 1e-4  # VAR changes this prompt's logits
        assert len(steered) == 4 and all(n > 0 for n in steered), steered  # every layer steered the prompt
        length = inputs["input_ids"].shape[1]
        assert all(pos < length for rows in sinks.values() for row in rows for pos in row), sinks
        assert torch.equal(cached, recomputed)
    base = vlm.generate(**inputs, **kwargs)
    assert cached.shape == base.shape


def test_remove_restores_exactly_and_vision_is_untouched(family, vlm):
    inputs = batch(family, vlm)
    seen = {}

    def record(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
            seen.setdefault(name, []).append(out.detach().clone())

        return hook

    logits(vlm, inputs)  # warm-up: transformers installs its output-capturing hooks lazily
    hooks = [m.register_forward_hook(record(n)) for n, m in F.vision_modules(vlm).items() if n != "model.image_newline"]
    impls = {
        id(c): c._attn_implementation for c in [vlm.config, *[getattr(vlm.config, k) for k in vlm.config.sub_configs]]
    }
    dicts = {n: set(m.__dict__) for n, m in vlm.named_modules()}
    top_dict = set(vlm.__dict__)
    base = logits(vlm, inputs)
    hooks_before = {n: (set(m._forward_pre_hooks), set(m._forward_hooks)) for n, m in vlm.named_modules()}
    for method in ("var", "vhr", "pai", "vaf", "hgai", "spin"):
        with attnsteer.apply(vlm, RECIPES[method]):
            assert vlm.config.vision_config._attn_implementation == "sdpa"
            logits(vlm, inputs)
    for h in hooks:
        h.remove()
    for name, outs in seen.items():
        for out in outs[1:]:
            assert torch.equal(out[: outs[0].shape[0]], outs[0][: out.shape[0]]), name
    assert torch.equal(logits(vlm, inputs), base)
    assert {
        id(c): c._attn_implementation for c in [vlm.config, *[getattr(vlm.config, k) for k in vlm.config.sub_configs]]
    } == impls
    assert {n: set(m.__dict__) for n, m in vlm.named_modules()} == dicts and set(vlm.__dict__) == top_dict
    hooks_after = {n: (set(m._forward_pre_hooks), set(m._forward_hooks)) for n, m in vlm.named_modules()}
    for name, (pre, post) in hooks_after.items():  # transformers' own lazily installed hooks stay
        assert pre <= hooks_before[name][0] | set() and post <= hooks_before[name][1] | set(), name


def test_vhr_batched_text_stream_gives_the_vhd_of_separate_passes(family, vlm):
    """One steered layer: heads chosen from the batched image + text-only prefill == heads chosen
    from two separate unsteered forward passes (image prompt; same prompt without its image)."""
    from attnsteer.methods.vhr import VHR

    layer = 2
    inputs = batch(family, vlm)
    with attnsteer.apply(vlm, {"interventions": [{"method": "vhr", "layers": [layer]}]}) as handle:
        logits(vlm, inputs)
        batched = handle.vhr_heads()[layer]

    captured = []
    o_proj = F.text_layers(vlm)[layer].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0][:, -1].detach()))
    heads = vlm.config.text_config.num_attention_heads
    for row in range(inputs["input_ids"].shape[0]):
        alone = F.row_inputs(family, vlm, inputs, row)
        image_rows = F.image_token_mask(family, vlm, alone["input_ids"])
        drop = image_rows | torch.isin(
            alone["input_ids"], torch.tensor(list(F.vision_wrapper_ids(family, vlm).values()) or [-1])
        )
        text_ids = alone["input_ids"][:, ~drop[0]]
        captured.clear()
        logits(vlm, alone)
        if family == "instructblip":  # its text stream drops the query-token positions of the embeddings
            text_inputs = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}
            with torch.no_grad():
                vlm.language_model(**text_inputs)
        else:
            logits(vlm, {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)})
        image_out, text_out = (c.view(1, heads, -1) for c in captured)
        expected = VHR.select_heads(image_out, text_out)[0].nonzero().flatten().tolist()
        assert batched[row] == expected, (row, batched[row], expected)
    hook.remove()


def test_builtin_paper_recipes_check_the_model(family, vlm):
    """var-llava15-7b names Llama-2-7B's sink dims: on a 64-wide model that is a clear error."""
    if family in ("llava", "llava_next"):
        with pytest.raises(attnsteer.RecipeError, match="sink_dims"):
            attnsteer.apply(vlm, "var-llava15-7b")
    else:
        with pytest.raises(attnsteer.RecipeError, match="model_types"):
            attnsteer.apply(vlm, "var-llava15-7b")
    if family == "instructblip":  # "14:" on a 4-layer model selects nothing: a clear error
        with pytest.raises(attnsteer.RecipeError, match="selects no layer"):
            attnsteer.apply(vlm, "vhr-instructblip")


def test_processor_made_inputs_are_steered(family, vlm):
    """Token roles come from the ids a real (offline-built) processor inserts."""
    try:
        processor = F.make_processor(family, vlm)
    except ValueError as exc:  # smolvlm's processor needs num2words
        pytest.skip(str(exc))
    image = F.random_pil_image(16, 16, seed=1)
    text = F.token_text([5, 6, 7])
    prompt = f"{F.PROCESSOR_IMAGE_TEXT[family]} {text}".strip()
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    except Exception as exc:  # pragma: no cover - documents what the processor needs
        pytest.skip(f"offline processor for {family} did not accept this prompt: {exc}")
    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with attnsteer.apply(vlm, RECIPES["pai"]) as handle:
        logits(vlm, inputs)
        assert handle.stats()[0]["fired"] == 1
        assert handle._state.prompt.roles.image.sum() == F.image_token_mask(family, vlm, inputs["input_ids"]).sum() > 0
