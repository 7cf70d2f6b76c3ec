"""Reading one request's keys and values out of vLLM's paged CPU KV cache."""

from __future__ import annotations

import torch


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
