"""attnsteer inside vLLM (CPU): greedy tokens and per-token logprobs of vLLM with a recipe equal
attnsteer's Hugging Face path with the same recipe; a batch equals each request alone; refused
methods fail at engine start. Runs only where vLLM is installed (CI: scripts/setup_vllm.sh)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("vllm")

from vllm_fixtures import build_tiny_llama, run_vllm  # noqa: E402

import attnsteer  # noqa: E402

RECIPES = {
    "softplus": {"interventions": [{"method": "softplus", "params": {"p": 2.0, "offset": 1.0}}]},
    "act": {"interventions": [{"method": "act", "layers": "all", "params": {"beta": 0.3, "threshold": 0.05}}]},
    "vhr-fixed": {
        "interventions": [
            {"method": "vhr", "heads": {0: [1], 1: [0, 3]}, "params": {"selection": "fixed", "alpha": 3.0}}
        ]
    },
}
MAX_TOKENS = 6
LOGPROB_TOL = 2e-4  # float32 on both sides; vLLM's CPU kernel vs PyTorch differ by ~1e-6 per layer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def _hf_generate(model, prompt_ids, recipe, focus=None):
    """Greedy tokens and the logprob of each, from attnsteer's Hugging Face path; ``focus``:
    [[start, end], ...] prompt spans for ``handle.focus``."""
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    if recipe is None:
        out = model.generate(input_ids=ids, **kwargs)
    else:
        with attnsteer.apply(model, recipe) as handle:
            if focus is None:
                out = model.generate(input_ids=ids, **kwargs)
            else:
                mask = torch.zeros_like(ids, dtype=torch.bool)
                for start, end in focus:
                    mask[0, start:end] = True
                with handle.focus(mask):
                    out = model.generate(input_ids=ids, **kwargs)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def _vllm(tiny, tmp_path, recipe, **kw):
    out = tmp_path / "out.json"
    path = None
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        attnsteer.load_recipe(recipe).save(path)
    proc = run_vllm(tiny, str(path) if path else None, out, MAX_TOKENS, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc


def _assert_same(vllm_rows, hf_rows):
    for v, (tokens, logprobs) in zip(vllm_rows, hf_rows):
        assert v["tokens"] == tokens
        torch.testing.assert_close(torch.tensor(v["logprobs"]), torch.tensor(logprobs), atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("name", [None, *RECIPES])
def test_vllm_with_a_recipe_equals_the_hugging_face_path(tiny, hf, tmp_path, name):
    recipe = RECIPES.get(name)
    got, proc = _vllm(tiny, tmp_path, recipe, whole_prompts=name == "act")
    expected = [_hf_generate(hf, row["prompt_ids"], recipe) for row in got["batch"]]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)  # a batch of requests == each request alone
    if recipe is not None:
        unsteered = [_hf_generate(hf, row["prompt_ids"], None) for row in got["batch"]]
        assert any((torch.tensor(e[1]) - torch.tensor(u[1])).abs().max() > 1e-3 for e, u in zip(expected, unsteered)), (
            "the recipe changes nothing on this model: the test would not see a wrong path"
        )
        assert attnsteer.load_recipe(recipe).hash in proc.stderr  # the recipe and its hash are logged


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"interventions": [{"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}]}, "params.gamma"),
        ({"interventions": [{"method": "var"}]}, "var does not run inside vLLM"),
        ({"interventions": [{"method": "vhr"}]}, "per_prompt VHR"),
        ({"interventions": [{"method": "act", "params": {"apply_to": "all"}}]}, "apply_to: all"),
    ],
)
def test_refused_methods_fail_at_engine_start(tiny, tmp_path, recipe, match):
    path = tmp_path / "recipe.yaml"
    attnsteer.load_recipe(recipe).save(path)
    proc = run_vllm(tiny, None, tmp_path / "out.json", env={"ATTNSTEER_RECIPE": str(path)}, timeout=120)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and match in logs, logs[-3000:]


def test_act_with_chunked_prefill_is_refused_at_engine_start(tiny, tmp_path):
    path = tmp_path / "recipe.yaml"
    attnsteer.load_recipe(RECIPES["act"]).save(path)
    proc = run_vllm(tiny, str(path), tmp_path / "out.json", timeout=200)
    logs = proc.stdout + proc.stderr  # vLLM's workers log to stdout
    assert proc.returncode != 0 and "chunked prefill is on" in logs, logs[-3000:]
    assert not (tmp_path / "out.json").exists()


def test_tensor_parallel_maps_global_heads_to_each_rank(tiny, hf, tmp_path):
    """Tensor-parallel size 2: rank 0 holds query heads 0-1, rank 1 heads 2-3; head selectors that
    span both ranks steer the same heads as on the Hugging Face model."""
    recipe = {
        "interventions": [
            {"method": "softplus", "layers": [0], "heads": {0: [1, 2]}, "params": {"p": 2.5, "offset": 1.0}},
            {"method": "vhr", "heads": {0: [3], 1: [0, 2]}, "params": {"selection": "fixed", "alpha": 3.0}},
        ]
    }
    path = tmp_path / "recipe.yaml"
    attnsteer.load_recipe(recipe).save(path)
    out = tmp_path / "out.json"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU backend needs a CPU per rank")
    # vLLM's CPU workers each bind their threads to CPUs: one per rank here
    proc = run_vllm(tiny, str(path), out, MAX_TOKENS, tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "rank 1/2 steers layers [0, 1]" in proc.stderr
    got = json.loads(out.read_text())
    expected = [_hf_generate(hf, row["prompt_ids"], recipe) for row in got["batch"]]
    _assert_same(got["batch"], expected)


def test_pai_steers_the_focus_spans_each_request_gives(tiny, hf, tmp_path):
    """Per-request roles: SamplingParams.extra_args focus spans == handle.focus on the Hugging Face
    path; a request without spans in the same batch runs unsteered."""
    recipe = {"interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.8}}]}
    focus = [[[1, 4]], None, [[0, 2], [5, 9]]]
    path = tmp_path / "recipe.yaml"
    attnsteer.load_recipe(recipe).save(path)
    out = tmp_path / "out.json"
    proc = run_vllm(tiny, str(path), out, MAX_TOKENS, focus=focus)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(out.read_text())
    expected = [
        _hf_generate(hf, row["prompt_ids"], recipe if spans else None, spans) for row, spans in zip(got["batch"], focus)
    ]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)
    unsteered = _hf_generate(hf, got["batch"][0]["prompt_ids"], None)
    assert (torch.tensor(expected[0][1]) - torch.tensor(unsteered[1])).abs().max() > 1e-3


def _saved(tmp_path, name, recipe):
    path = tmp_path / f"{name}.yaml"
    attnsteer.load_recipe(recipe).save(path)
    return str(path)


def test_requests_with_different_recipes_or_none_batch_together(tiny, hf, tmp_path):
    """Per-request recipes: one batch with a softplus request, an unsteered one and a fixed-head
    VHR one; each equals the Hugging Face path with its own recipe, and each request alone."""
    chosen = [RECIPES["softplus"], None, RECIPES["vhr-fixed"]]
    paths = [_saved(tmp_path, f"r{i}", r) if r else None for i, r in enumerate(chosen)]
    out = tmp_path / "out.json"
    proc = run_vllm(tiny, None, out, MAX_TOKENS, recipes=paths, prefix_caching="off")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(out.read_text())
    expected = [_hf_generate(hf, row["prompt_ids"], r) for row, r in zip(got["batch"], chosen)]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)


def test_per_request_recipes_with_prefix_caching_are_refused_at_engine_start(tiny, tmp_path):
    path = _saved(tmp_path, "r", RECIPES["softplus"])
    proc = run_vllm(tiny, None, tmp_path / "out.json", recipes=[path, None, None], prefix_caching="on", timeout=200)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "prefix caching would hand one request's blocks to another" in logs, logs[-3000:]
