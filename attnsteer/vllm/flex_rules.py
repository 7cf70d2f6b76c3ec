"""The rule kinds as FlexAttention pieces, on the packed rows of one serving step (no vLLM here).

A serving engine hands one attention call per layer: the rows of every scheduled request
concatenated (``T`` rows), each request's keys in a paged cache. FlexAttention computes
``softmax(score_mod(s)) V`` over that layout and returns each row's log-sum-exp ``lse``. This
module turns the rules of each request (:class:`RequestSlice`: its rows, its keys, its plan's
steps and its :class:`~attnsteer.context.PromptState`) into:

- **score rules** -> one ``score_mod(score, b, h, q_logical, kv_logical, physical_q)``: each rule's
  ``modify`` with its ``inputs(rows, prompt)``, gathered from packed tables by physical row
  (row-dependent inputs) or by request, by head and by logical key position. ``cosine`` is
  ``score / (scale |q_i| |k_j|)`` from norm tables; ``head_dim`` a constant. Rows before a rule's
  ``first_row`` are left to the kernel's plain scores.
- **group rules** -> a correction of the kernel's output ``o`` from ``lse`` and the small key
  groups: with ``O_g = sum_{j in g} exp(s_ij - lse_i) v_j`` (the gathered members only),
  ``o' = f_0 o + sum_{g>=1} (f_g - f_0) O_g``; a rule's ``column_stats`` at prefill come from one
  chunked QK^T pass with the known ``lse`` (no softmax, no V).
- **re-weight rules** -> a second kernel pass whose score_mod is
  ``p log(max(N_i exp(s_ij - lse_i) - o_i, 0))`` (renormalised by the kernel's softmax); rows where
  every weight is 0 (uniform rows) keep the first pass.
- **head rules** -> per request, on the result.

Each request carries at most one weight rule per layer (:func:`refusal` names what cannot run). The
functions take plain tensors and a callable that runs the kernel, so the backend
(:mod:`attnsteer.vllm.flex_backend`) and CPU tests share them. Shapes: ``T`` packed rows, ``H``
query heads, ``H_kv`` kv heads, ``D`` head dim, ``C`` rows of one request, ``n`` its keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import chunked
from ..attention.chunked import grouped_pv, grouped_qk
from ..attention.geometry import AttentionCall, ForwardInfo, MaskView
from ..context import PromptState
from ..methods.rules import RowView, group_ids_of
from .paged import window_mask

# what a score_mod cannot see: every head's score of an entry at once
UNSUPPORTED_READS = {"head_mean_abs": "it reads the mean |score| over every head, which a score_mod (one head's score) never sees"}  # fmt: skip
EPS = 1e-12  # F.normalize's floor on a norm
# A steered row whose rest (group 0) holds less than this mass, under a factor f_0 != 1, has its rest
# summed exactly over its keys: o - sum O_g carries the kernel's rounding, which f_0 multiplies (as
# attnsteer's CPU flash backend does)
MIN_REST_MASS = 0.25
NEG_INF = float("-inf")


def refusal(rules) -> str | None:
    """Why one method's ``rules`` cannot run on this path (None: they can)."""
    for rule in rules:
        if rule.kind == "score":
            for read in rule.reads:
                if read in UNSUPPORTED_READS:
                    return f"its score rule {type(rule).__name__} reads {read!r}: {UNSUPPORTED_READS[read]}"
    if sum(rule.kind in ("group", "reweight") for rule in rules) > 1:
        return "it states more than one weight rule (group / re-weight) on a layer, and this path corrects one"
    return None


