"""Bad input a new user gives the CLI: unusable output paths, files that are not images, empty
prompts, a non-positive search budget, image recipes on a text model, a hub id with no network.
Each is refused with one paragraph naming the flag, the value and the fix -- before any model
loads (or, where the check needs the model, before any generation, evaluation or timing)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest
from test_cli import CHAT_TEMPLATE, _save_tiny_llama

from attnsteer.cli import main
from attnsteer.errors import UsageError

# what loads or builds a model, by the name each command reaches it under
LOADERS = [
    ("attnsteer.models", "load_checked"),
    ("attnsteer.models", "load_model"),
    ("attnsteer.models", "load_smollm2"),
    ("attnsteer.evals.vlm", "load_vlm"),
    ("attnsteer.speed.models", "build_model"),
]


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every model loader records its call and fails: the list must stay empty."""
    calls: list[str] = []
    for module, name in LOADERS:

        def record(*args, _name=name, **kwargs):
            calls.append(_name)
            raise AssertionError(f"{_name} ran before the bad input was refused")

        monkeypatch.setattr(f"{module}.{name}", record)
    return calls


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-chat"), CHAT_TEMPLATE)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    from PIL import Image

    (tmp_path / "a-file.txt").write_text("not a folder\n")
    (tmp_path / "fake.png").write_text("not an image\n")
    (tmp_path / "a-folder").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "real.png")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Describe the image.", "image": "real.png"}\n')
    (tmp_path / "captions.jsonl").write_text('{"image_id": 42, "caption": "a dog"}\n')
    return {
        "file": tmp_path / "a-file.txt",
        "fake": tmp_path / "fake.png",
        "folder": tmp_path / "a-folder",
        "image": tmp_path / "real.png",
        "prompts": tmp_path / "prompts.jsonl",
        "captions": tmp_path / "captions.jsonl",
    }


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error(err: str) -> str:
    """The single error paragraph of a refused command."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def _write_recipe(folder: Path, name: str, method: str, params: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ninterventions:\n  - method: {method}\n" + (f"    params: {params}\n" if params else "")
    )
    return path


# ---- 1. output paths ----------------------------------------------------------------------------------
def _output_cases(f: dict, target: Path) -> dict[str, tuple[str, list]]:
    """command -> (flag, argv) writing to ``target``."""
    gen = ["generate", "--model", "smollm2", "--recipe", "act-default", "--prompt", "hi"]
    return {
        "generate": ("--output_path", [*gen, "--output_path", target]),
        "generate-json": ("--output_path", [*gen, "--output_path", target / "answers.json"]),
        "generate-views": ("--save-views", [*gen, "--image", f["image"], "--save-views", target]),
        "eval-mmlu": ("--output_path", ["eval", "mmlu", "--model", "smollm2", "--tasks", "attnsteer_mc_demo",
                                        "--output_path", target]),
        "eval-pope": ("--output_path", ["eval", "pope", "--model", "org/llava", "--pope_dir", f["folder"],
                                        "--coco_dir", f["folder"], "--output_path", target]),
        "eval-chair": ("--output_path", ["eval", "chair", "--model", "org/llava", "--output_path", target]),
        "eval-chair-rescore": ("--output_path", ["eval", "chair", "--captions", f["captions"], "--output_path",
                                                 target]),
        "eval-speed": ("--output_path", ["eval", "speed", "--model", "llama-tiny", "--random-weights", "--recipe",
                                         "act-default", "--output_path", target]),
        "calibrate-act": ("--out", ["calibrate", "act", "--out", target / "act.yaml"]),
        "calibrate-var": ("--out", ["calibrate", "var", "--model", "org/llava", "--prompts", f["prompts"], "--out",
                                    target / "var.yaml"]),
        "calibrate-vhr": ("--out", ["calibrate", "vhr", "--fixed-heads", "--model", "org/llava", "--prompts",
                                    f["prompts"], "--out", target / "recipes"]),
        "inspect": ("--out", ["inspect", "--model", "smollm2", "--recipe", "act-default", "--prompt", "hi", "--out",
                              target]),
        "recipes-pull": ("--out", ["recipes", "pull", "me/my-act", "--out", target / "recipe.yaml"]),
    }  # fmt: skip


COMMANDS = list(_output_cases({k: Path() for k in ("image", "folder", "captions", "prompts")}, Path()))


@pytest.mark.parametrize("command", COMMANDS)
def test_output_path_that_is_a_file_or_under_one_is_refused_first(capsys, files, loads, command):
    flag, argv = _output_cases(files, files["file"])[command]
    code, _, err = run(capsys, *argv)
    error = one_error(err)
    assert code == 2 and loads == []
    assert error.startswith("attnsteer: error: " + flag) and "a-file.txt" in error and "Fix: pass a" in error
    assert "existing file" in error or "is a file, so no folder can be created under it" in error


@pytest.mark.parametrize(
    "command", ["generate", "generate-json", "eval-mmlu", "eval-speed", "calibrate-act", "inspect"]
)
def test_read_only_output_folder_is_refused_first(capsys, files, loads, monkeypatch, tmp_path, command):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # root ignores permission bits: deny writes here as a user's would be
        if mode & os.W_OK and Path(path).resolve() == read_only.resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    flag, argv = _output_cases(files, read_only / "run")[command]
    code, _, err = run(capsys, *argv)
    error = one_error(err)
    assert code == 2 and loads == []
    assert error.startswith("attnsteer: error: " + flag) and "read-only" in error
    assert "cannot be written (permission denied or a read-only file system)" in error and "Fix: pass a" in error


def test_generate_output_json_may_exist_but_not_be_a_folder_or_read_only(tmp_path, monkeypatch):
    from attnsteer.cli._common import output_file

    existing = tmp_path / "answers.json"
    existing.write_text("{}")
    assert output_file(str(existing), "attnsteer_generate.json") == existing  # overwritten at the end: fine
    assert output_file(str(tmp_path / "new"), "attnsteer_generate.json") == tmp_path / "new" / "attnsteer_generate.json"
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UsageError, match=r"--output_path .*dir\.json.*existing folder, and a file is expected.*Fix"):
        output_file(str(tmp_path / "dir.json"), "attnsteer_generate.json")
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: not (mode & os.W_OK))
    with pytest.raises(UsageError, match=r"--output_path .*answers\.json.*cannot be written.*Fix"):
        output_file(str(existing), "attnsteer_generate.json")


# ---- 2. --image -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "inspect"])
@pytest.mark.parametrize(
    "which, says",
    [
        ("fake", "not an image PIL can read"),
        ("folder", "that is a folder, not an image file"),
        ("missing", "no such file"),
    ],
)
def test_image_that_is_not_an_image_file_is_refused_before_the_model_loads(
    capsys, files, loads, tmp_path, command, which, says
):
    image = files.get(which, tmp_path / "missing.png")
    argv = ["--model", "org/llava", "--recipe", "act-default", "--prompt", "hi", "--image", image]
    code, _, err = run(capsys, command, *argv, *(["--out", tmp_path / "pics"] if command == "inspect" else []))
    error = one_error(err)
    assert code == 2 and loads == []
    assert f"--image {str(image)!r}: {says}" in error and "Fix: pass the path of an image file" in error


# ---- 3. empty prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "inspect"])
@pytest.mark.parametrize("prompt", ["", "   "])
@pytest.mark.parametrize("chat", [[], ["--no-chat"]])
def test_empty_prompt_is_refused_before_the_model_loads(capsys, loads, tmp_path, command, prompt, chat):
    argv = ["--model", "smollm2", "--recipe", "act-default", "--prompt", prompt, *chat]
    code, _, err = run(capsys, command, *argv, *(["--out", tmp_path / "pics"] if command == "inspect" else []))
    error = one_error(err)
    assert code == 2 and loads == []
    assert f"--prompt {prompt!r}: the prompt is empty" in error and "Fix: pass the text to answer" in error


def test_empty_prompt_among_several_names_which(capsys, loads):
    code, _, err = run(capsys, "generate", "--model", "smollm2", "--recipe", "act-default", "--prompt", "hi", " ")
    assert code == 2 and loads == [] and "--prompt ' ' (prompt 2): the prompt is empty" in one_error(err)


# ---- 5. calibrate act --budget ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["0", "-3", "many"])
def test_calibrate_act_budget_must_be_positive(capsys, loads, tmp_path, budget):
    code, _, err = run(capsys, "calibrate", "act", "--budget", budget, "--out", tmp_path / "act.yaml")
    error = one_error(err)
    assert code == 2 and loads == []
    assert f"argument --budget: expected a positive integer, got {budget!r}" in error and "Fix" in error


def test_calibrate_act_library_refuses_a_non_positive_budget(tmp_path, monkeypatch):
    from attnsteer.calibrate import act

    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(UsageError, match=r"--budget .*positive integer.*Fix: e\.g\. --budget 6000"):
            act.check_budget(bad)
    with pytest.raises(UsageError, match="--budget 0"):
        act.Search(None, tmp_path / "state.json", {}, 0)
    assert not (tmp_path / "state.json").exists()
    monkeypatch.setattr(act, "load_task", lambda *a, **k: pytest.fail("the data was read before the budget check"))
    for bad in (0, -1, 2.5, True, "10"):  # as a Python caller could pass it: the config refuses it
        with pytest.raises(UsageError, match=r"--budget .*positive integer.*Fix: e\.g\. --budget 6000"):
            act.ActCalibrationConfig(out=tmp_path / "act.yaml", budget=bad)
    from attnsteer.cli import calibrate_act

    parser = argparse.ArgumentParser()
    calibrate_act.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "act.yaml")])
    args.budget = 0  # set past the flag's own check: the command refuses it before reading any data
    with pytest.raises(UsageError, match="--budget 0"):
        calibrate_act.run(args)


# ---- 6. recipes that steer toward image tokens, on a text model -------------------------------------------
@pytest.mark.parametrize("method, params", [("var", ""), ("pai", ""), ("vhr", "{selection: per_prompt}")])
def test_recipes_validate_says_an_image_recipe_cannot_run_on_a_text_model(capsys, tmp_path, tiny_model, method, params):
    path = _write_recipe(tmp_path, f"{method}-any", method, params)
    code, out, err = run(capsys, "recipes", "validate", path, "--model", tiny_model)
    assert code == 2 and out.startswith(f"valid: {path}")  # the file itself is fine ...
    assert [line for line in err.splitlines() if not line.startswith(("Loading", "  loaded"))] == [
        err.strip().splitlines()[-1]
    ]
    assert f"CANNOT RUN on --model {str(tiny_model)!r}: {path} is valid in itself, but it cannot run from the " in err
    assert f"--recipe '{method}-any'" in err and f"['{method}']" in err and "text-only model" in err  # ... not here
    assert "Fix: use a vision-language --model" in err and "handle.focus(mask)" in err


def test_generate_refuses_an_image_recipe_on_a_text_model_before_generating(capsys, tmp_path, tiny_model, monkeypatch):
    import attnsteer.demo

    ran = []
    monkeypatch.setattr(attnsteer.demo, "run_prompts", lambda *a, **k: ran.append(1))
    path = _write_recipe(tmp_path, "var-any", "var")
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--recipe", "act-default", path, "--prompt", "hi")
    error = one_error(err)
    assert code == 2 and ran == []
    assert "--recipe 'var-any' cannot run here: its method(s) ['var'] steer attention toward image tokens" in error
    assert "Fix: use a vision-language --model" in error and "handle.focus(mask)" in error


def test_eval_speed_refuses_an_image_recipe_without_image_tokens_before_timing(capsys, tmp_path, monkeypatch):
    from attnsteer.speed import timing

    timed = []
    monkeypatch.setattr(timing, "run_once", lambda *a, **k: timed.append(1))
    path = _write_recipe(tmp_path, "var-any", "var")
    code, _, err = run(
        capsys, "eval", "speed", "--model", "llama-tiny", "--random-weights", "--recipe", path, "--prompt-len", "16",
        "--output_path", tmp_path / "speed",
    )  # fmt: skip
    error = one_error(err)
    assert code == 2 and timed == [] and not (tmp_path / "speed").exists()
    assert "--recipe 'var-any' cannot run here" in error and "['var']" in error
    assert "--image-tokens N" in error  # eval speed's own way to give it an image span


def test_eval_mmlu_refuses_an_image_recipe_before_evaluating(capsys, tmp_path, tiny_model, monkeypatch):
    import lm_eval

    evaluated = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: evaluated.append(1))
    path = _write_recipe(tmp_path, "pai-any", "pai")
    code, _, err = run(
        capsys, "eval", "mmlu", "--model", tiny_model, "--tasks", "attnsteer_mc_demo", "--recipe", "none", path,
        "--limit", "1", "--output_path", tmp_path / "run",
    )  # fmt: skip
    error = one_error(err)
    assert code == 2 and evaluated == []
    assert "--recipe 'pai-any' cannot run here" in error and "['pai']" in error and "Fix" in error
    assert not (tmp_path / "run").exists()  # refused before the first sample: no run directory is left behind


def test_check_recipes_knows_whether_the_inputs_carry_images(tmp_path):
    from vlm_fixtures import build_vlm

    from attnsteer.plan import check_recipes

    var = [("var-any", str(_write_recipe(tmp_path, "var-any", "var")))]
    llava = build_vlm("llava")
    check_recipes(llava, var, "tiny-llava")  # a VLM fed images: fine
    check_recipes(llava, var, "tiny-llava", images=True)
    with pytest.raises(UsageError, match=r"--recipe 'var-any' cannot run here: .*prompts carry no image.*Fix"):
        check_recipes(llava, var, "tiny-llava", images=False)  # e.g. lm-eval's text prompts


# ---- 7. a hub id with no network ---------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub.constants

    import attnsteer.models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    monkeypatch.setattr(attnsteer.hub, "reachable", lambda timeout=3.0: False)


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["generate", "--model", "some-org/not-here", "--recipe", "act-default", "--prompt", "hi"],
            "hub is not reachable",
        ),
        (["eval", "speed", "--model", "some-org/not-here", "--recipe", "act-default"], "hub is not reachable"),
        (["eval", "mmlu", "--model", "some-org/not-here", "--tasks", "attnsteer_mc_demo"], "hub is not reachable"),
        (["recipes", "validate", "some-org/not-here"], "the Hub could not be reached"),
    ],
)
def test_hub_miss_offline_fails_fast(capsys, loads, no_hub, tmp_path, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code, _, err = run(capsys, *argv)
    elapsed = time.perf_counter() - start
    assert code == 2 and says in err and "Fix" in err and loads == []
    assert elapsed < 1.0, f"took {elapsed:.1f} s (download retries?)"


def test_a_cached_hub_model_loads_from_the_cache_alone_when_the_hub_is_unreachable(no_hub, monkeypatch):
    import huggingface_hub

    from attnsteer import hub, models

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert models.resolve_model("some-org/cached", None) == ("some-org/cached", {"local_files_only": True})
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: True)
    assert models.resolve_model("some-org/cached", None) == ("some-org/cached", {})


def test_hub_probe_is_bounded_and_remembered(monkeypatch):
    import socket

    from attnsteer import hub

    calls = []

    def hanging(*args, **kwargs):  # a resolver or firewall that never answers
        calls.append(1)
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", hanging)
    start = time.perf_counter()
    assert hub.reachable(timeout=0.2) is False
    assert hub.reachable(timeout=0.2) is False  # remembered: no second probe
    assert time.perf_counter() - start < 0.8 and calls == [1]


# ---- 8. a run that stops says how to resume ----------------------------------------------------------------
def test_eval_mmlu_interrupted_says_how_to_resume_and_resumes(capsys, tmp_path, tiny_model, monkeypatch):
    import lm_eval

    real = lm_eval.simple_evaluate
    calls = []

    def interrupted_second(*args, **kwargs):  # Ctrl-C during the second recipe
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupted_second)
    run_dir = tmp_path / "run"
    argv = ["eval", "mmlu", "--model", tiny_model, "--tasks", "attnsteer_mc_demo", "--recipe", "none",
            "softplus-gentle", "--limit", "2", "--bootstrap_iters", "0", "--no_cache", "--output_path", run_dir]  # fmt: skip
    code, _, err = run(capsys, *argv)
    hint = f"rerun the same command (with --output_path {run_dir}) to resume it"
    assert code == 130 and f"the run in {run_dir} was interrupted; 1 finished sample(s) are kept: {hint}" in err
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted" and record["resume"] == hint  # not a bare "running"
    calls.clear()
    code, _, err = run(capsys, *argv)
    assert code == 0 and f"resuming {run_dir}: 1 finished item(s) are kept, 1 to go" in err
    assert len(calls) == 1  # only the interrupted recipe ran again
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"
