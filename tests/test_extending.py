"""docs/extending.md, followed: toy methods (tests/toy_methods.py, one file's worth of code each)
stating one rule of each kind, run on every backend that claims the kind -- reference, chunked,
CPU flash, Triton under the interpreter (vLLM: tests/test_vllm.py) -- with no backend file touched;
and a family attnsteer does not ship, added by one declarative entry."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from conftest import TINY_TEXT, VOCAB, build_tiny
from toy_methods import TOYS, toy

import attnsteer
from attnsteer import archs, compat
from attnsteer.attention import router
from attnsteer.errors import AttnsteerWarning, RecipeError, SteeringError
from attnsteer.methods import METHODS
from attnsteer.methods.base import register
from attnsteer.methods.rules import ScoreRule

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def toys():
    """The toy methods (tests/toy_methods.py registers them when imported, as a method module does)."""
    assert all(METHODS[name] is cls for name, cls in TOYS.items())
    return TOYS


def _ids(batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _inputs():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _logits(model, recipe, backend, ids, mask):
    with torch.no_grad(), attnsteer.apply(model, recipe, backend=backend) as handle:
        out = model(input_ids=ids, attention_mask=mask).logits
        stats = handle.stats()
    return out, stats


# which backends claim each attention kind (the capability tables, read, not restated)
def _claims(kind: str, form: str = "elementwise") -> list[str]:
    def claims(cap) -> bool:
        return kind in cap.kinds and (kind != "score" or cap.score_forms is None or form in cap.score_forms)

    names = [n for n in router.BACKENDS if claims(router.backend(n).CAPABILITY)]
    if not INTERPRETER:
        names = [n for n in names if n != "triton"]
    return names


@pytest.mark.parametrize(
    "name, kind, form",
    [
        ("toy_score", "score", "elementwise"),
        ("toy_key_scale", "score", "key_scale"),
        ("toy_group", "group", None),
        ("toy_reweight", "reweight", None),
    ],
)
def test_an_attention_rule_of_each_kind_runs_on_every_backend_that_claims_it(toys, name, kind, form, monkeypatch):
    if INTERPRETER:
        monkeypatch.setenv("ATTNSTEER_TRITON", "1")
    model = build_tiny("llama")
    ids, mask = _inputs()
    valid = mask.bool()
    recipe = {"interventions": [{"method": name, "heads": {1: [0, 2], 3: [1, 2, 3]}, "params": {"c": 3.0}}]}
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    ref, _ = _logits(model, recipe, "reference", ids, mask)
    assert (ref - base)[valid].abs().max() > 1e-3  # the toy steers: the comparisons below are not vacuous
    backends = _claims(kind, form)
    assert {"reference", "chunked"} <= set(backends) and ("flash" in backends) == (kind != "score")
    assert ("keyscale" in backends) == (form == "key_scale")
    for backend in backends:
        out, stats = _logits(model, recipe, backend, ids, mask)
        torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=2e-5, msg=lambda m, b=backend: f"{b}: {m}")
        assert {s["layer"] for s in stats if s["fired"]} == {1, 3}
        assert all(set(s["paths"]) == {f"{backend}/prefill"} for s in stats), stats
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)  # removed exactly
    for backend in set(router.BACKENDS) - set(backends) - {"triton"}:  # forced on a backend without the kind
        reason = f"{kind} rule" if backend != "keyscale" or kind != "score" else "score rules of form elementwise"
        with pytest.raises(SteeringError, match=f"backend='{backend}' cannot run layer 1's prefill call: {reason}"):
            _logits(model, recipe, backend, ids, mask)


def test_a_head_rule_runs_after_any_backend(toys):
    model = build_tiny("llama")
    ids, mask = _inputs()
    valid = mask.bool()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    only_heads = {"interventions": [{"method": "toy_head", "layers": [1], "params": {"c": 4.0}}]}
    out, stats = _logits(model, only_heads, "auto", ids, mask)
    assert (out - base)[valid].abs().max() > 1e-3 and stats[0]["paths"] == {}  # the model's own attention
    # with a weight rule on the same layer the head rule scales that backend's output
    both = {
        "interventions": [
            {"method": "toy_reweight", "layers": [1], "params": {"c": 2.0}},
            {"method": "toy_head", "layers": [1], "params": {"c": 4.0}},
        ]
    }
    ref, _ = _logits(model, both, "reference", ids, mask)
    for backend in ("chunked", "flash"):
        got, stats = _logits(model, both, backend, ids, mask)
        torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=2e-5)
        assert all(s["fired"] for s in stats)


def test_a_key_rule_equals_the_score_scaling_it_implies(toys):
    """Scaling the first token's keys by c before RoPE (a rotation: linear) multiplies every score
    on that key by c -- in the prefill and, the edited key living in the cache, in decode steps."""
    model = build_tiny("llama")
    ids = _ids(1, 9)

    class KeyZeroScores(ScoreRule):
        def inputs(self, rows, prompt):
            return {"first": (rows.key_abs == 0).view(1, 1, 1, -1)}

        def modify(self, s, first):
            return torch.where(first, s * self.method.p.c, s)

    register(toy("toy_key_scores", [KeyZeroScores]))
    try:
        out = {}
        for name in ("toy_key", "toy_key_scores"):
            recipe = {"interventions": [{"method": name, "layers": [1, 2], "params": {"c": 2.5}}]}
            with torch.no_grad(), attnsteer.apply(model, recipe, backend="auto") as handle:
                first = model(input_ids=ids, use_cache=True)
                step = model(
                    input_ids=ids[:, -1:], use_cache=True, **compat.with_cache(model, compat.output_cache(first))
                )
                out[name] = (first.logits, step.logits)
                assert all(s["fired"] for s in handle.stats())
    finally:
        METHODS.pop("toy_key_scores")
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert (out["toy_key"][0] - base).abs().max() > 1e-3
    for got, want in zip(out["toy_key"], out["toy_key_scores"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_model_step_runs_under_generate(toys):
    model = build_tiny("llama")
    ids = _ids(1, 9)
    recipe = {"interventions": [{"method": "toy_logits", "layers": [1], "params": {"c": 2.0}}]}
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = model.generate(ids, **kwargs)
        with attnsteer.apply(model, recipe):
            steered = model.generate(ids, **kwargs)
    assert torch.equal(base.sequences, steered.sequences)  # a temperature keeps the greedy choice
    for b, s in zip(base.logits, steered.logits):
        torch.testing.assert_close(s, b / 2.0)


def test_a_toy_method_is_validated_and_identity_skipped(toys):
    with pytest.raises(RecipeError, match=r"params\.c"):
        attnsteer.load_recipe({"interventions": [{"method": "toy_score", "params": {"c": 0}}]})
    model = build_tiny("llama")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", AttnsteerWarning)
        plan = attnsteer.plan(model, {"interventions": [{"method": "toy_score", "params": {"c": 1.0}}]})
    assert plan.layers == {} and any("identity" in str(w.message) for w in record)


def test_no_backend_names_a_method():
    """The backends implement rule kinds: no method name, and no branch on one, appears in them."""
    root = os.path.join(os.path.dirname(attnsteer.__file__))
    names = sorted(METHODS)
    found = []
    for folder in ("attention", "kernels", "vllm"):
        for file in sorted(os.listdir(os.path.join(root, folder))):
            if not file.endswith(".py"):
                continue
            text = open(os.path.join(root, folder, file), encoding="utf-8").read()
            for name in names:
                for quoted in (f'"{name}"', f"'{name}'", f".name == {name!r}"):
                    if quoted in text:
                        found.append(f"{folder}/{file}: {quoted}")
            if ".name ==" in text or ".name !=" in text:
                found.append(f"{folder}/{file}: a branch on a method's name")
    assert not found, found


# Methods added on the rule interface after it landed: each one file under attnsteer/methods/
ADDED_ON_THE_INTERFACE = ("vaf", "spin", "seka", "hgai")


@pytest.mark.parametrize("name", ADDED_ON_THE_INTERFACE)
def test_methods_added_on_the_interface_need_no_backend_change(name):
    """Every rule such a method states is of a kind (and score form, and score input) the backends
    already implement, by their capability tables: adding it touched no file under attention/,
    kernels/ or vllm/ (test_no_backend_names_a_method checks no backend names it)."""
    from attnsteer.methods.rules import KINDS, SCORE_READS

    cls = METHODS.get(name)
    if cls is None:
        pytest.skip(f"{name} is not registered in this checkout")
    module = sys.modules[cls.__module__]
    assert module.__file__.endswith(f"methods/{name}.py")  # one file
    rule_classes = [
        obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__ and
        hasattr(obj, "kind")
    ]  # fmt: skip
    assert rule_classes, f"{name} states no rule"
    capabilities = [router.backend(n).CAPABILITY for n in router.BACKENDS]
    for rule in rule_classes:
        assert rule.kind in KINDS
        if rule.kind in ("score", "group", "reweight"):
            fast = [
                c.name for c in capabilities if rule.kind in c.kinds and c.name != "reference" and
                (rule.kind != "score" or c.score_forms is None or rule.form in c.score_forms)
            ]  # fmt: skip
            assert "chunked" in fast, (rule, fast)
        if rule.kind == "score":
            assert set(rule.reads) <= set(SCORE_READS), rule.reads


def test_a_family_added_by_one_declarative_entry(monkeypatch):
    from transformers import AutoModelForCausalLM, Olmo2Config

    assert "olmo2" not in archs.ARCHS
    monkeypatch.setitem(archs.ARCHS, "olmo2", archs.ArchSpec("olmo2"))  # the one entry
    cfg = Olmo2Config(**TINY_TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = _ids()
    recipe = {"interventions": [{"method": "softplus", "layers": "all", "params": {"p": 2.0}}]}
    with torch.no_grad():
        base = model(input_ids=ids).logits
        out = {}
        for backend in ("reference", "auto"):
            with attnsteer.apply(model, recipe, backend=backend):
                out[backend] = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)
        with attnsteer.apply(model, recipe):
            first = model(input_ids=ids, use_cache=True)
            step = model(input_ids=ids[:, -1:], use_cache=True, **compat.with_cache(model, compat.output_cache(first)))
            full = model(input_ids=torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1]
    torch.testing.assert_close(out["auto"], out["reference"], atol=2e-5, rtol=2e-5)
    assert (out["auto"] - base).abs().max() > 1e-4
    torch.testing.assert_close(step.logits[:, -1], full, atol=2e-5, rtol=2e-5)
