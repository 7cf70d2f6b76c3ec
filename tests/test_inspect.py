"""``attnsteer.attention.observe`` and ``attnsteer inspect``: the observer leaves the model exactly as it
was, its last-row weights equal eager attention (baseline) and the reference backend (steered), and the
command writes pictures whose pixels show the numbers in inspect.json. Tiny random models, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import vlm_fixtures as F
from conftest import FAMILIES, VOCAB, build_tiny
from test_eval_helpers import IMAGE_IDS, coco_name, tiny_llava_dir, write_images  # noqa: F401  (fixture)

import attnsteer
from attnsteer import compat
from attnsteer.attention import dispatch, reference
from attnsteer.attention.observe import LastRows, last_row_weights, observe
from attnsteer.cli import main
from attnsteer.pictures import NAN_COLOUR, colormap

ACT = {
    "name": "act-low",
    "interventions": [{"method": "act", "layers": "1:", "params": {"threshold": 0.15, "beta": 0.2}}],
}
VAR = {
    "name": "var-tiny",
    "interventions": [
        {"method": "var", "layers": "all", "params": {"tau": 2.8, "rho": 0.3, "min_image_attention": 0.05}}
    ],
}
PAI = {"name": "pai-tiny", "interventions": [{"method": "pai", "layers": "1:", "params": {"alpha": 0.5}}]}
VHR = {"name": "vhr-tiny", "interventions": [{"method": "vhr", "layers": "all", "params": {"alpha": 2.0}}]}
SPIN = {"name": "spin-tiny", "interventions": [{"method": "spin", "layers": "1:", "params": {"rho": 0.5, "eps": 0.1}}]}
VAF = {"name": "vaf-tiny", "interventions": [{"method": "vaf", "layers": "2:", "params": {"alpha": 1.5, "beta": 0.5}}]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _implementations(model) -> list:
    return [
        (type(cfg).__name__, vars(cfg)["_attn_implementation_internal"]) for cfg in compat.config_tree(model.config)
    ]


def _ids(seed=0, length=14, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, layer, module, query, key, attention_mask, kwargs):
        self.calls.append(layer)


# ---- the observer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_observer_on_an_unsteered_model_sees_every_layer_once_and_changes_nothing(impl):
    model = build_tiny("llama", attn_implementation=impl)
    ids = _ids()
    before = _implementations(model)
    with torch.no_grad():
        expected = model(ids).logits
    seen = Counter()
    with torch.no_grad(), observe(model, seen):
        assert compat.attn_implementation(model.config) == dispatch.REGISTERED_NAMES[impl]
        logits = model(ids).logits
        assert seen.calls == [0, 1, 2, 3]
        model(ids)
    assert seen.calls == [0, 1, 2, 3] * 2
    assert torch.equal(logits, expected)
    assert _implementations(model) == before
    assert not any(m in dispatch._OBSERVERS for m in (layer.self_attn for layer in model.model.layers))
    with torch.no_grad():
        model(ids)
    assert len(seen.calls) == 8  # detached on exit


def test_observer_restores_the_implementation_when_the_block_raises():
    model = build_tiny("llama")
    before = _implementations(model)
    with pytest.raises(RuntimeError, match="boom"), observe(model, Counter()):
        raise RuntimeError("boom")
    assert _implementations(model) == before


def test_observer_on_a_steered_model_leaves_its_logits_bit_identical():
    model = build_tiny("llama")
    ids = _ids(1)
    original = _implementations(model)
    with attnsteer.apply(model, ACT) as handle, torch.no_grad():
        expected = model(ids).logits
        steered_impls = _implementations(model)
        seen = Counter()
        rows = LastRows.of_handle(handle, batch=1)
        with observe(model, seen), observe(model, rows):
            logits = model(ids).logits
        assert _implementations(model) == steered_impls  # a steered model is not switched
        assert seen.calls == [0, 1, 2, 3] and dict(rows.calls) == {0: 1, 1: 1, 2: 1, 3: 1}
        assert torch.equal(logits, expected)
        assert not torch.equal(logits, _unsteered_logits(model, ids, handle))
    assert _implementations(model) == original


def _unsteered_logits(model, ids, handle):
    with handle._state.paused():
        return model(ids).logits


def test_observer_on_a_vlm_switches_the_text_attention_only():
    model = F.build_vlm("llava")
    inputs = F.make_inputs("llava", model, n_images=[1], seed=2)
    before = _implementations(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    seen = Counter()
    with torch.no_grad(), observe(model, seen):
        assert model.config.vision_config._attn_implementation == "sdpa"
        logits = model(**inputs).logits
    assert seen.calls == [0, 1, 2, 3]
    assert torch.equal(logits, expected) and _implementations(model) == before


# ---- the numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_last_row_weights_equal_eager_attention(family):
    """Left-padded batch with GQA (4 query / 2 kv heads); mistral's sliding window of 6 is in the mask."""
    eager = build_tiny(family, attn_implementation="eager")
    sdpa = build_tiny(family, attn_implementation="sdpa")
    ids = _ids(2, length=12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True).attentions
    for model in (eager, sdpa):
        rows = LastRows()
        with torch.no_grad(), observe(model, rows):
            model(ids, attention_mask=mask)
        assert sorted(rows.pre) == [0, 1, 2, 3]
        for layer, weights in enumerate(reference):
            torch.testing.assert_close(rows.pre[layer], weights[:, :, -1].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rows.finish()[0], rows.pre[0], rtol=0, atol=0)  # unsteered: post == pre


