"""SEKA: the key edit against its formula written out here (k_proj hooks applying it per token and
head in float32, on the unsteered model), on every backend, in prefill and cached decode, with left
padding, on every tiny text family and on SmolLM2 through ``handle.focus``; the projection builder
(deterministic, reloadable), the projection file a recipe carries (sha256, wrong model / shapes /
bytes refused), sharing it (save_pretrained, a mocked Hub) and ``attnsteer calibrate seka``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny

import attnsteer
from attnsteer import archs
from attnsteer.calibrate.seka import QAExample, build_projections, read_examples, seka_recipe
from attnsteer.cli import main
from attnsteer.errors import AttnsteerWarning, RecipeError, UsageError
from attnsteer.methods.seka import Projections
from attnsteer.recipe import Recipe, file_sha256

G_POS, G_NEG = 3.0, 1.0
NORM_FAMILIES = {"qwen3": "bthd", "qwen3_moe": "bthd", "gemma3_text": "bhtd"}  # keys normalised per head

# fictional facts: a context, a question it answers, the answer (a span of the context)
QA = [
    ("The lighthouse on Marrow Point is painted in green and white stripes.", "What colours is the lighthouse painted in?", "green and white stripes"),
    ("Professor Ilse Varga keeps her notes in a locked oak cabinet.", "Where does Professor Varga keep her notes?", "a locked oak cabinet"),
    ("The village of Hollin Creek holds its harvest fair every October.", "When is the Hollin Creek harvest fair held?", "every October"),
    ("In the game of Tessel, each player starts with seven copper tokens.", "How many tokens does a Tessel player start with?", "seven copper tokens"),
]  # fmt: skip
EXAMPLES = [QAExample(c, q, a) for c, q, a in QA]


# ---- projections and recipes for tiny models ------------------------------------------------------------
def facts(model) -> dict:
    arch = archs.resolve(model)
    return {
        "model_type": arch.spec.model_type,
        "num_layers": arch.num_layers,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": arch.text_config.hidden_size,
    }


def random_projections(model, layers, *, negative=True, seed=0, rank=3, empty=()) -> Projections:
    """Random orthogonal projections of ``rank`` per layer and kv head; (layer, head) in ``empty``: zeros."""
    f = facts(model)
    gen = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in layers:
        heads_p, heads_n = [], []
        for head in range(f["num_kv_heads"]):
            basis, _ = torch.linalg.qr(torch.randn(f["head_dim"], f["head_dim"], generator=gen, dtype=torch.float64))
            keep = 0.0 if (layer, head) in empty else 1.0
            heads_p.append(keep * basis[:, :rank] @ basis[:, :rank].T)
            heads_n.append(keep * basis[:, rank:] @ basis[:, rank:].T)
        pos[layer], neg[layer] = torch.stack(heads_p).float(), torch.stack(heads_n).float()
    projected = {str(l): [h for h in range(f["num_kv_heads"]) if (l, h) not in empty] for l in layers}
    return Projections(pos, neg if negative else None, {**f, "projected": projected})


def recipe_for(folder: Path, projections: Projections, layers=None, name="p.safetensors", **params) -> Recipe:
    file = projections.save(folder / name)
    params = {"g_pos": G_POS, "g_neg": G_NEG, **params, "projections": {"path": name, "sha256": file_sha256(file)}}
    item = {"method": "seka", "params": params}
    if layers is not None:
        item["layers"] = layers
    return Recipe.from_dict({"name": "seka-test", "interventions": [item]}, folder=folder)


class Formula:
    """Forward hooks on the unsteered model writing SEKA's edit literally on the keys just before
    RoPE -- ``k_proj``'s output, or the per-head ``k_norm``'s where the family has one (Qwen3:
    (B, T, H_kv, D), Gemma 3: (B, H_kv, T, D)): for every marked token (b, t) and kv head h,
    ``k <- k + g+ P+_h k`` or ``k + (g+ P+_h k + g- P-_h k) / 2`` in float32."""

    def __init__(self, model, projections: Projections, marked, g_pos=G_POS, g_neg=G_NEG, layers=None):
        arch = archs.resolve(model)
        self.handles = []
        for layer in layers if layers is not None else sorted(projections.pos):
            attention = arch.attention_modules[layer]
            site = getattr(attention, "k_norm", None) or getattr(attention, "k_proj", None) or attention.qkv_proj
            layout = NORM_FAMILIES.get(model.config.model_type, "flat")
            neg = projections.neg[layer] if projections.neg is not None and g_neg != 0 else None
            hook = self.hook(arch, projections.pos[layer], neg, marked, g_pos, g_neg, layout)
            self.handles.append(site.register_forward_hook(hook))

    @staticmethod
    def hook(arch, pos, neg, marked, g_pos, g_neg, layout):
        hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim

        def edit(module, args, out):
            if layout == "flat":
                start = hq * d if out.shape[-1] == (hq + 2 * hkv) * d else 0
                keys = out[..., start : start + hkv * d].unflatten(-1, (hkv, d))
            else:
                keys = out if layout == "bthd" else out.transpose(1, 2)
            new = keys.detach().clone()
            for b in range(keys.shape[0]):
                for t in range(keys.shape[1]):
                    if not marked[b, t]:
                        continue
                    for h in range(hkv):
                        k = keys[b, t, h].float()
                        delta = g_pos * (pos[h] @ k)
                        if neg is not None:
                            delta = (delta + g_neg * (neg[h] @ k)) / 2
                        new[b, t, h] = (k + delta).to(out.dtype)
            if layout == "flat":
                whole = out.detach().clone()
                whole[..., start : start + hkv * d] = new.flatten(-2)
                return whole
            return new if layout == "bthd" else new.transpose(1, 2)

        return edit

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def batch(length=10, pads=(0, 3), seed=0):
    """Two left-padded rows of ``length`` (row b has pads[b] padding tokens), a focus mask marking
    positions 3..6 of each row's real tokens, and position ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    focus = torch.zeros(2, length, dtype=torch.bool)
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
        focus[b, pad + 3 : pad + 7] = True
    return ids, mask, focus


