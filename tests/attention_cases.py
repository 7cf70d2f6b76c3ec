"""Attention-level cases shared by the fused backends' tests (Triton kernels, CPU flash path):
methods with small hand-checked settings, phases (prefill, continuation chunk, decode) and
padded causal masks, all compared against ``reference_attention``."""

from __future__ import annotations

import dataclasses
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnsteer.methods.act import ACT
from attnsteer.methods.softplus import SoftplusReweight
from attnsteer.methods.var import VAR
from attnsteer.plan import LayerPlan
from attnsteer.roles import PromptRoles
from attnsteer.sinks import HiddenSinks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Stats:
    """Counts the rows each method changed, like the backends' SiteStats."""

    def __init__(self):
        self.rows = {}

    def record(self, method, rows):
        self.rows[id(method)] = self.rows.get(id(method), 0) + int(rows)


def params(cls, **over):
    return {name: over.get(name, p.default) for name, p in cls.params.items()}


HEADS = torch.tensor([True, False, True, False, False, True])


def var_method(variant="paper", heads=None, p=0.6):
    """VAR on a fake 14-token prompt (the decode phase's row 14 is the first generated token):
    image tokens at 4..9 (batch row 1: 6..11); sinks at 0, 5, 7 (text, image, image) in row 0 and
    at 5, 8 (padding, image) in row 1."""
    image = torch.zeros(2, 14, dtype=torch.bool)
    image[0, 4:10], image[1, 6:12] = True, True
    table = torch.zeros(2, 14, dtype=torch.bool)
    table[0, [0, 5, 7]], table[1, [5, 8]] = True, True
    sinks = HiddenSinks()
    sinks.by_layer[0] = table.to(DEVICE)
    state = types.SimpleNamespace(roles=PromptRoles(image.to(DEVICE)), sinks=sinks)
    chosen = params(VAR, rho=0.2, min_image_attention=0.05, variant=variant, p=p)
    return VAR(VAR.finalize_params(chosen), 0, heads, state=state)


METHODS = {
    "act": lambda: ACT(params(ACT, threshold=0.05, beta=0.2), 0, None),
    "act-heads": lambda: ACT(params(ACT, threshold=0.05, beta=0.2, keep_first_sink=False), 0, HEADS),
    "softplus": lambda: SoftplusReweight(params(SoftplusReweight, p=2.5), 0, None),
    "softplus-heads": lambda: SoftplusReweight(params(SoftplusReweight, p=3.0, offset=0.5), 0, HEADS),
    "var": lambda: var_method(),
    "var-released-heads": lambda: var_method("released", HEADS, p=1.0),
}
PHASES = {"prefill": (11, 11, 0), "chunk": (9, 15, 6), "decode": (1, 15, 14)}


def padded_mask(b, q_len, k_len, pads, window=0):
    rows = torch.arange(k_len - q_len, k_len).view(1, 1, -1, 1)
    keys = torch.arange(k_len).view(1, 1, 1, -1)
    mask = keys <= rows
    if window:
        mask = mask & (keys > rows - window)
    return (mask & (keys >= torch.tensor(pads).view(-1, 1, 1, 1))).expand(b, 1, q_len, k_len).clone().to(DEVICE)


def plans(name, k_len, past):
    """Two plans of the same fresh method (one per backend being compared)."""
    made = []
    for _ in range(2):
        m = METHODS[name]()
        if past and m.name == "act":  # continuation rows reuse the prompt's sinks
            m.p = dataclasses.replace(m.p, apply_to="all")
            sinks = torch.rand(2, 6, k_len, generator=torch.Generator().manual_seed(1)) > 0.7
            m.prompt_state["sinks"] = sinks.to(DEVICE)
        plan = LayerPlan(0)
        plan.methods.append(m)
        made.append(plan)
    return made


def inputs(b, hq, hkv, q_len, k_len, d, seed=0, dtype=torch.float32, strong=3.0):
    """q (B, Hq, Q, D), k, v (B, Hkv, K, D) with one key ``strong`` times larger, so rows are not
    near-uniform."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g) * 1.5
    k = torch.randn(b, hkv, k_len, d, generator=g) * 1.5
    v = torch.randn(b, hkv, k_len, d, generator=g)
    k[:, :, min(3, k_len - 1)] *= strong
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns while active (the O(N)-memory tests)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
