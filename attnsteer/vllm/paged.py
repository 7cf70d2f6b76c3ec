"""One request of a packed serving step, computed alone: its keys and values gathered out of vLLM's
paged KV cache, attnsteer's chunked path on them.

The CPU build's backend (:mod:`attnsteer.vllm.cpu_backend`) steers every request this way; the
FlexAttention backend (:mod:`attnsteer.vllm.flex_backend`) gives a request this way when its
rules' (kind, dtype, head dim) failed the self-check (:mod:`attnsteer.vllm.flex_check`). Each
backend reads its own cache layout (:func:`read_request_kv` here for CPU_ATTN,
:func:`attnsteer.vllm.compat.flex_read_request_kv` for FlexAttention); :func:`request_inputs` and
:func:`run_chunked` are shared.
"""

from __future__ import annotations

import torch

from ..attention import chunked
from ..attention.geometry import AttentionCall, ForwardInfo, MaskView


def read_request_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions ``0..length-1`` of one request: (H_kv, length, D) each.

    kv_cache: (num_blocks, H_kv, block_size, 2 * D) as CPU_ATTN allocates it. In its ``vec`` /
    ``vec16`` layouts each (block, kv head) holds K transposed, (D, block_size), followed by V,
    (block_size, D) (vLLM's ``cpu_attn_vec`` ``reshape_and_cache``). blocks: the request's row of
    the block table (block ids in position order).
    """
    _, hkv, block, two_d = kv_cache.shape
    d = two_d // 2
    n = -(-length // block)
    raw = kv_cache[blocks[:n].long()].reshape(n, hkv, 2, block * d)
    k = raw[:, :, 0].reshape(n, hkv, d, block).permute(1, 0, 3, 2).reshape(hkv, n * block, d)
    v = raw[:, :, 1].reshape(n, hkv, block, d).permute(1, 0, 2, 3).reshape(hkv, n * block, d)
    return k[:, :length], v[:, :length]


def window_mask(q_len: int, length: int, window: int) -> torch.Tensor | None:
    """bool (1, 1, Q, K) visibility of a request's last ``q_len`` rows under a sliding window of
    ``window`` keys (vLLM: key j visible from position p iff p - W < j <= p); None without one."""
    if window <= 0:
        return None
    rows = torch.arange(length - q_len, length).view(-1, 1)
    keys = torch.arange(length).view(1, -1)
    return ((keys <= rows) & (keys > rows - window)).view(1, 1, q_len, length)


def request_info(q_len: int, length: int) -> ForwardInfo:
    """The :class:`ForwardInfo` of one request's ``q_len`` rows ending its ``length`` tokens so far."""
    return ForwardInfo(q_len=q_len, past_len=length - q_len, total_len=length, first_valid=None, batch=1)


def request_inputs(query: torch.Tensor, q0: int, q1: int, length: int, window: int, read):
    """``inputs()`` -> (q (1, H, C, D), k / v (1, H_kv, n, D), MaskView) of rows ``q0..q1`` of the
    packed ``query`` (T, H, D): one request with ``length`` tokens so far, its keys and values from
    ``read()`` -> (H_kv, n, D) each (the gather from the paged cache, run only when called)."""

    def inputs():
        k, v = read()
        q = query[q0:q1].transpose(0, 1).unsqueeze(0)
        mask = MaskView(window_mask(q1 - q0, length, window), q1 - q0, length)
        return q, k.unsqueeze(0), v.unsqueeze(0), mask

    return inputs


def run_chunked(layer: int, steps, info: ForwardInfo, prompt, inputs, own, stats, scale: float, softcap=None):
    """The ``steps`` (a :class:`~attnsteer.plan.Steps`) of one call of the request(s) whose state is
    ``prompt``, by attnsteer's chunked backend: ``inputs()`` -> (q (B, H, Q, D), k / v (B, H_kv, K,
    D), MaskView), read only when a score or weight rule (or a head rule that ``reads_call``) needs
    them; ``own()`` -> the engine's own output (B, Q, H, D) otherwise; head rules scale the result.
    ``stats``: the layer's SiteStats (begun by the caller). Returns (B, Q, H, D) in q's dtype."""
    call = None
    if steps.attention or any(rule.reads_call for rule in steps.head):
        q, k, v, mask = inputs()
        call = AttentionCall(layer, info, q, k, mask, scale, prompt, softcap)
    if steps.attention:
        out = chunked.run(steps, call, q, k.to(q.dtype), v.to(q.dtype), stats)
        stats.ran("chunked", call.phase)
    else:  # head rules only: the engine's own attention output
        out = own()
    for rule in steps.head:
        out, touched = rule.apply(out, call if call is not None else HeadCall(info), prompt)
        stats.record(rule.method, touched)
    return out


class HeadCall:
    """What a head rule reads of a call the engine's own kernel computed: its phase."""

    def __init__(self, info: ForwardInfo):
        self.info = info

    @property
    def is_prefill(self) -> bool:
        return self.info.is_prefill
