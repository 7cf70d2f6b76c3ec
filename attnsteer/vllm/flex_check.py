"""The FlexAttention path checks itself, and gives back the requests it cannot serve (no vLLM here).

Before the FlexAttention impl (:mod:`attnsteer.vllm.flex_backend`) steers a request whose rules
are of a (rule kind, dtype, head dim) it has not served yet in this process, that combination is
checked once on a small synthetic call (:mod:`attnsteer.attention.selfcheck`): one request of the
synthetic call (no padding; an unsteered request with other keys packed before it) is written into
a FlexAttention paged cache on the call's device -- vLLM's layout and the engine's block size,
blocks out of order, block 0 unused (:class:`PagedStep`) -- steered by
:func:`attnsteer.vllm.flex_rules.steer` with the impl's own FlexAttention kernel (vLLM's compiled
``flex_attention`` on GPUs), and compared with the chunked path by the dtype rule of the test suite.
The kinds checked are those FlexAttention computes: ``score`` (the ``score_mod``), ``group`` (the
correction from the kernel's output and log-sum-exp) and ``reweight`` (the second kernel pass);
head rules scale the output in the same PyTorch on every path, key rules never reach attention.

A combination that fails its check (a mismatch, a compile error, an exception of the kernel), or
whose real call raises, is warned once (:class:`~attnsteer.attention.selfcheck.KernelSelfCheckWarning`)
and the requests carrying it are given back for the rest of the process: each is computed by
attnsteer's chunked path over its keys and values gathered from the paged cache by its block table
(:func:`attnsteer.vllm.paged.run_chunked`, as the CPU build computes every request), and counted in
its layer's SiteStats under ``fallbacks`` (``"vllm-flex: <reason>"``) and ``paths``
(``"chunked/<phase>"``); the requests FlexAttention serves count under ``"vllm-flex/<phase>"``.
``ATTNSTEER_TRITON_SELFCHECK=0`` skips the check (a real call's failure still gives its
combinations back); ``ATTNSTEER_TRITON_STRICT=1`` raises instead of giving back.

Shapes: ``T`` packed rows, ``H`` query heads, ``H_kv`` kv heads, ``D`` head dim, ``R`` requests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import settings
from ..attention import selfcheck
from ..context import PromptState
from ..errors import AttnsteerError
from . import compat, flex_rules
from .paged import request_info, request_inputs, run_chunked

NAME = "vllm-flex"
KINDS = ("score", "group", "reweight")  # the rule kinds FlexAttention computes (checked)
PACKED = (0,)  # the synthetic call's batch: one request without padding (packed rows carry none)
NEG_INF = float("-inf")


def kinds(steps) -> tuple[str, ...]:
    """The checked kinds of a request's ``steps`` (a :class:`~attnsteer.plan.Steps`), in :data:`KINDS` order."""
    present = {rule.kind for rule in (*steps.score, *steps.weight)}
    return tuple(kind for kind in KINDS if kind in present)


