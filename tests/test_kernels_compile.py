"""The Triton kernels compile for real GPUs: ahead-of-time compilation to sm_90 / sm_80 cubin
through the real launchers, no GPU needed (``attnsteer.kernels.compile_check``).

The interpreter tests (tests/test_kernels.py) check the numbers but never run Triton's compiler;
these tests do, so a kernel that cannot compile (a non-constexpr global, an unsupported ``tl.dot``
shape, ...) or that spills registers fails here instead of falling back to PyTorch, or crawling,
on a user's GPU. Each check runs in a fresh Python process with an empty Triton cache (so it really
compiles, and timings mean something): Triton's interpreter, which test_kernels.py runs in the
pytest process, leaves ``triton.language`` patched after running a kernel, after which nothing
compiles in that process.

The command line is ``benchmarks/compile_check.py``. Skipped without triton or without its NVIDIA
backend and ptxas. The default run compiles every
kernel and mode once for sm_90 (bf16, D = 128; about 20-30 s on 2 CPU cores); the ``slow`` one
the whole matrix for sm_90 and sm_80.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from attnsteer.kernels import compile_check as CC  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not CC.nvidia_backend_available(), reason="triton's NVIDIA backend (with ptxas for sm_80 / sm_90) is not installed"
)


def _run(code: str, cache_dir, interpret: bool = False, timeout: int = 1800):
    """Run ``code`` in a fresh interpreter with its own Triton cache; it prints one JSON document last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


COMPILE = """
    import json, dataclasses
    from attnsteer.kernels import compile_check as CC
    records = CC.compile_variants({cc}, {dtypes!r}, {dims!r}, scope={scope!r})
    print(json.dumps([dataclasses.asdict(r) for r in records], default=str))
"""


def _problems(records, cc):
    """Failures, spills and shared-memory overflows, one line each."""
    limit = CC.SHARED_LIMIT[cc]
    out = []
    for r in records:
        where = f"{r['kernel']} [{r['variant']}; {r['dtype']}, D={r['head_dim']}, sm_{cc}]"
        if not r["ok"]:
            out.append(f"{where}: {r['error']}")
            continue
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            out.append(f"{where}: spills {r['spill_store_bytes']} / {r['spill_load_bytes']} B per thread")
        if not r["registers"] or r["registers"] > 255:
            out.append(f"{where}: registers {r['registers']}")
        if r["shared_bytes"] is None or r["shared_bytes"] > limit:
            out.append(f"{where}: shared memory {r['shared_bytes']} B > {limit}")
    return out


def test_variants_cover_every_launcher_mode():
    """The enumeration itself (nothing compiled): every kernel mode is in the smoke set, and the
    matrix adds group counts 2-4, integer / half-integer / general p, MHA and the masks."""
    import torch

    def labels(scope):
        return [f"{k} {v}" for k, v, _ in CC.variants(torch.bfloat16, 128, scope)]

    smoke, modes, full = labels("smoke"), labels("modes"), labels("full")
    for want in (
        "row_stats lse;",
        "row_stats lse + row max",
        "row_stats 4 groups, online",
        "row_stats 4 groups, lse given",
        "column_stats",
        "attention plain",
        "attention 4-group bias, lse given",
        "attention 4-group bias, online",
        "attention reweight p=1.5",
        "attention reweight p=0.7",
        "decode plain",
        "decode 2 groups (masses and group outputs)",
        "decode 4 groups (masses and group outputs)",
        "decode reweight;",
        "decode reweight, 128 splits",
    ):
        assert any(label.startswith(want) for label in smoke), want
    for want in (
        "row_stats 2 groups, online",
        "row_stats 3 groups, lse given",
        "attention 2-group bias, online",
        "attention reweight p=1.0",
        "decode 3 groups (masses and group outputs)",
    ):
        assert any(label.startswith(want) for label in modes) and not any(label.startswith(want) for label in smoke)
    assert len(set(smoke)) == len(smoke) and len(set(full)) == len(full)
    for want in ("mha 32/32, contiguous, causal", "gqa 32/8, (B,L,H,D) strides, padding+window"):
        assert any(want in label for label in full) and not any(want in label for label in modes), want


def test_every_kernel_mode_compiles_for_sm90(tmp_path):
    """Every kernel and mode once (bf16, head dim 128, GQA 32/8 with transformers' strides, padding):
    the prefill passes, re-weighting with half-integer and general p, decode of each rule kind. No failure,
    no register spill, shared memory within H100's per-block limit."""
    records = _run(COMPILE.format(cc=90, dtypes=("bfloat16",), dims=(128,), scope="smoke"), tmp_path)
    assert not _problems(records, 90), _problems(records, 90)
    names = {r["kernel"] for r in records}
    assert names == {
        "row_stats",
        "column_stats",
        "attn_fwd",
        "decode_split",
        "decode_merge",
        "decode_split(scores)",
        "decode_split(reweight)",
    }, names
    assert all(r["cc"] == 90 for r in records)