def forward(model, ids, mask, handle=None, focus=None):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if handle is not None and focus is not None:
            with handle.focus(focus):
                return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def real(logits, mask):
    """The logits of real tokens only (padding rows' garbage left out)."""
    return logits[mask.bool()]


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


# ---- the rule against the formula ----------------------------------------------------------------------
@pytest.mark.parametrize("negative", [True, False], ids=["with-P-", "P+-only"])
def test_every_backend_equals_the_formula_with_left_padding(llama, tmp_path, negative):
    projections = random_projections(llama, [1, 2, 3], negative=negative, empty={(2, 1)})
    recipe = recipe_for(tmp_path, projections, layers=[1, 2, 3])
    ids, mask, focus = batch()
    base = forward(llama, ids, mask)
    with Formula(llama, projections, focus, g_neg=G_NEG if negative else 0.0):
        expected = forward(llama, ids, mask)
    assert (real(expected, mask) - real(base, mask)).abs().max() > 1e-3  # the edit changes the logits
    for backend in ("reference", "chunked", "flash", "auto"):
        with attnsteer.apply(llama, recipe, backend=backend) as handle:
            got = forward(llama, ids, mask, handle, focus)
            stats = handle.stats()
            report = handle.report()
        torch.testing.assert_close(real(got, mask), real(expected, mask), atol=1e-5, rtol=1e-5)
        assert all(s["fired"] == 1 and s["rows_modified"] > 0 for s in stats)
    assert report[2]["seka"] == {"kv_heads": [0], "marked": [4, 4]} and report[1]["seka"]["kv_heads"] == [0, 1]


def test_composed_with_a_weight_rule_the_backends_see_the_edited_keys(llama, tmp_path):
    """SEKA + softplus: the keys are edited first, then every backend re-weights over them."""
    projections = random_projections(llama, [0, 1, 2, 3])
    seka = recipe_for(tmp_path, projections).to_dict(keep_files=True)["interventions"]
    softplus = {"method": "softplus", "params": {"p": 2.0}}
    both = Recipe.from_dict({"name": "both", "interventions": [*seka, softplus]})
    ids, mask, focus = batch()
    with Formula(llama, projections, focus), attnsteer.apply(llama, {"interventions": [softplus]}) as handle:
        expected = forward(llama, ids, mask, handle, focus)
    with attnsteer.apply(llama, {"interventions": [softplus]}) as handle:
        assert (real(expected, mask) - real(forward(llama, ids, mask, handle), mask)).abs().max() > 1e-3
    for backend in ("reference", "chunked", "flash"):
        with attnsteer.apply(llama, both, backend=backend) as handle:
            got = forward(llama, ids, mask, handle, focus)
        torch.testing.assert_close(real(got, mask), real(expected, mask), atol=2e-5, rtol=2e-5)


