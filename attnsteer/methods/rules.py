"""The rule kinds a method states its intervention in. Backends implement each kind once.

A method (one file under ``attnsteer/methods/``) holds its parameters, their validation, its report
and one or more *rules*, each of one kind below. The backends that compute steered attention --
reference (materialised float32, the oracle), chunked PyTorch, CPU flash + log-sum-exp
corrections, Triton, vLLM -- implement the kinds, never a method: a new method whose rules are of
kinds a backend implements runs there with no backend file touched (docs/extending.md).

=============  ==========================================================  ==========================
kind           what the rule states                                        examples
=============  ==========================================================  ==========================
key            an edit of some prompt tokens' keys before RoPE, as they    SEKA
               enter the KV cache (native on every kernel)
score          an elementwise function of the score and the per-row /      PAI, LSSA scoring, HGAI,
               per-key inputs it names (a FlexAttention ``score_mod``);    VAF (key_scale form)
               form ``key_scale``: ``c_j s_ij`` on gated rows, i.e.
               plain attention over scaled keys
group          per row, a few key groups and new group masses from the     ACT, VAR
               old ones (``out' = sum_g f_g M_g o_g``, from the unsteered
               output, the row log-sum-exp and the small groups)
reweight       new weights ``max(N_i a_ij - o_i, 0)^p`` (a thresholded     softplus re-weighting
               power of the weight relative to uniform)
head           per-head output scaling after attention, before ``o_proj``  VHR
model          steps around the model's forward: extra streams, logits     VHR's text-only stream,
                                                                           PAI's gamma, AGLA's views
=============  ==========================================================  ==========================

What a rule needs computed before it is declared on the rule (a group rule's ``column_stats``:
the column sums of the prefill map, which ACT's sink detection reads) or on its method (a
decoder-layer input observer: VAR's hidden-state sinks). Which phases a rule acts in is its
``active(is_prefill)``.

Per-prompt state is never kept on a rule or method object: rules read and write the
:class:`~attnsteer.context.PromptState` of the call's context (``prompt``), which the backend
passes in. Shapes below: ``B`` batch rows, ``H`` query heads, ``C`` query rows of one chunk, ``K``
keys, ``P`` prompt positions, ``G`` groups.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..context import PromptState


class RowView:
    """The query rows of one chunk (or a whole call) as a rule sees them; shapes broadcast against
    (B, H, C, K). Everything but ``key_abs`` is computed on first use.

    visible:   bool (B|1, 1, C, K) -- key j visible to query row i (causal, padding, window).
    n_visible: float (B|1, 1, C, 1) -- N_i, the number of keys row i sees.
    rel_pos:   long (B|1, 1, C, 1) -- row position counted from its batch row's first token.
    row_abs:   long (1, 1, C, 1) -- absolute (padded-layout) position of each query row.
    key_abs:   long (K,) -- absolute (padded-layout) position of each key index.
    row_valid: bool (B, 1, C, 1) -- False for query rows that are padding (right padding), or None.
    """

    def __init__(self, visible, key_abs, *, past_len=0, q0=0, rows=None, first_valid=None, max_pad=0, row_valid=None):
        self._visible = visible  # None: every key visible to every row
        self.row_valid = row_valid
        self.key_abs = key_abs
        self.past_len, self.q0 = past_len, q0
        self.rows = rows if rows is not None else visible.shape[-2]
        self.first_valid = first_valid
        self.max_pad = max_pad  # largest first_valid (python int), for scalar shortcuts

    @property
    def all_visible(self) -> bool:
        return self._visible is None

    @functools.cached_property
    def visible(self) -> torch.Tensor:
        if self._visible is not None:
            return self._visible
        return torch.ones(1, 1, self.rows, self.key_abs.numel(), dtype=torch.bool, device=self.key_abs.device)

    @functools.cached_property
    def n_visible(self) -> torch.Tensor:
        if self._visible is None:
            return torch.full((1, 1, self.rows, 1), float(self.key_abs.numel()), device=self.key_abs.device)
        return self._visible.sum(-1, keepdim=True, dtype=torch.float32)

    @functools.cached_property
    def row_abs(self) -> torch.Tensor:
        return torch.arange(self.rows, device=self.key_abs.device).view(1, 1, -1, 1) + (self.past_len + self.q0)

    @functools.cached_property
    def rel_pos(self) -> torch.Tensor:
        if self.first_valid is None:
            return self.row_abs
        return self.row_abs - self.first_valid.to(self.key_abs.device).view(-1, 1, 1, 1)

    def all_rows_at_least(self, position: int) -> bool:
        """True when every row of the chunk sits at relative position >= ``position`` (no sync)."""
        return self.past_len + self.q0 - self.max_pad >= position


class Rule:
    """One rule of one method on one layer. ``method``: the method object stating it (its ``key``,
    ``heads`` and ``layer``; rows changed are counted against it)."""

    kind: ClassVar[str]

    def __init__(self, method):
        self.method = method

    @property
    def heads(self) -> torch.Tensor | None:
        """bool (H,) of the steered query heads, or None for all."""
        return self.method.heads

    @property
    def key(self):
        """The site's key in a :class:`~attnsteer.context.PromptState` (layer, intervention)."""
        return self.method.key

    def active(self, is_prefill: bool) -> bool:
        """Whether the rule changes anything in a forward of this phase (decode: any forward with a
        KV cache before it, one row or a continuation chunk)."""
        return True

    def head_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """(1, H, 1, 1) bool mask of the steered heads on ``like``'s device, or None for all."""
        if self.heads is None:
            return None
        return self.heads.to(like.device).view(1, -1, 1, 1)