def test_last_row_weights_function_matches_the_recorder():
    model = build_tiny("qwen2")
    ids = _ids(3)
    got, rows = {}, LastRows()

    def both(layer, module, query, key, mask, kwargs):
        got[layer] = last_row_weights(module, query, key, mask, kwargs)
        rows(layer, module, query, key, mask, kwargs)

    with torch.no_grad(), observe(model, both):
        model(ids)
    assert all(torch.equal(got[layer], rows.pre[layer]) for layer in range(4))


def _reference_rows(monkeypatch) -> list:
    """Capture the last row of every map the reference backend returns (steered layers, in call order)."""
    captured = []
    attend = reference.attend

    def capture(*args, **kwargs):
        out, weights = attend(*args, **kwargs)
        captured.append(weights[:, :, -1].float().clone())
        return out, weights

    monkeypatch.setattr(reference, "attend", capture)
    return captured


def _steered_rows(model, recipe, inputs, backend, monkeypatch):
    captured = _reference_rows(monkeypatch) if backend == "reference" else []
    with attnsteer.apply(model, recipe, backend=backend) as handle, torch.no_grad():
        rows = LastRows.of_handle(handle, batch=inputs["input_ids"].shape[0])
        with observe(model, rows):
            model(**inputs)
        rows.finish()
        layers = sorted(handle.plans)
        changed = {layer: rows.changed(layer) for layer in layers}
    return rows, layers, captured, changed


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_steered_act_rows_equal_the_reference_backend(monkeypatch, backend):
    """The post-steering row (ACT's rule applied to the observed row after the forward) is the row
    the reference backend computes with the full map, and differs from the pre-steering row."""
    model = build_tiny("llama")
    inputs = {"input_ids": _ids(4, length=16)}
    rows, layers, _, changed = _steered_rows(model, ACT, inputs, backend, monkeypatch)
    ref_rows, _, captured, _ = _steered_rows(model, ACT, inputs, "reference", monkeypatch)
    assert len(captured) == len(layers) == 3
    for layer, weights in zip(layers, captured):
        torch.testing.assert_close(rows.post[layer], weights, rtol=1e-5, atol=1e-6)
    assert any(bool(c.any()) for c in changed.values())
    assert any(not torch.allclose(rows.post[layer], rows.pre[layer]) for layer in layers)
    torch.testing.assert_close(rows.post[0], rows.pre[0], rtol=0, atol=0)  # layer 0 is not steered


@pytest.mark.parametrize("recipe", [VAR, PAI], ids=["var", "pai"])
def test_steered_vision_rows_equal_the_reference_backend(monkeypatch, recipe):
    model = F.build_vlm("llava")
    inputs = F.make_inputs("llava", model, n_images=[1], seed=5)
    rows, layers, captured, changed = _steered_rows(model, recipe, inputs, "reference", monkeypatch)
    assert len(captured) == len(layers)
    for layer, weights in zip(layers, captured):
        torch.testing.assert_close(rows.post[layer], weights, rtol=1e-5, atol=1e-6)
    assert any(bool(c.any()) for c in changed.values()), "the recipe should fire on this prompt"


# ---- the command ----------------------------------------------------------------------------------------
WORDS = "the a cat dog sat on mat hello world what is capital of france paris answer yes no".split()


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny llama with planted sinks (conftest) and a word-level tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-text")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    build_tiny("llama").save_pretrained(folder)
    return folder


