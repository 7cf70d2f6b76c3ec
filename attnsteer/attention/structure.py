"""The structure of a forward's attention mask, as the fused backends need it.

The kernels (Triton on CUDA, the PyTorch flash path on CPU) never read a Q x K mask: they take
causal + left padding (+ a sliding window) as a :class:`attnsteer.kernels.ops.MaskSpec` (query
offset, each batch row's first valid key, window). :func:`mask_structure` derives it from
``info.first_valid`` and the key offset, and checks it against the mask tensor transformers built
-- once per forward and mask (every layer of a forward shares the mask, so the O(B Q K) check and
its one host sync are paid once per forward, not per layer). A mask that is anything else gives a
string saying why, and the caller takes the generic chunked path.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field

import torch

from ..kernels.ops import MaskSpec
from .geometry import ForwardInfo, MaskView


@dataclass
class Structure:
    spec: MaskSpec
    key_offset: int  # absolute position of key index 0
    rel0: torch.Tensor  # int32 (B,): position of query row 0 counted from the row's first token
    # per-row facts a backend derives from the structure (visible-key counts, ...), computed once
    # per forward and shared by its layers: see :meth:`memo`
    derived: dict = field(default_factory=dict, repr=False)

    def memo(self, key, build):
        """``build()`` the first time ``key`` is asked for in this forward, the kept value after."""
        value = self.derived.get(key)
        if value is None:
            value = self.derived[key] = build()
        return value


_CACHE: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_CACHE_SIZE = 32


def _mask_key(mask: MaskView, info: ForwardInfo, b: int, q_len: int, k_len: int, device) -> tuple:
    t = mask.mask
    if t is None:
        return (id(info), None, b, q_len, k_len, str(device))
    return (
        id(info),
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        b,
        q_len,
        k_len,
        str(device),
    )


def _verify(mask: MaskView, q_offset: int, kv_start: torch.Tensor | None, q_len: int, k_len: int):
    """(ok, window): whether the mask is exactly causal + left padding (+ a window W, inferred as
    the largest number of keys any row sees). One host sync."""
    t = mask.mask
    dev = t.device
    vis = t if mask.is_bool else t > torch.finfo(t.dtype).min / 2
    rows = torch.arange(q_len, device=dev).view(1, 1, -1, 1) + q_offset
    keys = torch.arange(k_len, device=dev).view(1, 1, 1, -1)
    expected = keys <= rows
    if kv_start is not None:
        expected = expected & (keys >= kv_start.view(-1, 1, 1, 1))
    width = vis.sum(-1, dtype=torch.int64).amax()
    expected = expected & (keys > rows - width)
    ok = (vis == expected).all()
    if not mask.is_bool:  # additive masks: visible entries must add exactly 0
        ok = ok & (t.masked_fill(~vis, 0) == 0).all()
    ok_v, width_v = torch.stack([ok.to(torch.int64), width]).tolist()
    return bool(ok_v), int(width_v)


def mask_structure(mask: MaskView, info: ForwardInfo, b: int, q_len: int, k_len: int, device):
    """The :class:`Structure` of this call's mask, or a string saying why it is not causal + left
    padding (+ a sliding window)."""
    key = _mask_key(mask, info, b, q_len, k_len, device)
    return _cached(key, info, lambda: _build_structure(mask, info, b, q_len, k_len, device))


def call_structure(call):
    """The :class:`Structure` of an :class:`~attnsteer.attention.geometry.AttentionCall`'s mask (causal +
    left padding + window, what the fast kernels take), or a string saying why it is not one; once
    per forward and mask."""
    return mask_structure(call.mask, call.info, call.batch, call.q_len, call.k_len, call.device)


def sees_later_keys(mask: MaskView, info: ForwardInfo, q_len: int, k_len: int, device) -> bool:
    """Whether some query row may attend to a key after its own position (bidirectional blocks, as
    Gemma 3's image tokens have): then a chunk of rows must read every key, not just the keys up to
    its last row. Row i sits at key index ``past_len - key_offset + i``. One host sync per mask."""
    if mask.mask is None:
        return False
    key = ("later", *_mask_key(mask, info, 0, q_len, k_len, device))

    def build() -> bool:
        t = mask.mask
        vis = t if mask.is_bool else t > torch.finfo(t.dtype).min / 2
        q_offset = info.past_len - max(info.total_len - k_len, 0)
        rows = torch.arange(vis.shape[-2], device=t.device).view(-1, 1) + q_offset
        later = torch.arange(vis.shape[-1], device=t.device).view(1, -1) > rows
        return bool((vis & later).any())

    return _cached(key, info, build)


def _cached(key: tuple, info: ForwardInfo, build):
    """``build()`` once per forward (``info``) and mask; kept for the forward's other layers."""
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is info:
        return hit[1]
    result = build()
    try:
        _CACHE[key] = (weakref.ref(info), result)
    except TypeError:  # pragma: no cover - info without weakref support: no caching
        return result
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _build_structure(mask: MaskView, info: ForwardInfo, b: int, q_len: int, k_len: int, device):
    key_offset = max(info.total_len - k_len, 0)
    fv = info.first_valid
    if fv is not None and fv.shape[0] != b:
        return "first_valid does not match the batch"
    if fv is not None:
        fv = fv.to(device)
        rel0 = (info.past_len - fv).to(torch.int32)
    else:
        rel0 = torch.full((b,), info.past_len, dtype=torch.int32, device=device)
    if mask.mask is None:
        # MaskView's rule for a missing mask: plain causal, query i at key index K - Q + i
        if k_len < q_len:
            return "fewer keys than queries"
        return Structure(MaskSpec(q_offset=k_len - q_len), key_offset, rel0)
    t = mask.mask
    if t.shape[1] != 1:
        return "per-head attention mask"
    if t.shape[0] not in (1, b) or t.shape[-2] != q_len or t.shape[-1] != k_len:
        return f"mask of shape {tuple(t.shape)} for Q={q_len}, K={k_len}"
    q_offset = info.past_len - key_offset
    if q_offset < 0 or q_offset + q_len > k_len:
        return "query positions outside the keys"
    kv_start = None if fv is None else (fv - key_offset).clamp(min=0).to(torch.int32)
    ok, width = _verify(mask, q_offset, kv_start, q_len, k_len)
    if not ok or width == 0:
        return "mask is not causal + left padding + sliding window"
    window = 0 if width >= q_offset + q_len else width
    return Structure(MaskSpec(q_offset=q_offset, kv_start=kv_start, window=window), key_offset, rel0)
