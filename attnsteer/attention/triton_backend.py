"""The ``fused`` backend on Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).

``triton_attention`` has the contract of :func:`attnsteer.attention.fused.fused_attention` and
produces the same numbers (to float rounding) for what it supports:

* one weight-level step per layer, softmax scoring, of a method with glue below (keyed by
  ``method.name``): ``act`` (prefill with sink detection, continuation chunks and decode with the
  prompt's sinks), ``softplus`` (re-weighting, ``scoring: softmax``) and ``var`` (four key
  groups: other / text sink / image sink / visual non-sink; prefill, chunks and decode);
* masks that are causal + left padding (+ a sliding window): ``None`` (plain causal, MaskView's
  rule) or a 4D bool / additive float mask whose visibility is exactly
  ``kv_start[b] <= j <= q_offset + i`` (and ``j > q_offset + i - W``). The structure comes from
  ``info.first_valid`` plus the key offset; it is checked against the mask tensor transformers
  built, once per forward and mask (the mask is shared by all layers of a forward, so the check --
  O(B Q K) elementwise and one host sync -- is paid once per forward, not per layer);
* fp16 / bf16 / fp32, head dim <= 256, Hq a multiple of Hkv.

Everything else -- a score-level step (LSSA scoring, PAI), two weight steps on one layer, another
method, any other mask -- goes to ``fused_attention`` (plain PyTorch), never to an approximation.
Each call is counted in :data:`COUNTERS` (``"triton/<method>/<phase>"`` or ``"fallback/<reason>"``)
so benchmarks and tests can tell which path ran.

Dispatch (see :func:`wanted` and ``dispatch.select_fused_backend``): CUDA tensors use these
kernels when triton imports; CPU tensors only when ``ATTNSTEER_TRITON=1`` and
``TRITON_INTERPRET=1`` (interpreter tests); ``ATTNSTEER_TRITON=0`` turns the kernels off everywhere.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch

from .. import kernels as K
from ..errors import AttnsteerWarning
from ..methods.base import StepInfo
from .routing import COUNTERS, fallback, fast_path_inputs, single_weight_step
from .rows import ForwardInfo, MaskView
from .structure import Structure

_DISABLED: dict[str, str] = {}  # set when a kernel failed to compile/launch: the process falls back
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def wanted(query: torch.Tensor) -> bool:
    """Whether the ``fused`` backend should run this call on the Triton kernels: CUDA tensors when
    triton imports (unless ``ATTNSTEER_TRITON=0`` or a kernel failed in this process); CPU tensors
    only with ``ATTNSTEER_TRITON=1`` under ``TRITON_INTERPRET=1`` (the interpreter tests)."""
    mode = os.environ.get("ATTNSTEER_TRITON", "").strip().lower()
    if mode in _FALSE or _DISABLED:
        return False
    if query.is_cuda:
        return K.available()
    return mode in _TRUE and K.interpreting() and K.available()


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
def _route(plan, query, key, value, info: ForwardInfo):
    """The single method this call can run on the kernels, or the reason it cannot."""
    if _DISABLED:
        return "kernels disabled after a launch failure"
    if not K.available():
        return "triton unavailable"
    if not query.is_cuda and not K.interpreting():
        return "cpu tensors without TRITON_INTERPRET=1"
    if query.dtype not in K.SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    if query.shape[-1] > 256 or query.shape[1] % key.shape[1] or key.shape[2] == 0:
        return "shape"
    return single_weight_step(plan, info.is_prefill, _GLUE)


def triton_attention(plan, query, key, value, mask: MaskView, scaling: float, info: ForwardInfo, stats, softcap=None):
    """query (B, H_q, Q, D), key/value (B, H_kv, K, D) -> (out (B, Q, H_q, D) in query.dtype, None).
    The kernels have no logit soft-capping: soft-capped calls (Gemma 2) take the chunked path."""
    ready = fast_path_inputs(_route(plan, query, key, value, info), query, key, mask, info, softcap)
    if isinstance(ready, str):
        return fallback(ready, plan, query, key, value, mask, scaling, info, stats, softcap=softcap)
    route, struct = ready
    try:
        out, rows, phase = _GLUE[route.kernel_rule](route, query, key, value, struct, float(scaling), info)
    except K.KernelLaunchError as exc:
        if os.environ.get("ATTNSTEER_TRITON_STRICT", "").strip().lower() in _TRUE:
            raise
        _DISABLED["reason"] = str(exc)
        warnings.warn(
            f"attnsteer: a Triton kernel failed ({exc}); this process now uses the PyTorch fused path. "
            "Set ATTNSTEER_TRITON_STRICT=1 to raise instead, and please report it",
            AttnsteerWarning,
            stacklevel=2,
        )
        return fallback("kernel failure", plan, query, key, value, mask, scaling, info, stats)
    stats.record(route, rows)
    COUNTERS[f"triton/{route.kernel_rule}/{phase}"] += 1
    return out, None


# ---------------------------------------------------------------------------------------------
# per-method glue
# ---------------------------------------------------------------------------------------------
_STEER_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _steer_flags(method, hq: int, device) -> torch.Tensor:
    """int8 (Hq,) 1 for the method's steered query heads, kept per method and device (decode calls
    it every step: no new host-to-device copy each time)."""
    key = (hq, str(device))
    cached = _STEER_FLAGS.get(method)
    if cached is not None and cached[0] == key:
        return cached[1]
    flags = (torch.ones(hq, dtype=torch.int8) if method.heads is None else method.heads.to(torch.int8)).to(device)
    _STEER_FLAGS[method] = (key, flags)
    return flags


def _act_groups(method, b: int, k_len: int, struct: Structure, step: StepInfo, device) -> K.Groups:
    """Group 1 = the prompt's sinks (per query head, absolute positions), 0 = everything else."""
    table = method.prompt_state.get("sinks")
    if table is None or table.shape[0] != b:
        # ACT's own lookup raises the SteeringError that explains the problem
        method.sinks_for_keys(torch.arange(k_len, device=device) + struct.key_offset, b, step)
        raise AssertionError("unreachable: sinks_for_keys accepted a missing sink table")  # pragma: no cover
    if table.device != device:
        table = table.to(device)
    return K.Groups(table.view(torch.int8), 2, offset=struct.key_offset)


