"""A fast backend checks itself before it serves a (rule kind, dtype, head dim) for the first time.

Kernels that were only ever tested under an interpreter, or compiled ahead of time, meet a real
device the first time a user runs them. So before a fast backend (the Triton kernels; a serving
engine's GPU path can reuse this module) computes its first real call of a *combination* -- rule
kind, dtype, head dim -- in a process, :func:`ensure` runs one small deterministic synthetic call
of that combination (a prefill and a decode step) on the call's device, by the backend and by the
chunked PyTorch path, and compares them by the dtype rule of the test suite (:func:`dtype_rule`).

The synthetic rules are built here, one per kind (:func:`synthetic_rule`): a generic 4-group rule
that needs the prefill map's column statistics, a re-weight rule, and a score rule whose input
varies by row, head and key and which reads the call's cosine and head dim; they steer a subset of
the heads. They are no method of the library: backends implement kinds and never name a method.

The result is kept per process in a registry keyed by (backend, kind, dtype, head dim): ``"ok"``,
or the reason the combination failed (a mismatch, a compile error, a launch error). A failure is
warned once (:class:`KernelSelfCheckWarning`), and the backend gives that combination's calls to the
next backend for the rest of the process (the router counts each as a fallback with the reason, in
``handle.stats()``); with ``strict`` it raises instead. A kernel failure of a real call is recorded
the same way (:func:`record_failure`). ``ATTNSTEER_TRITON_SELFCHECK=0`` skips the check
(:mod:`attnsteer.settings`).

Another backend reuses it by calling :func:`ensure` with its own name and compute function before
its first real call of a combination (and :func:`record_failure` when a kernel fails on a real
call): the function receives the synthetic call as the Hugging Face path describes one (q, k, v of
shapes (B, H, Q, D) / (B, H_kv, K, D) and an :class:`AttentionCall`); a backend whose kernels read
another layout (a paged KV cache) writes the synthetic keys and values into it there. vLLM's
FlexAttention path does so (:mod:`attnsteer.vllm.flex_check`): it calls :func:`ensure_combination`
(the combination by its parts, its real calls being packed steps of several requests) with
``pads=(0,)``, a synthetic call of one unpadded request, as a serving engine's requests are.

The check never steers through a model: it calls the backend's compute function and the chunked
and reference backends directly on synthetic tensors (tiny: B=2, 4/2 heads, a 10-token prompt on
CPU, 80 on CUDA), draws them from its own seeded generator (the process's random stream is left
alone), holds a lock while it runs (threads wait for the first check of a combination), and is
skipped while a CUDA graph is being captured or a graph compiled (then the call is served
unchecked, and checked at the next eager call).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..context import PromptState
from ..errors import AttnsteerWarning, SteeringError
from ..methods.rules import GroupRule, ReweightRule, ScoreRule
from . import chunked, reference
from .fused import fused_attention
from .geometry import AttentionCall, ForwardInfo, MaskView

KINDS = ("score", "group", "reweight")  # the rule kinds a synthetic call exists for (Triton: group, reweight)
OK = "ok"


class KernelSelfCheckWarning(AttnsteerWarning):
    """A fast backend failed its self-check (or a kernel failed on a real call) for one (rule kind,
    dtype, head dim): that combination now runs on the next backend for the rest of the process."""


class KernelSelfCheckError(SteeringError):
    """A fast backend's output differed from the chunked path on the synthetic call (raised instead
    of falling back when ``ATTNSTEER_TRITON_STRICT=1``)."""


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
# (backend, kind, dtype, head dim) -> "ok" or why the combination goes to the next backend
RESULTS: dict[tuple[str, str, torch.dtype, int], str] = {}
_LOCK = threading.RLock()
_RUNNING: set[tuple] = set()


def combination(backend: str, kind: str, dtype: torch.dtype, head_dim: int) -> tuple[str, str, torch.dtype, int]:
    """The registry key of a backend's (rule kind, dtype, head dim)."""
    return (backend, kind, dtype, int(head_dim))


