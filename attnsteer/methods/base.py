"""What every steering method declares: its parameters, defaults, level and the two code paths.

A method has two implementations of the same formula (docs/methods.md):

* ``reference_*``: the formula applied literally on the materialised float32 attention map
  ``a`` of shape (B, H_q, Q, K) -- the oracle every fast path is tested against;
* ``fused_*``: the form the fused backend needs -- per-row group masses and factors on one
  query chunk ``p`` of shape (B, H_q, C, K) (never Q x K), or a score transform.

Composition (docs/methods.md#composition): score-level steps of every method run first, then weight-level
steps in recipe order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import RecipeError


@dataclass(frozen=True)
class Param:
    """One recipe parameter: type, default and allowed range."""

    name: str
    kind: type
    default: Any
    doc: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # For parameters that are not plain numbers/strings: check(value, field) -> normalised value.
    check: Callable | None = None
    allowed_text: str = ""

    def allowed(self) -> str:
        if self.allowed_text:
            return self.allowed_text
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"a {self.kind.__name__} in {left}{lo}, {hi}{right}"

    def validate(self, value: Any, field_name: str) -> Any:
        bad = f"{field_name}: got {value!r}; allowed: {self.allowed()} ({self.doc}). Default: {self.default!r}"
        if self.check is not None:
            try:
                return self.check(value)
            except (TypeError, ValueError):
                raise RecipeError(bad) from None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(bad)
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise RecipeError(bad)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(bad)
        value = float(value) if self.kind is float else value
        if self.kind is int and not isinstance(value, int):
            raise RecipeError(bad)
        if not math.isfinite(value):
            raise RecipeError(bad)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise RecipeError(bad)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise RecipeError(bad)
        return value


_KINDS = {"float": float, "int": int, "str": str, "bool": bool}


def param(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    check: Callable | None = None,
    allowed_text: str = "",
):
    """One field of a method's frozen parameter dataclass: its default, one-line help and what is
    allowed (a range for numbers, ``choices`` for strings, or a ``check(value) -> value`` that
    raises ValueError). The field's annotation gives its type."""
    spec = dict(
        choices=choices,
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        check=check,
        allowed_text=allowed_text,
        doc=doc,
    )
    return field(default=default, metadata={"attnsteer_param": spec})


