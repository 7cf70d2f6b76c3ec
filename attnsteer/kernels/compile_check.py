"""Compile every Triton kernel variant for NVIDIA GPUs without a GPU (ahead of time, to cubin).

Triton's interpreter (``TRITON_INTERPRET=1``) checks the kernels' numbers on CPU but never runs
the compiler: type errors, unsupported shapes of ``tl.dot``, register spills and shared-memory
overflows only show up when the kernels are compiled for a real target. This module compiles them
for a chosen compute capability (sm_90 H100, sm_80 A100, ...) on any machine where triton ships
its NVIDIA backend (the Linux wheels do, with ptxas), and reports the resources of each variant.

It goes through the real launchers of :mod:`attnsteer.kernels.ops` (``row_stats``,
``column_stats``, ``attention``, ``decode``) with small CPU tensors, so exactly the variants those
launchers would launch are compiled: same constexprs, strides, specialisations, ``num_warps`` and
``num_stages``. Inside :func:`compile_only` the launchers call ``JITFunction.warmup`` (compile,
no launch) against a stand-in CUDA driver that names the target; a non-interpreted copy of the
kernel module is used even when the process runs the interpreter, and everything (the active
driver, the launchers' state) is restored afterwards.

    python -m attnsteer.kernels.compile_check --arch 90 --arch 80 --output evals/kernels
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import ops

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HEAD_DIMS = (64, 80, 128)


@dataclass
class KernelBuild:
    """One compiled kernel (or the error that stopped it)."""

    kernel: str
    variant: str
    cc: int
    dtype: str
    head_dim: int
    ok: bool
    seconds: float
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None


def nvidia_backend_available() -> bool:
    """Whether triton and its NVIDIA backend (with ptxas) are installed."""
    try:
        import triton
    except Exception:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


def _fake_driver(cc: int):
    """A stand-in for triton's CUDA driver: names the target, never touches a device."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver

    class TargetOnlyCudaDriver(GPUDriver):
        def __init__(self):
            self.target = GPUTarget("cuda", cc, 32)

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):  # pragma: no cover - never used: nothing runs
            raise NotImplementedError

        def get_empty_cache_for_benchmark(self):  # pragma: no cover
            raise NotImplementedError

        def clear_cache(self, cache):  # pragma: no cover
            pass

        def map_python_to_cpp_type(self, ty):  # pragma: no cover
            return ty

    return TargetOnlyCudaDriver()


_COMPILED_MODULE: dict = {}