def _act_bias(method, masses: torch.Tensor, struct: Structure, q_len: int):
    """Per-row bias log(M'_g / M_g) of ACT's groups (0 other, 1 sinks), from ``ACT.group_factors``."""
    m_other, m_sink = masses[..., :1], masses[..., 1:2]  # (B, H, Q, 1)
    rel = struct.rel0.view(-1, 1, 1, 1) + torch.arange(q_len, device=masses.device).view(1, 1, -1, 1)
    rows = method.steered_rows(m_sink, m_other, rel, m_sink)
    log_sink, log_other = method.group_factors(m_sink, m_other, log=True)
    bias = torch.cat([log_other, torch.full_like(log_other, log_sink)], dim=-1)
    bias = torch.where(rows, bias, torch.zeros_like(bias))
    return bias, rows.sum()


def _act(method, query, key, value, struct: Structure, scaling: float, info: ForwardInfo):
    b, hq, q_len, _ = query.shape
    k_len = key.shape[2]
    dev = query.device
    spec = struct.spec
    step = StepInfo(is_prefill=info.is_prefill, key_offset=struct.key_offset, num_keys=k_len)
    if method.needs_column_stats(info.is_prefill):
        # prefill: LSE pass, column pass (sink detection), group-mass pass, biased pass
        lse, _ = K.row_stats(query, key, spec, scaling)
        colsum, count = K.column_stats(query, key, lse, spec, scaling)
        key_abs = torch.arange(k_len, device=dev) + struct.key_offset
        method.set_column_stats(colsum, count, step, key_abs=key_abs)
        groups = _act_groups(method, b, k_len, struct, step, dev)
        _, masses = K.row_stats(query, key, spec, scaling, groups=groups, lse=lse)
        phase = "prefill"
    else:
        groups = _act_groups(method, b, k_len, struct, step, dev)
        if q_len == 1:
            out, modified = K.decode(
                query,
                key,
                value,
                spec,
                scaling,
                groups=groups,
                rule="act",
                beta=float(method.p.beta),
                steer=_steer_flags(method, hq, dev),
                rel0=struct.rel0,
            )
            return out, modified.sum(), "decode"
        lse, masses = K.row_stats(query, key, spec, scaling, groups=groups)
        phase = "chunk"
    bias, rows = _act_bias(method, masses, struct, q_len)
    # ACT conserves each row's mass, so exp(s + bias - lse) are the final weights (no running max)
    out, _ = K.attention(query, key, value, spec, scaling, groups=groups, bias=bias, lse=lse)
    return out, rows, phase