def params_of(params_class) -> dict[str, Param]:
    """The :class:`Param` of every field of a method's parameter dataclass, in field order --
    what the recipe validator, the error messages and ``attnsteer recipes show`` read."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(params_class):
        spec = dict(f.metadata["attnsteer_param"])
        annotation = str(f.type).replace(" | None", "").strip()
        out[f.name] = Param(f.name, _KINDS.get(annotation, object), f.default, spec.pop("doc"), **spec)
    return out


class RowContext:
    """Per-chunk row facts shared by every step (shapes broadcast against (B, H_q, C, K)).

    Everything but ``key_abs`` is computed on first use, so a step pays only for what it reads.

    visible:   bool (B|1, 1|H, C, K) -- key j visible to query row i (causal, padding, window).
    n_visible: float (B|1, 1|H, C, 1) -- N_i, number of visible keys of the row.
    rel_pos:   long (B|1, 1, C, 1) -- row position counted from its row's first non-pad token.
    row_abs:   long (1, 1, C, 1) -- absolute (padded-layout) position of each query row.
    key_abs:   long (K,) -- absolute (padded-layout) position of each key index.
    """

    def __init__(self, visible, key_abs, *, past_len=0, q0=0, rows=None, first_valid=None, max_pad=0, row_valid=None):
        self._visible = visible  # None: every key visible to every row
        # bool (B, 1, C, 1): False for query rows that are padding (right padding); None: all real
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


class Method:
    """Runtime object of one intervention on one layer.

    Subclasses set ``name``, ``Params`` (a frozen dataclass of :func:`param` fields), the level
    flags, and override the steps they need. ``self.p`` is the validated ``Params`` instance.
    ``heads`` is a bool mask (H_q,) of steered query heads, or ``None`` for all heads.
    """

    name: ClassVar[str]
    # the frozen dataclass of the method's parameters (fields built with :func:`param`); ``params``
    # is derived from it by :func:`register` (name -> Param, for validation and help)
    Params: ClassVar[type]
    params: ClassVar[dict[str, Param]]
    default_layers: ClassVar[Any] = "all"
    docs: ClassVar[str] = ""  # where the rule is documented for users (docs/methods.md#<name>)
    citation: ClassVar[str] = ""
    has_score_step: ClassVar[bool] = False
    has_weight_step: ClassVar[bool] = False
    has_head_step: ClassVar[bool] = False
    has_logits_step: ClassVar[bool] = False
    # Methods that act on image (or focus-span) keys and need them in the prompt.
    needs_image: ClassVar[bool] = False
    # Methods with a faithful meaning on cross-attention layers (mllama's), whose keys are all image
    # states: they steer only those layers there. Others steer self-attention layers only, and
    # image methods without it are refused on such models (attnsteer.plan).
    on_cross_attention: ClassVar[bool] = False
    # Methods with a step around the steered model's forward (before_model / after_model): VHR's
    # text-only stream in the prefill batch, PAI's logits step. They run once per forward and
    # intervention, ordered by model_step_order (head level before logits level).
    has_model_step: ClassVar[bool] = False
    model_step_order: ClassVar[int] = 0
    # order of after_model among the model-level steps (default: model_step_order)
    after_step_order: ClassVar[int | None] = None
    # Methods that build model inputs of their own and need the model's processor (AGLA).
    needs_processor: ClassVar[bool] = False
    # Methods that read the arguments of the generate() call itself (AGLA: the pixels, which
    # transformers may encode before the first forward).
    needs_call_inputs: ClassVar[bool] = False

    # Methods that replace the next-token logits (AGLA; PAI with gamma): at most one per recipe.
    @classmethod
    def replaces_logits(cls, params: dict[str, Any]) -> bool:
        return False

    # Methods whose per-layer prompt state allows one intervention of theirs per layer (VAR).
    one_per_layer: ClassVar[bool] = False
    # Name of the Triton kernels' rule that computes this step (attention/triton_backend.py), or
    # None: the PyTorch fused path runs it.
    kernel_rule: ClassVar[str | None] = None

    def __init__(self, params: dict[str, Any], layer: int, heads: torch.Tensor | None, state=None):
        self.p = self.Params(**params)  # typed, frozen: self.p.beta
        self.layer = layer
        self.heads = heads
        self.state = state  # the handle's SteeringState (token roles, hidden-state sinks, streams)
        # Per-prompt state (e.g. ACT sink sets), reset whenever a new prompt starts.
        self.prompt_state: dict[str, Any] = {}
        self.intervention = 0  # index of the recipe intervention this site comes from
        self.first_layer = True  # the lowest layer of that intervention (set when planning)
        self.cross_attention = False  # whether this layer attends to vision states (set when planning)

    # ---- recipe-level facts ---------------------------------------------------------------
    @classmethod
    def is_identity_params(cls, params: dict[str, Any]) -> bool:
        """True when these parameters provably leave every attention row unchanged."""
        return False

    @classmethod
    def finalize_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults that depend on other parameters (e.g. VAR's variant)."""
        return params

    @classmethod
    def check_model(cls, params: dict[str, Any], arch, where: str) -> None:
        """Raise RecipeError when these parameters cannot fit the model (e.g. hidden dims)."""

    @classmethod
    def layers_default(cls, params: dict[str, Any], arch=None):
        """The method's default layers; ``arch`` (archs.ResolvedArch or None) for family-dependent ones."""
        return cls.default_layers

    def layer_hooks(self, decoder_layer, state) -> list:
        """Extra hooks this method needs: ``[(register, hook)]`` with ``register`` one of
        ``decoder_layer.register_forward_pre_hook`` / ``register_forward_hook`` (called with
        ``with_kwargs=True`` by ``apply``, removed by ``remove``)."""
        return []

    def report(self) -> dict | None:
        """What this site found for the last prompt (JSON-friendly), or None: see
        :meth:`attnsteer.SteeringHandle.report`."""
        return None

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (integer (R,)) of the per-prompt state, in that order: the first
        B rows after a second stream is cropped off the batch, the beams' rows under beam search.
        Every tensor in ``prompt_state`` has the batch as its first dimension."""
        for key, value in list(self.prompt_state.items()):
            if isinstance(value, torch.Tensor) and value.dim():
                self.prompt_state[key] = value[index.to(value.device)]

    def head_output(self, out: torch.Tensor, info) -> tuple[torch.Tensor, object]:  # pragma: no cover
        """out: (B, Q, H_q, D) attention output before o_proj -> (scaled out, rows changed)."""
        raise NotImplementedError

    def before_model(self, state, bound: dict) -> dict | None:
        """At a new prompt, before the steered model's forward: ``bound`` are its arguments by
        name; return replacement arguments (e.g. a larger batch), or None to leave them."""
        return None

    def before_decode(self, state, bound: dict) -> dict | None:
        """Before every decode forward (a KV cache is given): replacement arguments, or None."""
        return None

    def after_model(self, state, model, bound: dict, output, is_prefill: bool) -> None:
        """After every forward of the steered model (not paused): may rewrite ``output`` in place
        (e.g. ``output.logits``). ``bound``: the forward's arguments as the caller gave them (before
        any method added rows); ``is_prefill``: the phase the pre-hook decided before the forward
        (the cache in ``bound`` has been filled by then)."""

    def active(self, is_prefill: bool) -> bool:
        """Whether this step modifies anything in a forward of this phase."""
        return True

    def reset_prompt(self) -> None:
        self.prompt_state.clear()

    # ---- helpers -------------------------------------------------------------------------
    def head_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """(1, H_q, 1, 1) bool mask of steered heads on ``like``'s device, or None for all."""
        if self.heads is None:
            return None
        return self.heads.to(like.device).view(1, -1, 1, 1)

    def rows_touched(self, s: torch.Tensor) -> int:
        """Number of (batch, head, row) triples a score step rewrote in s (B, H_q, C, K)."""
        heads = s.shape[1] if self.heads is None else int(self.heads.sum())
        return s.shape[0] * heads * s.shape[2]

    def select_heads(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        hm = self.head_mask(new)
        return new if hm is None else torch.where(hm, new, old)

    # ---- score level ---------------------------------------------------------------------
    def scores(self, s, q, k, ctx: RowContext, qk):  # pragma: no cover
        """s: float32 scores (B, H_q, C, K), -inf where invisible -> new scores (same shape).

        ``qk(q, k)`` computes (B, H_q, C, K) products with GQA handled by the backend.
        """
        raise NotImplementedError

    # ---- weight level --------------------------------------------------------------------
    def needs_column_stats(self, is_prefill: bool) -> bool:
        """Whether the fused path must first compute column sums of the map entering this step."""
        return False

    def set_column_stats(self, colsum: torch.Tensor, count: torch.Tensor, info, key_abs: torch.Tensor) -> None:
        """colsum: (B, H_q, K) summed weights of the map entering this step over the forward's rows;
        count: (B|1, 1, K) number of rows that see each key; key_abs: (K,) absolute key positions."""
        raise NotImplementedError  # pragma: no cover

    def reference_weights(self, a, ctx: RowContext, info):  # pragma: no cover
        """a: float32 (B, H_q, Q, K) post-softmax map -> modified map; returns (map, rows_modified)."""
        raise NotImplementedError

    def fused_weights(self, p, ctx: RowContext, info):  # pragma: no cover
        """p: float32 (B, H_q, C, K) chunk -> modified chunk; returns (chunk, rows_modified)."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}

# Methods docs/methods.md describes whose implementation has not landed yet; recipes naming them fail with
# a clear error instead of silently doing nothing.
PLANNED_METHODS: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method to the registry (recipes name it by ``cls.name``)."""
    cls.params = params_of(cls.Params)
    if cls.after_step_order is None:
        cls.after_step_order = cls.model_step_order
    METHODS[cls.name] = cls
    return cls


def masked_sum(p: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Sum of ``p`` (B, H, C, K) over keys where ``group`` (B, H|1, 1|C, K) is True -> (B, H, C, 1)."""
    return (p * group).sum(-1, keepdim=True)


@dataclass
class StepInfo:
    """Facts about the current forward a step may need (phase and key offsets)."""

    is_prefill: bool
    key_offset: int
    num_keys: int
    extra: dict = field(default_factory=dict)
