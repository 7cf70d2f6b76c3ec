"""Triton kernels for steered attention (forward only). Never imports transformers.

Importing ``attnsteer.kernels`` never fails, with or without triton: triton is imported, and the
kernels are defined, on the first kernel call (``TritonUnavailableError`` then says how to install
it). Under ``TRITON_INTERPRET=1`` (set before that first call) the kernels run on CPU tensors in
Triton's interpreter, which is how the test suite checks them without a GPU.

* :func:`row_stats`   -- pass 1 (QK only): row log-sum-exp and per-group masses;
* :func:`column_stats` -- the column pass (a group rule's ``column_stats``): per-key sums of the
  weights and the rows seeing each key;
* :func:`attention`   -- pass 2: fused attention with a per-row, per-group bias (the group rule
  kind), or re-weighting (the re-weight kind) that reads pass 1's LSE;
* :func:`decode`      -- split-K decode (one query row): plain, per-group masses and outputs (the
  group kind; the caller's rule combines them) or re-weighting.

The kernels know rule kinds, never methods.

See docs/kernels.md for the design, the memory traffic of each pass and what falls back.
"""

from .ops import (
    MAX_GROUPS,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    Groups,
    KernelLaunchError,
    MaskSpec,
    ReweightArgs,
    TritonUnavailableError,
    attention,
    available,
    column_stats,
    decode,
    decode_splits,
    interpreting,
    row_stats,
)

__all__ = [
    "MAX_GROUPS",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "Groups",
    "KernelLaunchError",
    "MaskSpec",
    "ReweightArgs",
    "TritonUnavailableError",
    "attention",
    "available",
    "column_stats",
    "decode",
    "decode_splits",
    "interpreting",
    "row_stats",
]