@dataclass
class RequestSlice:
    """One request's rows in a packed call: rows ``q0..q1``, its tokens so far ``length`` (keys at
    positions ``0..length-1``), its plan's ``steps`` for this phase, its per-prompt state, and
    ``kv()`` -> (keys, values) (H_kv, length, D) read from the cache when a rule needs them.
    ``stats``: its layer's SiteStats (which path served it, rows each method changed), or None."""

    q0: int
    q1: int
    length: int
    steps: object
    prompt: PromptState
    kv: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    stats: object = None
    _kv: tuple | None = field(default=None, repr=False)

    def record(self, method, rows) -> None:
        """Count ``rows`` changed by ``method`` in the site's stats (none: nothing)."""
        if self.stats is not None:
            self.stats.record(method, rows)

    @property
    def rows(self) -> int:
        return self.q1 - self.q0

    @property
    def past(self) -> int:
        return self.length - self.rows

    @property
    def phase(self) -> str:
        """``prefill``, ``decode`` (one row after the prompt) or ``chunk``, as :class:`AttentionCall` names it."""
        return "prefill" if self.past == 0 else ("decode" if self.rows == 1 else "chunk")

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None:
            self._kv = self.kv()
        return self._kv


class PagedRows(RowView):
    """A request's rows ``r0..r0+C`` (of its call) against keys at ``key_abs``, with the counts of
    keys each row sees over *all* its keys (causal, sliding ``window``), computed, not summed from
    ``visible`` (which covers only ``key_abs``, e.g. a group's members)."""

    def __init__(self, key_abs, past: int, r0: int, rows: int, window: int = 0):
        super().__init__(None, key_abs, past_len=past, q0=r0, rows=rows)
        self.window = window

    @property
    def all_visible(self) -> bool:
        return False

    @functools.cached_property
    def visible(self) -> torch.Tensor:
        pos = self.row_abs  # (1, 1, C, 1)
        seen = self.key_abs.view(1, 1, 1, -1) <= pos
        if self.window > 0:
            seen = seen & (self.key_abs.view(1, 1, 1, -1) > pos - self.window)
        return seen

    @functools.cached_property
    def n_visible(self) -> torch.Tensor:
        count = (self.row_abs + 1).float()
        return count.clamp(max=self.window) if self.window > 0 else count


def _call(layer: int, req: RequestSlice, q: torch.Tensor, scale: float, window: int, keys=None) -> AttentionCall:
    """The request's :class:`AttentionCall` (q (1, H, C, D), keys (1, H_kv, n, D) or None)."""
    info = ForwardInfo(q_len=req.rows, past_len=req.past, total_len=req.length, first_valid=None, batch=1)
    if keys is None:
        keys = q.new_zeros(1, 1, req.length, 1).expand(1, 1, req.length, q.shape[-1])
    mask = MaskView(window_mask(req.rows, req.length, window), req.rows, req.length)
    return AttentionCall(layer, info, q, keys, mask, scale, req.prompt)


# ---------------------------------------------------------------------------------------------
# score rules -> score_mod
# ---------------------------------------------------------------------------------------------
class _Table:
    """One score-rule input packed over the requests that steer with the rule: (N, Hs, Ks) with N
    the rule's steered rows (row-dependent inputs) or its requests; Hs in {1, H}; Ks in {1, n_max}."""

    def __init__(self, parts: list[torch.Tensor], rows: list[int], heads: int):
        parts = [p.reshape((1,) * (4 - p.dim()) + tuple(p.shape)) for p in parts]  # (1, h, c, k)
        self.by_row = any(p.shape[2] > 1 for p in parts)
        self.by_head = any(p.shape[1] > 1 for p in parts)
        self.by_key = any(p.shape[3] > 1 for p in parts)
        hs = heads if self.by_head else 1
        ks = max(p.shape[3] for p in parts)
        packed = []
        for p, c in zip(parts, rows):
            p = p[0].expand(hs, c if self.by_row else 1, p.shape[3]).permute(1, 0, 2)  # (c|1, hs, k)
            if p.shape[2] != ks:  # a per-request constant, or a request with fewer keys: 0 beyond them
                full = p.new_zeros(p.shape[0], hs, ks)
                full[..., : p.shape[2]] = p
                p = full if p.shape[2] > 1 else p.expand(p.shape[0], hs, ks)
            packed.append(p)
        self.table = torch.cat(packed).contiguous()
        self.keys = ks

    def at(self, slot, req, h, kv):
        return self.table[slot if self.by_row else req, h if self.by_head else 0,
                          kv.clamp(0, self.keys - 1) if self.by_key else 0]  # fmt: skip


