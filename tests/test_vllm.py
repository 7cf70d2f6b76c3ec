"""attnsteer inside vLLM (CPU): greedy tokens and per-token logprobs of vLLM with a recipe equal
attnsteer's Hugging Face path with the same recipe; a batch equals each request alone; refused
methods fail at engine start. Runs only where vLLM is installed (CI: scripts/setup_vllm.sh)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")

from vllm_fixtures import IMAGE_PROMPTS, build_tiny_idefics3, build_tiny_llama, make_image, run_vllm  # noqa: E402

import attnsteer  # noqa: E402

RECIPES = {
    "softplus": {"interventions": [{"method": "softplus", "params": {"p": 2.0, "offset": 1.0}}]},
    "act": {"interventions": [{"method": "act", "layers": "all", "params": {"beta": 0.3, "threshold": 0.05}}]},
    "act-all": {  # decode steps reuse each prompt's own sinks
        "interventions": [
            {"method": "act", "layers": "all", "params": {"beta": 0.3, "threshold": 0.05, "apply_to": "all"}}
        ]
    },
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


def _hf_generate(model, prompt_ids, recipe, focus=None, inputs=None, max_tokens=MAX_TOKENS):
    """Greedy tokens and the logprob of each, from attnsteer's Hugging Face path; ``focus``:
    [[start, end], ...] prompt spans for ``handle.focus``; ``inputs``: the processor's inputs
    (pixel values too) when the prompt has an image."""
    inputs = inputs if inputs is not None else {"input_ids": torch.tensor([prompt_ids])}
    ids = inputs["input_ids"]
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0, **inputs)  # fmt: skip
    if recipe is None:
        out = model.generate(**kwargs)
    else:
        with attnsteer.apply(model, recipe) as handle:
            if focus is None:
                out = model.generate(**kwargs)
            else:
                mask = torch.zeros_like(ids, dtype=torch.bool)
                for start, end in focus:
                    mask[0, start:end] = True
                with handle.focus(mask):
                    out = model.generate(**kwargs)
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
    got, proc = _vllm(tiny, tmp_path, recipe, whole_prompts=name in ("act", "act-all"))
    expected = [_hf_generate(hf, row["prompt_ids"], recipe) for row in got["batch"]]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)  # a batch of requests == each request alone
    if recipe is None:
        assert got["recipe_info"] is None
        return
    unsteered = [_hf_generate(hf, row["prompt_ids"], None) for row in got["batch"]]
    assert any((torch.tensor(e[1]) - torch.tensor(u[1])).abs().max() > 1e-3 for e, u in zip(expected, unsteered)), (
        "the recipe changes nothing on this model: the test would not see a wrong path"
    )
    if name == "act-all":  # decode steps are steered too: prefill-only ACT would give other logprobs
        prefill_only = [_hf_generate(hf, row["prompt_ids"], RECIPES["act"]) for row in got["batch"]]
        assert any((torch.tensor(e[1]) - torch.tensor(p[1])).abs().max() > 1e-3 for e, p in zip(expected, prefill_only))
    assert attnsteer.load_recipe(recipe).hash in proc.stderr  # the recipe and its hash are logged
    info = {"recipe": "unnamed", "hash": attnsteer.load_recipe(recipe).hash, "per_request_recipes": False}
    assert got["recipe_info"] == info  # attnsteer.vllm.recipe_info(llm)


def test_a_preempted_request_recomputed_in_one_forward_equals_the_hugging_face_path(tiny, hf, tmp_path):
    """A KV cache too small for the batch: vLLM preempts a request and later recomputes its prompt
    and generated tokens in one forward; ACT (apply_to: all) steers the prompt rows as its prefill and
    the generated rows as decode steps, as on the Hugging Face path."""
    tokens = 30
    recipe = RECIPES["act-all"]
    out = tmp_path / "out.json"
    proc = run_vllm(tiny, _saved(tmp_path, "act", recipe), out, tokens, whole_prompts=True, kv_blocks=3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(out.read_text())
    assert got["preemptions"] >= 1  # otherwise this test would not see the recompute
    expected = [_hf_generate(hf, row["prompt_ids"], recipe, max_tokens=tokens) for row in got["batch"]]
    _assert_same(got["batch"], expected)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"interventions": [{"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}]}, "params.gamma"),
        ({"interventions": [{"method": "agla"}]}, "agla does not run inside vLLM"),
        ({"interventions": [{"method": "vhr"}]}, "per_prompt VHR"),
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
    bad = [{"focus": [[3, 999]]}, {"focus": "1-4"}, {"fokus": [[1, 4]]}, {"recipe": "softplus-gentle"}]
    proc = run_vllm(tiny, str(path), out, MAX_TOKENS, focus=focus, prefix_caching="off", bad_extra=bad)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(out.read_text())
    # malformed per-request inputs are the client's error, raised at admission; the engine keeps serving
    errors = got["bad_request_errors"]
    assert all(e and e.startswith("VLLMValidationError") for e in errors), errors
    assert "span [3, 999] is not [start, end) within the prompt" in errors[0]
    assert "expected a non-empty list of spans" in errors[1]
    assert "expected a dict with keys among ['focus', 'recipe']" in errors[2]
    assert "takes no recipe per request" in errors[3]
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
    refused = _saved(tmp_path, "refused", {"interventions": [{"method": "vhr"}]})  # per-prompt VHR
    bad = [{"recipe": refused}, {"focus": [[0, 2]]}]
    proc = run_vllm(tiny, None, out, MAX_TOKENS, recipes=paths, prefix_caching="off", bad_extra=bad)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(out.read_text())
    errors = got["bad_request_errors"]  # refused at admission, before any worker sees them
    assert "per_prompt VHR" in errors[0] and "no method that reads focus spans" in errors[1], errors
    expected = [_hf_generate(hf, row["prompt_ids"], r) for row, r in zip(got["batch"], chosen)]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)


def test_per_request_recipes_with_prefix_caching_are_refused_at_engine_start(tiny, tmp_path):
    path = _saved(tmp_path, "r", RECIPES["softplus"])
    proc = run_vllm(tiny, None, tmp_path / "out.json", recipes=[path, None, None], prefix_caching="on", timeout=200)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "prefix caching would hand one request's blocks to another" in logs, logs[-3000:]


IMAGE_RECIPES = {  # tau 2.5: the tiny model has no massive activations; a low threshold finds sinks in both layers
    "pai": {"interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.8}}]},
    "var": {
        "interventions": [
            {"method": "var", "layers": "all", "params": {"tau": 2.5, "p": 0.6, "rho": 0.2, "min_image_attention": 0.1}}
        ]
    },
    # the newer methods, composed in one engine: a key_scale and an elementwise score rule, a head rule
    "vaf+hgai+spin": {
        "interventions": [
            {"method": "vaf", "layers": [0], "params": {"alpha": 1.6, "beta": 0.6}},
            {"method": "hgai", "layers": [1], "params": {"alpha": 0.8}},
            {"method": "spin", "layers": "all", "params": {"rho": 0.5, "eps": 0.1}},
        ]
    },
}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_idefics3(tmp_path_factory.mktemp("vllm-vlm"))


@pytest.fixture(scope="module")
def hf_vlm(tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_vlm)


def _image_inputs(processor, text, seed):
    images = [[make_image(seed)]] if seed is not None else None
    return dict(processor(text=[text], images=images, return_tensors="pt"))


@pytest.mark.parametrize("name", list(IMAGE_RECIPES))
def test_image_methods_steer_the_placeholders_vllm_gives(tiny_vlm, hf_vlm, tmp_path, name):
    """A vision-language model (tiny Idefics3: image tokens between wrapper and tile tokens, so the
    placeholders' is_embed mask matters): image keys from vLLM's multimodal placeholders == image
    tokens on the Hugging Face path; a request without an image in the batch runs unsteered."""
    model, processor = hf_vlm
    recipe = IMAGE_RECIPES[name]
    got, proc = _vllm(tiny_vlm, tmp_path, recipe, images=True, whole_prompts=True)
    expected, unsteered = [], []
    for row, (text, seed) in zip(got["batch"], IMAGE_PROMPTS):
        inputs = _image_inputs(processor, text, seed)
        assert inputs["input_ids"][0].tolist() == row["prompt_ids"]  # the same prompt on both sides
        unsteered.append(_hf_generate(model, None, None, inputs=inputs))
        expected.append(_hf_generate(model, None, recipe, inputs=inputs) if seed is not None else unsteered[-1])
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)
    for (text, seed), e, u in zip(IMAGE_PROMPTS, expected, unsteered):
        if seed is not None:  # the recipe changes every image request: a wrong path would show
            assert (torch.tensor(e[1]) - torch.tensor(u[1])).abs().max() > 1e-3, text
    assert "image placeholders" in proc.stderr


@pytest.mark.parametrize(
    "recipe, options, match",
    [
        (IMAGE_RECIPES["pai"], {"prefix_caching": "on"}, "prefix caching hands a request KV blocks"),
        (IMAGE_RECIPES["var"], {"whole_prompts": True, "eager": False}, "enforce_eager=True"),
        (IMAGE_RECIPES["var"], {"prefix_caching": "off"}, "chunked prefill is on"),
    ],
)
def test_image_methods_refuse_engines_that_would_change_their_result(tiny_vlm, tmp_path, recipe, options, match):
    path = _saved(tmp_path, "r", recipe)
    proc = run_vllm(tiny_vlm, path, tmp_path / "out.json", images=True, timeout=200, **options)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and match in logs, logs[-3000:]
    assert not (tmp_path / "out.json").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_vllm_serve_steers_and_shows_the_recipe_hash_in_v1_models(tiny, hf, tmp_path):
    """``vllm serve`` with $ATTNSTEER_RECIPE: /v1/models names the recipe and its hash, and a greedy
    completion equals attnsteer's Hugging Face path with that recipe."""
    recipe = RECIPES["softplus"]
    path = _saved(tmp_path, "served", recipe)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    # the API server `vllm serve` starts (vllm-cpu's `vllm` command looks up a distribution named "vllm" and fails)
    args = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(tiny), "--port", str(port),
            "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--enforce-eager", "--max-model-len", "256",
            "--max-num-seqs", "4", "--served-model-name", "tiny"]  # fmt: skip
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ATTNSTEER_RECIPE": path})
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
                time.sleep(2)
        card = models["data"][0]
        assert card["id"] == "tiny"
        assert card["attnsteer"] == {"recipe": "unnamed", "hash": attnsteer.load_recipe(recipe).hash,
                                     "per_request_recipes": False}  # fmt: skip
        prompt_ids = [1, 40, 64, 81, 22, 90, 100, 120]
        body = {"model": "tiny", "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 1,
                "ignore_eos": True, "return_tokens_as_token_ids": True}  # fmt: skip
        choice = _post(f"http://127.0.0.1:{port}/v1/completions", body)["choices"][0]
        tokens = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        _assert_same([{"tokens": tokens, "logprobs": choice["logprobs"]["token_logprobs"]}],
                     [_hf_generate(hf, prompt_ids, recipe)])  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_toy_methods_of_every_attention_kind_run_in_vllm_with_no_backend_file_touched(tiny, hf, tmp_path):
    """tests/toy_methods.py's toys -- a score, a group (its groups found from the layer's input at
    prefill), a re-weight and a head rule -- imported into every engine process through
    ATTNSTEER_METHODS, equal the Hugging Face path: the vLLM backend runs rule kinds, not methods."""
    import toy_methods  # noqa: F401  (registers the toys here too, for the Hugging Face side)

    recipe = {
        "interventions": [
            {"method": "toy_score", "layers": [0], "params": {"c": 2.0}},
            {"method": "toy_reweight", "layers": [0], "params": {"c": 2.0}},
            {"method": "toy_group", "layers": [1], "params": {"c": 3.0}},
            {"method": "toy_head", "layers": [1], "params": {"c": 2.0}},
        ]
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    got, _ = _vllm(
        tiny, tmp_path, recipe, whole_prompts=True, env={"ATTNSTEER_METHODS": "toy_methods", "PYTHONPATH": path}
    )
    expected = [_hf_generate(hf, row["prompt_ids"], recipe) for row in got["batch"]]
    _assert_same(got["batch"], expected)
    _assert_same(got["alone"], expected)
    unsteered = [_hf_generate(hf, row["prompt_ids"], None) for row in got["batch"]]
    assert any((torch.tensor(e[1]) - torch.tensor(u[1])).abs().max() > 1e-3 for e, u in zip(expected, unsteered))


def test_a_key_rule_is_refused_at_engine_start_not_silently_dropped(tiny, tmp_path):
    import toy_methods  # noqa: F401

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    recipe = _saved(tmp_path, "key", {"interventions": [{"method": "toy_key", "layers": [0], "params": {"c": 2.0}}]})
    proc = run_vllm(
        tiny, recipe, tmp_path / "out.json", timeout=200, env={"ATTNSTEER_METHODS": "toy_methods", "PYTHONPATH": path}
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "toy_key edits keys before RoPE (a key rule)" in logs, logs[-3000:]
    assert not (tmp_path / "out.json").exists()