def test_left_padded_batch_equals_rows_alone(llama, tmp_path):
    recipe = recipe_for(tmp_path, random_projections(llama, [1, 2, 3]), layers=[1, 2, 3])
    ids, mask, focus = batch(pads=(0, 4))
    with attnsteer.apply(llama, recipe) as handle:
        together = forward(llama, ids, mask, handle, focus)
        for b in range(2):
            keep = mask[b].bool()
            alone = forward(llama, ids[b : b + 1, keep], mask[b : b + 1, keep], handle, focus[b : b + 1, keep])
            torch.testing.assert_close(together[b, keep], alone[0], atol=1e-5, rtol=1e-5)
    assert (real(together, mask) - real(forward(llama, ids, mask), mask)).abs().max() > 1e-3


def test_cached_generation_equals_recomputing_the_formula(llama, tmp_path):
    projections = random_projections(llama, [1, 2, 3])
    recipe = recipe_for(tmp_path, projections, layers=[1, 2, 3])
    ids, mask, focus = batch(pads=(0, 2))
    steps = 4
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True)
    with torch.no_grad():
        with attnsteer.apply(llama, recipe) as handle:
            with handle.focus(focus):
                out = llama.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
            with handle.focus(focus):
                static = llama.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    return_dict_in_generate=True,
                    cache_implementation="static",
                    **kwargs,
                )
        plain = llama.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-2
    assert torch.equal(static.sequences, out.sequences)
    for got, want in zip(static.logits, out.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t in range(steps):
        seqs = out.sequences[:, : ids.shape[1] + t]
        full_mask = torch.cat([mask, torch.ones(2, t, dtype=mask.dtype)], 1)
        marked = torch.cat([focus, torch.zeros(2, t, dtype=torch.bool)], 1)  # generated tokens are never marked
        with Formula(llama, projections, marked):
            want = forward(llama, seqs, full_mask)[:, -1]
        torch.testing.assert_close(out.logits[t].float(), want, atol=1e-4, rtol=1e-4)


def test_identity_parameters_are_bit_identical_and_remove_is_exact(llama, tmp_path):
    ids, mask, focus = batch()
    base = forward(llama, ids, mask)
    hooks = {id(m.k_proj): dict(m.k_proj._forward_hooks) for m in archs.resolve(llama).attention_modules}
    with_neg = random_projections(llama, [1, 2, 3])
    no_neg = random_projections(llama, [1, 2, 3], negative=False)
    cases = [(with_neg, {"g_pos": 0.0, "g_neg": 0.0}), (no_neg, {"g_pos": 0.0, "g_neg": 0.5})]
    for i, (projections, gains) in enumerate(cases):
        recipe = recipe_for(tmp_path, projections, layers=[1, 2, 3], name=f"identity-{i}.safetensors", **gains)
        with pytest.warns(AttnsteerWarning, match="identity parameters"):
            handle = attnsteer.apply(llama, recipe)
        assert torch.equal(forward(llama, ids, mask, handle, focus), base)
        handle.remove()
    recipe = recipe_for(tmp_path, with_neg, layers=[1, 2, 3])
    handle = attnsteer.apply(llama, recipe)
    assert (forward(llama, ids, mask, handle, focus) - base).abs().max() > 1e-2
    handle.remove()
    assert torch.equal(forward(llama, ids, mask), base)
    assert {id(m.k_proj): dict(m.k_proj._forward_hooks) for m in archs.resolve(llama).attention_modules} == hooks


def test_heads_select_whole_kv_groups(llama, tmp_path):
    projections = random_projections(llama, [1, 2, 3])
    ids, mask, focus = batch()
    recipe = recipe_for(tmp_path, projections, layers=[1, 2, 3]).to_dict(keep_files=True)
    recipe["interventions"][0]["heads"] = {1: [2, 3], 2: [2, 3], 3: [2, 3]}  # query heads 2, 3 = kv head 1
    only_second = {l: torch.stack([torch.zeros_like(p[0]), p[1]]) for l, p in projections.pos.items()}
    halves = Projections(
        only_second, {l: torch.stack([torch.zeros_like(p[0]), p[1]]) for l, p in projections.neg.items()}
    )
    with Formula(llama, halves, focus):
        expected = forward(llama, ids, mask)
    with attnsteer.apply(llama, recipe) as handle:
        got = forward(llama, ids, mask, handle, focus)
    assert (real(got, mask) - real(forward(llama, ids, mask), mask)).abs().max() > 1e-3
    torch.testing.assert_close(real(got, mask), real(expected, mask), atol=1e-5, rtol=1e-5)
    recipe["interventions"][0]["heads"] = {1: [1, 2]}
    with pytest.raises(RecipeError, match="part of a group") as info:
        attnsteer.plan(llama, recipe)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_steers_and_equals_the_formula(family, tmp_path):
    model = build_tiny(family)
    projections = random_projections(model, [1, 2, 3])
    ids, mask, focus = batch()
    assert (archs.resolve(model).spec.key_projection == "k_norm") == (family in NORM_FAMILIES)
    recipe = recipe_for(tmp_path, projections, layers=[1, 2, 3])
    with Formula(model, projections, focus):
        expected = forward(model, ids, mask)
    with attnsteer.apply(model, recipe) as handle:
        got = forward(model, ids, mask, handle, focus)
    assert (real(got, mask) - real(forward(model, ids, mask), mask)).abs().max() > 1e-3
    torch.testing.assert_close(real(got, mask), real(expected, mask), atol=2e-5, rtol=2e-5)


def test_no_focus_span_on_a_text_model_is_an_error(llama, tmp_path):
    recipe = recipe_for(tmp_path, random_projections(llama, [3]), layers=[3])
    ids, mask, _ = batch()
    with attnsteer.apply(llama, recipe):
        with pytest.raises(attnsteer.SteeringError, match="focus"):
            forward(llama, ids, mask)


# ---- the file a recipe carries --------------------------------------------------------------------------
def test_recipe_errors_name_the_field_the_file_and_the_fix(llama, tmp_path, monkeypatch):
    projections = random_projections(llama, [2, 3])
    recipe = recipe_for(tmp_path, projections, layers=[2, 3])
    data = recipe.to_dict()
    no_file = {"interventions": [{"method": "seka"}]}  # loads, and cannot steer
    with pytest.raises(RecipeError, match=r"params.projections: not set") as info:
        attnsteer.plan(llama, no_file)
    assert "Fix: build projections" in str(info.value) and "attnsteer calibrate seka" in str(info.value)
    cases = []
    for key, value, needle in [
        ("sha256", "0" * 64, "has sha256"),  # a file that is not the recorded one
        ("sha256", None, "params.projections.sha256: got None"),
        ("path", "missing.safetensors", "does not exist"),
    ]:
        broken = json.loads(json.dumps(data))
        broken["interventions"][0]["params"]["projections"][key] = value
        cases.append((broken, needle, "Fix:"))
    for bad, needle, fix in cases:
        with pytest.raises(RecipeError, match="Fix:") as info:
            Recipe.from_dict(bad, folder=tmp_path)
        assert needle in str(info.value) and fix in str(info.value), str(info.value)
    # a dict with a relative path reads it from the current directory
    monkeypatch.chdir(tmp_path)
    assert attnsteer.load_recipe(data) == recipe
    # a layer the file does not hold
    data["interventions"][0]["layers"] = [1, 2]
    with pytest.raises(RecipeError, match="layer 1") as info:
        attnsteer.plan(llama, data)
    assert "holds layers [2, 3]" in str(info.value) and "Fix:" in str(info.value)


def test_changed_truncated_and_inconsistent_files_are_refused(llama, tmp_path):
    projections = random_projections(llama, [2, 3])
    recipe = recipe_for(tmp_path, projections, layers=[2, 3])
    file = tmp_path / "p.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0xFF  # one changed byte
    file.write_bytes(bytes(raw))
    with pytest.raises(RecipeError, match="changed, truncated or replaced") as info:
        attnsteer.load_recipe(recipe)
    assert str(file) in str(info.value) and "Fix:" in str(info.value)
    # a recipe written for a truncated file: its bytes match, but it is no safetensors file
    (tmp_path / "t.safetensors").write_bytes(projections.to_bytes()[:-100])
    cut = recipe.to_dict()
    cut["interventions"][0]["params"]["projections"] = {
        "path": "t.safetensors",
        "sha256": file_sha256(tmp_path / "t.safetensors"),
    }
    with pytest.raises(RecipeError, match="not a readable safetensors file") as info:
        attnsteer.plan(llama, Recipe.from_dict(cut, folder=tmp_path))
    assert "t.safetensors" in str(info.value) and "attnsteer calibrate seka" in str(info.value)
    # tensors that do not match the file's own metadata (wrong shapes)
    from safetensors.torch import save

    meta = {**facts(llama), "format": "attnsteer.seka.projections", "version": 1, "layers": [2, 3], "negative": False}
    tensors = {f"layers.{l}.pos": torch.zeros(2, 8, 8) for l in (2, 3)}
    (tmp_path / "s.safetensors").write_bytes(save(tensors, metadata={"attnsteer": json.dumps(meta)}))
    cut["interventions"][0]["params"]["projections"] = {
        "path": "s.safetensors",
        "sha256": file_sha256(tmp_path / "s.safetensors"),
    }
    with pytest.raises(RecipeError, match="does not match its own metadata") as info:
        attnsteer.plan(llama, Recipe.from_dict(cut, folder=tmp_path))
    assert "s.safetensors" in str(info.value) and "(2, 16, 16)" in str(info.value)


def test_hash_covers_the_file_content_not_its_name(llama, tmp_path):
    one = random_projections(llama, [3], seed=1)
    first = recipe_for(tmp_path, one, layers=[3])
    renamed = recipe_for(tmp_path, one, layers=[3], name="other-name.safetensors")
    other = recipe_for(tmp_path, random_projections(llama, [3], seed=2), layers=[3], name="x.safetensors")
    assert first.hash == renamed.hash != other.hash
    assert first != other


# ---- the builder on SmolLM2 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(smollm2):
    tokenizer, model = smollm2
    return build_projections(model, tokenizer, EXAMPLES, layers="1:3", top_pct=0.9, min_diff=0.0, model_id="smollm2")


def smol_inputs(tokenizer):
    context = "The capital of France is Lyon."
    text = f"Context: {context}\nQuestion: What is the capital of France?\nAnswer:"
    enc = tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0]
    start = text.index(context)
    focus = (offsets[:, 1] > start) & (offsets[:, 0] < start + len(context))
    return enc, focus.view(1, -1)