class _ScoreEntry:
    """One score rule over the requests that carry it: its tables and where its rows are."""

    def __init__(self, rule, total_rows: int, device):
        self.rule = rule
        self.slot = torch.zeros(total_rows, dtype=torch.long, device=device)  # row -> its row slot
        self.req = torch.zeros(total_rows, dtype=torch.long, device=device)  # row -> its request slot
        self.on = torch.zeros(total_rows, dtype=torch.bool, device=device)
        self.tables: dict[str, _Table] = {}
        self.consts: dict[str, object] = {}
        self.knorm = None  # (requests, H_kv, n_max) key norms when the rule reads cosine


def _as_tensor(x, device) -> torch.Tensor:
    return x.to(device) if isinstance(x, torch.Tensor) else torch.tensor(x, device=device)


class ScoreMod:
    """The score rules of every request of a packed call as one FlexAttention ``score_mod``
    (``None`` via :func:`score_mod_for` when no request has a score rule)."""

    def __init__(self, layer: int, query: torch.Tensor, requests: list[RequestSlice], scale: float, window: int):
        t, self.heads, d = query.shape
        self.scale, self.device = float(scale), query.device
        self.qnorm = None
        self.entries: list[_ScoreEntry] = []
        by_rule: dict[int, tuple] = {}
        for req in requests:
            for rule in req.steps.score:
                first = rule.first_row(req.prompt)
                r0 = 0 if first is None else min(max(first - req.past, 0), req.rows)
                if r0 < req.rows:
                    by_rule.setdefault(id(rule), (rule, []))[1].append((req, r0))
        for rule, members in by_rule.values():
            self.entries.append(self._entry(layer, rule, members, query, t, window))

    def _entry(self, layer, rule, members, query, t, window) -> _ScoreEntry:
        entry = _ScoreEntry(rule, t, self.device)
        inputs, rows = [], []
        slot = 0
        for i, (req, r0) in enumerate(members):
            view = PagedRows(torch.arange(req.length, device=self.device), req.past, r0, req.rows - r0, window)
            inputs.append(rule.inputs(view, req.prompt))
            c = req.rows - r0
            rows.append(c)
            entry.slot[req.q0 + r0 : req.q1] = torch.arange(slot, slot + c, device=self.device)
            entry.req[req.q0 + r0 : req.q1] = i
            entry.on[req.q0 + r0 : req.q1] = True
            slot += c
            heads = rule.heads
            req.record(rule.method, c * (self.heads if heads is None else int(heads.sum())))
        for name in inputs[0] if inputs else ():
            entry.tables[name] = _Table([_as_tensor(x[name], self.device) for x in inputs], rows, self.heads)
        if "head_dim" in rule.reads:
            entry.consts["head_dim"] = query.shape[-1]
        if "cosine" in rule.reads:
            if self.qnorm is None:
                self.qnorm = query.float().norm(dim=-1).clamp(min=EPS)  # (T, H)
            n_max = max(req.length for req, _ in members)
            norms = [F.pad(req.keys_values()[0].float().norm(dim=-1), (0, n_max - req.length)) for req, _ in members]
            entry.knorm = torch.stack(norms).clamp(min=EPS)  # (requests, H_kv, n_max)
        heads = rule.heads
        entry.heads = (torch.ones(self.heads, dtype=torch.bool) if heads is None else heads.bool()).to(self.device)
        return entry

    def __call__(self, score, b, h, q_logical, kv_logical, physical_q=None):
        row = q_logical if physical_q is None else physical_q
        s = score
        for e in self.entries:
            slot, req = e.slot[row], e.req[row]
            args = {name: table.at(slot, req, h, kv_logical) for name, table in e.tables.items()}
            args.update(e.consts)
            if e.knorm is not None:
                group = self.heads // e.knorm.shape[1]
                kn = e.knorm[req, h // group, kv_logical.clamp(0, e.knorm.shape[2] - 1)]
                args["cosine"] = score / (self.scale * self.qnorm[row, h] * kn)
            new = e.rule.modify(s, **args)
            s = torch.where(e.on[row] & e.heads[h], new, s)
        return s


def score_mod_for(layer: int, query, requests: list[RequestSlice], scale: float, window: int = 0):
    """The score_mod of every request's score rules, or None when none has one."""
    if not any(req.steps.score for req in requests):
        return None
    mod = ScoreMod(layer, query, requests, scale, window)
    if not mod.entries:
        return None

    def score_mod(score, b, h, q_logical, kv_logical, physical_q=None):
        return mod(score, b, h, q_logical, kv_logical, physical_q)

    return score_mod


# ---------------------------------------------------------------------------------------------
# weight rules -> corrections of (out, lse)
# ---------------------------------------------------------------------------------------------
def _member_scores(layer, req: RequestSlice, q, k, key_abs, scale: float, window: int):
    """Scores (1, H, C, M) of the request's rows against its keys at ``key_abs`` (k (1, H_kv, M, D)),
    after its score rules, -inf where a row does not see the key."""
    rows = PagedRows(key_abs, req.past, 0, req.rows, window)
    call = _call(layer, req, q, scale, window)
    s = grouped_qk(q, k) * scale
    s = s.masked_fill(~rows.visible, NEG_INF)
    if req.steps.score:
        s = chunked.apply_score_rules(req.steps.score, s, q, k, rows, call)
    return s


def _column_stats(layer, rule, req: RequestSlice, q, k, lse, scale: float, window: int, call) -> None:
    """At a prefill: the column sums of the map entering ``rule`` (weights ``exp(s - lse)``) over
    the request's rows, in chunks of rows."""
    n = req.length
    colsum = torch.zeros(1, q.shape[1], n, device=q.device)
    count = torch.zeros(1, 1, n, device=q.device)
    size = chunked.chunk_rows(1, q.shape[1], req.rows, n)
    key_abs = torch.arange(n, device=q.device)
    for c0 in range(0, req.rows, size):
        c1 = min(c0 + size, req.rows)
        rows, s = _chunk_scores(req, q, k, key_abs, c0, c1, scale, window, call)
        colsum += torch.exp(s - lse[:, :, c0:c1, None]).sum(-2)
        count += rows.visible.sum(-2, dtype=torch.float32).view(1, 1, n)
    rule.set_column_stats(colsum, count, key_abs, req.prompt)


def _chunk_scores(req: RequestSlice, q, k, key_abs, c0: int, c1: int, scale: float, window: int, call):
    """(PagedRows, scores (1, H, C, n) float32) of the request's rows c0..c1: masked, score rules
    applied -- the scores the kernel's log-sum-exp was taken over."""
    rows = PagedRows(key_abs, req.past, c0, c1 - c0, window)
    s = grouped_qk(q[:, :, c0:c1], k) * scale
    s = s.masked_fill(~rows.visible, NEG_INF)
    if req.steps.score:
        s = chunked.apply_score_rules(req.steps.score, s, q[:, :, c0:c1], k, rows, call)
    return rows, s


def correct_group(layer, rule, req: RequestSlice, q, out, lse, scale: float, window: int = 0):
    """A group rule on one request: q (1, H, C, D), out (1, H, C, D) the kernel's output, lse
    (1, H, C) -> the steered output (1, H, C, D) float32."""
    k, v = (x.float().unsqueeze(0) for x in req.keys_values())  # (1, H_kv, n, D)
    call = _call(layer, req, q, scale, window, k)
    if rule.column_stats and req.past == 0:
        _column_stats(layer, rule, req, q, k, lse, scale, window, call)
    table = chunked.group_table(rule, call)  # (1, 1|H, P)
    length = min(table.shape[-1], req.length)
    members = torch.nonzero((table[0, :, :length] > 0).any(0)).flatten()  # (M,) union over heads
    k_m, v_m = k[:, :, members], v[:, :, members]
    a = torch.exp(_member_scores(layer, req, q, k_m, members, scale, window) - lse[..., None])  # (1, H, C, M)
    gid = group_ids_of(table, members).long()[:, :, None, :]  # (1, 1|H, 1, M)
    masses = chunked.group_masses(a, gid, rule.num_groups)
    masses[..., 0] = 1.0 - masses[..., 1:].sum(-1)  # the rest of the row: every key of no small group
    # rows whose rest holds little mass: 1 - sum M_g and o - sum O_g would lose the precision that the
    # factors multiply (and a rest of exactly 0 must read as 0), so their rest is summed exactly
    low = masses[..., :1] < MIN_REST_MASS
    rest = None
    if bool(low.any()):
        rest, rest_mass = _rest_output(layer, req, q, k, v, table, lse, scale, window)
        masses[..., :1] = torch.where(low, rest_mass, masses[..., :1])
    steered, factors = rule.factors(masses, req.prompt)
    full = PagedRows(torch.arange(req.length, device=q.device), req.past, 0, req.rows, window)
    steered = chunked.steered_rows(rule, steered, full, call)
    parts = [grouped_pv(a * (gid == g), v_m) for g in range(1, rule.num_groups)]  # O_g (1, H, C, D)
    new = factors[..., :1] * out
    for g, part in enumerate(parts, start=1):
        new = new + (factors[..., g : g + 1] - factors[..., :1]) * part
    if rest is not None:
        precise = factors[..., :1] * rest
        for g, part in enumerate(parts, start=1):
            precise = precise + factors[..., g : g + 1] * part
        new = torch.where(low, precise, new)
    req.record(rule.method, steered.sum())
    return torch.where(steered, new, out)


def _rest_output(layer, req: RequestSlice, q, k, v, table, lse, scale: float, window: int):
    """(O_0 (1, H, C, D), M_0 (1, H, C, 1)): each row's output and mass over the keys of group 0 (the
    rest), summed exactly, in chunks of rows."""
    key_abs = torch.arange(req.length, device=q.device)
    gid = group_ids_of(table, key_abs).long()[:, :, None, :]  # (1, 1|H, 1, n)
    rest = torch.zeros_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1]))
    mass = torch.zeros_like(q[..., :1])
    size = chunked.chunk_rows(1, q.shape[1], req.rows, req.length)
    call = _call(layer, req, q, scale, window, k)
    for c0 in range(0, req.rows, size):
        c1 = min(c0 + size, req.rows)
        _, s = _chunk_scores(req, q, k, key_abs, c0, c1, scale, window, call)
        a = torch.exp(s - lse[:, :, c0:c1, None]) * (gid == 0)
        rest[:, :, c0:c1] = grouped_pv(a, v)
        mass[:, :, c0:c1] = a.sum(-1, keepdim=True)
    return rest, mass


