"""Attention-level cases shared by the backends' tests (Triton kernels, CPU flash path, chunked):
methods with small hand-checked settings, phases (prefill, continuation chunk, decode) and
padded causal masks, all compared against the reference backend. :func:`attend` runs one call on
a named backend, through the router when a fast backend is asked for (so a call it cannot run
raises instead of passing on another path)."""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnsteer.attention import chunked, reference, router
from attnsteer.attention.geometry import AttentionCall, ForwardInfo, MaskView
from attnsteer.context import PromptState
from attnsteer.methods.act import ACT
from attnsteer.methods.softplus import SoftplusReweight
from attnsteer.methods.var import VAR
from attnsteer.plan import LayerPlan
from attnsteer.roles import PromptRoles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Stats:
    """Counts the rows each method changed and which backends ran, like the sites' SiteStats."""

    def __init__(self):
        self.rows = {}
        self.paths: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()

    def record(self, method, rows):
        self.rows[id(method)] = self.rows.get(id(method), 0) + int(rows)

    def ran(self, backend, phase):
        self.paths[f"{backend}/{phase}"] += 1

    def fell_back(self, backend, reason):
        self.fallbacks[f"{backend}: {reason}"] += 1


def params(cls, **over):
    return {name: over.get(name, p.default) for name, p in cls.params.items()}


HEADS = torch.tensor([True, False, True, False, False, True])


def var_prompt() -> PromptState:
    """A fake 14-token prompt for VAR (the decode phase's row 14 is the first generated token): image
    tokens at 4..9 (batch row 1: 6..11); its sinks at 0, 5, 7 (text, image, image) in row 0 and at
    5, 8 (padding, image) in row 1."""
    image = torch.zeros(2, 14, dtype=torch.bool)
    image[0, 4:10], image[1, 6:12] = True, True
    table = torch.zeros(2, 14, dtype=torch.bool)
    table[0, [0, 5, 7]], table[1, [5, 8]] = True, True
    prompt = PromptState(PromptRoles(image.to(DEVICE)))
    prompt.put((0, 0), "sinks", table.to(DEVICE))
    return prompt


def var_method(variant="paper", heads=None, p=0.6):
    chosen = params(VAR, rho=0.2, min_image_attention=0.05, variant=variant, p=p)
    return VAR(VAR.finalize_params(chosen), 0, heads)


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


def case(name, k_len, past, **over):
    """(LayerPlan with a fresh method of case ``name``, a function making a fresh PromptState for
    one backend run): continuation rows of ACT reuse a prompt's sinks (random, seeded); VAR's
    prompt has its roles and hidden-state sinks. ``over``: parameters to replace."""
    method = METHODS[name]()
    if over:
        method.p = dataclasses.replace(method.p, **over)
        method.rules = method.build_rules()
    if past and method.name == "act":  # continuation rows reuse the prompt's sinks
        method.p = dataclasses.replace(method.p, apply_to="all")
    plan = LayerPlan(0)
    plan.methods.append(method)

    def prompt() -> PromptState:
        if method.name == "var":
            return var_prompt()
        state = PromptState()
        if past and method.name == "act":
            sinks = torch.rand(2, 6, k_len, generator=torch.Generator().manual_seed(1)) > 0.7
            state.put(method.key, "sinks", sinks.to(DEVICE))
        return state

    return plan, prompt


def call_of(
    q, k, mask: MaskView, info: ForwardInfo, prompt: PromptState | None = None, scaling=None, softcap=None, layer=0
):
    """The :class:`AttentionCall` of q (B, H, Q, D), k (B, H_kv, K, D) under ``mask`` and ``info``."""
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    return AttentionCall(layer, info, q, k, mask, scaling, prompt if prompt is not None else PromptState(), softcap)


def attend(backend, plan, q, k, v, mask: MaskView, info: ForwardInfo, prompt=None, stats=None, **kw):
    """One call of ``plan`` on ``backend`` -> out (B, Q, H, D). ``reference`` is called directly, so is
    ``chunked`` with ``chunk=`` (rows per chunk); otherwise through the router with that backend
    forced (a call it cannot run raises, naming why; ``stats.paths`` records the run).
    ``kw``: ``scaling``, ``softcap``, ``chunk``, ``compute_dtype`` (reference), ``triton`` (mode)."""
    stats = stats if stats is not None else Stats()
    call = call_of(q, k, mask, info, prompt, kw.get("scaling"), kw.get("softcap"))
    steps = plan.steps(info.is_prefill)
    if backend == "reference":
        return reference.attend(steps, call, q, k, v, stats, compute_dtype=kw.get("compute_dtype", torch.float32))[0]
    if backend == "chunked" and kw.get("chunk"):
        return chunked.run(steps, call, q, k, v, stats, chunk=kw["chunk"])
    config = router.BackendConfig(backend, triton=kw.get("triton", "interpret" if backend == "triton" else "off"))
    return router.run(config, steps, call, q, k, v, stats)


def plan_of(*methods) -> LayerPlan:
    """A layer plan holding ``methods`` (layer 0), in order."""
    plan = LayerPlan(0)
    plan.methods.extend(methods)
    return plan


def weights_as_attention(a):
    """q, k, v (1, 1, Q|K, D) whose attention at scaling 1 has the weights ``a`` (1, 1, Q, K) (rows
    summing to 1 over the keys the mask shows them), with v the identity: the output row i of
    (B, Q, H, D) is row i's weights (padded with zeros to D). q_i = e_i and k_j[i] = log a_ij."""
    _, _, nq, nk = a.shape
    d = max(nq, nk)
    q = torch.eye(d)[:nq].view(1, 1, nq, d)
    k = torch.zeros(1, 1, nk, d)
    k[0, 0, :, :nq] = torch.log(a[0, 0]).clamp(min=-1e4).T
    v = torch.eye(d)[:nk].view(1, 1, nk, d)
    return q, k, v


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