class KeyRule(Rule):
    """Edit the keys of some prompt tokens before RoPE, as they enter the KV cache (prefill only:
    the edited keys then live in the cache). Runs in a hook on the attention module's key
    projection, so every attention kernel and the cache see the edited keys."""

    kind = "key"

    def active(self, is_prefill: bool) -> bool:
        return is_prefill

    def edit(self, keys: torch.Tensor, positions: torch.Tensor, prompt: PromptState) -> tuple[torch.Tensor, Any]:
        """keys (B, T, H_kv, D) pre-RoPE of the tokens at absolute positions ``positions`` (long
        (B|1, T)) -> (edited keys, (head, token) pairs changed)."""
        raise NotImplementedError


class ScoreRule(Rule):
    """``s'_ij = modify(s_ij, **inputs)`` before the softmax, elementwise, on the steered heads of
    the visible keys. ``inputs(rows, prompt)`` names per-row / per-key / per-head tensors
    broadcastable to (B, H, C, K); the backend adds what the rule ``reads`` of the call itself
    (:data:`SCORE_READS`): ``"cosine"`` (B, H, C, K), the scores of L2-normalised queries and keys;
    ``"head_dim"`` (int); ``"head_mean_abs"`` (B, 1, C, K), ``mean_h |s_hij|`` over every query head
    of the layer (the scores entering this rule; only visible keys are meaningful)."""

    kind = "score"
    reads: ClassVar[tuple[str, ...]] = ()
    form: ClassVar[str] = "elementwise"  # or "key_scale" (:class:`KeyScaleRule`), which more backends run

    def inputs(self, rows: RowView, prompt: PromptState) -> dict[str, torch.Tensor]:
        return {}

    def modify(self, s: torch.Tensor, **inputs) -> torch.Tensor:  # pragma: no cover - each rule defines it
        raise NotImplementedError

    def first_row(self, prompt: PromptState) -> int | None:
        """The lowest absolute position of a query row the rule can change (e.g. the prompt's last
        row), or None for any row. Backends may compute the rows before it as plain attention."""
        return None


class AnsweringRowsScoreRule(ScoreRule):
    """A score rule on the image (or focus) keys of the rows that produce tokens: the prompt's last
    row and every decode row (PAI, HGAI). Its ``modify`` gets ``target`` bool (B, 1, C, K); the rows
    before the prompt's last are never changed (:meth:`first_row`)."""

    def inputs(self, rows, prompt):
        roles = prompt.roles
        image = roles.keys(rows.key_abs)[:, None, None, :]  # (B, 1, 1, K)
        return {"target": image & (rows.row_abs >= roles.length - 1)}

    def first_row(self, prompt):
        return prompt.roles.length - 1