def test_builder_is_deterministic_and_its_file_reloads_to_the_same_logits(smollm2, built, tmp_path):
    tokenizer, model = smollm2
    again = build_projections(model, tokenizer, EXAMPLES, layers="1:3", top_pct=0.9, min_diff=0.0, model_id="smollm2")
    assert built.to_bytes() == again.to_bytes()  # byte-identical
    meta = built.meta
    assert meta["layers"] == [1, 2] and meta["build"]["used"] == 4 and meta["build"]["tokens"] >= 12
    for layer in (1, 2):  # P+ and P- are orthogonal projections (symmetric, idempotent), P+ of low rank
        for proj in (built.pos[layer], built.neg[layer]):
            torch.testing.assert_close(proj @ proj, proj, atol=1e-5, rtol=0)
            torch.testing.assert_close(proj, proj.transpose(-1, -2), atol=1e-6, rtol=0)
        assert all(0 < k < 64 for k, _ in meta["ranks"][str(layer)])
    file = built.save(tmp_path / "a.safetensors")
    loaded = Projections.load(file)
    assert all(torch.equal(loaded.pos[l], built.pos[l]) and torch.equal(loaded.neg[l], built.neg[l]) for l in (1, 2))
    enc, focus = smol_inputs(tokenizer)
    recipe = seka_recipe(built, file, g_pos=2.0, g_neg=0.5)
    with torch.no_grad():
        base = model(**enc).logits
        with attnsteer.apply(model, recipe) as handle, handle.focus(focus):
            steered = model(**enc).logits
        saved = recipe.save_pretrained(tmp_path / "shared")
        with attnsteer.apply(model, Recipe.from_pretrained(saved.parent)) as handle, handle.focus(focus):
            reloaded = model(**enc).logits
    assert (steered - base).abs().max() > 1e-2
    assert torch.equal(reloaded, steered)
    # the file of another model is refused when planned
    with pytest.raises(RecipeError, match="built for another model") as info:
        attnsteer.plan(build_tiny("llama"), recipe)
    assert "num_layers 30 (this model: 4)" in str(info.value) and "attnsteer calibrate seka" in str(info.value)


