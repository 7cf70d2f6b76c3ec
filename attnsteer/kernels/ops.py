"""Python launchers for the Triton kernels: shapes, strides, launch grids, block sizes.

Importing this module imports torch only. Triton and the kernels themselves
(:mod:`attnsteer.kernels._triton`) are imported on the first kernel call, so a machine without
triton can import attnsteer (and this module) and gets :class:`TritonUnavailableError` only when a
kernel is actually called. On CPU, kernels run only under Triton's interpreter:
``TRITON_INTERPRET=1`` must be in the environment before that first call.

Masks are never passed as tensors: every kernel takes the structure of transformers' causal mask
as a :class:`MaskSpec` (query offset, per-batch-row first valid key, optional sliding window).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import time
from dataclasses import dataclass

import torch

from .. import settings

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GROUPS = 4  # int8 group ids 0..3 (pass 2 and decode keep per-group state in registers)


class TritonUnavailableError(ImportError):
    """triton is not installed (or cannot be imported) but a Triton kernel was called."""


class KernelLaunchError(RuntimeError):
    """A kernel failed to compile or launch (the message names the kernel); callers may fall back."""


_STATE: dict = {}


def available() -> bool:
    """Whether triton can be imported (checked once; does not define the kernels)."""
    if "available" not in _STATE:
        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                importlib.import_module("triton")
                importlib.import_module("triton.language")
            except Exception as exc:  # pragma: no cover - broken installs
                _STATE["import_error"] = exc
                ok = False
        _STATE["available"] = ok
    return _STATE["available"]


def interpreting() -> bool:
    """Whether kernels run (or will run) under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    if "kernels" in _STATE:
        return _STATE["interpreted"]
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernels():
    """The kernel module (imported, i.e. the kernels defined, on the first call)."""
    mod = _STATE.get("kernels")
    if mod is None:
        if not available():
            err = _STATE.get("import_error")
            raise TritonUnavailableError(
                "attnsteer's Triton kernels need the `triton` package"
                + (f" (importing it failed: {err})" if err else "")
                + ". Fix: pip install 'triton>=3.2' (Linux + CUDA), or use backend='chunked' / 'flash' / 'reference', "
                "which run in plain PyTorch"
            )
        mod = importlib.import_module("attnsteer.kernels._triton")
        try:
            from triton import knobs

            interpreted = bool(knobs.runtime.interpret)
        except Exception:  # pragma: no cover - older triton
            interpreted = interpreting()
        _STATE["interpreted"] = interpreted
        _STATE["kernels"] = mod
    return mod


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskSpec:
    """Structure of a causal + left-padding (+ sliding-window) mask, in key-index space.

    q_offset: key index of query row 0 (query row i sits at key index q_offset + i; K - Q for a
              dynamic cache).
    kv_start: int32 (B,) first valid (non-pad) key index of each batch row, or None (all 0).
    window:   sliding window W (key j visible from query position p iff j > p - W), 0 = none.
    """

    q_offset: int
    kv_start: torch.Tensor | None = None
    window: int = 0


@dataclass
class Groups:
    """Per-key group ids: int8 ``gid`` (B, 1|H, P) indexed by absolute key position; key index
    j is at position ``offset + j``; positions >= P are group 0. ``num_groups`` in 1..4."""

    gid: torch.Tensor
    num_groups: int
    offset: int = 0


@dataclass
class ReweightArgs:
    """The re-weight rule kind for pass 2 / decode: ``w = max(N_i a_ij - o_i, 0)^power`` with
    ``o_i = 0`` in a row's first ``free_rows`` positions and ``offset`` after.

    lse, rowmax: float32 (B, H, Q) row log-sum-exp and row max of the scores from
    :func:`row_stats` (``with_max=True``); pass 2 only (decode computes its own).
    steer: int8 (H,) 1 for steered query heads. rel0: int32 (B,) position (from the row's first
    non-pad token) of query row 0; row i is at rel0 + i.
    """

    power: float
    offset: float
    free_rows: int
    steer: torch.Tensor
    rel0: torch.Tensor
    lse: torch.Tensor | None = None
    rowmax: torch.Tensor | None = None