def describe(key: tuple) -> str:
    """``group rules, bfloat16, head dim 128`` for a registry key."""
    _, kind, dtype, head_dim = key
    return f"{kind} rules, {str(dtype).removeprefix('torch.')}, head dim {head_dim}"


def failure(backend: str, kind: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why this combination no longer runs on ``backend`` in this process, or None."""
    result = RESULTS.get(combination(backend, kind, dtype, head_dim))
    return None if result in (None, OK) else result


def record_failure(backend: str, kind: str, dtype: torch.dtype, head_dim: int, reason: str) -> str:
    """Route the combination to the next backend for the rest of the process, warning once; returns
    the reason its calls are given back with (a real call's kernel failure comes here too)."""
    key = combination(backend, kind, dtype, head_dim)
    with _LOCK:
        known = RESULTS.get(key)
        if known not in (None, OK):
            return known
        RESULTS[key] = text = f"{reason} ({describe(key)})"
    warnings.warn(
        f"attnsteer: the {backend} backend failed for {describe(key)}: {reason}. Steered attention of this kind, "
        "dtype and head dim now runs on the next backend (plain PyTorch: chunked on CUDA) for the rest of the "
        "process; handle.stats() counts these calls under fallbacks. Strict mode raises instead "
        "(ATTNSTEER_TRITON_STRICT=1 for the Triton kernels); please report it",
        KernelSelfCheckWarning,
        stacklevel=3,
    )
    return text


def reset() -> None:
    """Forget every result (tests; a process that changed device or driver)."""
    with _LOCK:
        RESULTS.clear()


def ensure(backend: str, kind: str, call: AttentionCall, run: Callable, *, strict: bool = False) -> str | None:
    """The hook a backend calls before computing a real ``call`` with a rule of ``kind``: None when
    the combination is known good (checked now if it is new), else the reason to give the call back.

    run: ``run(steps, call, query, key, value) -> out (B, Q, H, D)``, the backend's compute path
    (never the router: the check must not steer through itself). strict: a failure raises (the
    compile / launch error itself, or :class:`KernelSelfCheckError`) instead of being recorded."""
    return ensure_combination(backend, kind, call.dtype, call.head_dim, call.device, run, strict=strict)


def ensure_combination(backend, kind, dtype, head_dim, device, run, *, strict=False, pads=None) -> str | None:
    """:func:`ensure` for a combination named by its parts -- ``dtype`` (a torch dtype), ``head_dim``
    (int), ``device`` -- for a backend whose real calls are no :class:`AttentionCall` (a serving
    engine's packed step). ``pads``: the synthetic call's left padding per batch row (a tuple of
    ints, :func:`synthetic`; default :data:`PADS`)."""
    device = torch.device(device)
    key = combination(backend, kind, dtype, head_dim)
    result = RESULTS.get(key)
    if result is not None:
        return None if result == OK else result
    if _capturing(device):
        return None  # served unchecked now; the next eager call checks
    with _LOCK:
        result = RESULTS.get(key)
        if result is not None:
            return None if result == OK else result
        if key in _RUNNING:  # pragma: no cover - a backend's compute path reached the hook again
            raise RuntimeError(f"the {backend} self-check for {describe(key)} re-entered itself")
        _RUNNING.add(key)
        try:
            report = check(backend, kind, dtype, head_dim, device, run, strict=strict, pads=pads)
        finally:
            _RUNNING.discard(key)
        if report.ok:
            RESULTS[key] = OK
            return None
        if strict:
            raise KernelSelfCheckError(
                f"the {backend} backend failed its self-check for {describe(key)}: {report.reason}. Fix: unset "
                "ATTNSTEER_TRITON_STRICT to let such calls run on the chunked path, and please report it"
            )
        return record_failure(backend, kind, dtype, head_dim, f"self-check failed: {report.reason}")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured or a graph compiled now (no host syncs allowed)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# the synthetic call
# ---------------------------------------------------------------------------------------------
class _Owner:
    """What a rule reads of the object stating it: its prompt-state key, steered heads and layer.
    Not a method of the library: it exists only to state the synthetic rules."""

    name = "synthetic self-check rule"
    layer = 0
    key = ("selfcheck", 0)

    def __init__(self, heads: torch.Tensor | None):
        self.heads = heads


class SpreadGroups(GroupRule):
    """A generic group rule: four groups per head, fixed by position (:func:`group_table_for`); a
    steered row (position >= 1 from its first token, groups 1 and 3 both non-empty) keeps half of
    group 1's mass and gives the other half to group 3: ``f = (1, 1/2, 1, 1 + M_1 / (2 M_3))``.
    Mass-conserving; asks for the prefill map's column statistics (kept as column means)."""

    num_groups = 4
    per_head = True
    column_stats = True
    conserves_mass = True

    def set_column_stats(self, colsum, count, key_abs, prompt) -> None:
        prompt.put(self.key, "column means", colsum / count.clamp(min=1))  # (B, H, K)

    def group_table(self, prompt) -> torch.Tensor:
        return prompt.require(self.key, "groups", "the self-check's group rule", "put the table first")

    def row_gate(self, rows, prompt):
        return None if rows.all_rows_at_least(1) else rows.rel_pos >= 1

    def factors(self, masses, prompt):
        m1, m3 = masses[..., 1:2], masses[..., 3:4]
        steered = (m1 > 0) & (m3 > 0)
        ones = torch.ones_like(m1)
        return steered, torch.cat([ones, 0.5 * ones, ones, 1.0 + 0.5 * m1 / m3.clamp(min=1e-30)], dim=-1)


class LiftScores(ScoreRule):
    """A generic score rule: ``s + lift + cosine sqrt(head_dim) / 4`` on rows at positions >= 2
    (:meth:`first_row`; the rows before keep their scores), with ``lift`` = ``0.75 (1 + h)`` on head
    h's keys at positions 1 mod 3 in even rows, 0 elsewhere: inputs that vary by row, head and key,
    and both values a score rule may read of the call (``cosine``, ``head_dim``)."""

    reads = ("cosine", "head_dim")

    def inputs(self, rows, prompt):
        key = rows.key_abs.view(1, 1, 1, -1)
        heads = torch.arange(1, self.heads.numel() + 1, device=key.device).view(1, -1, 1, 1)
        lifted = (key % 3 == 1) & (rows.row_abs % 2 == 0)  # (1, 1, C, K)
        return {"lift": torch.where(lifted, 0.75 * heads, 0.0), "gate": rows.row_abs >= 2}  # (1, H, C, K), (1, 1, C, 1)

    def modify(self, s, lift, gate, cosine, head_dim):
        return torch.where(gate, s + lift + cosine * (head_dim**0.5 / 4), s)

    def first_row(self, prompt):
        return 2


def synthetic_rule(kind: str, heads: int):
    """A rule of ``kind`` steering query heads 0, 2, 3 of ``heads`` (re-weight: power 3, offset 1,
    3 free rows)."""
    mask = torch.tensor([h % 4 != 1 for h in range(heads)])
    owner = _Owner(mask)
    if kind == "score":
        return LiftScores(owner)
    if kind == "group":
        return SpreadGroups(owner)
    if kind == "reweight":
        return ReweightRule(owner, power=3.0, offset=1.0, free_rows=3)
    raise ValueError(f"kind: got {kind!r}; a synthetic self-check call exists for {list(KINDS)}")


@dataclass(frozen=True)
class _Steps:
    """The call's rules by kind, as :class:`attnsteer.plan.Steps` holds them."""

    score: tuple = ()
    weight: tuple = ()
    head: tuple = ()


@dataclass
class Synthetic:
    """One synthetic call: its rules, inputs, the pieces of its :class:`AttentionCall` and a
    function making a fresh :class:`PromptState` for each backend that runs it."""

    phase: str
    steps: _Steps
    q: torch.Tensor  # (B, H_q, Q, D)
    k: torch.Tensor  # (B, H_kv, K, D)
    v: torch.Tensor
    mask: MaskView
    info: ForwardInfo
    groups: torch.Tensor | None  # int8 (B, H, P) for the group kind

    @property
    def rule(self):
        """The call's one rule."""
        return (*self.steps.score, *self.steps.weight)[0]

    def prompt(self) -> PromptState:
        state = PromptState()
        if self.groups is not None:
            state.put(self.rule.key, "groups", self.groups)
        return state

    def call(self, q: torch.Tensor, k: torch.Tensor, prompt: PromptState) -> AttentionCall:
        return AttentionCall(0, self.info, q, k, self.mask, q.shape[-1] ** -0.5, prompt)


BATCH, HEADS, KV_HEADS, PADS = 2, 4, 2, (0, 2)


def prompt_length(device: torch.device) -> int:
    """Tokens of the synthetic prompt: 10 on CPU (the interpreter is slow), 80 on CUDA (more than one
    query tile, several decode splits)."""
    return 10 if device.type == "cpu" else 80


def group_table_for(prompt_len: int, heads: int, device, pads: tuple[int, ...] = PADS) -> torch.Tensor:
    """int8 (B, H, P), B = len(pads): per batch row and head, the first token and key 3 (+ head % 2)
    in group 1, rows ``P/2 .. P/2 + 2`` from the first token in group 3, positions ``= head mod 3``
    in group 2."""
    pos = torch.arange(prompt_len).view(1, 1, -1)
    rel = pos - torch.tensor(pads).view(-1, 1, 1)
    head = torch.arange(heads).view(1, -1, 1)
    table = torch.where(rel % 3 == head % 3, 2, 0)
    half = prompt_len // 2
    table = torch.where((rel >= half) & (rel < half + 3), 3, table)
    table = torch.where((rel == 0) | (pos == 3 + head % 2), 1, table)
    table = torch.where(rel < 0, 0, table)
    return table.to(torch.int8).to(device)


def synthetic(
    kind: str,
    phase: str,
    dtype: torch.dtype,
    head_dim: int,
    device,
    seed: int = 0,
    prompt_len: int | None = None,
    pads: tuple[int, ...] | None = None,
) -> Synthetic:
    """The synthetic ``phase`` (``prefill`` / ``decode``) call of a ``kind`` rule: B=2 (the second
    row left-padded by 2), 4 query / 2 kv heads, one key three times larger (rows are not
    near-uniform); inputs rounded to ``dtype``, deterministic for a ``seed``. ``prompt_len``: the
    prompt's tokens (default :func:`prompt_length` of the device). ``pads``: each batch row's left
    padding instead (its length is the batch; ``(0,)``: one unpadded row, as a serving engine's
    request)."""
    device = torch.device(device)
    pads = PADS if pads is None else tuple(pads)
    batch = len(pads)
    n = prompt_len or prompt_length(device)
    q_len, past = (n, 0) if phase == "prefill" else (1, n)
    k_len = past + q_len
    g = torch.Generator().manual_seed(1234 + head_dim + 7919 * seed)
    drawn = max(batch, BATCH)  # the same numbers for the first rows whatever the batch
    q = torch.randn(drawn, HEADS, q_len, head_dim, generator=g)[:batch] * 1.5
    k = torch.randn(drawn, KV_HEADS, k_len, head_dim, generator=g)[:batch] * 1.5
    v = torch.randn(drawn, KV_HEADS, k_len, head_dim, generator=g)[:batch]
    k[:, :, 3] *= 3.0
    rows = torch.arange(past, k_len).view(1, 1, -1, 1)
    keys = torch.arange(k_len).view(1, 1, 1, -1)
    first = torch.tensor(pads)
    visible = (keys <= rows) & (keys >= first.view(-1, 1, 1, 1))
    info = ForwardInfo(q_len, past, k_len, first.to(device), batch=batch)
    rule = synthetic_rule(kind, HEADS)
    groups = group_table_for(n, HEADS, device, pads) if kind == "group" else None
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    mask = MaskView(visible.expand(batch, 1, q_len, k_len).contiguous().to(device), q_len, k_len)
    steps = _Steps(score=(rule,)) if kind == "score" else _Steps(weight=(rule,))
    return Synthetic(phase, steps, q, k, v, mask, info, groups)


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def dtype_rule(
    out: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype
) -> tuple[bool, float, float]:
    """The suite's tolerance rule: (ok, error, tolerance) of ``out`` against the float32 ``ref``.

    fp16 / bf16: within twice the error of ``naive`` (the same computation done plainly in that
    dtype) plus a floor, flash-attention's rule; the floor is the suite's 1e-3 or one unit in the
    last place at ``max|ref|``, whichever is larger (the kernels round the weights to the input
    dtype before the PV product, as flash-attention does, so a single call may land one or two
    units off where the plain computation happens not to: a self-check must not fail a correct
    kernel on that). float32: within ``2e-5 + 1e-4 max|ref|`` (or twice the naive error, when
    larger). NaN anywhere fails."""
    ref = ref.float()
    err = (out.float() - ref).abs().max()
    naive_err = (naive.float() - ref).abs().max()
    scale = ref.abs().max()
    if dtype == torch.float32:
        tol = torch.maximum(2 * naive_err, 2e-5 + 1e-4 * scale)
    else:
        tol = 2 * naive_err + torch.clamp(torch.finfo(dtype).eps * scale, min=1e-3)
    err, tol = float(err), float(tol)
    return bool(err <= tol), err, tol  # NaN compares False


class NullStats:
    """A throwaway SiteStats: the synthetic calls count nothing anywhere."""

    def record(self, method, rows) -> None:
        pass

    def ran(self, backend, phase) -> None:
        pass

    def fell_back(self, backend, reason) -> None:
        pass


@dataclass
class Report:
    """One combination's check: ``ok``, ``reason`` (empty when ok) and per phase the error, the
    tolerance, the naive error, the steering effect (max |steered - plain| of the chunked path: the
    comparison is not vacuous) and, at prefill of the group kind, the column means' error."""

    backend: str
    kind: str
    dtype: str
    head_dim: int
    device: str
    ok: bool = True
    reason: str = ""
    phases: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check(
    backend: str,
    kind: str,
    dtype: torch.dtype,
    head_dim: int,
    device,
    run: Callable,
    *,
    strict: bool = False,
    seed: int = 0,
    prompt_len: int | None = None,
    pads: tuple[int, ...] | None = None,
) -> Report:
    """Run the synthetic prefill and decode calls of ``kind`` through ``run`` (see :func:`ensure`)
    and the chunked path, compare by :func:`dtype_rule`; no registry. An exception of ``run`` is a
    failure (re-raised with ``strict``). ``seed`` / ``prompt_len``: other synthetic data (tests);
    ``pads``: the batch rows' left padding (:func:`synthetic`)."""
    device = torch.device(device)
    report = Report(backend, kind, str(dtype).removeprefix("torch."), int(head_dim), str(device))
    t0 = time.perf_counter()
    with torch.no_grad():
        for phase in ("prefill", "decode"):
            case = synthetic(kind, phase, dtype, head_dim, device, seed, prompt_len, pads)
            try:
                reason, numbers = _compare(case, dtype, run)
            except Exception as exc:
                if strict:
                    raise
                reason, numbers = f"{phase} call raised {type(exc).__name__}: {short(exc)}", {"phase": phase}
            report.phases.append(numbers)
            if reason:
                report.ok, report.reason = False, reason
                break
    report.seconds = time.perf_counter() - t0
    return report


def short(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (for a reason in the stats)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare(case: Synthetic, dtype: torch.dtype, run: Callable) -> tuple[str, dict]:
    """(why the backend's output is wrong or "", the numbers) for one synthetic call."""
    rule = case.rule
    q32, k32, v32 = case.q.float(), case.k.float(), case.v.float()
    ref_prompt = case.prompt()
    ref = chunked.run(case.steps, case.call(q32, k32, ref_prompt), q32, k32, v32, NullStats())
    naive_prompt = case.prompt()
    naive = reference.attend(
        case.steps, case.call(case.q, case.k, naive_prompt), case.q, case.k, case.v, compute_dtype=dtype
    )[0]
    plain = fused_attention(case.call(q32, k32, PromptState()), q32, k32, v32)
    out_prompt = case.prompt()
    out = run(case.steps, case.call(case.q, case.k, out_prompt), case.q, case.k, case.v)
    numbers = {"phase": case.phase, "effect": float((ref - plain).abs().max())}
    if not isinstance(out, torch.Tensor):  # a backend that gives the call back (a Refusal string)
        return f"{case.phase} call given back ({out})", numbers
    if out.shape != ref.shape or out.dtype != dtype:
        return f"{case.phase} output {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}", numbers
    ok, err, tol = dtype_rule(out, ref, naive, dtype)
    if tol >= numbers["effect"] / 2:  # as large as the steering: it would pass a kernel that ignores the rule
        tol = numbers["effect"] / 2
        ok = err <= tol
    numbers.update(error=err, tolerance=tol, naive_error=float((naive.float() - ref).abs().max()))
    if not ok:
        return f"{case.phase} output differs from the chunked path (max error {err:.3g} > {tol:.3g})", numbers
    if rule.kind == "group" and case.phase == "prefill":
        cols = [p.get(rule.key, "column means") for p in (out_prompt, ref_prompt, naive_prompt)]
        if any(c is None for c in cols):
            return "prefill column statistics were not handed to the rule", numbers
        ok, err, tol = dtype_rule(cols[0], cols[1], cols[2], dtype)
        numbers.update(column_error=err, column_tolerance=tol)
        if not ok:
            return f"prefill column statistics differ from the chunked path (max error {err:.3g} > {tol:.3g})", numbers
    return "", numbers


# ---------------------------------------------------------------------------------------------
# every combination at once (benchmarks/gpu_check.sh)
# ---------------------------------------------------------------------------------------------
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_all(backend: str, run: Callable, device, kinds=KINDS, dtypes=DTYPES, head_dims=(64, 128)) -> list[Report]:
    """A :class:`Report` per (kind, dtype, head dim), fresh (the registry is neither read nor written)."""
    return [check(backend, kind, dtype, d, device, run) for kind in kinds for dtype in dtypes for d in head_dims]


def markdown(reports: list[Report]) -> str:
    """A table of :func:`check_all`'s reports, one row per combination and phase."""
    lines = [
        "| backend | kind | dtype | head dim | device | phase | result | error | tolerance | naive error | effect | s |",
        "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def num(x):
        return "" if x is None else f"{x:.3g}"

    for r in reports:
        for i, p in enumerate(r.phases or [{}]):
            last = i == len(r.phases) - 1
            result = "ok" if r.ok else ("FAILED: " + r.reason if last else "ok")
            lines.append(
                f"| {r.backend} | {r.kind} | {r.dtype} | {r.head_dim} | {r.device} | {p.get('phase', '')} | {result} | "
                f"{num(p.get('error'))} | {num(p.get('tolerance'))} | {num(p.get('naive_error'))} | "
                f"{num(p.get('effect'))} | {r.seconds:.2f} |"
            )
    return "\n".join(lines) + "\n"