def _compiled_kernel_module():
    """A copy of ``_triton.py`` defined with the interpreter off (kernels are JITFunctions)."""
    mod = _COMPILED_MODULE.get("mod")
    if mod is None:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            path = Path(__file__).with_name("_triton.py")
            spec = importlib.util.spec_from_file_location("attnsteer.kernels._triton_compiled", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _COMPILED_MODULE["mod"] = mod
    return mod


class InterpreterLeakError(RuntimeError):
    """Triton's interpreter ran in this process and left ``triton.language`` patched."""


def _check_language_unpatched() -> None:
    """Triton 3.9's interpreter does not always restore ``triton.language.core`` after running a
    kernel; compiling afterwards then fails with errors that have nothing to do with the kernels.
    Refuse clearly instead of reporting them as kernel failures."""
    import triton.language as tl

    if not tl.core.is_builtin(tl.core.where):
        raise InterpreterLeakError(
            "Triton's interpreter ran in this process and left triton.language patched, so nothing can be "
            "compiled here. Fix: run the compile check in a fresh process (python -m attnsteer.kernels.compile_check)"
        )


@contextlib.contextmanager
def compile_only(cc: int = 90):
    """Inside: the launchers of :mod:`ops` compile for sm_<cc> instead of launching; yields the list
    of ``(launcher name, CompiledKernel)`` they append to. Restores everything on exit."""
    from triton.runtime import driver

    _check_language_unpatched()
    ops.available()  # settle triton's availability before swapping state
    saved = {key: ops._STATE.get(key, _MISSING) for key in ("kernels", "interpreted", "compile_only")}
    saved_driver = getattr(driver, "_active", None)
    builds: list = []
    driver.set_active(_fake_driver(cc))
    ops._STATE.update(kernels=_compiled_kernel_module(), interpreted=False, compile_only=builds)
    try:
        yield builds
    finally:
        for key, value in saved.items():
            if value is _MISSING:
                ops._STATE.pop(key, None)
            else:
                ops._STATE[key] = value
        driver._active = saved_driver  # None again if no driver had been chosen (CPU machines)


_MISSING = object()


# ---- the variants ---------------------------------------------------------------------------------
def _qkv(dtype, d, hq=32, hkv=8, b=2, q_len=64, k_len=64, transposed=True):
    """q (B, Hq, Q, D), k/v (B, Hkv, K, D); ``transposed``: views of (B, L, H, D) tensors, the
    strides transformers hands to attention functions."""
    def make(h, n):
        if transposed:
            return torch.zeros(b, n, h, d, dtype=dtype).transpose(1, 2)
        return torch.zeros(b, h, n, d, dtype=dtype)

    return make(hq, q_len), make(hkv, k_len), make(hkv, k_len)


def variants(dtype: torch.dtype, d: int, full: bool = True):
    """(kernel label, variant, call) for every kernel mode the launchers support; ``full=False``
    keeps one call per kernel and mode (the GQA / MHA, stride and mask variations dropped)."""
    k = ops
    scale = d ** -0.5
    out = []

    def add(kernel, variant, fn):
        out.append((kernel, variant, fn))

    layouts = [("gqa 32/8, (B,L,H,D) strides", dict(hq=32, hkv=8, transposed=True))]
    if full:
        layouts.append(("mha 32/32, contiguous", dict(hq=32, hkv=32, transposed=False)))
    for lay_name, lay in layouts:
        q, kk, v = _qkv(dtype, d, **lay)
        b, hq = q.shape[0], q.shape[1]
        plain = k.MaskSpec(q_offset=0)
        padded = k.MaskSpec(q_offset=0, kv_start=torch.tensor([0, 5], dtype=torch.int32))
        window = k.MaskSpec(q_offset=0, kv_start=torch.tensor([0, 5], dtype=torch.int32), window=16)
        masks = [("causal", plain), ("padding", padded), ("padding+window", window)] if full else [("padding", padded)]
        lse = torch.zeros(b, hq, q.shape[2])
        for mask_name, mask in masks:
            tag = f"{lay_name}, {mask_name}"
            add("row_stats", f"lse + row max; {tag}", lambda q=q, kk=kk, m=mask: k.row_stats(q, kk, m, scale, with_max=True))
            for g in ((2, 3, 4) if full else (4,)):
                groups = k.Groups(torch.zeros(b, 1, 64, dtype=torch.int8), g)
                add("row_stats", f"{g} groups, online; {tag}",
                    lambda q=q, kk=kk, m=mask, gr=groups: k.row_stats(q, kk, m, scale, groups=gr))
                add("row_stats", f"{g} groups, lse given; {tag}",
                    lambda q=q, kk=kk, m=mask, gr=groups: k.row_stats(q, kk, m, scale, groups=gr, lse=lse))
                bias = torch.zeros(b, hq, q.shape[2], g)
                add("attention", f"{g}-group bias, lse given; {tag}",
                    lambda q=q, kk=kk, v=v, m=mask, gr=groups, bi=bias: k.attention(
                        q, kk, v, m, scale, groups=gr, bias=bi, lse=lse))
                if full:
                    add("attention", f"{g}-group bias, online; {tag}",
                        lambda q=q, kk=kk, v=v, m=mask, gr=groups, bi=bias: k.attention(q, kk, v, m, scale, groups=gr, bias=bi))
            add("column_stats", tag, lambda q=q, kk=kk, m=mask: k.column_stats(q, kk, lse, m, scale))
            add("attention", f"plain; {tag}", lambda q=q, kk=kk, v=v, m=mask: k.attention(q, kk, v, m, scale))
            for p in ((1.0, 1.5, 0.7) if full else (3.0, 0.7)):
                args = k.SoftplusArgs(p=p, offset=1.0, steer=torch.ones(hq, dtype=torch.int8),
                                      rel0=torch.zeros(b, dtype=torch.int32), lse=lse, rowmax=lse)
                add("attention", f"softplus p={p}; {tag}",
                    lambda q=q, kk=kk, v=v, m=mask, a=args: k.attention(q, kk, v, m, scale, softplus=a))
            # decode: one query row against the cache (the merge kernel comes with every call)
            qd = q[:, :, :1]
            dmask = k.MaskSpec(q_offset=63, kv_start=mask.kv_start, window=mask.window)
            steer = torch.ones(hq, dtype=torch.int8)
            rel0 = torch.ones(b, dtype=torch.int32)
            add("decode", f"plain; {tag}", lambda qd=qd, kk=kk, v=v, m=dmask: k.decode(qd, kk, v, m, scale))
            g2 = k.Groups(torch.zeros(b, 1, 64, dtype=torch.int8), 2)
            add("decode", f"act (2 groups); {tag}", lambda qd=qd, kk=kk, v=v, m=dmask: k.decode(
                qd, kk, v, m, scale, groups=g2, rule="act", beta=0.4, steer=steer, rel0=rel0))
            g4 = k.Groups(torch.zeros(b, 1, 64, dtype=torch.int8), 4)
            var = k.VarArgs(p=0.6, rho=0.5, min_image=0.2, gate=torch.ones(b, dtype=torch.int32))
            add("decode", f"var (4 groups); {tag}", lambda qd=qd, kk=kk, v=v, m=dmask: k.decode(
                qd, kk, v, m, scale, groups=g4, rule="var", var=var, steer=steer))
            sp = k.SoftplusArgs(p=3.0, offset=1.0, steer=steer, rel0=rel0)
            add("decode", f"softplus; {tag}", lambda qd=qd, kk=kk, v=v, m=dmask: k.decode(
                qd, kk, v, m, scale, rule="softplus", softplus=sp))
    return out


# ---- compiling and measuring ----------------------------------------------------------------------
def _resources(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of the kernel in a cubin, read with the cuobjdump triton bundles."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                              check=False).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]) if "REG" in found else None,
            "stack_bytes": int(found["STACK"]) if "STACK" in found else None,
            "local_bytes": int(found["LOCAL"]) if "LOCAL" in found else None}


def compile_variants(cc: int = 90, dtypes=("bfloat16",), head_dims=(128,), full: bool = True) -> list[KernelBuild]:
    """Compile every variant for sm_<cc>; one :class:`KernelBuild` per compiled kernel (a decode
    call compiles its split kernel(s) and the merge kernel), or per failed launcher call."""
    records: list[KernelBuild] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for d in head_dims:
            for kernel, variant, call in variants(dtype, d, full=full):
                with compile_only(cc) as builds:
                    t0 = time.perf_counter()
                    try:
                        call()
                        error = None
                    except InterpreterLeakError:
                        raise
                    except Exception as exc:  # report every failure, keep compiling the rest
                        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400] if str(exc).strip() else ''}"
                    seconds = time.perf_counter() - t0
                if error is not None:
                    records.append(KernelBuild(kernel, variant, cc, dtype_name, d, False, seconds, error=error))
                    continue
                for name, compiled in builds:
                    meta = compiled.metadata
                    records.append(KernelBuild(
                        name, variant, cc, dtype_name, d, True, seconds / max(1, len(builds)),
                        num_warps=meta.num_warps, num_stages=meta.num_stages, shared_bytes=meta.shared,
                        **_resources(compiled.asm["cubin"]),
                    ))
    return records


