"""The Triton kernels (forward only). Imported lazily by :mod:`attnsteer.kernels.ops` on the first
kernel call, so ``TRITON_INTERPRET=1`` only has to be set before that call (``triton.jit`` reads it
when a kernel is defined, i.e. when this module is imported).

Conventions shared by every kernel
----------------------------------
* ``q`` is (B, Hq, Q, D), ``k`` / ``v`` are (B, Hkv, K, D), any strides; query head ``h`` reads
  kv head ``h // GROUP`` with ``GROUP = Hq // Hkv``.
* Visibility of key index ``j`` for query row ``i`` (all in key-index space):
  ``lo_i <= j <= hi_i`` with ``qpos_i = q_offset + i``, ``hi_i = min(qpos_i, K - 1)``,
  ``lo_i = max(kv_start[b], qpos_i - window + 1)`` (the window term only when ``window > 0``;
  ``kv_start`` = first non-pad key index of batch row ``b``, 0 without padding).
  A row with ``lo_i > hi_i`` is fully masked: output 0, log-sum-exp ``-inf``, no NaN.
* Groups: an int8 group id per (b, head, absolute key position) read from ``gid`` at
  ``gid_offset + j`` (``gid_offset`` = absolute position of key index 0); positions at or beyond
  ``gid_len`` (e.g. generated tokens) are group 0. ``gid``'s head stride may be 0 (shared).
* Scores are ``(q . k) * scale`` accumulated in float32; p is cast to v's dtype for the PV
  product (as flash-attention does); accumulators are float32.
* ``DOT_PREC`` is "ieee" for float32 inputs (no TF32 rounding) and "tf32" (ignored) otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))  # a constexpr: compiled kernels may read no other globals


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation. UPCAST (interpreter + bfloat16 only): Triton 3.x's
    interpreter multiplies bfloat16 operands as raw uint16 bits, so they are widened to float32
    first (after any rounding to bfloat16 already happened); compiled kernels never set it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``. UPCAST (interpreter + bfloat16 only): Triton 3.x's interpreter converts float32
    to bfloat16 by truncating the low 16 bits, where GPUs round to nearest even, so the rounding is
    done on the bits first and the interpreter's numbers are the compiled kernels'; compiled kernels
    never set it."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _row_bounds(offs_m, Q_LEN, K_LEN, q_offset, kv_start, window):
    """Per-row visible key range [lo, hi] (hi = -1 for rows beyond Q_LEN)."""
    qpos = q_offset + offs_m
    lo = tl.zeros_like(qpos) + kv_start
    lo = tl.where(window > 0, tl.maximum(lo, qpos - window + 1), lo)
    hi = tl.minimum(qpos, K_LEN - 1)
    hi = tl.where(offs_m < Q_LEN, hi, -1)
    return lo, hi


@triton.jit
def _block_key_range(m0, Q_LEN, K_LEN, q_offset, kv_start, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a block of query rows [m0, m0 + BLOCK_M) can see: [start, end)."""
    lo = kv_start
    first_q = q_offset + m0
    lo = tl.where(window > 0, tl.maximum(lo, first_q - window + 1), lo)
    lo = tl.maximum(lo, 0)
    last_row = tl.minimum(m0 + BLOCK_M, Q_LEN) - 1
    end = tl.minimum(q_offset + last_row, K_LEN - 1) + 1
    start = (lo // BLOCK_N) * BLOCK_N
    return start, end


@triton.jit
def _load_kv_start(KVS, b, HAS_KVS: tl.constexpr):
    if HAS_KVS:
        kvs = tl.load(KVS + b).to(tl.int32)
    else:
        kvs = tl.full([], 0, dtype=tl.int32)
    return kvs


@triton.jit
def _score_tile(
    q,
    k_base,
    offs_n,
    offs_d,
    stride_kn,
    stride_kd,
    K_LEN,
    D,
    scale,
    lo,
    hi,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """s (BLOCK_M, BLOCK_N) float32 with -inf where invisible, and the visibility mask."""
    kmask = (offs_n[None, :] < K_LEN) & (offs_d[:, None] < D)
    kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kmask, other=0.0)
    s = _dot(q, kt, DOT_PREC, UPCAST) * scale
    vis = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
    s = tl.where(vis, s, NEG_INF)
    return s, vis


@triton.jit
def _load_gid_row(GID, b, h, offs_n, stride_gb, stride_gh, stride_gn, gid_offset, gid_len, K_LEN):
    pos = gid_offset + offs_n
    ok = (pos < gid_len) & (offs_n < K_LEN) & (pos >= 0)
    g = tl.load(GID + b * stride_gb + h * stride_gh + pos * stride_gn, mask=ok, other=0)
    return g.to(tl.int32)


# ---------------------------------------------------------------------------------------------
# prefill pass 1: row log-sum-exp and per-group masses (QK only, no V)
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Q_LEN", "K_LEN", "q_offset", "window", "gid_offset", "gid_len"])
def row_stats_kernel(
    Qp,
    Kp,
    LSE,
    MAXS,
    MASS,
    GID,
    LSE_IN,
    KVS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_gb,
    stride_gh,
    stride_gn,
    H,
    GROUP,
    Q_LEN,
    K_LEN,
    scale,
    q_offset,
    window,
    gid_offset,
    gid_len,
    D: tl.constexpr,
    HAS_KVS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    LSE_GIVEN: tl.constexpr,
    WITH_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """LSE and MAXS (row max of the scores) (B, H, Q) and, with NUM_GROUPS > 0,
    MASS (B, H, Q, NUM_GROUPS) = exp(lse_g - lse).

    LSE_GIVEN: read the row LSE from LSE_IN (pass 1 already ran) and sum exp(s - lse) per group
    directly -- no online rescaling; LSE and MAXS are then not written.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, G_PAD)
    q_base = Qp + b * stride_qb + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = Kp + b * stride_kb + hk * stride_kh
    kv_start = _load_kv_start(KVS, b, HAS_KVS)
    lo, hi = _row_bounds(offs_m, Q_LEN, K_LEN, q_offset, kv_start, window)
    start, end = _block_key_range(pid_m * BLOCK_M, Q_LEN, K_LEN, q_offset, kv_start, window, BLOCK_M, BLOCK_N)
    row_ok = offs_m < Q_LEN
    lg = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)

    if LSE_GIVEN:
        lse = tl.load(LSE_IN + pid_bh * Q_LEN + offs_m, mask=row_ok, other=NEG_INF)
        lse_safe = tl.where(lse == NEG_INF, 0.0, lse)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, vis = _score_tile(
                q, k_base, offs_n, offs_d, stride_kn, stride_kd, K_LEN, D, scale, lo, hi, DOT_PREC, UPCAST
            )
            p = tl.where(vis, tl.exp(s - lse_safe[:, None]), 0.0)
            g = _load_gid_row(GID, b, h, offs_n, stride_gb, stride_gh, stride_gn, gid_offset, gid_len, K_LEN)
            for gi in tl.static_range(NUM_GROUPS):
                part = tl.sum(tl.where(g[None, :] == gi, p, 0.0), axis=1)
                lg += tl.where(offs_g[None, :] == gi, part[:, None], 0.0)
        mass = lg
    else:
        m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, vis = _score_tile(
                q, k_base, offs_n, offs_d, stride_kn, stride_kd, K_LEN, D, scale, lo, hi, DOT_PREC, UPCAST
            )
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if NUM_GROUPS > 0:
                g = _load_gid_row(GID, b, h, offs_n, stride_gb, stride_gh, stride_gn, gid_offset, gid_len, K_LEN)
                lg = lg * alpha[:, None]
                for gi in tl.static_range(NUM_GROUPS):
                    part = tl.sum(tl.where(g[None, :] == gi, p, 0.0), axis=1)
                    lg += tl.where(offs_g[None, :] == gi, part[:, None], 0.0)
            m_i = m_new
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), NEG_INF)
        tl.store(LSE + pid_bh * Q_LEN + offs_m, lse, mask=row_ok)
        if WITH_MAX:
            tl.store(MAXS + pid_bh * Q_LEN + offs_m, m_i, mask=row_ok)
        mass = tl.where(has[:, None], lg / tl.where(has, l_i, 1.0)[:, None], 0.0)
    if NUM_GROUPS > 0:
        mptr = MASS + (pid_bh * Q_LEN + offs_m[:, None]) * NUM_GROUPS + offs_g[None, :]
        tl.store(mptr, mass, mask=row_ok[:, None] & (offs_g[None, :] < NUM_GROUPS))


# ---------------------------------------------------------------------------------------------
# the column pass (a group rule's column statistics): sum_i a_ij per key, and the number of rows that see each key (QK only)
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Q_LEN", "K_LEN", "q_offset", "window"])
def column_stats_kernel(
    Qp,
    Kp,
    LSE,
    COLSUM,
    COUNT,
    KVS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    H,
    GROUP,
    Q_LEN,
    K_LEN,
    scale,
    q_offset,
    window,
    D: tl.constexpr,
    HAS_KVS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """COLSUM (B, H, K) = sum over rows of exp(s_ij - lse_i); COUNT (B, K) float = rows seeing j
    (written by the head-0 programs only: visibility does not depend on the head)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.load(
        Kp + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=(offs_n[None, :] < K_LEN) & (offs_d[:, None] < D),
        other=0.0,
    )
    kv_start = _load_kv_start(KVS, b, HAS_KVS)
    q_base = Qp + b * stride_qb + h * stride_qh
    # rows that can see a key of this tile: qpos >= n0 and (window) qpos - window + 1 <= n0 + BLOCK_N - 1
    i_start = tl.maximum(n0 - q_offset, 0)
    i_start = (i_start // BLOCK_M) * BLOCK_M
    i_end = tl.where(window > 0, tl.minimum(Q_LEN, n0 + BLOCK_N - 1 + window - q_offset), Q_LEN)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start_m in range(i_start, i_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Q_LEN
        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        lo, hi = _row_bounds(offs_m, Q_LEN, K_LEN, q_offset, kv_start, window)
        lse = tl.load(LSE + pid_bh * Q_LEN + offs_m, mask=row_ok, other=NEG_INF)
        lse_safe = tl.where(lse == NEG_INF, 0.0, lse)
        s = _dot(q, kt, DOT_PREC, UPCAST) * scale
        vis = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        a = tl.where(vis, tl.exp(tl.where(vis, s, 0.0) - lse_safe[:, None]), 0.0)
        colsum += tl.sum(a, axis=0)
        count += tl.sum(vis.to(tl.int32), axis=0)
    nmask = offs_n < K_LEN
    tl.store(COLSUM + pid_bh * K_LEN + offs_n, colsum, mask=nmask)
    if h == 0:
        tl.store(COUNT + b * K_LEN + offs_n, count.to(tl.float32), mask=nmask)


# ---------------------------------------------------------------------------------------------
# prefill pass 2: fused attention with a per-row, per-group bias, or re-weighting
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pow_weights(u, sp_p, P_INT: tl.constexpr, P_HALF: tl.constexpr):
    """u ** p for u in [0, 1]: multiplications (+ one sqrt) when 2p is an integer <= 32 (P_INT >= 0),
    exp2(p log2 u) otherwise (P_INT < 0). u = 0 gives 0."""
    if P_INT >= 0:
        w = tl.where(u > 0.0, 1.0, 0.0)
        for _ in tl.static_range(P_INT):
            w = w * u
        if P_HALF:
            w = w * tl.sqrt(u)
    else:
        w = tl.where(u > 0.0, tl.exp2(sp_p * tl.log2(tl.where(u > 0.0, u, 1.0))), 0.0)
    return w


@triton.jit
def _attn_sweep(
    q,
    k_base,
    v_base,
    offs_d,
    start,
    end,
    lo,
    hi,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    K_LEN,
    scale,
    GID,
    b,
    h,
    stride_gb,
    stride_gh,
    stride_gn,
    gid_offset,
    gid_len,
    bias_rows,
    offs_g,
    lse_safe,
    nvis,
    off_row,
    inv_tmax,
    sp_p,
    steer,
    D: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    HAS_LSE: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    P_INT: tl.constexpr,
    P_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One sweep over the key tiles [start, end); returns (acc, l) with out = acc / l.

    HAS_LSE: the row LSE of the plain scores is known (pass 1), so weights are formed directly --
    exp(s + bias - lse) (already normalised: no running max, no rescaling of acc) or the re-weighted
    weights ((N a - o) / t_max)^p, whose largest value is 1. Without it: online softmax.
    """
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # per-group bias columns, extracted once (ids >= NUM_GROUPS never occur)
    b0 = tl.max(tl.where(offs_g[None, :] == 0, bias_rows, NEG_INF), axis=1)
    b1 = tl.max(tl.where(offs_g[None, :] == 1, bias_rows, NEG_INF), axis=1)
    b2 = tl.max(tl.where(offs_g[None, :] == 2, bias_rows, NEG_INF), axis=1)
    b3 = tl.max(tl.where(offs_g[None, :] == 3, bias_rows, NEG_INF), axis=1)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, vis = _score_tile(q, k_base, offs_n, offs_d, stride_kn, stride_kd, K_LEN, D, scale, lo, hi, DOT_PREC, UPCAST)
        if NUM_GROUPS > 0:
            g = _load_gid_row(GID, b, h, offs_n, stride_gb, stride_gh, stride_gn, gid_offset, gid_len, K_LEN)
            btile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + b0[:, None]
            if NUM_GROUPS > 1:
                btile = tl.where(g[None, :] == 1, b1[:, None], btile)
            if NUM_GROUPS > 2:
                btile = tl.where(g[None, :] == 2, b2[:, None], btile)
            if NUM_GROUPS > 3:
                btile = tl.where(g[None, :] == 3, b3[:, None], btile)
            s = tl.where(vis, s + btile, NEG_INF)
        if HAS_LSE:
            p = tl.exp(s - lse_safe[:, None])  # 0 where invisible
            if SOFTPLUS:
                t = nvis[:, None] * p - off_row[:, None]
                u = tl.where(vis & (t > 0.0), t * inv_tmax[:, None], 0.0)
                p = tl.where(steer, _pow_weights(u, sp_p, P_INT, P_HALF), p)
            l_i += tl.sum(p, axis=1)
            scaled = p
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
            scaled = p
        vt = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=(offs_n[:, None] < K_LEN) & (offs_d[None, :] < D),
            other=0.0,
        )
        acc += _dot(_cast(scaled, vt.dtype, UPCAST), vt, DOT_PREC, UPCAST)
    return acc, l_i


@triton.jit(do_not_specialize=["Q_LEN", "K_LEN", "q_offset", "window", "gid_offset", "gid_len"])
def attn_fwd_kernel(
    Qp,
    Kp,
    Vp,
    OUT,
    GID,
    BIAS,
    LSE_IN,
    MAX_IN,
    STEER,
    REL0,
    MOD,
    KVS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gn,
    H,
    GROUP,
    Q_LEN,
    K_LEN,
    scale,
    q_offset,
    window,
    gid_offset,
    gid_len,
    sp_p,
    sp_offset,
    sp_free_rows,
    D: tl.constexpr,
    HAS_KVS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    P_INT: tl.constexpr,
    P_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """OUT (B, Q, H, D) = softmax(s + bias[b, h, i, gid_j]) V, or re-weighting.

    BIAS (B, H, Q, NUM_GROUPS) float32: log(M'_g / M_g) per row and group (0 = unchanged row).
    HAS_LSE: LSE_IN (B, H, Q) is the row LSE of the unbiased scores from pass 1 (then
    exp(s + bias - lse) are the final weights whenever sum_g M'_g = 1).
    SOFTPLUS (needs HAS_LSE and MAX_IN, the row max of the scores): weights
    max(N_i a_ij - o_i, 0)^p, computed as (t / t_max)^p so the largest is 1, with o_i = 0 for rows
    whose position from the row's first token (REL0[b] + i) is below ``sp_free_rows`` and
    ``sp_offset`` after. Rows of a steered head (STEER (H,) int8) where no key survives keep plain
    attention (a second sweep, only in blocks that have such a row). MOD (B, H, Q) int8 = 1 where
    the row was re-weighted.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, G_PAD)
    row_ok = offs_m < Q_LEN
    q = tl.load(
        Qp + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = Kp + b * stride_kb + hk * stride_kh
    v_base = Vp + b * stride_vb + hk * stride_vh
    kv_start = _load_kv_start(KVS, b, HAS_KVS)
    lo, hi = _row_bounds(offs_m, Q_LEN, K_LEN, q_offset, kv_start, window)
    start, end = _block_key_range(pid_m * BLOCK_M, Q_LEN, K_LEN, q_offset, kv_start, window, BLOCK_M, BLOCK_N)
    nvis = tl.maximum(hi - lo + 1, 0).to(tl.float32)

    if NUM_GROUPS > 0:
        bias_rows = tl.load(
            BIAS + (pid_bh * Q_LEN + offs_m[:, None]) * NUM_GROUPS + offs_g[None, :],
            mask=row_ok[:, None] & (offs_g[None, :] < NUM_GROUPS),
            other=0.0,
        )
    else:
        bias_rows = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
    if HAS_LSE:
        lse = tl.load(LSE_IN + pid_bh * Q_LEN + offs_m, mask=row_ok, other=NEG_INF)
        lse_safe = tl.where(lse == NEG_INF, 0.0, lse)
    else:
        lse_safe = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SOFTPLUS:
        rel = tl.load(REL0 + b).to(tl.int32) + offs_m
        off_row = tl.where(rel < sp_free_rows, 0.0, sp_offset)
        steer = tl.load(STEER + h) != 0
        rmax = tl.load(MAX_IN + pid_bh * Q_LEN + offs_m, mask=row_ok, other=NEG_INF)
        t_max = nvis * tl.exp(tl.where(rmax == NEG_INF, 0.0, rmax) - lse_safe) - off_row
        inv_tmax = tl.where(t_max > 0.0, 1.0 / tl.where(t_max > 0.0, t_max, 1.0), 1.0 / tl.maximum(nvis, 1.0))
    else:
        off_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        inv_tmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        steer = False

    acc, l_i = _attn_sweep(
        q,
        k_base,
        v_base,
        offs_d,
        start,
        end,
        lo,
        hi,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        K_LEN,
        scale,
        GID,
        b,
        h,
        stride_gb,
        stride_gh,
        stride_gn,
        gid_offset,
        gid_len,
        bias_rows,
        offs_g,
        lse_safe,
        nvis,
        off_row,
        inv_tmax,
        sp_p,
        steer,
        D,
        NUM_GROUPS,
        HAS_LSE,
        SOFTPLUS,
        P_INT,
        P_HALF,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DOT_PREC,
        UPCAST,
    )
    if SOFTPLUS:
        failed = steer & (l_i == 0.0) & (nvis > 0.0) & row_ok
        modified = steer & (l_i > 0.0) & row_ok
        if tl.sum(failed.to(tl.int32), axis=0) > 0:
            # rows where nothing is above the uniform level: the rule leaves them unchanged
            acc0, l0 = _attn_sweep(
                q,
                k_base,
                v_base,
                offs_d,
                start,
                end,
                lo,
                hi,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                K_LEN,
                scale,
                GID,
                b,
                h,
                stride_gb,
                stride_gh,
                stride_gn,
                gid_offset,
                gid_len,
                bias_rows,
                offs_g,
                lse_safe,
                nvis,
                off_row,
                inv_tmax,
                sp_p,
                False,
                D,
                NUM_GROUPS,
                HAS_LSE,
                SOFTPLUS,
                P_INT,
                P_HALF,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                DOT_PREC,
                UPCAST,
            )
            acc = tl.where(failed[:, None], acc0, acc)
            l_i = tl.where(failed, l0, l_i)
        tl.store(MOD + pid_bh * Q_LEN + offs_m, modified.to(tl.int8), mask=row_ok)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where(l_i[:, None] > 0.0, acc / l_safe[:, None], 0.0)
    optr = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(optr, _cast(out, OUT.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# decode: split-K sweep over the cache (all query heads of one kv head together), then a merge
# ---------------------------------------------------------------------------------------------
@triton.jit
def _store_partials(
    PM,
    PL,
    PACC,
    m,
    l,
    acc,
    b,
    hk,
    pid_s,
    rows_h,
    rows_g,
    offs_d,
    HQ,
    GROUP,
    NUM_SPLITS,
    D: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    WITH_ACC: tl.constexpr,
):
    """Write one split's partials: row r is head ``hk * GROUP + rows_h[r]``, group ``rows_g[r]``,
    at ((b, head, split, group)) of the contiguous (B, HQ, NUM_SPLITS, NUM_GROUPS[, D]) buffers."""
    idx = ((b * HQ + hk * GROUP + rows_h) * NUM_SPLITS + pid_s) * NUM_GROUPS + rows_g
    ok = (rows_h < GROUP) & (rows_g < NUM_GROUPS)
    tl.store(PM + idx, m, mask=ok)
    tl.store(PL + idx, l, mask=ok)
    if WITH_ACC:
        tl.store(PACC + idx[:, None] * D + offs_d[None, :], acc, mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=["K_LEN", "q_offset", "window", "gid_offset", "gid_len", "NUM_SPLITS", "SPLIT_LEN"])
def decode_split_kernel(
    Qp,
    Kp,
    Vp,
    PM,
    PL,
    PACC,
    GID,
    SCORES,
    LSE_PM,
    LSE_PL,
    STEER,
    REL0,
    KVS,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gn,
    HQ,
    HKV,
    GROUP,
    K_LEN,
    scale,
    q_offset,
    window,
    gid_offset,
    gid_len,
    NUM_SPLITS,
    SPLIT_LEN,
    sp_p,
    sp_offset,
    sp_free_rows,
    D: tl.constexpr,
    HAS_KVS: tl.constexpr,
    MODE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One (batch row, kv head, split) program; rows = the GROUP query heads of that kv head.

    Partials per (b, h, split, group): PM (running max), PL (sum), PACC (D), contiguous
    (B, HQ, NUM_SPLITS, NUM_GROUPS[, D]).
    MODE 0 (groups): one score sweep with per-group sums and outputs (group of key j = gid).
    MODE 1 (scores): QK only; writes s to SCORES (B, HQ, K) and (max, sum) as group 0.
    MODE 2 (re-weighting): reads SCORES and the MODE-1 partials (LSE_PM/LSE_PL) instead of K; group 0
      accumulates the unchanged weights exp(s - lse) (max fixed at 0), group 1 the re-weighted
      scores s' = p log(N exp(s - lse) - o) online.
    With several groups (MODE 0 with NUM_GROUPS > 1, MODE 2) the per-group state is stacked: row
    r = g * BLOCK_H + h of a (G_PAD * BLOCK_H, BLOCK_D) accumulator, so each key tile takes one
    P @ V product for all groups (per-group (BLOCK_H, G_PAD, BLOCK_D) accumulators updated with
    tl.where spilled registers at compile time).
    """
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_r = tl.arange(0, BLOCK_H)
    heads = hk * GROUP + offs_r
    row_ok = offs_r < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, G_PAD)
    kv_start = _load_kv_start(KVS, b, HAS_KVS)
    qpos = q_offset
    lo = tl.maximum(kv_start, 0)
    lo = tl.where(window > 0, tl.maximum(lo, qpos - window + 1), lo)
    hi = tl.minimum(qpos, K_LEN - 1)
    s0 = pid_s * SPLIT_LEN
    s1 = tl.minimum(s0 + SPLIT_LEN, hi + 1)
    start = tl.maximum(s0, (lo // BLOCK_N) * BLOCK_N)
    v_base = Vp + b * stride_vb + hk * stride_vh

    offs_gr = tl.arange(0, G_PAD * BLOCK_H)  # stacked per-group rows: r = g * BLOCK_H + h
    g_of_r = offs_gr // BLOCK_H
    h_of_r = offs_gr % BLOCK_H

    if MODE == 2:
        # row LSE from the MODE-1 partials of every split, S_PAD splits at a time
        mx = tl.full([BLOCK_H], NEG_INF, dtype=tl.float32)
        tot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s_first in range(0, NUM_SPLITS, S_PAD):
            offs_s = s_first + tl.arange(0, S_PAD)
            pbase = (b * HQ + heads[:, None]) * NUM_SPLITS + offs_s[None, :]
            pmask = row_ok[:, None] & (offs_s[None, :] < NUM_SPLITS)
            pm = tl.load(LSE_PM + pbase, mask=pmask, other=NEG_INF)
            pl = tl.load(LSE_PL + pbase, mask=pmask, other=0.0)
            mx_new = tl.maximum(mx, tl.max(pm, axis=1))
            mx_safe = tl.where(mx_new == NEG_INF, 0.0, mx_new)
            tot = tot * tl.exp(mx - mx_safe) + tl.sum(pl * tl.exp(pm - mx_safe[:, None]), axis=1)
            mx = mx_new
        mx_safe = tl.where(mx == NEG_INF, 0.0, mx)
        lse_safe = tl.where(tot > 0.0, mx_safe + tl.log(tl.where(tot > 0.0, tot, 1.0)), 0.0)
        nvis = tl.maximum(hi - lo + 1, 0).to(tl.float32)
        rel = tl.load(REL0 + b).to(tl.int32)
        off_row = tl.where(rel < sp_free_rows, 0.0, sp_offset)
        steer = tl.load(STEER + heads, mask=row_ok, other=0) != 0
        m1 = tl.full([BLOCK_H], NEG_INF, dtype=tl.float32)
        # stacked rows: group 0 (unchanged weights, no rescaling) then group 1 (re-weighted, online)
        l_r = tl.zeros([G_PAD * BLOCK_H], dtype=tl.float32)
        acc_r = tl.zeros([G_PAD * BLOCK_H, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, s1, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            vis_n = (offs_n >= lo) & (offs_n < s1)
            vis = row_ok[:, None] & vis_n[None, :]
            s = tl.load(SCORES + (b * HQ + heads[:, None]) * K_LEN + offs_n[None, :], mask=vis, other=NEG_INF)
            w0 = tl.where(vis, tl.exp(s - lse_safe[:, None]), 0.0)
            t = nvis * w0 - off_row
            keep = vis & (t > 0.0) & steer[:, None]
            s1_ = tl.where(keep, sp_p * tl.log(tl.where(keep, t, 1.0)), NEG_INF)
            m_new = tl.maximum(m1, tl.max(s1_, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = tl.exp(m1 - m_safe)
            p1 = tl.exp(s1_ - m_safe[:, None])
            vt = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=(offs_n[:, None] < K_LEN) & (offs_d[None, :] < D),
                other=0.0,
            )
            w_r = tl.reshape(
                tl.where((offs_g == 0)[:, None, None], w0[None, :, :], p1[None, :, :]), [G_PAD * BLOCK_H, BLOCK_N]
            )
            a_r = tl.reshape(tl.where((offs_g == 0)[:, None], 1.0, alpha[None, :]), [G_PAD * BLOCK_H])
            l_r = l_r * a_r + tl.sum(w_r, axis=1)
            acc_r = acc_r * a_r[:, None] + _dot(_cast(w_r, vt.dtype, UPCAST), vt, DOT_PREC, UPCAST)
            m1 = m_new
        m_r = tl.reshape(tl.where((offs_g == 0)[:, None], 0.0, m1[None, :]), [G_PAD * BLOCK_H])
        _store_partials(
            PM,
            PL,
            PACC,
            m_r,
            l_r,
            acc_r,
            b,
            hk,
            pid_s,
            h_of_r,
            g_of_r,
            offs_d,
            HQ,
            GROUP,
            NUM_SPLITS,
            D,
            NUM_GROUPS,
            True,
        )
    else:
        q = tl.load(
            Qp + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        k_base = Kp + b * stride_kb + hk * stride_kh
        m_i = tl.full([BLOCK_H], NEG_INF, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        l_r = tl.zeros([G_PAD * BLOCK_H], dtype=tl.float32)
        acc_r = tl.zeros([G_PAD * BLOCK_H, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, s1, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=(offs_n[None, :] < K_LEN) & (offs_d[:, None] < D),
                other=0.0,
            )
            s = _dot(q, kt, DOT_PREC, UPCAST) * scale
            vis_n = (offs_n >= lo) & (offs_n < s1)
            vis = row_ok[:, None] & vis_n[None, :]
            s = tl.where(vis, s, NEG_INF)
            if MODE == 1:
                tl.store(SCORES + (b * HQ + heads[:, None]) * K_LEN + offs_n[None, :], s, mask=vis)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            if MODE == 0:
                vt = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(offs_n[:, None] < K_LEN) & (offs_d[None, :] < D),
                    other=0.0,
                )
            if NUM_GROUPS > 1:
                # stacked rows g * BLOCK_H + h: one P @ V product serves every group
                g = tl.load(
                    GID + b * stride_gb + heads[:, None] * stride_gh + (gid_offset + offs_n[None, :]) * stride_gn,
                    mask=vis & ((gid_offset + offs_n[None, :]) < gid_len),
                    other=0,
                ).to(tl.int32)
                p_r = tl.reshape(
                    tl.where(g[None, :, :] == offs_g[:, None, None], p[None, :, :], 0.0), [G_PAD * BLOCK_H, BLOCK_N]
                )
                a_r = tl.reshape(alpha[None, :] + tl.zeros([G_PAD, BLOCK_H], dtype=tl.float32), [G_PAD * BLOCK_H])
                l_r = l_r * a_r + tl.sum(p_r, axis=1)
                acc_r = acc_r * a_r[:, None] + _dot(_cast(p_r, vt.dtype, UPCAST), vt, DOT_PREC, UPCAST)
            else:
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if MODE == 0:
                    acc = acc * alpha[:, None] + _dot(_cast(p, vt.dtype, UPCAST), vt, DOT_PREC, UPCAST)
            m_i = m_new
        if NUM_GROUPS > 1:
            m_r = tl.reshape(m_i[None, :] + tl.zeros([G_PAD, BLOCK_H], dtype=tl.float32), [G_PAD * BLOCK_H])
            _store_partials(
                PM,
                PL,
                PACC,
                m_r,
                l_r,
                acc_r,
                b,
                hk,
                pid_s,
                h_of_r,
                g_of_r,
                offs_d,
                HQ,
                GROUP,
                NUM_SPLITS,
                D,
                NUM_GROUPS,
                MODE == 0,
            )
        else:
            _store_partials(
                PM,
                PL,
                PACC,
                m_i,
                l_i,
                acc,
                b,
                hk,
                pid_s,
                offs_r,
                offs_r * 0,
                offs_d,
                HQ,
                GROUP,
                NUM_SPLITS,
                D,
                NUM_GROUPS,
                MODE == 0,
            )


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def decode_merge_kernel(
    PM,
    PL,
    PACC,
    OUT,
    STEER,
    MOD,
    MASSES,
    OGROUPS,
    stride_ob,
    stride_oh,
    stride_od,
    HQ,
    NUM_SPLITS,
    D: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    RULE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Merge the split partials per group (flash-decoding); the rule kind decides what is written.
    STEER (HQ,) int8: steered query heads (re-weight kind).

    RULE 0: plain attention (all groups together) to OUT. RULE 1 (group kind): OUT gets plain
    attention, MASSES (B*HQ, G) float32 each group's mass M_g and OGROUPS (B*HQ, G, D) float32 its
    normalised output o_g -- the caller's rule turns the masses into factors, ``sum_g f_g M_g o_g``.
    RULE 2 (re-weight kind): group 0 = unchanged weights, group 1 = re-weighted; re-weighted when
    the head is steered and some key survived; MOD (B, HQ) int8 = 1 where it was.
    """
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < NUM_GROUPS
    mx = tl.full([G_PAD], NEG_INF, dtype=tl.float32)
    lsum = tl.zeros([G_PAD], dtype=tl.float32)
    asum = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        idx = (pid * NUM_SPLITS + s) * NUM_GROUPS + offs_g
        m_s = tl.load(PM + idx, mask=gmask, other=NEG_INF)
        l_s = tl.load(PL + idx, mask=gmask, other=0.0)
        a_s = tl.load(PACC + idx[:, None] * D + offs_d[None, :], mask=gmask[:, None] & (offs_d[None, :] < D), other=0.0)
        m_new = tl.maximum(mx, m_s)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        c_old = tl.exp(mx - m_safe)
        c_new = tl.exp(m_s - m_safe)
        lsum = lsum * c_old + l_s * c_new
        asum = asum * c_old[:, None] + a_s * c_new[:, None]
        mx = m_new
    has = lsum > 0.0
    o_g = tl.where(has[:, None], asum / tl.where(has, lsum, 1.0)[:, None], 0.0)
    lse_g = tl.where(has, tl.where(mx == NEG_INF, 0.0, mx) + tl.log(tl.where(has, lsum, 1.0)), NEG_INF)
    top = tl.max(lse_g, axis=0)
    top_safe = tl.where(top == NEG_INF, 0.0, top)
    mass = tl.where(has, tl.exp(lse_g - top_safe), 0.0)
    total = tl.sum(mass, axis=0)
    mass = mass / tl.where(total > 0.0, total, 1.0)
    if RULE == 2:
        steer = tl.load(STEER + h) != 0
        l1 = tl.sum(tl.where(offs_g == 1, lsum, 0.0), axis=0)
        modified = steer & (l1 > 0.0)
        w = tl.where(offs_g == tl.where(modified, 1, 0), 1.0, 0.0)
        w = tl.where(tl.sum(tl.where(offs_g == 0, lsum, 0.0), axis=0) > 0.0, w, 0.0)
    else:
        w = mass
    out = tl.sum(w[:, None] * o_g, axis=0)
    out = _cast(out, OUT.dtype.element_ty, UPCAST)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out, mask=offs_d < D)
    if RULE == 1:
        tl.store(MASSES + pid * NUM_GROUPS + offs_g, mass, mask=gmask)
        tl.store(
            OGROUPS + (pid * NUM_GROUPS + offs_g[:, None]) * D + offs_d[None, :],
            o_g,
            mask=gmask[:, None] & (offs_d[None, :] < D),
        )
    if RULE == 2:
        tl.store(MOD + pid, modified.to(tl.int8))
