"""Compile every Triton kernel variant for NVIDIA GPUs without a GPU (ahead of time, to cubin).

Triton's interpreter (``TRITON_INTERPRET=1``) checks the kernels' numbers on CPU but never runs
the compiler: type errors, unsupported shapes of ``tl.dot``, globals that are not constexprs,
register spills and shared-memory overflows only show up when the kernels are compiled for a real
target. This module compiles them for a chosen compute capability (sm_90 H100, sm_80 A100, ...)
on any machine where triton ships its NVIDIA backend (the Linux wheels do, with ptxas), and
reports the resources of each build: registers, stack frame and spill bytes per thread
(``ptxas -v``), shared memory per block (triton's metadata, checked against the architecture's
limit), num_warps / num_stages and compile time.

It goes through the real launchers of :mod:`attnsteer.kernels.ops` (``row_stats``,
``column_stats``, ``attention``, ``decode``) with small CPU tensors, so exactly the variants those
launchers would launch are compiled: same constexprs, strides, specialisations, ``num_warps`` and
``num_stages`` (the decode launcher plans its splits for the target's SM count). Inside
:func:`compile_only` the launchers call ``JITFunction.warmup`` (compile, no launch) against a
stand-in CUDA driver that only names the target. This works in a process that runs the
interpreter too: the launchers get a compiled copy of ``_triton.py``, triton's language library
its compiled functions and the interpret knob is off while inside; everything (the launchers'
state, the active driver, the knob, the library) is restored on exit. (The reverse order does not
work with triton 3.9: after an interpreted kernel has run, ``triton.language`` stays patched and
:func:`compile_only` refuses with :class:`InterpreterLeakError`.)

:func:`check_arch` compiles and reports one target, :func:`write_reports` writes
``compile_sm<cc>.md`` / ``.json``. The command line is ``benchmarks/compile_check.py``::

    python benchmarks/compile_check.py --arch 90 --arch 80 --scope full --output evals/kernels

prints a Markdown report, writes ``compile_sm<cc>.md`` / ``.json`` under ``--output`` and exits 1
if any variant fails to compile or needs more shared memory than the target has.
"""

from __future__ import annotations

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
HEAD_DIMS = (64, 80, 128, 256)  # 256 = ops.MAX_HEAD_DIM (Gemma-style heads)


@dataclass
class KernelBuild:
    """One compiled kernel (or the launcher call that failed to compile).

    registers / stack_bytes / spill_*_bytes: per thread, from ``ptxas -v`` (the ptxas triton used);
    spill stores or loads > 0 mean registers spilled to local memory. shared_bytes: from triton's
    metadata. seconds: wall time of the compile (near 0 when triton's cache already had it).
    kernel_hash: triton's hash of the compiled kernel (equal hashes = the same binary).
    """

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
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    shared_bytes: int | None = None
    kernel_hash: str | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)


def nvidia_backend_available(archs=(90, 80)) -> bool:
    """Whether triton, its NVIDIA backend and the ptxas it uses for each of ``archs`` are installed."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return all(os.access(get_ptxas(cc).path, os.X_OK) for cc in archs)
    except Exception:
        return False


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
_MISSING = object()

# Streaming multiprocessors of the usual part of each architecture: the decode launcher sizes its
# split-K grid (and the S_PAD constexpr of the re-weighting sweep) from the device's SM count.
TARGET_SMS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}


@contextlib.contextmanager
def _interpreter_off():
    """``triton.knobs.runtime.interpret`` False inside (``triton.jit`` and constexpr functions read
    it); the knob's override is put back exactly on exit, ``TRITON_INTERPRET`` is never touched."""
    from triton import knobs

    runtime = knobs.runtime
    override = runtime.__dict__.get("interpret", _MISSING)
    # the knob's override slot, not ``runtime.interpret = False``: that setter also writes
    # TRITON_INTERPRET=0 to the environment, and the library never sets environment variables
    runtime.__dict__["interpret"] = False
    try:
        yield
    finally:
        if override is _MISSING:
            runtime.__dict__.pop("interpret", None)
        else:
            runtime.__dict__["interpret"] = override