def markdown(records: list[KernelBuild], cc: int) -> str:
    import triton

    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    spills = [r for r in ok if (r.local_bytes or 0) > 0 or (r.stack_bytes or 0) > 0]
    lines = [
        f"# Triton kernels compiled for sm_{cc} (ahead of time, no GPU)",
        "",
        f"- triton {triton.__version__}, torch {torch.__version__}; "
        f"`python -m attnsteer.kernels.compile_check --arch {cc}`",
        f"- {len(ok)} kernels compiled, {len(failed)} launcher calls failed; "
        f"{len(spills)} with local memory / stack use (register spills)"
        + "".join(f"; {dt}: {sum(r.dtype == dt for r in spills)} (at most "
                  f"{max([r.stack_bytes or 0 for r in spills if r.dtype == dt] + [0])} B per thread)"
                  for dt in sorted({r.dtype for r in ok})),
        "- compile s: wall time of the launcher call, near 0 when triton's on-disk cache already held the kernel",
        "- registers per thread from cuobjdump; shared memory from triton's metadata. These are compile-time "
        "facts only: nothing here ran or was timed.",
        "",
        "| kernel | variant | dtype | D | warps | stages | regs | local B | stack B | shared KiB | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.ok:
            lines.append(
                f"| {r.kernel} | {r.variant} | {r.dtype} | {r.head_dim} | {r.num_warps} | {r.num_stages} | "
                f"{r.registers} | {r.local_bytes} | {r.stack_bytes} | {(r.shared_bytes or 0) / 1024:.1f} | {r.seconds:.2f} |"
            )
        else:
            lines.append(f"| {r.kernel} | {r.variant} | {r.dtype} | {r.head_dim} | - | - | - | - | - | - | "
                         f"FAILED: {r.error} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnsteer.kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability as 90, 80, ... (default 90)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: all three")
    parser.add_argument("--head-dim", type=int, action="append", help=f"default: {' '.join(map(str, HEAD_DIMS))}")
    parser.add_argument("--full", action="store_true",
                        help="every layout (GQA/MHA, strides), mask and group count for every dtype and head dim "
                             "(slow: tens of minutes); default: one call per kernel and mode, plus the full set "
                             "for bfloat16 at head dim 128")
    parser.add_argument("--output", help="folder for compile_sm<cc>.md / .json")
    args = parser.parse_args(argv)
    if not nvidia_backend_available():
        print("compile_check: triton with its NVIDIA backend (ptxas) is not installed. Fix: pip install triton "
              "(Linux x86-64 / aarch64 wheels include it)", file=sys.stderr)
        return 2
    failed = 0
    for cc in args.arch or [90]:
        dtypes, dims = tuple(args.dtype or DTYPES), tuple(args.head_dim or HEAD_DIMS)
        records = compile_variants(cc, dtypes, dims, full=args.full)
        if not args.full and "bfloat16" in dtypes and 128 in dims:
            records += compile_variants(cc, ("bfloat16",), (128,), full=True)
        text = markdown(records, cc)
        print(text)
        failed += sum(not r.ok for r in records)
        if args.output:
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"compile_sm{cc}.md").write_text(text)
            (out / f"compile_sm{cc}.json").write_text(json.dumps([asdict(r) for r in records], indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