def test_builder_skips_examples_it_cannot_use_and_reads_jsonl(smollm2, tmp_path):
    tokenizer, model = smollm2
    odd = [*EXAMPLES[:2], QAExample("Nothing to see here.", "Where?", "elsewhere", "Why?", where="odd line")]
    projections = build_projections(model, tokenizer, odd, layers=[1], min_diff=0.0)
    assert projections.meta["build"]["used"] == 2 and "odd line" in projections.meta["build"]["skipped"][0]
    with pytest.raises(UsageError, match="no usable example"):
        build_projections(model, tokenizer, odd[2:], layers=[1])
    data = tmp_path / "qa.jsonl"
    data.write_text('{"context": "A b c.", "question": "Q?"}\n')
    with pytest.raises(UsageError, match="line 1") as info:
        read_examples(data)
    assert "answer" in str(info.value) and "Fix:" in str(info.value)


# ---- sharing a recipe with its file ----------------------------------------------------------------------
class FakeHub:
    """huggingface_hub.HfApi / hf_hub_download over a folder: tmp/hub/<repo> (one commit per upload)."""

    def __init__(self, root: Path):
        self.root, self.commits, self.downloads = root, [], []

    def api(self, token=None, **_):
        hub = self

        class Api:
            def create_repo(self, repo_id, **_):
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
                return SimpleNamespace(repo_id=repo_id)

            def upload_folder(self, *, folder_path, repo_id, **kwargs):
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
                hub.commits.append({"files": sorted(p.name for p in Path(folder_path).iterdir()), **kwargs})
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits)}")

        return Api()

    def download(self, repo_id, filename, *, revision=None, **_):
        self.downloads.append(filename)
        cached = self.root.parent / "cache" / repo_id / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / repo_id / filename, cached)
        return str(cached)