def _softplus(method, query, key, value, struct: Structure, scaling: float, info: ForwardInfo):
    hq, q_len = query.shape[1], query.shape[2]
    args = K.SoftplusArgs(
        p=float(method.p.p),
        offset=float(method.p.offset),
        steer=_steer_flags(method, hq, query.device),
        rel0=struct.rel0,
    )
    if q_len == 1 and not info.is_prefill:
        out, modified = K.decode(query, key, value, struct.spec, scaling, rule="softplus", softplus=args)
        return out, modified.sum(), "decode"
    args.lse, _, args.rowmax = K.row_stats(query, key, struct.spec, scaling, with_max=True)
    out, modified = K.attention(query, key, value, struct.spec, scaling, softplus=args)
    return out, modified.sum(), "prefill" if info.is_prefill else "chunk"


_VAR_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _var_groups(method, struct: Structure, k_len: int, device) -> tuple[K.Groups, torch.Tensor]:
    """VAR's groups of the prompt positions (int8 (B, 1, P): 0 other, 1 text sink, 2 image sink,
    3 visual non-sink; generated tokens are group 0) and the bool (B,) gate of query rows after
    the prompt (decode rows) for this forward's keys. Cached per prompt and layer (the cache keeps
    the sink and image tables it was built from, and is rebuilt when either is replaced) and per
    span of prompt positions among the keys (constant across decode steps)."""
    state = method.state
    sinks, image = state.sinks.by_layer.get(method.layer), state.roles.image
    prompt_len = image.shape[-1]
    span = (struct.key_offset, min(struct.key_offset + k_len, prompt_len), str(device))
    cached = _VAR_TABLES.get(method)
    if cached is None or cached[0] is not sinks or cached[1] is not image or cached[2] != str(device):
        gid = method.group_ids(torch.arange(prompt_len, device=image.device))  # VAR's error if no sinks
        cached = (sinks, image, str(device), gid.to(device).unsqueeze(1), {})
        _VAR_TABLES[method] = cached
    gid, gates = cached[3], cached[4]
    if span not in gates:
        keys = torch.arange(span[0], max(span[1], span[0]), device=image.device)
        after_prompt = torch.full((1,), prompt_len, device=image.device)
        gates[span] = method.row_gate(after_prompt, *method.key_groups(keys)).view(-1).to(device)
    return K.Groups(gid, 4, offset=struct.key_offset), gates[span]


def _var(method, query, key, value, struct: Structure, scaling: float, info: ForwardInfo):
    b, hq, q_len, _ = query.shape
    k_len = key.shape[2]
    dev = query.device
    spec = struct.spec
    groups, decode_gate = _var_groups(method, struct, k_len, dev)
    first_row = struct.key_offset + spec.q_offset  # absolute position of query row 0
    p = float(method.p.p)
    if q_len == 1 and not info.is_prefill and first_row >= groups.gid.shape[-1]:
        args = K.VarArgs(p=p, rho=float(method.p.rho), min_image=float(method.p.min_image_attention), gate=decode_gate)
        out, modified = K.decode(
            query,
            key,
            value,
            spec,
            scaling,
            groups=groups,
            rule="var",
            var=args,
            steer=_steer_flags(method, hq, dev),
        )
        return out, modified.sum(), "decode"
    lse, masses = K.row_stats(query, key, spec, scaling, groups=groups)
    m_other, m_text_sink, m_image_sink, m_vis = masses.unsqueeze(-2).unbind(-1)  # each (B, H, C, 1)
    m_sink, m_img = m_text_sink + m_image_sink, m_image_sink + m_vis
    row_abs = torch.arange(q_len, device=dev) + first_row
    gate = method.row_gate(row_abs, *method.key_groups(torch.arange(k_len, device=dev) + struct.key_offset))
    rows = method.select_rows(gate[:, None, :, None], m_img, m_sink, m_vis, m_vis)  # (B, H, C, 1)
    # VAR conserves each row's mass: exp(s + bias - lse) are the final weights (no running max)
    log_sink, vis_bias = method.group_factors(m_sink, m_vis, log=True)
    sink_bias = torch.full_like(m_vis, log_sink)
    bias = torch.cat([torch.zeros_like(m_other), sink_bias, sink_bias, vis_bias], dim=-1)
    bias = torch.where(rows, bias, torch.zeros_like(bias))
    out, _ = K.attention(query, key, value, spec, scaling, groups=groups, bias=bias, lse=lse)
    return out, rows.sum(), "prefill" if info.is_prefill else "chunk"


_GLUE = {"act": _act, "softplus": _softplus, "var": _var}