def _write_recipe(folder: Path, recipe: dict) -> Path:
    import yaml

    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 1, **recipe}))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def _crop(pixels, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return pixels[y0:y1, x0:x1]


def _colours(region) -> int:
    return len(np.unique(region.reshape(-1, 3), axis=0))


def _check_cells(pixels, panel, vmin, vmax) -> None:
    """Each cell's centre pixel is the colour of its number in inspect.json."""
    x0, y0, _, _ = panel["box"]
    cw, ch = panel["cell"]
    for r, row in enumerate(panel["values"]):
        for c, value in enumerate(row):
            want = NAN_COLOUR if value is None else tuple(colormap(np.array([value]), vmin, vmax)[0])
            got = tuple(pixels[y0 + r * ch + ch // 2, x0 + c * cw + cw // 2])
            assert got == tuple(want), (panel["caption"], r, c, value, got, want)


def _pictures(record) -> dict:
    return {(p["label"], p["picture"]): p for p in record["pictures"]}


def test_inspect_text_model_writes_pictures_that_show_the_numbers(tiny_text_dir, tmp_path, capsys):
    recipe = _write_recipe(tmp_path, ACT)
    out = tmp_path / "pictures"
    code, stdout, err = run(
        capsys, "inspect", "--model", tiny_text_dir, "--recipe", recipe, "--prompt", "what is the capital of france",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "inspect.json").read_text())
    printed = stdout.split()
    assert str(out / "inspect.json") in printed
    pics = _pictures(record)
    assert set(pics) == {("act-low", "head_share"), ("act-low", "sinks")}
    for pic in pics.values():
        assert pic["path"] in printed and Path(pic["path"]).name.startswith("act-low_")
        pixels = _pixels(pic["path"])
        assert pixels.std() > 10, "not a constant picture"
        for panel in pic["panels"]:
            assert _colours(_crop(pixels, panel["box"])) >= 3
            _check_cells(pixels, panel, pic["vmin"], pic["vmax"])
    share = pics[("act-low", "head_share")]
    assert "sinks ACT found" in share["title"][0]
    base, steered = share["panels"]
    assert base["caption"].startswith("baseline") and "steered weights" in steered["caption"]
    pixels = _pixels(share["path"])
    assert not np.array_equal(_crop(pixels, base["box"]), _crop(pixels, steered["box"]))
    assert steered["marks"]["rule_changed"]
    # ACT keeps beta of each sink's weight: the first steered layer sees unchanged inputs
    first = record["recipes"]["act-low"]["steered_layers"][0]
    for before, after in zip(base["values"][first], steered["values"][first]):
        if before is not None:
            assert after == pytest.approx(0.2 * before, rel=1e-5)
    sinks = pics[("act-low", "sinks")]
    assert sinks["panels"][0]["values"][0] == [None] * len(record["tokens"])  # layer 0 not steered
    assert record["tokens"][:3] == ["what", "is", "the"]


def test_inspect_llava_with_an_image(tiny_llava_dir, tmp_path, capsys):  # noqa: F811
    images = write_images(tmp_path / "images", IMAGE_IDS[:1])
    recipes = [_write_recipe(tmp_path, r) for r in (VAR, VHR, SPIN, VAF)]
    out = tmp_path / "pictures"
    code, stdout, err = run(
        capsys, "inspect", "--model", tiny_llava_dir, "--recipe", *recipes, "--prompt", "is there a dog in the image ?",
        "--image", images / coco_name(IMAGE_IDS[0]), "--out", out,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "inspect.json").read_text())
    assert record["image_grid"] == [4, 4] and len(record["image_positions"]) == 16
    pics = _pictures(record)
    assert {("var-tiny", "head_share"), ("var-tiny", "sinks"), ("var-tiny", "image_attention")} <= set(pics)
    assert {("vhr-tiny", "head_share"), ("vhr-tiny", "vhr_heads"), ("vhr-tiny", "image_attention")} <= set(pics)
    assert "on the image tokens" in pics[("var-tiny", "head_share")]["title"][0]
    for key in [("var-tiny", "head_share"), ("vhr-tiny", "vhr_heads")]:
        pic = pics[key]
        for panel in pic["panels"]:
            _check_cells(_pixels(pic["path"]), panel, pic["vmin"], pic["vmax"])
    vhr = pics[("vhr-tiny", "head_share")]["panels"][1]["marks"]["vhr"]
    chosen = record["recipes"]["vhr-tiny"]["vhr_heads"]
    assert sorted(map(tuple, vhr)) == sorted((int(layer), h) for layer, hs in chosen.items() for h in hs)
    # SPIN's kept heads (2 of 4 per steered layer) drawn as spin_heads and outlined on its head share
    kept = record["recipes"]["spin-tiny"]["spin_heads"]
    assert sorted(map(int, kept)) == [1, 2, 3] and all(len(hs) == 2 for hs in kept.values())
    spin = pics[("spin-tiny", "spin_heads")]
    assert Path(spin["path"]).name == "spin-tiny_spin_heads.png" and "SPIN kept" in spin["title"][0]
    grid = spin["panels"][0]["values"]
    assert grid[0] == [None] * 4  # layer 0 not steered
    assert all(grid[int(layer)][h] == 1.0 for layer, hs in kept.items() for h in hs)
    _check_cells(_pixels(spin["path"]), spin["panels"][0], spin["vmin"], spin["vmax"])
    marks = pics[("spin-tiny", "head_share")]["panels"][1]["marks"]["spin"]
    assert sorted(map(tuple, marks)) == sorted((int(layer), h) for layer, hs in kept.items() for h in hs)
    # VAF's key groups: 1.5 on the image tokens, 0.5 before the first one, 1 after; grey below layer 2
    groups = pics[("vaf-tiny", "vaf_key_factors")]
    factors = groups["panels"][0]["values"]
    first = min(record["image_positions"])
    assert factors[0] == [None] * len(factors[0]) and factors[1] == [None] * len(factors[0])
    for layer in (2, 3):
        row = factors[layer]
        assert set(row[:first]) == {0.5} and all(row[p] == 1.5 for p in record["image_positions"])
        assert set(row[max(record["image_positions"]) + 1 :]) == {1.0}
    _check_cells(_pixels(groups["path"]), groups["panels"][0], groups["vmin"], groups["vmax"])
    for label in ("var-tiny", "vhr-tiny"):
        pic = pics[(label, "image_attention")]
        pixels = _pixels(pic["path"])
        base, steered = (_crop(pixels, p["box"]) for p in pic["panels"])
        assert base.shape == steered.shape and base.shape[0] >= 64
        assert _colours(base) > 5 and _colours(steered) > 5
        assert not np.array_equal(base, steered)
        grid = np.array(pic["panels"][1]["values"])
        assert grid.shape == (4, 4) and np.isfinite(grid).all() and grid.max() > grid.min()


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("image_with_text_model", "--image"),
        ("missing_image", "no such file"),
        ("recipe_for_llava", "--recipe"),
        ("image_recipe_without_image", "image tokens"),
        ("out_is_a_file", "--out"),
        ("missing_model", "--model"),
    ],
)
def test_inspect_usage_errors_name_the_flag(tiny_text_dir, tmp_path, capsys, case, fragment):
    image = write_images(tmp_path / "images", IMAGE_IDS[:1]) / coco_name(IMAGE_IDS[0])
    argv = ["inspect", "--model", tiny_text_dir, "--recipe", _write_recipe(tmp_path, ACT), "--prompt", "hello"]
    out = ["--out", tmp_path / "out"]
    if case == "image_with_text_model":
        argv += ["--image", image]
    elif case == "missing_image":
        argv += ["--image", tmp_path / "nope.png"]
    elif case == "recipe_for_llava":
        argv[4] = "vhr-llava15"
    elif case == "image_recipe_without_image":
        argv[4] = _write_recipe(tmp_path, VAR)
    elif case == "out_is_a_file":
        (tmp_path / "file").write_text("x")
        out = ["--out", tmp_path / "file"]
    elif case == "missing_model":
        argv[2] = tmp_path / "no-such-model"
    code, _, err = run(capsys, *argv, *out)
    errors = [line for line in err.splitlines() if line.startswith("attnsteer: error:")]
    assert code == 2 and len(errors) == 1
    assert fragment in errors[0] and "Fix" in errors[0]


