"""What every steering method declares: its parameters (typed, ranged, documented), its facts
(image keys, processor, serving limits) and its rules, of the kinds in :mod:`attnsteer.methods.rules`.

Composition (docs/methods.md#composition): key rules, then score rules of every method, then the
weight rules (group, reweight) in recipe order, then head rules, then model steps.
"""

from __future__ import annotations

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


class Method:
    """One intervention of a recipe on one layer: its validated parameters and its rules.

    Subclasses set ``name``, ``Params`` (a frozen dataclass of :func:`param` fields), their facts
    below, and build their rules (:mod:`attnsteer.methods.rules`) in :meth:`build_rules`.
    ``self.p`` is the validated ``Params`` instance; ``heads`` is a bool mask (H_q,) of steered query
    heads, or ``None`` for all heads. A method object keeps nothing per prompt: what it finds for a
    prompt lives in that prompt's :class:`~attnsteer.context.PromptState` under :attr:`key`.
    """

    name: ClassVar[str]
    # the frozen dataclass of the method's parameters (fields built with :func:`param`); ``params``
    # is derived from it by :func:`register` (name -> Param, for validation and help)
    Params: ClassVar[type]
    params: ClassVar[dict[str, Param]]
    default_layers: ClassVar[Any] = "all"
    docs: ClassVar[str] = ""  # where the rule is documented for users (docs/methods.md#<name>)
    citation: ClassVar[str] = ""
    # Methods that act on image (or focus-span) keys and need them in the prompt.
    needs_image: ClassVar[bool] = False
    # Methods with a faithful meaning on cross-attention layers (mllama's), whose keys are all image
    # states: they steer only those layers there. Others steer self-attention layers only, and
    # image methods without it are refused on such models (attnsteer.plan).
    on_cross_attention: ClassVar[bool] = False
    # Methods that build model inputs of their own and need the model's processor (AGLA).
    needs_processor: ClassVar[bool] = False
    # Methods that read the arguments of the generate() call itself (AGLA: the pixels, which
    # transformers may encode before the first forward).
    needs_call_inputs: ClassVar[bool] = False
    # Methods whose per-layer prompt state allows one intervention of theirs per layer (VAR).
    one_per_layer: ClassVar[bool] = False
    # Methods that read the hidden states entering their decoder layer at prefill
    # (:meth:`observe_layer_input`; VAR's massive-activation sinks).
    reads_layer_input: ClassVar[bool] = False
    # Why the method needs each prompt in one forward (a serving engine must not split a prompt
    # into chunks, or reuse another prompt's cached blocks), or None.
    whole_prompt: ClassVar[str | None] = None
    # Parameters that name a file the recipe carries beside it ({param: how the file is made}):
    # ``{path, sha256}`` in the recipe, checked and copied by attnsteer.recipe (SEKA's projections).
    carried_files: ClassVar[dict[str, str]] = {}
    # Why a position's keys depend on the prompt's length (so a KV block cached for one prompt is
    # wrong for a longer prompt that extends it), or None.
    prompt_length_dependent: ClassVar[str | None] = None

    # Methods that replace the next-token logits (AGLA; PAI with gamma): at most one per recipe.
    @classmethod
    def replaces_logits(cls, params: dict[str, Any]) -> bool:
        return False

    def __init__(self, params: dict[str, Any], layer: int, heads: torch.Tensor | None):
        self.p = self.Params(**params)  # typed, frozen: self.p.beta
        self.layer = layer
        self.heads = heads
        self.intervention = 0  # index of the recipe intervention this site comes from
        self.first_layer = True  # the lowest layer of that intervention (set when planning)
        self.cross_attention = False  # whether this layer attends to vision states (set when planning)
        self.rules: list = self.build_rules()

    @property
    def key(self) -> tuple[int, int]:
        """This site's key in a :class:`~attnsteer.context.PromptState`: (layer, intervention)."""
        return (self.layer, self.intervention)

    def build_rules(self) -> list:
        """The method's rules (:mod:`attnsteer.methods.rules`), in the order they apply."""
        return []

    def rules_of(self, kind: str) -> list:
        return [rule for rule in self.rules if rule.kind == kind]

    @property
    def model_step(self):
        """The method's model step (:class:`~attnsteer.methods.rules.ModelStep`), or None."""
        steps = self.rules_of("model")
        return steps[0] if steps else None

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

    # ---- per prompt ---------------------------------------------------------------------------
    def observe_layer_input(self, hidden: torch.Tensor, valid: torch.Tensor, prompt) -> None:
        """At prefill (``reads_layer_input``): hidden (B, L, D) entering this decoder layer, valid bool
        (B, L) the real prompt tokens; store what the method finds in ``prompt``."""

    def report(self, prompt) -> dict | None:
        """What this site found for ``prompt`` (JSON-friendly), or None: see
        :meth:`attnsteer.SteeringHandle.report`."""
        return None


METHODS: dict[str, type[Method]] = {}

# Methods docs/methods.md describes whose implementation has not landed yet; recipes naming them fail with
# a clear error instead of silently doing nothing.
PLANNED_METHODS: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method to the registry (recipes name it by ``cls.name``)."""
    cls.params = params_of(cls.Params)
    METHODS[cls.name] = cls
    return cls