def _stdlib_twins() -> list:
    """(owner, attribute, interpreted, compiled) for every @triton.jit function of triton's own
    language library that was defined under the interpreter.

    With ``TRITON_INTERPRET=1`` set when triton is imported, ``tl.max``, ``tl.sum``,
    ``tl.zeros_like``, ... are interpreter functions; the compiler cannot inline them (calling one
    runs the interpreter and patches ``triton.language``). Their compiled twins are JITFunctions
    of the same Python functions, swapped in while compiling. Nothing to do in a normal process.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - triton without the interpreter
        return []
    cache = _COMPILED_MODULE.setdefault("twins", {})

    def twin(fn):
        if id(fn) not in cache:
            cache[id(fn)] = (fn, JITFunction(fn.fn, **getattr(fn, "kwargs", {})))
        return cache[id(fn)][1]

    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, InterpretedFunction):
                found.append((module, attr, value, twin(value)))
    # tensor methods (x.max(), ...) wrap the interpreted function; compiled triton binds the JITFunction
    for attr, value in list(vars(tl.core.tensor).items()):
        for cell in getattr(value, "__closure__", None) or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # pragma: no cover - empty cell
                continue
            if isinstance(inner, InterpretedFunction):
                found.append((tl.core.tensor, attr, value, twin(inner)))
                break
    return found


@contextlib.contextmanager
def _compiled_language():
    """triton.language as a process without the interpreter has it (see :func:`_stdlib_twins`)."""
    swapped = _stdlib_twins()
    for owner, attr, _, compiled in swapped:
        setattr(owner, attr, compiled)
    try:
        with _interpreter_off():
            yield
    finally:
        for owner, attr, interpreted, _ in reversed(swapped):
            setattr(owner, attr, interpreted)


def _compiled_kernel_module():
    """A copy of ``_triton.py`` defined with the interpreter off (its kernels are JITFunctions),
    under its own module name; call it inside :func:`_compiled_language`."""
    mod = _COMPILED_MODULE.get("mod")
    if mod is None:
        path = Path(__file__).with_name("_triton.py")
        spec = importlib.util.spec_from_file_location("attnsteer.kernels._triton_compiled", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _COMPILED_MODULE["mod"] = mod
    return mod


class InterpreterLeakError(RuntimeError):
    """Triton's interpreter ran in this process and left ``triton.language`` patched."""


def _check_language_unpatched() -> None:
    """Triton 3.9's interpreter does not restore what it patches in ``triton.language.core`` for
    nested jit calls after running a kernel; compiling afterwards then fails with errors that have
    nothing to do with the kernels. Refuse clearly instead of reporting them as kernel failures.
    (Compiling first and interpreting afterwards is fine.)"""
    import triton.language as tl

    if not (tl.core.is_builtin(tl.core.where) and tl.core.is_builtin(tl.where)):
        raise InterpreterLeakError(
            "Triton's interpreter ran in this process and left triton.language patched, so nothing can be "
            "compiled here. Fix: run the compile check in a fresh process (python -m attnsteer.kernels.compile_check)"
        )


@contextlib.contextmanager
def compile_only(cc: int = 90, sms: int | None = None):
    """Inside: the launchers of :mod:`ops` compile for sm_<cc> instead of launching; yields the list
    of ``(launcher name, CompiledKernel)`` they append to.

    Works in a process that runs the interpreter too (``TRITON_INTERPRET=1``): the launchers get a
    compiled copy of the kernel module, triton's language library its compiled functions and the
    interpret knob is off while inside. ``sms``: SM count the decode launcher plans its splits for
    (default: the usual part of the architecture, :data:`TARGET_SMS`). Restores everything on exit:
    the launchers' state, triton's active driver, the knob and the library.
    """
    from triton.runtime import driver

    _check_language_unpatched()
    ops.available()  # settle triton's availability before swapping state
    sms_key = ("sms", "cpu")
    keys = ("kernels", "interpreted", "compile_only", sms_key)
    saved = {key: ops._STATE.get(key, _MISSING) for key in keys}
    saved_driver = getattr(driver, "_active", None)
    builds: list = []
    with _compiled_language():
        driver.set_active(_fake_driver(cc))
        try:
            ops._STATE.update(
                {
                    "kernels": _compiled_kernel_module(),
                    "interpreted": False,
                    "compile_only": builds,
                    sms_key: sms or TARGET_SMS.get(cc, 132),
                }
            )
            yield builds
        finally:
            for key, value in saved.items():
                if value is _MISSING:
                    ops._STATE.pop(key, None)
                else:
                    ops._STATE[key] = value
            driver._active = saved_driver  # None again if no driver had been chosen (CPU machines)