def test_compile_only_in_an_interpreter_process_restores_everything(tmp_path):
    """In a process that runs the interpreter (TRITON_INTERPRET=1, as the CPU test suite does) the
    compile-only mode still compiles real kernels, and afterwards the launchers' state, triton's
    active driver, the interpret knob, the environment and triton's language library are what they
    were: the next kernel call runs interpreted and is right."""
    result = _run(
        """
        import json, os, torch
        import triton.language as tl
        from triton import knobs
        from triton.runtime import driver
        from attnsteer import kernels as K
        from attnsteer.kernels import compile_check as CC, ops

        def snapshot():
            return {"driver": id(getattr(driver, "_active", None)), "knob": knobs.runtime.interpret,
                    "env": os.environ.get("TRITON_INTERPRET"), "max": type(tl.max).__name__,
                    "sum": type(tl.standard.sum).__name__, "tensor_max": id(tl.core.tensor.max),
                    "state": sorted(map(str, ops._STATE))}

        ops.kernels()  # the interpreted kernels are defined, as in the test suite
        before = snapshot()
        records = CC.compile_variants(90, ("float16",), (64,), scope="smoke", only="^(row_stats lse;|decode 2 groups)")
        after = snapshot()
        q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
        out, _ = K.attention(q, k, v, K.MaskSpec(q_offset=0), 0.25)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.expand(1, 2, 5, 16), v.expand(1, 2, 5, 16), is_causal=True, scale=0.25).transpose(1, 2)
        err = float((out - ref).abs().max())
        try:  # an interpreted kernel ran: triton 3.9 leaves triton.language patched -> clear refusal
            CC.compile_variants(90, ("float16",), (64,), scope="smoke", only="^row_stats lse;")
            leak = "no error"
        except CC.InterpreterLeakError as exc:
            leak = str(exc)
        print(json.dumps({"before": before, "after": after, "err": err, "leak": leak,
                          "interpreted": ops._STATE["interpreted"],
                          "ok": [r.ok for r in records], "kernels": [r.kernel for r in records],
                          "compiled": all(r.registers for r in records)}))
    """,
        tmp_path,
        interpret=True,
    )
    assert result["ok"] == [True] * 3 and result["compiled"], result
    assert result["kernels"] == ["row_stats", "decode_split", "decode_merge"], result
    assert result["before"] == result["after"], result
    assert result["before"]["knob"] is True and result["before"]["env"] == "1", result
    assert result["before"]["max"] == "InterpretedFunction" and result["interpreted"] is True, result
    assert result["err"] < 1e-5, result
    # if a later triton restores what its interpreter patches, the check simply compiles
    assert result["leak"] == "no error" or "fresh process" in result["leak"], result


def test_a_kernel_that_cannot_compile_is_reported(tmp_path):
    """Compile errors are reported, not passed (the check found a plain-float NEG_INF global this
    way): with NEG_INF a plain float again, the calls fail with triton's CompilationError."""
    result = _run(
        """
        import json
        from attnsteer.kernels import compile_check as CC
        only = "^(row_stats lse;|attention plain)"
        good = CC.compile_variants(90, ("float16",), (64,), scope="smoke", only=only)
        CC._compiled_kernel_module().NEG_INF = float("-inf")  # not a constexpr: compiled code may not read it
        bad = CC.compile_variants(90, ("float16",), (80,), scope="smoke", only=only)  # new shapes: not cached
        print(json.dumps({"good": [r.ok for r in good], "bad": [[r.ok, r.error] for r in bad]}))
    """,
        tmp_path,
    )
    assert result["good"] == [True, True]
    assert len(result["bad"]) == 2 and not any(ok for ok, _ in result["bad"]), result["bad"]
    assert all("CompilationError" in err for _, err in result["bad"]), result["bad"]


def test_cli_writes_the_reports(tmp_path):
    """``python benchmarks/compile_check.py`` writes compile_sm<cc>.md / .json (with the versions
    and the command) and exits 0 when everything compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO)  # this checkout's attnsteer, whatever is installed
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "compile_check.py"),
            "--arch",
            "80",
            "--dtype",
            "float16",
            "--head-dim",
            "64",
            "--scope",
            "smoke",
            "--only",
            "^column_stats",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "compile_sm80.json").read_text())
    assert doc["cc"] == 80 and doc["triton"] and doc["torch"] and "ptxas" in doc["ptxas"]
    assert [r["kernel"] for r in doc["records"]] == ["column_stats"] and doc["records"][0]["ok"]
    command = (
        "python benchmarks/compile_check.py --arch 80 --dtype float16 --head-dim 64 --scope smoke "
        "--only '^column_stats'"
    )
    assert doc["command"] == command and doc["scope"] == "smoke" and doc["head_dims"] == [64]
    text = (tmp_path / "out" / "compile_sm80.md").read_text()
    assert "sm_80" in text and "| column_stats |" in text and f"`{command}`" in text
    assert proc.stdout.strip() == text.strip() and "sm_80: 1 builds, 0 failed" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cc", [90, 80])
def test_the_whole_matrix_compiles_without_spills(cc, tmp_path):
    """fp16 / bf16 / fp32 x head dims 64 / 80 / 128 / 256 x every constexpr variant (group counts 2-4,
    integer / half-integer / general p, every decode rule), plus GQA and MHA, transformers' and
    contiguous strides, causal / padding / window masks for bf16 at D = 128 (about 5 min per arch
    on 2 CPU cores). ``python benchmarks/compile_check.py --scope full`` is the same with the
    layouts and masks for every dtype and head dim (the reports in evals/kernels/)."""
    records = _run(
        COMPILE.format(cc=cc, dtypes=tuple(CC.DTYPES), dims=CC.HEAD_DIMS, scope="modes"), tmp_path, timeout=3600
    )
    records += _run(COMPILE.format(cc=cc, dtypes=("bfloat16",), dims=(128,), scope="full"), tmp_path, timeout=3600)
    assert not _problems(records, cc), _problems(records, cc)