def test_inspect_vlm_without_image_is_a_usage_error(tiny_llava_dir, tmp_path, capsys):  # noqa: F811
    code, _, err = run(
        capsys, "inspect", "--model", tiny_llava_dir, "--recipe", "act-default", "--prompt", "hi", "--out", tmp_path
    )
    assert code == 2 and "--image" in err and "vision-language" in err


@pytest.mark.parametrize("chat", [True, False])
def test_inspect_vlm_honours_no_chat(tiny_llava_dir, tmp_path, capsys, monkeypatch, chat):  # noqa: F811
    from attnsteer import pictures

    seen = {}

    def fake_inspect(model, inputs, recipes, out, *, tokens, **kwargs):  # the prompt as inspect built it
        seen["tokens"] = tokens
        return {"pictures": [], "json": str(out / "inspect.json"), "skipped": [], "notes": []}

    monkeypatch.setattr(pictures, "inspect", fake_inspect)
    image = write_images(tmp_path / "images", IMAGE_IDS[:1]) / coco_name(IMAGE_IDS[0])
    code, _, err = run(
        capsys, "inspect", "--model", tiny_llava_dir, "--recipe", "act-default", "--prompt", "is there a dog ?",
        "--image", image, "--out", tmp_path / "out", *([] if chat else ["--no-chat"]),
    )  # fmt: skip
    assert code == 0, err
    words = [t for t in seen["tokens"] if t != "<image>"]
    assert "<image>" in seen["tokens"]
    if chat:  # the processor's chat template: user : <image> ... assistant :
        assert words == ["user", ":", "is", "there", "a", "dog", "?", "assistant", ":"]
    else:  # the image placeholders, then the prompt as given
        assert seen["tokens"][0] == "<image>" and words == ["is", "there", "a", "dog", "?"]