# ---------------------------------------------------------------------------------------------
# a packed step over a paged cache, as vLLM's FlexAttention metadata describes one
# ---------------------------------------------------------------------------------------------
class PagedStep:
    """One packed step as FlexAttention's impl runs it: the rows of ``R`` requests concatenated
    (request r's rows ``starts[r]..starts[r+1]``), their keys in ``kv_cache`` (num_blocks, H_kv,
    block, 2 D) at the blocks of ``block_table`` (R, max blocks) in position order, ``seq_lens`` (R,)
    tokens so far (rows are each request's last). As vLLM 0.34's metadata: a key slot maps to its
    request's logical position through the inverse block table, block 0 is never live, the mask is
    causal (and a sliding window), and a ``score_mod`` is called on logical positions with the
    packed row as ``physical_q``, -inf on slots that are no key of the row's request."""

    def __init__(self, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens, starts):
        device = kv_cache.device
        self.kv_cache, self.block = kv_cache, kv_cache.shape[2]
        starts = torch.as_tensor(starts, dtype=torch.long)
        seq = torch.as_tensor(seq_lens, dtype=torch.long)
        rows = starts[1:] - starts[:-1]
        self.rows = int(starts[-1])
        self.doc = torch.repeat_interleave(torch.arange(len(rows)), rows).to(device)  # (T,) row -> request
        self.start, self.seq = starts[:-1].to(device), seq.to(device)
        self.offset = (seq - rows).to(device)  # logical position of each request's first row
        blocks = kv_cache.shape[0]
        table = block_table.long().cpu()
        used = torch.arange(table.shape[1]).view(1, -1) < (-(-seq // self.block)).view(-1, 1)
        logical = torch.full((len(rows), blocks), -1, dtype=torch.long)
        logical.scatter_reduce_(-1, torch.where(used, table, 0), torch.where(used, torch.arange(table.shape[1]), -1),
                                reduce="amax")  # fmt: skip
        logical[:, 0] = -1
        self.to_logical = logical.to(device)  # (R, num_blocks)

    def logical(self, q_idx, kv_idx):
        """(valid, logical row, logical key) of packed row ``q_idx`` and cache slot ``kv_idx``."""
        r = self.doc[q_idx]
        lb = self.to_logical[r, kv_idx // self.block]
        lkv = lb * self.block + kv_idx % self.block
        valid = (lb >= 0) & (lkv < self.seq[r])
        return valid, q_idx - self.start[r] + self.offset[r], lkv

    def mask_mod(self, window: int = 0):
        def mask_mod(b, h, q_idx, kv_idx):
            valid, lq, lkv = self.logical(q_idx, kv_idx)
            valid = valid & (lkv <= lq)
            return valid & (lkv > lq - window) if window > 0 else valid

        return mask_mod

    def score_mod(self, user):
        """vLLM's wrapper of ``user(score, b, h, q_logical, kv_logical, physical_q)``."""
        if user is None:
            return None

        def score_mod(score, b, h, q_idx, kv_idx):
            valid, lq, lkv = self.logical(q_idx, kv_idx)
            return torch.where(valid, user(score, b, h, lq, lkv, physical_q=q_idx), NEG_INF)

        return score_mod

    def tensors(self, query: torch.Tensor, window: int = 0):
        """(q (1, H, T, D), k / v (1, H_kv, slots, D) views of the cache, the BlockMask) the kernel
        takes for ``query`` (T, H, D)."""
        from torch.nn.attention.flex_attention import create_block_mask

        hkv, d = self.kv_cache.shape[1], query.shape[-1]
        slots = self.kv_cache.transpose(1, 2).reshape(-1, hkv, 2 * d)  # (num_blocks * block, H_kv, 2 D)
        k = slots[..., :d].transpose(0, 1).unsqueeze(0)
        v = slots[..., d:].transpose(0, 1).unsqueeze(0)
        mask = create_block_mask(self.mask_mod(window), None, None, self.rows, slots.shape[0], device=query.device,
                                 BLOCK_SIZE=(16, self.block))  # fmt: skip
        return query.transpose(0, 1).unsqueeze(0), k, v, mask

    def attend(self, query: torch.Tensor, scale: float, kernel: Callable, window: int = 0):
        """``attend(score_mod)`` -> (out (T, H, D), lse (T, H)) of ``query`` (T, H, D) over the cache
        by ``kernel(q, k, v, score_mod, block_mask, scale)`` (:func:`eager_kernel`,
        :func:`attnsteer.vllm.compat.flex_kernel`), as :func:`flex_rules.steer` takes it."""
        q, k, v, mask = self.tensors(query, window)

        def attend(score_mod):
            out, lse = kernel(q, k, v, self.score_mod(score_mod), mask, scale)
            return out[0].transpose(0, 1), lse[0].transpose(0, 1)

        return attend


def eager_kernel(q, k, v, score_mod, block_mask, scale):
    """torch's ``flex_attention`` run eagerly (CPU; tests) -> (out (1, H, T, D), lse (1, H, T))."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    with warnings.catch_warnings():  # eager flex_attention warns that it is not compiled
        warnings.simplefilter("ignore", UserWarning)
        out, aux = flex_attention(q, k, v, score_mod, block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
                                  return_aux=AuxRequest(lse=True))  # fmt: skip
    return out, aux.lse


# ---------------------------------------------------------------------------------------------
# the synthetic call on this path
# ---------------------------------------------------------------------------------------------
def synthetic_run(kernel: Callable = eager_kernel, block_size: int = 16) -> Callable:
    """The self-check's compute of this path: ``run(steps, call, q, k, v)`` -> out (1, Q, H, D) in
    q's dtype for a synthetic call of one request (q (1, H, Q, D), k / v (1, H_kv, K, D), no
    padding): an unsteered request (its keys rolled by one position) and this one packed in that
    order into a paged cache of ``block_size``-token blocks on the call's device (their blocks
    interleaved, in descending order, block 0 unused), steered by :func:`flex_rules.steer` through
    :meth:`PagedStep.attend` with ``kernel``."""

    def run(steps, call, query, key, value):
        if call.batch != 1 or call.info.max_pad:
            raise ValueError(
                f"a packed step's synthetic call is one unpadded request (pads={PACKED}); got {call.batch}"
            )
        length, rows = call.k_len, call.q_len
        requests_kv = [(key[0].roll(1, dims=1), value[0].roll(1, dims=1)), (key[0], value[0])]
        per_request = -(-length // block_size)
        order = torch.arange(2 * per_request, 0, -1).view(per_request, 2).T  # (2, blocks): interleaved, descending
        storage = query.new_zeros(2 * per_request + 1, block_size, key.shape[1], 2 * key.shape[-1])
        kv_cache = storage.transpose(1, 2)  # (num_blocks, H_kv, block, 2 D), as vLLM hands it to the impl
        for blocks, (k, v) in zip(order, requests_kv):
            compat.flex_write_request_kv(kv_cache, blocks, k, v)
        step = PagedStep(kv_cache, order, [length, length], [0, rows, 2 * rows])
        packed = query[0].transpose(0, 1).repeat(2, 1, 1)  # (2 Q, H, D): the same queries for both
        slices = [
            flex_rules.RequestSlice(r * rows, (r + 1) * rows, length, type(steps)((), (), ()) if r == 0 else steps,
                                    PromptState() if r == 0 else call.prompt,
                                    lambda blocks=order[r]: compat.flex_read_request_kv(kv_cache, blocks, length,
                                                                                        key.shape[1], key.shape[-1]))
            for r in range(2)
        ]  # fmt: skip
        attend = step.attend(packed, call.scaling, kernel)
        out = flex_rules.steer(call.layer, packed, slices, call.scaling, attend)
        return out[rows:].unsqueeze(0).to(query.dtype)

    return run


# ---------------------------------------------------------------------------------------------
# the gate in front of the kernel
# ---------------------------------------------------------------------------------------------
@dataclass
class Gate:
    """Which requests of a packed step FlexAttention serves, and the chunked path for the others.

    kernel: the impl's FlexAttention call (:func:`attnsteer.vllm.compat.flex_kernel` on GPUs),
    which the self-check runs too. selfcheck / strict: ``ATTNSTEER_TRITON_SELFCHECK`` /
    ``ATTNSTEER_TRITON_STRICT`` (:meth:`from_settings`)."""

    kernel: Callable = eager_kernel
    selfcheck: bool = True
    strict: bool = False

    @classmethod
    def from_settings(cls, kernel: Callable = eager_kernel) -> Gate:
        current = settings.current()
        return cls(kernel, current.triton_selfcheck, current.triton_strict)

    def refusal(self, steps, dtype: torch.dtype, head_dim: int, device, block_size: int = 16) -> str | None:
        """Why a request with ``steps`` goes to the chunked path (a kind of it failed), or None;
        checks each kind not yet checked for (dtype, head dim) in this process first."""
        for kind in kinds(steps):
            if self.selfcheck:
                reason = selfcheck.ensure_combination(NAME, kind, dtype, head_dim, device,
                                                      synthetic_run(self.kernel, block_size), strict=self.strict,
                                                      pads=PACKED)  # fmt: skip
            else:
                reason = selfcheck.failure(NAME, kind, dtype, head_dim)
            if reason:
                return reason
        return None

    def steer(self, layer: int, query, requests: list, scale: float, attend, window: int = 0, block_size: int = 16):
        """:func:`flex_rules.steer` over ``requests`` whose combinations pass; the others by
        :func:`chunked_request`. When the kernel raises on this call, the kinds it carried are given
        back for the process and its requests of those kinds go to the chunked path too (the others
        keep a plain kernel call). query (T, H, D); returns (T, H, D) float32; counts each request's
        path (and fallback reason) in its ``stats``."""
        dtype, head_dim, device = query.dtype, query.shape[-1], query.device
        served, given = [], []
        for req in requests:
            reason = self.refusal(req.steps, dtype, head_dim, device, block_size)
            if reason is None:
                served.append(req)
            else:
                given.append((req, reason))
        try:
            out = flex_rules.steer(layer, query, served, scale, attend, window)
        except AttnsteerError:
            raise  # a usage error of a rule, not of the kernel
        except Exception as exc:
            failed = sorted({kind for req in served for kind in kinds(req.steps)})
            if self.strict or not failed:
                raise
            reason = f"kernel failure: {type(exc).__name__}: {selfcheck.short(exc)}"
            for kind in failed:
                selfcheck.record_failure(NAME, kind, dtype, head_dim, reason)
            given += [(req, self.refusal(req.steps, dtype, head_dim, device)) for req in served if kinds(req.steps)]
            served = [req for req in served if not kinds(req.steps)]  # head rules alone: the plain kernel's output
            out = flex_rules.steer(layer, query, served, scale, attend, window)
        for req in served:
            if req.stats is not None:
                req.stats.ran(NAME, req.phase)
        for req, reason in given:
            if req.stats is not None:
                req.stats.fell_back(NAME, reason)
            out[req.q0 : req.q1] = chunked_request(layer, query, req, scale, window, out)
        return out


def chunked_request(layer: int, query, req, scale: float, window: int, plain) -> torch.Tensor:
    """A request of a packed step by attnsteer's chunked path: its keys and values gathered from the
    paged cache (``req.kv()``), its rows of ``query`` (T, H, D), its steps, state and stats;
    ``plain`` (T, H, D): the kernel's output, which rules of the head kind alone scale. -> (C, H, D)."""
    inputs = request_inputs(query, req.q0, req.q1, req.length, window, req.keys_values)
    stats = req.stats if req.stats is not None else selfcheck.NullStats()
    out = run_chunked(layer, req.steps, request_info(req.rows, req.length), req.prompt, inputs,
                      lambda: plain[req.q0 : req.q1].unsqueeze(0), stats, scale)  # fmt: skip
    return out[0].float()