class KeyScaleRule(ScoreRule):
    """A score rule of one form: ``s_ij <- c_j s_ij`` on the query rows its :meth:`row_gate` admits,
    with per-key factors ``c_j`` (1 for keys it leaves alone). Because ``c_j (q_i . k_j) =
    q_i . (c_j k_j)``, the gated rows' attention is plain attention over a scaled copy of the keys:
    a backend that claims the ``key_scale`` form runs any fused kernel on that copy (and on the
    plain keys for the other rows) instead of materialising scores. Backends that run every score
    rule use :meth:`modify` like any other."""

    form = "key_scale"

    def key_scales(self, key_abs: torch.Tensor, prompt: PromptState) -> torch.Tensor:
        """float32 (B, K): the factor ``c_j`` of each key at absolute position ``key_abs`` (K,)."""
        raise NotImplementedError  # pragma: no cover - each rule defines it

    def row_gate(self, rows: RowView, prompt: PromptState) -> torch.Tensor:
        """bool broadcastable to (B, 1, C, 1): the query rows the rule scales."""
        raise NotImplementedError  # pragma: no cover - each rule defines it

    def inputs(self, rows, prompt):
        return {"scales": self.key_scales(rows.key_abs, prompt)[:, None, None, :], "gate": self.row_gate(rows, prompt)}

    def modify(self, s, scales, gate):
        return torch.where(gate, s * scales, s)


class GroupRule(Rule):
    """Per query row, ``num_groups`` key groups and new group masses from the old ones.

    Group 0 is the rest of the row (every key of no other group, generated tokens included: the
    large group, never gathered); groups ``1..G-1`` are small. With ``M_g`` a row's mass in group
    ``g`` and ``o_g`` the group's normalised output, a steered row's output becomes
    ``sum_g f_g M_g o_g``; unsteered rows keep the unsteered output bit for bit.

    ``per_head``: the groups differ per query head (ACT's sinks), else per batch row only (VAR's).
    ``column_stats``: at prefill the backend first computes the column sums of the map entering
    this rule and hands them to :meth:`set_column_stats`, which finds the prompt's groups.
    ``conserves_mass``: ``sum_g f_g M_g = 1`` in every steered row (then fused kernels form the
    final weights directly from the unsteered row log-sum-exp). ``rest_unchanged``: ``f_0 = 1``.
    """

    kind = "group"
    num_groups: ClassVar[int] = 2
    per_head: ClassVar[bool] = False
    column_stats: ClassVar[bool] = False
    conserves_mass: ClassVar[bool] = True
    # f_0 = 1 in every row: the rest of the row keeps its weights (then backends that form group 0's
    # mass and output as the complement of the small groups need not recompute it exactly)
    rest_unchanged: ClassVar[bool] = False

    def set_column_stats(self, colsum, count, key_abs, prompt: PromptState) -> None:
        """colsum float (B, H, K): summed weights over the forward's real rows; count float
        (B|1, 1, K): the real rows that see each key; key_abs long (K,)."""
        raise NotImplementedError  # pragma: no cover - only rules with column_stats

    def group_table(self, prompt: PromptState) -> torch.Tensor:
        """int8 (B, 1|H, P): the group of every prompt position (generated tokens, at positions
        >= P, are group 0)."""
        raise NotImplementedError  # pragma: no cover - each rule defines it

    def row_gate(self, rows: RowView, prompt: PromptState) -> torch.Tensor | None:
        """bool broadcastable to (B, 1, C, 1): the query rows this rule may steer at all (cheap,
        before any mass is known), or None for every row."""
        return None

    def factors(self, masses: torch.Tensor, prompt: PromptState) -> tuple[torch.Tensor, torch.Tensor]:
        """masses float (..., G) of rows -> (steered bool (..., 1), factors float (..., G)): which
        rows change and each group's factor there."""
        raise NotImplementedError  # pragma: no cover - each rule defines it


def at_keys(table: torch.Tensor, key_abs: torch.Tensor, outside) -> torch.Tensor:
    """A per-prompt-position table (..., P) read at the keys ``key_abs`` (K,) -> (..., K); keys past
    the prompt (generated tokens) get ``outside``."""
    length = table.shape[-1]
    key_abs = key_abs.to(table.device)
    values = table[..., key_abs.clamp(max=max(length - 1, 0))]
    return torch.where(key_abs < length, values, torch.full_like(values, outside))