class ReweightMod:
    """The second pass of the re-weight rules of a packed call: a score_mod forming
    ``p log(max(N_i exp(s_ij - lse_i) - o_i, 0))`` on each steered (row, head), the first pass's
    score elsewhere."""

    def __init__(self, first, lse: torch.Tensor, requests: list[RequestSlice], window: int):
        t, h = lse.shape
        dev = lse.device
        self.first, self.lse = first, lse.float()
        self.n = torch.ones(t, device=dev)
        self.offset = torch.zeros(t, device=dev)
        self.power = torch.ones(t, device=dev)
        self.on = torch.zeros(t, h, dtype=torch.bool, device=dev)
        for req in requests:
            for rule in req.steps.weight:
                if rule.kind != "reweight":
                    continue
                view = PagedRows(torch.arange(req.length, device=dev), req.past, 0, req.rows, window)
                self.n[req.q0 : req.q1] = view.n_visible.view(-1)
                off = rule.offsets(view)
                self.offset[req.q0 : req.q1] = off.view(-1) if isinstance(off, torch.Tensor) else off
                self.power[req.q0 : req.q1] = rule.power
                heads = rule.heads
                self.on[req.q0 : req.q1] = True if heads is None else heads.to(dev).view(1, -1)

    def __call__(self, score, b, h, q_logical, kv_logical, physical_q=None):
        row = q_logical if physical_q is None else physical_q
        s = score if self.first is None else self.first(score, b, h, q_logical, kv_logical, physical_q)
        t = self.n[row] * torch.exp(s - self.lse[row, h]) - self.offset[row]
        w = torch.where(t > 0, self.power[row] * torch.log(t.clamp(min=1e-38)), NEG_INF)
        return torch.where(self.on[row, h], w, s)


