"""VHR ``selection: fixed``, ``attnsteer calibrate vhr --fixed-heads`` and ``attnsteer calibrate var``
on tiny random VLMs (offline): the rule by hand, the calibrations against counts made here, the
written recipes, and the command line's errors."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections import Counter

import pytest
import torch
import vlm_fixtures as F

import attnsteer
from attnsteer.calibrate.var import calibrate_var
from attnsteer.calibrate.vhr import calibrate_vhr
from attnsteer.cli import main
from attnsteer.errors import RecipeError, SilentSiteWarning, UsageError
from attnsteer.sinks import activation_ratio

TOL = dict(atol=2e-5, rtol=2e-5)
PER_PROMPT = {"interventions": [{"method": "vhr", "layers": "all"}]}
TINY_VAR = {
    "name": "tiny-var",
    "interventions": [{"method": "var", "params": {"tau": 5.0, "rho": 0.3, "min_image_attention": 0.05}}],
}
SINK_DIM, RARE_DIM, RARE_TOKEN = 5, 11, 7  # planted: every BOS on dim 5, text id 7 on dim 11


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(1)
    return F.build_vlm("llava")


def fixed(heads: dict, **params) -> dict:
    return {"interventions": [{"method": "vhr", "heads": heads, "params": {"selection": "fixed", **params}}]}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def logits_with(model, inputs, recipe):
    with attnsteer.apply(model, recipe):
        return logits(model, inputs)


def head_outputs(model, inputs, recipe=None) -> dict[int, torch.Tensor]:
    """Every text layer's attention output per head before o_proj, (B, L, H, D), of one forward."""
    captured, hooks = {}, []
    heads = model.config.text_config.num_attention_heads
    for i, layer in enumerate(F.text_layers(model)):

        def grab(module, args, i=i):
            captured[i] = args[0].detach().view(*args[0].shape[:2], heads, -1).clone()

        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(grab))
    try:
        if recipe is None:
            logits(model, inputs)
        else:
            with attnsteer.apply(model, recipe):
                logits(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


# ---- VHR selection: fixed ----------------------------------------------------------------------------
def test_fixed_scales_exactly_the_given_heads_in_every_row(llava):
    inputs = F.make_inputs("llava", llava, n_images=[1, 0, 2], seed=3)  # a padded batch, one row without image
    base = head_outputs(llava, inputs)
    steered = head_outputs(llava, inputs, fixed({2: [1, 3]}, alpha=3.0))
    for layer in (0, 1):  # below the steered layer: untouched
        torch.testing.assert_close(steered[layer], base[layer], atol=0, rtol=0)
    assert steered[2].shape[0] == 3  # no text-only stream in the batch
    torch.testing.assert_close(steered[2][:, :, [1, 3]], 3.0 * base[2][:, :, [1, 3]], **TOL)
    torch.testing.assert_close(steered[2][:, :, [0, 2]], base[2][:, :, [0, 2]], atol=0, rtol=0)
    with attnsteer.apply(llava, fixed({2: [1, 3]})) as handle:
        assert handle.vhr_heads() == {}  # before the first prompt
        logits(llava, inputs)
        assert handle.vhr_heads() == {2: [[1, 3]] * 3}
        assert handle.stats()[0]["rows_modified"] == 2 * 3 * inputs["input_ids"].shape[1]


def test_fixed_decode_steps_scale_the_same_heads(llava):
    """Fixed heads do not depend on the prompt: KV-cached generation equals recomputing every step."""
    inputs = F.make_inputs("llava", llava, n_images=[1], seed=5)
    with attnsteer.apply(llava, fixed({1: [0], 3: [2, 3]})):
        gen = llava.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = inputs["input_ids"]
        for _ in range(4):
            step = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
            with torch.no_grad():
                nxt = llava(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_fixed_equals_per_prompt_when_the_heads_are_the_prompts_own(family):
    model = F.build_vlm(family)
    for seed in (0, 1):
        inputs = F.make_inputs(family, model, n_images=[1], seed=seed)
        with attnsteer.apply(model, PER_PROMPT) as handle:
            per_prompt = logits(model, inputs)
            selected = {layer: rows[0] for layer, rows in handle.vhr_heads().items() if rows[0]}
        assert selected, "VHR selected no head at all"
        with attnsteer.apply(model, fixed(selected)) as handle:
            same = logits(model, inputs)
            assert handle.vhr_heads() == {layer: [heads] for layer, heads in selected.items()}
        torch.testing.assert_close(same, per_prompt, **TOL)
        other = {layer: [h for h in range(4) if h not in heads] or [0] for layer, heads in selected.items()}
        assert (logits_with(model, inputs, fixed(other)) - per_prompt).abs().max() > 1e-4


def test_fixed_needs_an_explicit_head_mapping(llava):
    with pytest.raises(RecipeError, match=r"selection: fixed.*`heads`.*heads: \{layer"):
        attnsteer.plan(llava, {"interventions": [{"method": "vhr", "params": {"selection": "fixed"}}]})
    with pytest.raises(RecipeError, match=r"params\.selection.*'per_prompt', 'fixed'"):
        attnsteer.load_recipe({"interventions": [{"method": "vhr", "params": {"selection": "always"}}]})


# ---- calibrate vhr --fixed-heads -----------------------------------------------------------------------
def test_calibrate_vhr_keeps_the_heads_selected_in_min_share_of_the_prompts(llava):
    prompts = [F.make_inputs("llava", llava, n_images=[1], seed=s) for s in range(6)]
    counts = Counter()
    with attnsteer.apply(llava, PER_PROMPT) as handle:
        for inputs in prompts:
            logits(llava, inputs)
            counts.update((layer, h) for layer, rows in handle.vhr_heads().items() for h in rows[0])
    for min_share in (0.5, 0.8):
        expected: dict[int, list[int]] = {}
        for (layer, head), c in sorted(counts.items()):
            if c / len(prompts) >= min_share - 1e-9:
                expected.setdefault(layer, []).append(head)
        if not expected:
            with pytest.raises(UsageError, match="no head is selected"):
                calibrate_vhr(llava, prompts, PER_PROMPT, min_share=min_share)
            continue
        recipe, stats = calibrate_vhr(llava, prompts, PER_PROMPT, min_share=min_share, model_id="tiny")
        assert stats.heads == expected and stats.prompts == 6
        assert dict(stats.counts) == dict(counts)
        reloaded = attnsteer.load_recipe(attnsteer.load_recipe(recipe.to_dict()))  # validates
        (iv,) = reloaded.interventions
        assert iv.params["selection"] == "fixed" and iv.heads == expected and iv.layers is None
        sites = attnsteer.plan(llava, reloaded).sites()
        assert {s["layer"]: s["heads"] for s in sites} == expected
        for layer, head in [(layer, h) for layer, hs in expected.items() for h in hs]:
            assert f"h{head} {counts[(layer, head)] / 6:.2f}" in recipe.source
        assert "6 prompts" in recipe.source
        with attnsteer.apply(llava, reloaded) as handle:  # the same heads on every prompt
            for inputs in prompts[:2]:
                logits(llava, inputs)
                assert handle.vhr_heads() == {layer: [heads] for layer, heads in expected.items()}


def test_calibrate_vhr_refuses_a_fixed_base(llava):
    prompts = [F.make_inputs("llava", llava, n_images=[1], seed=0)]
    with pytest.raises(UsageError, match="selection: per_prompt"):
        calibrate_vhr(llava, prompts, fixed({1: [0]}))


# ---- calibrate var -------------------------------------------------------------------------------------
def plant_sinks(model, bos_dim=SINK_DIM, rare=(RARE_TOKEN, RARE_DIM)) -> None:
    """Massive activations: every BOS token on ``bos_dim``, text id ``rare[0]`` on dim ``rare[1]``."""
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[F.BOS, bos_dim] = 50.0
        weight[rare[0], rare[1]] = 50.0


@pytest.fixture(scope="module")
def planted():
    model = F.build_vlm("llava", seed=1)
    plant_sinks(model)
    return model


def var_prompts(model, n=5, rare_in=(0, 1)):
    return [
        F.make_inputs("llava", model, prompts=[[20 + i, RARE_TOKEN if i in rare_in else 30, 40 + i, 50]], seed=i)
        for i in range(n)
    ]


def dims_by_hand(model, inputs, layer, tau) -> list[int]:
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]  # entering decoder layer `layer`
    return (activation_ratio(hidden)[0] >= tau).any(0).nonzero().flatten().tolist()


def test_calibrate_var_freezes_the_dims_found_in_most_prompts(planted):
    prompts = var_prompts(planted)  # the rare dim in 2 of 5 prompts
    found = [dims_by_hand(planted, inputs, 2, 5.0) for inputs in prompts]
    assert all(SINK_DIM in dims for dims in found) and sum(RARE_DIM in d for d in found) == 2
    recipe, stats = calibrate_var(planted, prompts, TINY_VAR, model_id="tiny")
    assert stats.first_layer == 2 and stats.dims_per_prompt == found
    counts = Counter(d for dims in found for d in dims)
    assert stats.sink_dims == [d for d, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c / 5 >= 0.5]
    assert SINK_DIM in stats.sink_dims and RARE_DIM not in stats.sink_dims
    # VAR's own auto dims (its state) agree with the calibration's
    with attnsteer.apply(planted, {**TINY_VAR, "interventions": [{**TINY_VAR["interventions"][0]}]}) as handle:
        logits(planted, prompts[0])
        auto_dims = handle._state.prompt.get(("var auto dims", 0), "dims")  # bool (B, D), intervention 0
        assert auto_dims[0].nonzero().flatten().tolist() == found[0]
    (iv,) = attnsteer.load_recipe(recipe.to_dict()).interventions
    assert iv.params["sink_dims"] == sorted(stats.sink_dims) and iv.params["tau"] == 5.0
    assert attnsteer.plan(planted, recipe).sites()[0]["layer"] == 2
    # sink tokens at the first layer with the frozen dims, by hand: the BOS (and nothing else)
    for inputs, count in zip(prompts, stats.sinks_per_layer[2]):
        with torch.no_grad():
            hidden = planted(**inputs, output_hidden_states=True).hidden_states[2]
        by_hand = int((activation_ratio(hidden)[0][:, stats.sink_dims] >= 5.0).any(-1).sum())
        assert count == by_hand
    assert f"{SINK_DIM}: 5/5 (1.00)" in recipe.source and f"{RARE_DIM}: 2/5 (0.40)" in recipe.source
    assert "5 prompts" in recipe.source and "L2 " in recipe.source
    # a lower share takes the rare dim too
    _, low = calibrate_var(planted, prompts, TINY_VAR, min_share=0.4)
    assert RARE_DIM in low.sink_dims and low.sink_dims[0] == SINK_DIM  # by frequency


def test_calibrate_var_explains_an_unreachable_tau(planted):
    prompts = var_prompts(planted, n=2)
    # the point: no hidden state of this 64-wide model reaches tau 20, so the first pass (VAR with
    # sink_dims: auto, run only to read the hidden states) finds no dim: the error says why, and the
    # first pass's silent sites are no result of the calibration (no SilentSiteWarning escapes it)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SilentSiteWarning)
        with pytest.raises(UsageError, match=r"sqrt\(64\) = 8\.0, below tau 20"):
            calibrate_var(planted, prompts, {"interventions": [{"method": "var"}]})


# ---- the command line ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A saved tiny LLaVA (massive activations planted on the chat template's first word and on 'dog'),
    its processor, images and prompt files."""
    import test_eval_helpers as H

    root = tmp_path_factory.mktemp("calibrate")
    model = H.build_tiny_llava()
    tokenizer = H.build_tokenizer()
    plant_sinks(model, rare=(tokenizer.convert_tokens_to_ids("dog"), RARE_DIM))
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("user"), SINK_DIM] = 50.0
    model.save_pretrained(root / "model")
    H.build_processor().save_pretrained(root / "model")
    images = H.write_images(root / "images", H.IMAGE_IDS[:2])
    (root / "prompts.txt").write_text("Describe this image.\n\nIs there a dog in the image?\nWhat is on the table?\n")
    rows = [
        {"prompt": "Is there a cat in the image?", "image": H.coco_name(H.IMAGE_IDS[0])},
        {"prompt": "Is there a dog in the image?", "image": str(images / H.coco_name(H.IMAGE_IDS[1]))},
        {"prompt": "Describe this image."},  # runs on every image of --images
    ]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "var.yaml").write_text(attnsteer.load_recipe(TINY_VAR).to_yaml())
    return {"root": root, "model": root / "model", "images": images}


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_calibrate_var_writes_a_recipe_with_frozen_dims(saved, capsys):
    out_path = saved["root"] / "out" / "var-tiny.yaml"
    code, out, err = cli(
        capsys,
        *("calibrate", "var", "--model", saved["model"], "--prompts", saved["root"] / "prompts.txt"),
        *("--images", saved["images"], "--recipe", saved["root"] / "var.yaml", "--out", out_path, "--no_progress"),
    )
    assert code == 0, err
    recipe = attnsteer.load_recipe(out_path)
    # 3 prompts x 2 images; 'dog' in 2 of the 6
    assert recipe.interventions[0].params["sink_dims"] == [SINK_DIM]
    assert recipe.name == "tiny-var-calibrated" and "6 prompts" in recipe.source
    assert f"{RARE_DIM}: 2/6 (0.33)" in recipe.source
    assert f"| {SINK_DIM} | 6/6 | 1.00 | yes |" in out and "| layer | mean |" in out
    assert str(out_path) in err


def test_cli_calibrate_var_default_base_is_the_llava_recipe(saved, capsys):
    argv = ["calibrate", "var", "--model", saved["model"], "--prompts", saved["root"] / "prompts.jsonl"]
    argv += ["--images", saved["images"], "--limit", "2", "--no_progress", "--out"]
    code, _, err = cli(capsys, *argv, saved["root"] / "never.yaml")
    assert code == 2 and "sqrt(64) = 8.0, below tau 20" in err  # var-llava15-7b's tau on a 64-wide model
    code, _, err = cli(capsys, *argv, saved["root"] / "default.yaml", "--tau", "5", "--name", "mine")
    assert code == 0, err
    recipe = attnsteer.load_recipe(saved["root"] / "default.yaml")
    assert recipe.name == "mine" and recipe.model_types == ["llava", "llava_next"]
    (iv,) = recipe.interventions
    # the first 2 prompts: a cat and a dog question; 'dog' in 1 of 2 is a share of exactly 0.5: frozen too
    assert iv.layers == "2:-1" and iv.params["sink_dims"] == [SINK_DIM, RARE_DIM] and iv.params["tau"] == 5.0
    assert "2 prompts" in recipe.source and "base recipe var-llava15-7b" in recipe.source


def test_cli_calibrate_vhr_fixed_heads(saved, capsys):
    out_path = saved["root"] / "vhr-out"
    code, out, err = cli(
        capsys,
        *("calibrate", "vhr", "--fixed-heads", "--model", saved["model"]),
        *("--prompts", saved["root"] / "prompts.jsonl", "--images", saved["images"]),
        *("--out", out_path, "--min-share", "0.75", "--no_progress"),
    )
    assert code == 0, err
    recipe = attnsteer.load_recipe(out_path)  # a folder: recipe.yaml inside
    assert recipe.name == "vhr-llava15-fixed" and recipe.model_types == ["llava", "llava_next"]
    (iv,) = recipe.interventions
    assert iv.params["selection"] == "fixed" and isinstance(iv.heads, dict) and iv.heads
    assert "4 prompts" in recipe.source and ">= 0.75" in recipe.source
    assert "| layer | heads selected per prompt (mean) |" in out
    model = F._model_class("llava").from_pretrained(saved["model"])
    assert {s["layer"]: s["heads"] for s in attnsteer.plan(model, recipe).sites()} == iv.heads


def test_library_calibrations_from_configs_log_through_the_callback_and_print_nothing(saved, capsys):
    """``attnsteer.calibrate.var.calibrate`` / ``vhr.calibrate``: the commands' work from typed
    configs. Loading logs one line to ``progress``; a model passed as ``loaded`` is not loaded again
    and gives the same recipe; the results carry the tables' data."""
    from attnsteer.calibrate import var, vhr
    from attnsteer.evals.vlm import load_vlm

    root = saved["root"]
    common = {"model": str(saved["model"]), "images": saved["images"], "no_progress": True}
    config = var.VarCalibrationConfig(
        prompts=root / "prompts.txt", recipe=str(root / "var.yaml"), out=root / "lib" / "var.yaml", **common
    )
    lines = []
    result = var.calibrate(config, progress=lines.append)
    assert capsys.readouterr() == ("", "")
    assert len(lines) == 1 and lines[0].startswith("Loading ") and lines[0].endswith(" ...")
    assert result.path == root / "lib" / "var.yaml" and attnsteer.load_recipe(result.path) == result.recipe
    assert result.stats.sink_dims == [SINK_DIM] and result.stats.prompts == 6 and result.stats.counts[RARE_DIM] == 2
    assert isinstance(result.notes, list) and all(isinstance(n, str) for n in result.notes)
    assert f"| {SINK_DIM} | 6/6 | 1.00 | yes |" in var.format_var_table(result.stats)
    processor, model = load_vlm(str(saved["model"]), {})
    capsys.readouterr()  # transformers' own loading bar
    again = var.calibrate(dataclasses.replace(config, out=root / "lib" / "again.yaml"), loaded=(processor, model))
    assert again.recipe == result.recipe and capsys.readouterr() == ("", "")

    fixed_config = vhr.VhrCalibrationConfig(
        prompts=root / "prompts.jsonl", out=root / "lib" / "vhr", min_share=0.75, **common
    )
    fixed_result = vhr.calibrate(fixed_config, loaded=(processor, model), progress=lines.append)
    assert len(lines) == 1 and capsys.readouterr() == ("", "")  # nothing more logged: nothing loaded
    (iv,) = attnsteer.load_recipe(fixed_result.path).interventions
    assert iv.heads == fixed_result.stats.heads and iv.params["selection"] == "fixed"
    assert fixed_result.fixed_heads == sum(len(h) for h in iv.heads.values()) > 0 and fixed_result.stats.prompts == 4


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("tau", 0, "--tau 0: the threshold must be > 0. Fix"),
        ("tau", "20", "--tau '20': the threshold must be > 0. Fix"),
        ("min_share", 0, "--min-share 0: expected a share in (0, 1]. Fix"),
        ("min_share", 1.5, "--min-share 1.5: expected a share in (0, 1]. Fix"),
        ("limit", 0, "--limit 0: expected a positive integer. Fix"),
    ],
)
def test_library_configs_refuse_bad_settings_naming_the_flag(tmp_path, field, value, needle):
    from attnsteer.calibrate import var, vhr

    with pytest.raises(UsageError, match=re.escape(needle)):
        var.VarCalibrationConfig(prompts=tmp_path / "p.txt", out=tmp_path / "o.yaml", **{field: value})
    if field != "tau":
        with pytest.raises(UsageError, match=re.escape(needle)):
            vhr.VhrCalibrationConfig(prompts=tmp_path / "p.txt", out=tmp_path / "o.yaml", **{field: value})


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["var", "--prompts", "{root}/nope.jsonl"], r"--prompts '.*nope\.jsonl': no such file\. Fix"),
        (["var", "--prompts", "{root}/empty.txt"], r"--prompts '.*empty\.txt': the file has no prompts\. Fix"),
        (["var", "--prompts", "{root}/prompts.txt"], r"line 1: the prompt has no image .* Fix: .*--images DIR"),
        (
            ["vhr", "--fixed-heads", "--prompts", "{root}/prompts.txt", "--images", "{root}/no-dir"],
            r"--images '.*no-dir'",
        ),
        (["var", "--prompts", "{root}/prompts.txt", "--images", "{root}/no-images"], r"holds no image files"),
        (["var", "--prompts", "{root}/bad.jsonl"], r"line 2: not valid JSON"),
        (["var", "--prompts", "{root}/noprompt.jsonl"], r"line 1: .*non-empty string \"prompt\""),
        (["var", "--prompts", "{root}/missing-image.jsonl"], r"line 1: image 'gone\.jpg' not found"),
        (["vhr", "--prompts", "{root}/prompts.jsonl", "--images", "{images}"], r"--fixed-heads is missing"),
        (["vhr", "--fixed-heads", "--prompts", "{root}/prompts.jsonl", "--min-share", "0"], r"--min-share.*\(0, 1\]"),
        (
            [
                "vhr",
                "--fixed-heads",
                "--prompts",
                "{root}/prompts.jsonl",
                "--images",
                "{images}",
                "--recipe",
                "{root}/var.yaml",
            ],
            r"calibrates one vhr intervention, and the recipe has 0",
        ),
        (
            ["var", "--prompts", "{root}/prompts.jsonl", "--images", "{images}", "--model", "{root}/text-model"],
            r"--model '.*text-model' is a text-only model \(llama\).*Fix: pass one",
        ),
        (
            ["var", "--prompts", "{root}/prompts.jsonl", "--images", "{images}", "--model", "smollm2"],
            r"text-only model",
        ),
    ],
)
def test_cli_errors_name_the_flag_the_value_and_the_fix(saved, capsys, argv, pattern):
    from conftest import tiny_config

    root = saved["root"]
    (root / "empty.txt").write_text("\n  \n")
    (root / "no-images").mkdir(exist_ok=True)
    (root / "no-images" / "notes.txt").write_text("not an image")
    (root / "bad.jsonl").write_text('{"prompt": "a", "image": null}\n{"prompt": \n')
    (root / "noprompt.jsonl").write_text('{"question": "a"}\n')
    (root / "missing-image.jsonl").write_text('{"prompt": "a", "image": "gone.jpg"}\n')
    tiny_config("llama").save_pretrained(root / "text-model")  # a config is enough to tell the kind
    argv = [a.format(root=root, images=saved["images"]) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(saved["model"])]
    code, _, err = cli(capsys, "calibrate", *argv, "--out", root / "never.yaml")
    assert code == 2
    assert re.search(pattern, err.replace("\n", " ")), err
    assert not (root / "never.yaml").exists()