def group_ids_of(table: torch.Tensor, key_abs: torch.Tensor) -> torch.Tensor:
    """Group ids (B, 1|H, K) of the keys at ``key_abs`` (K,) from a prompt table (B, 1|H, P)."""
    return at_keys(table, key_abs, 0)


class ReweightRule(Rule):
    """New weights ``w_ij = max(N_i a_ij - o_i, 0)^power``, renormalised, with ``o_i = 0`` in a
    row's first ``free_rows`` positions and ``offset`` after; a row where every ``w`` is 0 (a
    uniform row) keeps its weights. Stated by its parameters; backends compute it in log space or
    directly where ``power log2(N)`` stays inside float32."""

    kind = "reweight"

    def __init__(self, method, power: float, offset: float, free_rows: int):
        super().__init__(method)
        self.power, self.offset, self.free_rows = float(power), float(offset), int(free_rows)

    @property
    def identity(self) -> bool:
        return self.power == 1.0 and self.offset == 0.0

    def active(self, is_prefill: bool) -> bool:
        return not self.identity

    def offsets(self, rows: RowView):
        """o_i: (B|1, 1, C, 1) float, or a python float when every row is past the free rows."""
        if rows.all_rows_at_least(self.free_rows):
            return self.offset
        off = torch.full(rows.rel_pos.shape, self.offset, dtype=torch.float32, device=rows.rel_pos.device)
        return torch.where(rows.rel_pos < self.free_rows, torch.zeros_like(off), off)


class HeadRule(Rule):
    """Per-head output scaling after attention, before ``o_proj``: every backend runs its own
    attention (or the model's), then :meth:`apply`. ``reads_call``: :meth:`apply` reads the call's
    queries and keys, so every path (vLLM's own kernel included) hands it a full call."""

    kind = "head"
    reads_call: ClassVar[bool] = False

    def apply(self, out: torch.Tensor, call, prompt: PromptState) -> tuple[torch.Tensor, Any]:
        """out (B, Q, H, D) -> (new out, (head, row) pairs changed). ``call``: the call's
        :class:`~attnsteer.attention.geometry.AttentionCall` (phase, mask, ``call.query`` (B, H, Q, D)
        and ``call.keys`` (B, H_kv, K, D) after RoPE)."""
        raise NotImplementedError  # pragma: no cover - each rule defines it


class ModelStep(Rule):
    """Steps around the steered model's forward (never inside attention): extra streams in the
    batch, new next-token logits. Run once per forward and intervention, in ``order`` before the
    forward and ``after_order`` after it. ``serving``: why a serving engine cannot run it (vLLM
    schedules each request as one sequence), and ``serving_fix`` what to do instead."""

    kind = "model"
    order: ClassVar[int] = 0
    after_order: ClassVar[int | None] = None
    serving: ClassVar[str] = "it runs around the model's forward"
    serving_fix: ClassVar[str] = "steer with attnsteer.apply on the Hugging Face model"
    replaces_logits: ClassVar[bool] = False

    def before_model(self, state, bound: dict) -> dict | None:
        """At a new prompt, before the forward: replacement arguments (e.g. a larger batch), or None."""
        return None

    def before_decode(self, state, bound: dict) -> dict | None:
        """Before every decode forward: replacement arguments, or None."""
        return None

    def after_model(self, state, model, bound: dict, output, is_prefill: bool) -> None:
        """After every forward: may rewrite ``output`` in place. ``bound``: the arguments as the
        caller gave them; ``is_prefill``: the phase decided before the forward ran."""

    def select_rows(self, state, index: torch.Tensor) -> None:
        """Follow a selection of batch rows (crop or beam reorder) in what the step keeps itself."""


KINDS = ("key", "score", "group", "reweight", "head", "model")
SCORE_READS = ("cosine", "head_dim", "head_mean_abs")  # what a score rule may read of the call
WEIGHT_KINDS = ("group", "reweight")  # act on the post-softmax weights, in recipe order
