"""The one place that decides which backend computes a steered attention call.

Per call, :func:`run` walks the candidate backends of the handle's :class:`BackendConfig` -- a
forced one, or for ``auto`` the fast path of the call's device and then the chunked path, which
runs everything -- and takes the first whose :class:`~attnsteer.attention.capability.Capability`
(rule kinds, device, dtype, mask structure, soft-cap, how many weight rules) and availability (the
kernel is usable in this process) allow the call. A backend may still give a call back after
looking at its data (:class:`Refusal`: e.g. re-weighting whose weights would underflow the direct
form); the router then takes the next. Which backend ran, and every fallback with its reason, is
counted on the layer's site (``handle.stats()``). A forced backend that cannot run a call raises,
naming why.

Backends (modules with ``CAPABILITY``, ``unavailable(config, call)`` and ``run(steps, call, q, k,
v, stats, config)``): ``reference`` (float32 oracle, materialised), ``chunked`` (PyTorch, any
mask, every kind), ``flash`` (PyTorch's CPU flash kernel + log-sum-exp corrections), ``triton``
(CUDA kernels; CPU tensors under ``TRITON_INTERPRET=1``), ``keyscale`` (a lone ``key_scale`` score
rule as fused attention over scaled keys, any device).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import SteeringError

BACKENDS = {
    "reference": "attnsteer.attention.reference",
    "chunked": "attnsteer.attention.chunked",
    "flash": "attnsteer.attention.flash_cpu",
    "triton": "attnsteer.attention.triton",
    "keyscale": "attnsteer.attention.scaled_keys",
}
CHOICES = ("auto", "fused", *BACKENDS)  # fused: the fused paths, as auto (the name of earlier releases)
TRITON_MODES = ("auto", "off", "interpret")


class Refusal(str):
    """What a backend returns instead of an output when, after looking at a call's data, it leaves
    the call to the next backend; the string says why."""


@dataclass(frozen=True)
class BackendConfig:
    """How one handle routes its calls, fixed at ``apply``.

    backend: ``auto`` / ``fused`` (the fastest backend that can run each call), or one of
             ``reference``, ``chunked``, ``flash``, ``triton`` (that one, or an error naming why not).
    triton:  ``auto`` (the kernels on CUDA tensors when triton imports), ``off``, or ``interpret``
             (also CPU tensors, under ``TRITON_INTERPRET=1``: the interpreter tests).
    strict:  a Triton kernel that fails to compile or launch, or fails its self-check, raises
             instead of sending its (rule kind, dtype, head dim) to the next backend for the rest
             of the process with a warning.
    selfcheck: the Triton kernels check each (rule kind, dtype, head dim) on a small synthetic
             call before serving it the first time in the process (:mod:`attnsteer.attention.selfcheck`).
    """

    backend: str = "auto"
    triton: str = "auto"
    strict: bool = False
    selfcheck: bool = True

    def __post_init__(self):
        if self.backend not in CHOICES:
            raise ValueError(f"backend: got {self.backend!r}; allowed: {list(CHOICES)}")
        if self.triton not in TRITON_MODES:
            raise ValueError(f"triton: got {self.triton!r}; allowed: {list(TRITON_MODES)}")

    @classmethod
    def from_settings(cls, backend: str = "auto") -> BackendConfig:
        """The config for ``backend`` with the documented environment overrides (attnsteer.settings)."""
        from .. import settings

        current = settings.current()
        return cls(
            backend=backend, triton=current.triton, strict=current.triton_strict, selfcheck=current.triton_selfcheck
        )

    @property
    def forced(self) -> bool:
        return self.backend not in ("auto", "fused")

    def candidates(self, device_type: str, steps=None) -> tuple[str, ...]:
        """Backends to try for a call on ``device_type`` carrying ``steps``, in order: a lone
        ``key_scale`` score rule first tries the scaled-keys backend (any device)."""
        if self.forced:
            return (self.backend,)
        fast = ()
        if steps is not None and any(rule.form == "key_scale" for rule in steps.score):
            fast = ("keyscale",)
        if device_type == "cuda" and self.triton != "off":
            fast += ("triton",)
        elif device_type == "cpu":
            fast += ("triton", "flash") if self.triton == "interpret" else ("flash",)
        return (*fast, "chunked")


def backend(name: str):
    """The backend module called ``name`` (imported on first use: Triton's only when asked for)."""
    return importlib.import_module(BACKENDS[name])


def refusal(name: str, config: BackendConfig, steps, call) -> str | None:
    """Why backend ``name`` cannot run ``steps`` on ``call``: its capability table, then whether it
    is usable in this process; None when it can."""
    module = backend(name)
    return module.CAPABILITY.refusal(steps, call) or module.unavailable(config, call)


def run(config: BackendConfig, steps, call, query, key, value, stats):
    """The call's output (B, Q, H_q, D) in the query's dtype, from the first backend that runs it."""
    for name in config.candidates(call.device.type, steps):
        reason = refusal(name, config, steps, call)
        if reason is None:
            out = backend(name).run(steps, call, query, key, value, stats, config)
            if not isinstance(out, Refusal):
                stats.ran(name, call.phase)
                return out
            reason = str(out)
        if config.forced:
            raise SteeringError(
                f"backend={name!r} cannot run layer {call.layer}'s {call.phase} call: {reason}. Fix: "
                "backend='auto' (the fastest backend that can run each call) or backend='chunked' (runs every "
                "rule kind, on any device and mask)"
            )
        stats.fell_back(name, reason)
    raise AssertionError("unreachable: the chunked backend runs every call")  # pragma: no cover