# ---- the variants ---------------------------------------------------------------------------------
SCOPES = ("smoke", "modes", "full")
DECODE_CACHE = 8192  # keys in the decode cache: enough tiles for the launcher's 128-split cap


def _qkv(dtype, d, hq=32, hkv=8, b=2, q_len=64, k_len=64, transposed=True):
    """q (B, Hq, Q, D), k/v (B, Hkv, K, D), uninitialised (nothing runs); ``transposed``: views of
    (B, L, H, D) tensors, the strides transformers hands to attention functions."""

    def make(h, n):
        if transposed:
            return torch.empty(b, n, h, d, dtype=dtype).transpose(1, 2)
        return torch.empty(b, h, n, d, dtype=dtype)

    return make(hq, q_len), make(hkv, k_len), make(hkv, k_len)


def variants(dtype: torch.dtype, d: int, scope: str = "modes"):
    """(launcher, variant, call) for the kernel modes the launchers support.

    ``smoke``: every kernel and mode once (2 and 4 groups; re-weighting with a half-integer and a general p).
    ``modes``: every constexpr variant: also 2 and 3 groups, integer p, decode with groups carried
    through a plain sweep. Both on GQA 32/8 with transformers' (B, L, H, D) strides and a padding
    mask. ``full``: ``modes`` for GQA and MHA (contiguous strides), causal / padding /
    padding + sliding-window masks. Decode runs against an 8192-key cache with the split count the
    launcher picks for the target's SM count, and once with the 128-split cap (the largest S_PAD).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    k = ops
    scale = d**-0.5
    groups_set = (4,) if scope == "smoke" else (2, 3, 4)
    powers = (1.5, 0.7) if scope == "smoke" else (1.0, 1.5, 0.7)
    out = []

    def add(kernel, variant, fn):
        out.append((kernel, variant, fn))

    layouts = [("gqa 32/8, (B,L,H,D) strides", dict(hq=32, hkv=8, transposed=True))]
    if scope == "full":
        layouts.append(("mha 32/32, contiguous", dict(hq=32, hkv=32, transposed=False)))
    for lay_name, lay in layouts:
        q, kk, v = _qkv(dtype, d, **lay)
        _, kc, vc = _qkv(dtype, d, q_len=1, k_len=DECODE_CACHE, **lay)
        b, hq = q.shape[0], q.shape[1]
        kvs = torch.tensor([0, 5], dtype=torch.int32)
        padded = k.MaskSpec(q_offset=0, kv_start=kvs)
        masks = [("padding", padded)]
        if scope == "full":
            masks = [
                ("causal", k.MaskSpec(q_offset=0)),
                ("padding", padded),
                ("padding+window", k.MaskSpec(q_offset=0, kv_start=kvs, window=16)),
            ]
        lse = torch.zeros(b, hq, q.shape[2])
        for mask_name, mask in masks:
            tag = f"{lay_name}, {mask_name}"
            # prefill pass 1 and the column pass
            add("row_stats", f"lse; {tag}", lambda q=q, kk=kk, m=mask: k.row_stats(q, kk, m, scale))
            add(
                "row_stats",
                f"lse + row max; {tag}",
                lambda q=q, kk=kk, m=mask: k.row_stats(q, kk, m, scale, with_max=True),
            )
            for g in groups_set:
                gr = k.Groups(torch.zeros(b, 1, 64, dtype=torch.int8), g)
                add(
                    "row_stats",
                    f"{g} groups, online; {tag}",
                    lambda q=q, kk=kk, m=mask, gr=gr: k.row_stats(q, kk, m, scale, groups=gr),
                )
                add(
                    "row_stats",
                    f"{g} groups, lse given; {tag}",
                    lambda q=q, kk=kk, m=mask, gr=gr, lse=lse: k.row_stats(q, kk, m, scale, groups=gr, lse=lse),
                )
            add("column_stats", tag, lambda q=q, kk=kk, m=mask, lse=lse: k.column_stats(q, kk, lse, m, scale))
            # prefill pass 2
            add("attention", f"plain; {tag}", lambda q=q, kk=kk, v=v, m=mask: k.attention(q, kk, v, m, scale))
            for g in groups_set:
                gr = k.Groups(torch.zeros(b, 1, 64, dtype=torch.int8), g)
                bias = torch.zeros(b, hq, q.shape[2], g)
                add(
                    "attention",
                    f"{g}-group bias, lse given; {tag}",
                    lambda q=q, kk=kk, v=v, m=mask, gr=gr, bi=bias, lse=lse: k.attention(
                        q, kk, v, m, scale, groups=gr, bias=bi, lse=lse
                    ),
                )
                add(
                    "attention",
                    f"{g}-group bias, online; {tag}",
                    lambda q=q, kk=kk, v=v, m=mask, gr=gr, bi=bias: k.attention(q, kk, v, m, scale, groups=gr, bias=bi),
                )
            for p in powers:
                sp = k.ReweightArgs(
                    power=p,
                    offset=1.0,
                    free_rows=3,
                    steer=torch.ones(hq, dtype=torch.int8),
                    rel0=torch.zeros(b, dtype=torch.int32),
                    lse=lse,
                    rowmax=lse,
                )
                add(
                    "attention",
                    f"reweight p={p}; {tag}",
                    lambda q=q, kk=kk, v=v, m=mask, sp=sp: k.attention(q, kk, v, m, scale, reweight=sp),
                )
            # decode: one query row against the cache (each call also compiles its merge kernel)
            qd = q[:, :, :1]
            dmask = k.MaskSpec(q_offset=DECODE_CACHE - 1, kv_start=mask.kv_start, window=mask.window)
            steer = torch.ones(hq, dtype=torch.int8)
            rel0 = torch.ones(b, dtype=torch.int32)

            def gids(g, b=b):
                return k.Groups(torch.zeros(b, 1, DECODE_CACHE, dtype=torch.int8), g)

            add("decode", f"plain; {tag}", lambda qd=qd, m=dmask, kc=kc, vc=vc: k.decode(qd, kc, vc, m, scale))
            for g in sorted({2, *groups_set}):  # 2 groups (per head) and 4 (shared) as group rules use them
                add(
                    "decode",
                    f"{g} groups (masses and group outputs); {tag}",
                    lambda qd=qd, m=dmask, kc=kc, vc=vc, gr=gids(g): k.decode(qd, kc, vc, m, scale, groups=gr),
                )
            sp = k.ReweightArgs(power=3.0, offset=1.0, free_rows=3, steer=steer, rel0=rel0)
            add(
                "decode",
                f"reweight; {tag}",
                lambda qd=qd, m=dmask, kc=kc, vc=vc, sp=sp: k.decode(qd, kc, vc, m, scale, reweight=sp),
            )
            add(
                "decode",
                f"reweight, 128 splits; {tag}",
                lambda qd=qd, m=dmask, kc=kc, vc=vc, sp=sp: k.decode(qd, kc, vc, m, scale, reweight=sp, num_splits=128),
            )
    return out


# ---- compiling and measuring ----------------------------------------------------------------------
_PTXAS_INFO: dict = {}


def ptxas_version(cc: int) -> str:
    """The ptxas release triton compiles sm_<cc> with."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(cc)
    found = re.search(
        r"release ([\d.]+)", subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
    )
    return f"{Path(tool.path).name} {found.group(1) if found else '?'}"