def test_save_pretrained_and_push_to_hub_carry_the_file(llama, tmp_path, monkeypatch, capsys):
    projections = random_projections(llama, [2, 3])
    (tmp_path / "made").mkdir()
    recipe = recipe_for(tmp_path / "made", projections, layers=[2, 3])
    folder = recipe.save_pretrained(tmp_path / "saved").parent
    assert sorted(p.name for p in folder.iterdir()) == ["p.safetensors", "recipe.yaml"]
    again = Recipe.from_pretrained(folder)
    assert again == recipe and again.hash == recipe.hash
    assert again.carried_files[0].resolved == folder / "p.safetensors"
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("attnsteer.hub.reachable", lambda timeout=3.0: True)
    pushed = again.push_to_hub("me/seka-tiny")
    assert hub.commits[0]["files"] == ["p.safetensors", "recipe.yaml"] and pushed.hash == recipe.hash
    pulled = attnsteer.load_recipe("hf://me/seka-tiny")
    assert hub.downloads == ["recipe.yaml", "p.safetensors"] and pulled == recipe and pulled.hash == recipe.hash
    ids, mask, focus = batch()
    with attnsteer.apply(llama, recipe) as handle:
        want = forward(llama, ids, mask, handle, focus)
    with attnsteer.apply(llama, pulled) as handle:
        assert torch.equal(forward(llama, ids, mask, handle, focus), want)
    # `attnsteer recipes pull` writes the carried file beside recipe.yaml, so the folder loads as is
    from attnsteer.cli import main

    assert main(["recipes", "pull", "me/seka-tiny", "--out", str(tmp_path / "pulled")]) == 0
    assert "carried file:" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == ["p.safetensors", "recipe.yaml"]
    assert Recipe.from_pretrained(tmp_path / "pulled").hash == recipe.hash
    # a different local carried file is replaced only with --force
    local = tmp_path / "pulled" / "p.safetensors"
    local.write_bytes(random_projections(llama, [2, 3], seed=5).to_bytes())
    edited = local.read_bytes()
    assert main(["recipes", "pull", "me/seka-tiny", "--out", str(tmp_path / "pulled")]) == 2
    assert "already holds a different file" in capsys.readouterr().err and local.read_bytes() == edited
    assert main(["recipes", "pull", "me/seka-tiny", "--out", str(tmp_path / "pulled"), "--force"]) == 0
    capsys.readouterr()
    assert Recipe.from_pretrained(tmp_path / "pulled").hash == recipe.hash  # the carried file checks out again
    # a changed file in the repo is refused
    (hub.root / "me/seka-tiny/p.safetensors").write_bytes(random_projections(llama, [2, 3], seed=9).to_bytes())
    with pytest.raises(RecipeError, match="changed, truncated or replaced"):
        attnsteer.load_recipe("hf://me/seka-tiny")