def steer(layer: int, query, requests: list[RequestSlice], scale: float, attend, window: int = 0):
    """The steered output of a packed call. query (T, H, D); ``attend(score_mod)`` -> (out (T, H, D),
    lse (T, H)) runs the kernel over the packed rows and the paged cache (``score_mod`` None: plain
    scores). Returns (T, H, D) float32, after every request's score, weight and head rules; rows of
    requests without rules keep the kernel's plain output."""
    first = score_mod_for(layer, query, requests, scale, window)
    out, lse = attend(first)
    out, lse = out.float(), lse.float()
    weighted = [r for r in requests if r.steps.weight]
    if any(rule.kind == "reweight" for r in weighted for rule in r.steps.weight):
        mod = ReweightMod(first, lse, requests, window)

        def reweight_mod(score, b, h, q_logical, kv_logical, physical_q=None):
            return mod(score, b, h, q_logical, kv_logical, physical_q)

        out2, lse2 = attend(reweight_mod)
        keep = mod.on & torch.isfinite(lse2.float())
        out = torch.where(keep[..., None], out2.float(), out)
        for req in weighted:
            for rule in req.steps.weight:
                if rule.kind == "reweight":
                    req.record(rule.method, keep[req.q0 : req.q1].sum())
    for req in weighted:
        for rule in req.steps.weight:
            if rule.kind != "group":
                continue
            q = query[req.q0 : req.q1].float().transpose(0, 1).unsqueeze(0)  # (1, H, C, D)
            o = out[req.q0 : req.q1].transpose(0, 1).unsqueeze(0)
            l = lse[req.q0 : req.q1].transpose(0, 1).unsqueeze(0)
            new = correct_group(layer, rule, req, q, o, l, scale, window)
            out[req.q0 : req.q1] = new[0].transpose(0, 1)
    return apply_head_rules(layer, query, out, requests, scale, window)


def apply_head_rules(layer: int, query, out, requests: list[RequestSlice], scale: float, window: int = 0):
    """Every request's head rules on its rows of out (T, H, D), in place; returns out."""
    for req in requests:
        if not req.steps.head:
            continue
        q = query[req.q0 : req.q1].transpose(0, 1).unsqueeze(0)
        keys = req.keys_values()[0].unsqueeze(0)
        call = _call(layer, req, q, scale, window, keys)
        rows = out[req.q0 : req.q1].unsqueeze(0)  # (1, C, H, D)
        for rule in req.steps.head:
            rows, touched = rule.apply(rows, call, req.prompt)
            req.record(rule.method, touched)
        out[req.q0 : req.q1] = rows[0].to(out.dtype)
    return out