def _ptxas_resources(compiled, cc: int) -> dict:
    """Registers, stack frame and spill bytes per thread: ``ptxas -v`` on the kernel's PTX, with
    the ptxas and the options triton compiled it with (memoized per compiled kernel)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    key = (compiled.metadata.hash, cc)
    if key not in _PTXAS_INFO:
        fmad = [] if getattr(compiled.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
        extra = (getattr(compiled.metadata, "ptx_options", None) or "").split()
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(compiled.asm["ptx"])
            log = subprocess.run(
                [
                    get_ptxas(cc).path,
                    "-v",
                    "-lineinfo",
                    *fmad,
                    "--regAllocOptLevel=2",
                    *extra,
                    f"--gpu-name={sm_arch_from_capability(cc)}",
                    str(src),
                    "-o",
                    str(Path(tmp) / "kernel.cubin"),
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stderr

        def grab(pattern):
            found = re.search(pattern, log)
            return int(found.group(1)) if found else None

        _PTXAS_INFO[key] = {
            "registers": grab(r"Used (\d+) registers"),
            "stack_bytes": grab(r"(\d+) bytes stack frame"),
            "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        }
    return dict(_PTXAS_INFO[key])


def _error_text(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    # triton's CompilationError: "at L:C:" + source + the reason on the last line
    return f"{type(exc).__name__}: {lines[-1][:400] if lines else ''}"


def compile_variants(
    cc: int = 90,
    dtypes=("bfloat16",),
    head_dims=(128,),
    scope: str = "modes",
    sms: int | None = None,
    only: str | None = None,
) -> list[KernelBuild]:
    """Compile the variants of :func:`variants` for sm_<cc> through the launchers; one
    :class:`KernelBuild` per compiled kernel (a decode call compiles its split kernel(s) and the
    merge kernel) or per launcher call that failed. ``only``: a regular expression; only the calls
    whose "launcher variant" label it matches (re.search) are compiled."""
    records: list[KernelBuild] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for d in head_dims:
            for kernel, variant, call in variants(dtype, d, scope):
                if only and not re.search(only, f"{kernel} {variant}"):
                    continue
                with compile_only(cc, sms) as builds:
                    t0 = time.perf_counter()
                    try:
                        call()
                        error = None
                    except InterpreterLeakError:
                        raise
                    except Exception as exc:  # report every failure, keep compiling the rest
                        error = _error_text(exc)
                    seconds = time.perf_counter() - t0
                if error is not None:
                    records.append(
                        KernelBuild(kernel, variant, cc, dtype_name, d, False, round(seconds, 3), error=error)
                    )
                    continue
                for name, compiled, build_s in builds:
                    meta = compiled.metadata
                    records.append(
                        KernelBuild(
                            name,
                            variant,
                            cc,
                            dtype_name,
                            d,
                            True,
                            round(build_s, 3),
                            num_warps=meta.num_warps,
                            num_stages=meta.num_stages,
                            shared_bytes=meta.shared,
                            kernel_hash=str(meta.hash)[:16],
                            **_ptxas_resources(compiled, cc),
                        )
                    )
    return records


# ---- reports --------------------------------------------------------------------------------------
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in


def over_shared_limit(records: list[KernelBuild], cc: int) -> list[KernelBuild]:
    """Builds that need more shared memory per block than sm_<cc> has (they would fail to launch)."""
    limit = SHARED_LIMIT.get(cc)
    return [r for r in records if r.ok and limit is not None and (r.shared_bytes or 0) > limit]


def versions(cc: int) -> dict:
    import triton

    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": ptxas_version(cc),
        "python": sys.version.split()[0],
    }


def markdown(records: list[KernelBuild], cc: int, command: str | None = None) -> str:
    """A summary (per launcher: builds, distinct kernels, max registers / spills / shared memory)
    and one table row per build."""
    v = versions(cc)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    spilled = [r for r in ok if r.spills]
    over = over_shared_limit(records, cc)
    distinct = {r.kernel_hash for r in ok}
    limit = SHARED_LIMIT.get(cc)
    lines = [
        f"# Triton kernels compiled for sm_{cc} (ahead of time, no GPU)",
        "",
        f"- triton {v['triton']}, torch {v['torch']}, {v['ptxas']}" + (f"; `{command}`" if command else ""),
        f"- {len(ok)} builds ({len(distinct)} distinct kernels) compiled, {len(failed)} launcher calls failed; "
        f"max {max([r.registers or 0 for r in ok] + [0])} registers per thread; "
        f"{len({r.kernel_hash for r in spilled})} distinct kernels spill registers"
        + (
            f" (at most {max(max(r.spill_store_bytes or 0, r.spill_load_bytes or 0) for r in spilled)} B "
            "spill stores / loads per thread)"
            if spilled
            else ""
        )
        + (f"; {len(over)} builds over the {limit // 1024} KiB shared-memory limit" if limit else ""),
        "- registers, stack frame and spill bytes per thread from `ptxas -v` (the ptxas triton compiled with); "
        "shared memory from triton's metadata; compile s = the launcher's `warmup` call (near 0 when the kernel "
        "was already in triton's cache). Compile-time facts only: nothing here ran or was timed on a GPU.",
        "",
        "## Summary per kernel",
        "",
        "| kernel | dtype | builds | distinct | warps | max regs | max spill st/ld B | max stack B | max shared KiB |",
        "|---|---|---:|---:|---|---:|---|---:|---:|",
    ]
    groups: dict = {}
    for r in ok:
        groups.setdefault((r.kernel, r.dtype), []).append(r)
    for (kernel, dtype), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {dtype} | {len(rs)} | {len({r.kernel_hash for r in rs})} | "
            f"{'/'.join(str(w) for w in sorted({r.num_warps for r in rs}))} | {max(r.registers or 0 for r in rs)} | "
            f"{max(r.spill_store_bytes or 0 for r in rs)}/{max(r.spill_load_bytes or 0 for r in rs)} | "
            f"{max(r.stack_bytes or 0 for r in rs)} | {max(r.shared_bytes or 0 for r in rs) / 1024:.1f} |"
        )
    if failed:
        lines += ["", "## Failures", ""] + [
            f"- {r.kernel} [{r.variant}; {r.dtype}, D={r.head_dim}]: {r.error}" for r in failed
        ]
    lines += [
        "",
        "## Every build",
        "",
        "| kernel | variant | dtype | D | warps | stages | regs | spill st/ld B | stack B | shared KiB | compile s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in records:
        if r.ok:
            lines.append(
                f"| {r.kernel} | {r.variant} | {r.dtype} | {r.head_dim} | {r.num_warps} | {r.num_stages} | "
                f"{r.registers} | {r.spill_store_bytes}/{r.spill_load_bytes} | {r.stack_bytes} | "
                f"{(r.shared_bytes or 0) / 1024:.1f} | {r.seconds:.2f} |"
            )
        else:
            lines.append(
                f"| {r.kernel} | {r.variant} | {r.dtype} | {r.head_dim} | - | - | - | - | - | - | FAILED: {r.error} |"
            )
    return "\n".join(lines) + "\n"


@dataclass
class ArchCheck:
    """One target's check (:func:`check_arch`): every build, the Markdown report, the problems
    (failed builds and builds over the shared-memory limit) and the wall time in seconds."""

    cc: int
    records: list[KernelBuild]
    markdown: str
    problems: list[KernelBuild]
    seconds: float


def check_arch(
    cc: int,
    dtypes=tuple(DTYPES),
    head_dims=HEAD_DIMS,
    scope: str = "modes",
    only: str | None = None,
    command: str | None = None,
) -> ArchCheck:
    """Compile the variants for sm_<cc> (:func:`compile_variants`) and report them (:func:`markdown`;
    ``command``: how the check was run, shown in the report)."""
    t0 = time.perf_counter()
    records = compile_variants(cc, tuple(dtypes), tuple(head_dims), scope=scope, only=only)
    problems = [r for r in records if not r.ok] + over_shared_limit(records, cc)
    return ArchCheck(cc, records, markdown(records, cc, command), problems, time.perf_counter() - t0)


def write_reports(check: ArchCheck, folder, *, scope: str, only: str | None, dtypes, head_dims, command: str) -> Path:
    """``compile_sm<cc>.md`` (the report) and ``compile_sm<cc>.json`` (settings, versions, every
    build) under ``folder`` (created); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_sm{check.cc}.md").write_text(check.markdown)
    doc = {
        "cc": check.cc,
        "command": command,
        "scope": scope,
        "only": only,
        "dtypes": list(dtypes),
        "head_dims": list(head_dims),
        **versions(check.cc),
        "records": [asdict(r) for r in check.records],
    }
    (out / f"compile_sm{check.cc}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out