# ---- the command line ------------------------------------------------------------------------------------
def test_calibrate_seka_command_writes_the_file_and_a_recipe_naming_it(smollm2, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"context": c, "question": q, "answer": a}) + "\n" for c, q, a in QA))
    out = tmp_path / "out" / "seka-smollm2.yaml"
    argv = ["calibrate", "seka", "--model", "smollm2", "--data", data, "--out", out, "--layers", "1:3"]
    code = main([str(a) for a in [*argv, "--min-diff", "0", "--g-pos", "2", "--name", "mine"]])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "| 1 |" in printed and "wrote" in err
    file = out.with_name("seka-smollm2.seka.safetensors")
    recipe = attnsteer.load_recipe(out)
    assert recipe.name == "mine" and recipe.interventions[0].layers == [1, 2]
    assert recipe.carried_files[0].resolved == file and recipe.carried_files[0].sha256 == file_sha256(file)
    assert recipe.interventions[0].params["g_pos"] == 2.0
    tokenizer, model = smollm2
    enc, focus = smol_inputs(tokenizer)
    with torch.no_grad():
        base = model(**enc).logits
        with attnsteer.apply(model, recipe) as handle, handle.focus(focus):
            assert (model(**enc).logits - base).abs().max() > 1e-2
    # help ends with a runnable example; a bad data file is one clear paragraph
    assert main(["calibrate", "seka", "--help"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].strip().startswith("attnsteer calibrate seka")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    code = main(["calibrate", "seka", "--model", "smollm2", "--data", str(tmp_path / "bad.jsonl"), "--out", str(out)])
    assert code == 2 and "line 1" in capsys.readouterr().err


def test_calibrate_seka_library_returns_what_it_wrote_and_prints_nothing(smollm2, tmp_path, capsys):
    """``attnsteer.calibrate.seka.calibrate``: the command's work from a typed config, on a loaded
    model; the result carries the table's data; bad settings are refused before anything runs."""
    from attnsteer.calibrate.seka import SekaCalibrationConfig, calibrate, format_table

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"context": c, "question": q, "answer": a}) + "\n" for c, q, a in QA))
    out = tmp_path / "lib" / "seka.yaml"
    config = SekaCalibrationConfig(model="smollm2", data=data, out=out, layers=[1, 2], min_diff=0.0, g_pos=2.0)
    lines = []
    result = calibrate(config, loaded=smollm2, progress=lines.append)
    assert capsys.readouterr() == ("", "") and lines == []  # loaded: nothing to log; the library never prints
    assert result.path == out and result.projections_path == out.with_name("seka.seka.safetensors")
    assert attnsteer.load_recipe(out) == result.recipe and result.recipe.name == "seka-smollm2"
    meta = result.projections.meta
    assert meta["layers"] == [1, 2] and result.projected_heads == sum(map(len, meta["projected"].values())) > 0
    saved = Projections.load(result.projections_path)
    assert {k: v for k, v in saved.meta.items() if k in meta} == meta and "| 2 |" in format_table(result.projections)
    tokenizer, model = smollm2
    enc, focus = smol_inputs(tokenizer)
    with torch.no_grad():
        base = model(**enc).logits
        with attnsteer.apply(model, result.recipe) as handle, handle.focus(focus):
            assert (model(**enc).logits - base).abs().max() > 1e-2
    for bad, needle in (
        ({"top_pct": 1.5}, "top_pct: got 1.5"),
        ({"min_diff": -1.0}, "min_diff: got -1.0"),
        ({"layers": "x:y"}, "--layers: got 'x:y'"),
        ({"limit": 0}, "--limit 0: expected a positive integer. Fix"),
        ({"g_neg": "a"}, "--g-neg 'a': expected a number. Fix: e.g. --g-neg 0.2"),
    ):
        with pytest.raises(UsageError, match=re.escape(needle)):
            SekaCalibrationConfig(data=data, out=tmp_path / "never.yaml", **bad)
    assert not (tmp_path / "never.yaml").exists()