def _pow2(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def _tuned(value: int | None, default: int) -> int:
    """A launch setting: the override from attnsteer.settings, else ``default``."""
    return default if value is None else value


def _check(q, k, v=None):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q (B, Hq, Q, D) and k (B, Hkv, K, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit (batch, head dim, GQA ratio)")
    tensors = (q, k) if v is None else (q, k, v)
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if any(t.dtype != q.dtype for t in tensors) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one dtype among {SUPPORTED_DTYPES}; got {[t.dtype for t in tensors]}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if any(t.device != q.device for t in tensors):
        raise ValueError("q, k, v must be on one device")
    kernels()
    if q.device.type != "cuda" and not _STATE["interpreted"] and _STATE.get("compile_only") is None:
        raise ValueError(
            f"Triton kernels got {q.device.type} tensors; they run on CUDA, or on CPU only under the interpreter "
            "(set TRITON_INTERPRET=1 before the first kernel call)"
        )


def _dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_args(dtype) -> dict:
    """DOT_PREC, and UPCAST for the interpreter's bfloat16 dot bug (see _triton._dot)."""
    return {"DOT_PREC": _dot_prec(dtype), "UPCAST": bool(_STATE.get("interpreted")) and dtype == torch.bfloat16}


def _blocks(
    q_len: int, d: int, block_m: int | None, block_n: int | None, dtype=torch.bfloat16
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernels.

    GPU defaults are untuned first choices (64 x 64, 4 warps; 64 x 32 and 8 warps over head dim
    128; 16 x 16 for float32, whose exact ("ieee") dots run on FMA units with whole operand rows per
    thread: wider tiles spill registers at compile time -- see evals/kernels/);
    the settings' kernel overrides (``ATTNSTEER_TRITON_BLOCK_M`` / ``_BLOCK_N`` / ``_WARPS`` /
    ``_STAGES``, attnsteer.settings) replace them. The interpreter uses 16 x 16 tiles so small test
    shapes still cross tile boundaries.
    """
    tuning = settings.kernel_tuning()
    if _STATE.get("interpreted"):
        bm, bn = 16, 16
    else:
        wide = 16 if dtype == torch.float32 else 64
        bm = _tuned(tuning.block_m, wide)
        bn = _tuned(tuning.block_n, wide if d <= 128 else min(wide, 32))
    bm = block_m or bm
    bn = block_n or bn
    # 8 warps for head dims over 128 (a 64 x 256 float32 accumulator spills with 4; compile check)
    wide_rows = bm > 64 or (d > 128 and bm > 16)
    warps = _tuned(tuning.warps, 8 if wide_rows else 4)
    stages = _tuned(tuning.stages, 2)
    return bm, bn, warps, stages


def _launch(name: str, kernel, grid, *args, **kwargs):
    builds = _STATE.get("compile_only")
    if builds is not None:  # attnsteer.kernels.compile_check: compile for its target, never launch
        t0 = time.perf_counter()
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        builds.append((name, compiled, time.perf_counter() - t0))
        return
    try:
        kernel[grid](*args, **kwargs)
    except (ValueError, TypeError, IndexError) as exc:
        # argument bugs on our side are not something to fall back from silently
        if not _STATE.get("interpreted") and "compil" in str(exc).lower():
            raise KernelLaunchError(f"Triton kernel {name} failed to compile: {exc}") from exc
        raise
    except Exception as exc:
        if _STATE.get("interpreted"):
            raise
        raise KernelLaunchError(f"Triton kernel {name} failed: {type(exc).__name__}: {exc}") from exc


def _mask_args(mask: MaskSpec, device):
    if mask.kv_start is not None:
        kvs = mask.kv_start
        if kvs.dtype != torch.int32 or kvs.device != device:
            kvs = kvs.to(device=device, dtype=torch.int32)
        return kvs, True
    return torch.empty(1, dtype=torch.int32, device=device), False


def _group_args(groups: Groups | None, device):
    if groups is None:
        dummy = torch.empty(1, dtype=torch.int8, device=device)
        return dummy, (0, 0, 0), 0, 0, 0
    gid = groups.gid
    if gid.dtype == torch.bool:
        gid = gid.view(torch.int8)
    if gid.dtype != torch.int8 or gid.dim() != 3:
        raise ValueError(f"group ids must be int8 (B, 1|H, P); got {gid.dtype} {tuple(gid.shape)}")
    if not 1 <= groups.num_groups <= MAX_GROUPS:
        raise ValueError(f"num_groups must be in 1..{MAX_GROUPS}; got {groups.num_groups}")
    sb, sh, sn = gid.stride()
    if gid.shape[1] == 1:
        sh = 0
    return gid, (sb, sh, sn), groups.num_groups, int(groups.offset), gid.shape[2]


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------
def row_stats(
    q,
    k,
    mask: MaskSpec,
    scale: float,
    groups: Groups | None = None,
    lse: torch.Tensor | None = None,
    with_max: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Pass 1 (QK only). Returns (lse float32 (B, Hq, Q), masses float32 (B, Hq, Q, G) or None),
    plus the row max of the scores (B, Hq, Q) as a third item when ``with_max``.

    Without ``lse``: one online sweep gives the row LSE and, with ``groups``, the group masses
    M_g = exp(lse_g - lse). With ``lse`` (from an earlier call) and ``groups``: masses only, summing
    exp(s - lse) directly. Fully masked rows: lse = -inf (row max -inf), masses 0.
    """
    _check(q, k)
    if lse is not None and (groups is None or with_max):
        raise ValueError("row_stats: `lse` is only used together with `groups` (and then no row max is computed)")
    mod = kernels()
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    bm, bn, warps, stages = _blocks(q_len, d, block_m, block_n, q.dtype)
    kvs, has_kvs = _mask_args(mask, q.device)
    gid, gstr, ng, goff, glen = _group_args(groups, q.device)
    lse_out = lse if lse is not None else torch.empty(b, hq, q_len, dtype=torch.float32, device=q.device)
    if lse is not None and (lse.shape != (b, hq, q_len) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be contiguous float32 {(b, hq, q_len)}; got {lse.dtype} {tuple(lse.shape)}")
    masses = torch.empty(b, hq, q_len, max(ng, 1), dtype=torch.float32, device=q.device) if ng else lse_out
    rowmax = torch.empty_like(lse_out) if with_max else lse_out  # (not written when lse is given)
    grid = (triton_cdiv(q_len, bm), b * hq)
    _launch(
        "row_stats",
        mod.row_stats_kernel,
        grid,
        q,
        k,
        lse_out,
        rowmax,
        masses,
        gid,
        lse_out,
        kvs,
        *q.stride(),
        *k.stride(),
        *gstr,
        hq,
        hq // hkv,
        q_len,
        k_len,
        float(scale),
        int(mask.q_offset),
        int(mask.window),
        goff,
        glen,
        D=d,
        HAS_KVS=has_kvs,
        NUM_GROUPS=ng,
        G_PAD=_pow2(max(ng, 1), 2),
        LSE_GIVEN=lse is not None,
        WITH_MAX=with_max,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=_pow2(d),
        **_dot_args(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    if with_max:
        return lse_out, (masses if ng else None), rowmax
    return lse_out, (masses if ng else None)


def column_stats(
    q, k, lse: torch.Tensor, mask: MaskSpec, scale: float, block_m: int | None = None, block_n: int | None = None
):
    """The column pass of group rules with column statistics (QK only, after pass 1). Returns (colsum float32 (B, Hq, K) = sum over
    the forward's rows of a_ij, count float32 (B, 1, K) = rows that see key j)."""
    _check(q, k)
    mod = kernels()
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    bm, bn, warps, stages = _blocks(q_len, d, block_m, block_n, q.dtype)
    kvs, has_kvs = _mask_args(mask, q.device)
    colsum = torch.empty(b, hq, k_len, dtype=torch.float32, device=q.device)
    count = torch.empty(b, 1, k_len, dtype=torch.float32, device=q.device)
    grid = (triton_cdiv(k_len, bn), b * hq)
    _launch(
        "column_stats",
        mod.column_stats_kernel,
        grid,
        q,
        k,
        lse.contiguous(),
        colsum,
        count,
        kvs,
        *q.stride(),
        *k.stride(),
        hq,
        hq // hkv,
        q_len,
        k_len,
        float(scale),
        int(mask.q_offset),
        int(mask.window),
        D=d,
        HAS_KVS=has_kvs,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=_pow2(d),
        **_dot_args(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return colsum, count


def _power_plan(p: float) -> tuple[int, bool]:
    """(P_INT, P_HALF): u**p by multiplications when 2p is an integer <= 32, else (-1, False)."""
    twice = 2.0 * p
    if abs(twice - round(twice)) < 1e-12 and 0 < round(twice) <= 32:
        n = int(round(twice))
        return n // 2, bool(n % 2)
    return -1, False


def attention(
    q,
    k,
    v,
    mask: MaskSpec,
    scale: float,
    groups: Groups | None = None,
    bias: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    reweight: ReweightArgs | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Pass 2: one fused attention sweep. Returns (out (B, Q, Hq, D) in q.dtype, modified int8
    (B, Hq, Q) for ``reweight`` else None).

    ``groups`` + ``bias`` float32 (B, Hq, Q, G): scores get bias[b, h, i, group(j)] -- the exact
    one-pass form of any rule that rescales whole groups by per-row factors: bias = log(M'_g/M_g).
    ``lse`` (B, Hq, Q), pass 1's LSE of the unbiased scores: weights are formed directly as
    exp(s + bias - lse) (valid when sum_g M'_g = 1, i.e. the rule conserves each row's mass); without
    it, online softmax. ``reweight`` (with its ``lse`` and ``rowmax``): weights
    max(N_i a_ij - o_i, 0)^p; rows of a steered head where nothing survives keep plain attention.
    Without groups and reweight: plain attention.
    """
    _check(q, k, v)
    if (groups is None) != (bias is None):
        raise ValueError("attention: `groups` and `bias` go together")
    if reweight is not None and bias is not None:
        raise ValueError("attention: bias and re-weighting are separate modes")
    mod = kernels()
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    dev = q.device
    bm, bn, warps, stages = _blocks(q_len, d, block_m, block_n, q.dtype)
    kvs, has_kvs = _mask_args(mask, dev)
    gid, gstr, ng, goff, glen = _group_args(groups, dev)
    f32 = torch.float32
    if bias is not None:
        if bias.shape != (b, hq, q_len, ng):
            raise ValueError(f"bias must be (B, Hq, Q, G) = {(b, hq, q_len, ng)}; got {tuple(bias.shape)}")
        bias = bias.to(f32).contiguous()
    else:
        bias = torch.empty(1, dtype=f32, device=dev)
    if out is None:
        out = torch.empty(b, q_len, hq, d, dtype=q.dtype, device=dev)
    steer = torch.empty(1, dtype=torch.int8, device=dev)
    rel0 = torch.empty(1, dtype=torch.int32, device=dev)
    rowmax = torch.empty(1, dtype=f32, device=dev)
    modified = None
    p_int, p_half = 0, False
    sp = (1.0, 0.0, 0)
    if reweight is not None:
        if reweight.lse is None or reweight.rowmax is None:
            raise ValueError("attention: re-weighting needs pass 1's lse and row max (row_stats(with_max=True))")
        lse = reweight.lse
        rowmax = reweight.rowmax.to(f32).contiguous()
        steer = reweight.steer.to(device=dev, dtype=torch.int8).contiguous()
        rel0 = reweight.rel0.to(device=dev, dtype=torch.int32).contiguous()
        modified = torch.empty(b, hq, q_len, dtype=torch.int8, device=dev)
        sp = (float(reweight.power), float(reweight.offset), int(reweight.free_rows))
        p_int, p_half = _power_plan(float(reweight.power))
    if lse is not None:
        if lse.shape != (b, hq, q_len):
            raise ValueError(f"lse must be (B, Hq, Q) = {(b, hq, q_len)}; got {tuple(lse.shape)}")
        lse_t = lse.to(f32).contiguous()
    else:
        lse_t = torch.empty(1, dtype=f32, device=dev)
    mod_buf = modified if modified is not None else torch.empty(1, dtype=torch.int8, device=dev)
    grid = (triton_cdiv(q_len, bm), b * hq)
    _launch(
        "attn_fwd",
        mod.attn_fwd_kernel,
        grid,
        q,
        k,
        v,
        out,
        gid,
        bias,
        lse_t,
        rowmax,
        steer,
        rel0,
        mod_buf,
        kvs,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *gstr,
        hq,
        hq // hkv,
        q_len,
        k_len,
        float(scale),
        int(mask.q_offset),
        int(mask.window),
        goff,
        glen,
        *sp,
        D=d,
        HAS_KVS=has_kvs,
        NUM_GROUPS=ng,
        G_PAD=_pow2(max(ng, 1), 2),
        HAS_LSE=lse is not None,
        SOFTPLUS=reweight is not None,
        P_INT=p_int,
        P_HALF=p_half,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=_pow2(d),
        **_dot_args(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out, modified


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def _num_sms(device) -> int:
    key = ("sms", str(device))
    if key not in _STATE:
        _STATE[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _STATE[key]


def decode_splits(batch: int, kv_heads: int, k_len: int, block_n: int, device, num_splits: int | None = None):
    """(num_splits, split_len): enough (b, kv head, split) programs to fill the GPU twice over,
    each split a whole number of key tiles."""
    tiles = max(1, triton_cdiv(k_len, block_n))
    if num_splits is None:
        if _STATE.get("interpreted"):
            num_splits = min(4, tiles)
        else:
            want = triton_cdiv(2 * _num_sms(device), max(1, batch * kv_heads))
            cap = _tuned(settings.kernel_tuning().max_splits, 128)
            num_splits = max(1, min(want, tiles, cap))
    num_splits = max(1, min(num_splits, tiles))
    split_len = triton_cdiv(tiles, num_splits) * block_n
    return triton_cdiv(k_len, split_len) if k_len else 1, split_len


def decode(
    q,
    k,
    v,
    mask: MaskSpec,
    scale: float,
    groups: Groups | None = None,
    reweight: ReweightArgs | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
):
    """One query row per (batch row, head) against a long cache, by rule kind:

    * plain (neither ``groups`` nor ``reweight``): returns (out (B, 1, Hq, D), None);
    * group kind (``groups``): returns (out -- plain attention --, (masses float32 (B, Hq, G),
      outputs float32 (B, Hq, G, D))): each group's mass ``M_g`` and normalised output ``o_g``, from
      which the caller's rule forms ``sum_g f_g M_g o_g``;
    * re-weight kind (``reweight``): two sweeps (scores + LSE, then V with the re-weighted scores);
      returns (out, modified int8 (B, Hq)).
    """
    _check(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"decode takes one query row; got Q = {q.shape[2]}")
    if groups is not None and reweight is not None:
        raise ValueError("decode: groups and re-weighting are separate rule kinds")
    mod = kernels()
    b, hq, _, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    group = hq // hkv
    dev = q.device
    tuning = settings.kernel_tuning()
    # float32: 32-key tiles, 16 over head dim 128 (exact dots on FMA units spill registers with
    # wider ones; compile check)
    fp32_bn = 32 if d <= 128 else 16
    bn = block_n or (
        16 if _STATE.get("interpreted") else _tuned(tuning.decode_block_n, fp32_bn if q.dtype == torch.float32 else 64)
    )
    splits, split_len = decode_splits(b, hkv, k_len, bn, dev, num_splits)
    kvs, has_kvs = _mask_args(mask, dev)
    f32 = torch.float32
    dummy_f = torch.empty(1, dtype=f32, device=dev)
    if reweight is not None:
        steer_t = reweight.steer.to(device=dev, dtype=torch.int8).contiguous()
        rel_t = reweight.rel0.to(device=dev, dtype=torch.int32).contiguous()
    else:
        steer_t = torch.ones(hq, dtype=torch.int8, device=dev)
        rel_t = torch.zeros(b, dtype=torch.int32, device=dev)
    # 8 warps for float32, head dims over 128 and sweeps with several groups (a BLOCK_H x groups x D
    # accumulator): with 4 they spill or sit at the 255-register limit (compile check, evals/kernels/)
    several = groups is not None and groups.num_groups > 1
    warps = _tuned(tuning.decode_warps, 8 if (q.dtype == torch.float32 or several or d > 128) else 4)
    common = dict(BLOCK_H=_pow2(group), BLOCK_N=bn, BLOCK_D=_pow2(d), **_dot_args(q.dtype), num_warps=warps)
    # splits whose partials the re-weighting sweep reads per step (a constant, so the split count
    # never causes a recompile; 2 under the interpreter so its small tests take several steps)
    s_pad = 2 if _STATE.get("interpreted") else 16
    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=dev)
    grid = (splits, b * hkv)
    mask_args = (hq, hkv, group, k_len, float(scale), int(mask.q_offset), int(mask.window))
    strides = (q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride())
    sweep = (splits, split_len)

    if reweight is not None:
        ng = 2
        free_rows = int(reweight.free_rows)
        scores = torch.empty(b, hq, k_len, dtype=f32, device=dev)
        pm1 = torch.empty(b, hq, splits, 1, dtype=f32, device=dev)
        pl1 = torch.empty_like(pm1)
        gdummy, gstr, _, _, _ = _group_args(None, dev)
        _launch(
            "decode_split(scores)",
            mod.decode_split_kernel,
            grid,
            q,
            k,
            v,
            pm1,
            pl1,
            dummy_f,
            gdummy,
            scores,
            dummy_f,
            dummy_f,
            steer_t,
            rel_t,
            kvs,
            *strides,
            *gstr,
            *mask_args,
            0,
            0,
            *sweep,
            1.0,
            0.0,
            free_rows,
            D=d,
            HAS_KVS=has_kvs,
            MODE=1,
            NUM_GROUPS=1,
            G_PAD=2,
            S_PAD=s_pad,
            **common,
        )
        pm = torch.empty(b, hq, splits, ng, dtype=f32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(b, hq, splits, ng, d, dtype=f32, device=dev)
        _launch(
            "decode_split(reweight)",
            mod.decode_split_kernel,
            grid,
            q,
            k,
            v,
            pm,
            pl,
            pacc,
            gdummy,
            scores,
            pm1,
            pl1,
            steer_t,
            rel_t,
            kvs,
            *strides,
            *gstr,
            *mask_args,
            0,
            0,
            *sweep,
            float(reweight.power),
            float(reweight.offset),
            free_rows,
            D=d,
            HAS_KVS=has_kvs,
            MODE=2,
            NUM_GROUPS=ng,
            G_PAD=2,
            S_PAD=s_pad,
            **common,
        )
        rule_id = 2
    else:
        gid, gstr, ng, goff, glen = _group_args(groups, dev)
        ng = max(ng, 1)
        pm = torch.empty(b, hq, splits, ng, dtype=f32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(b, hq, splits, ng, d, dtype=f32, device=dev)
        _launch(
            "decode_split",
            mod.decode_split_kernel,
            grid,
            q,
            k,
            v,
            pm,
            pl,
            pacc,
            gid,
            dummy_f,
            dummy_f,
            dummy_f,
            steer_t,
            rel_t,
            kvs,
            *strides,
            *gstr,
            *mask_args,
            goff,
            glen,
            *sweep,
            1.0,
            0.0,
            0,
            D=d,
            HAS_KVS=has_kvs,
            MODE=0,
            NUM_GROUPS=ng,
            G_PAD=_pow2(ng, 2),
            S_PAD=s_pad,
            **common,
        )
        rule_id = 1 if groups is not None else 0
    modified = torch.empty(b, hq, dtype=torch.int8, device=dev) if rule_id == 2 else None
    mod_buf = modified if modified is not None else torch.empty(1, dtype=torch.int8, device=dev)
    masses = torch.empty(b, hq, ng, dtype=f32, device=dev) if rule_id == 1 else dummy_f
    outputs = torch.empty(b, hq, ng, d, dtype=f32, device=dev) if rule_id == 1 else dummy_f
    _launch(
        "decode_merge",
        mod.decode_merge_kernel,
        (b * hq,),
        pm,
        pl,
        pacc,
        out,
        steer_t,
        mod_buf,
        masses,
        outputs,
        out.stride(0),
        out.stride(2),
        out.stride(3),
        hq,
        splits,
        D=d,
        NUM_GROUPS=ng,
        G_PAD=_pow2(ng, 2),
        RULE=rule_id,
        BLOCK_D=_pow2(d),
        UPCAST=_dot_args(out.dtype)["UPCAST"],
        num_warps=4,
    )
    if rule_id == 1:
        return out, (masses, outputs)
    return out, modified


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
