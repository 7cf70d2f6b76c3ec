"""The columns of a comparison: the unsteered baseline and each recipe, as a run records them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .results import BASELINE_HASH

BASELINE_LABEL = "baseline"
NONE_RECIPE = "none"


@dataclass
class RecipeSpec:
    """One column of the comparison: the baseline (``recipe is None``) or a loaded recipe."""

    label: str
    recipe: Any = None  # attnsteer.Recipe or None
    # the concrete layers and heads it steered on the run's model (handle.resolved_recipe()),
    # filled by check_recipes_fit
    applied: dict | None = None

    @property
    def is_baseline(self) -> bool:
        return self.recipe is None

    @property
    def hash(self) -> str:
        return BASELINE_HASH if self.recipe is None else self.recipe.hash

    def to_json(self) -> dict:
        if self.recipe is None:
            return {"label": self.label, "name": NONE_RECIPE, "hash": BASELINE_HASH, "recipe": None}
        out = {
            "label": self.label,
            "name": self.recipe.name,
            "hash": self.recipe.hash,
            "recipe": self.recipe.resolved_dict(),
        }
        if self.applied is not None:
            out["applied"] = self.applied
        return out


def parse_recipes(values: Sequence | None) -> list[RecipeSpec]:
    """``--recipe`` values -> specs, baseline first. ``none`` (any case) is the baseline; no
    ``--recipe`` at all means the baseline only. Values may also be ``Recipe`` objects or dicts
    (the Python API). A bad recipe is a UsageError naming the value."""
    from ..recipe import load_labelled_recipes as _load_recipes

    def is_baseline(value) -> bool:
        return isinstance(value, str) and value.lower() == NONE_RECIPE

    values = list(values or [NONE_RECIPE])
    if all(isinstance(v, RecipeSpec) for v in values):  # already parsed
        return values
    specs: list[RecipeSpec] = []
    if any(is_baseline(v) for v in values):
        specs.append(RecipeSpec(BASELINE_LABEL))
    strings = list(dict.fromkeys(v for v in values if isinstance(v, str) and not is_baseline(v)))
    others = strings + [v for v in values if not isinstance(v, str)]  # Recipe objects, dicts
    for label, recipe in _load_recipes(others) if others else []:
        specs.append(RecipeSpec(label, recipe))
    return specs


def check_recipes_fit(model, specs: Sequence[RecipeSpec], model_id: str, *, images: bool | None = None) -> list[str]:
    """Plan every recipe of ``specs`` on the model (``attnsteer.plan``: nothing changes), record
    the concrete layers and heads each steers (``spec.applied``); returns the plans' warnings.
    ``images``: whether the inputs carry image tokens (``attnsteer.plan.check_recipes``)."""
    from ..plan import check_recipes

    steered = [(spec.label, spec.recipe) for spec in specs if not spec.is_baseline]
    notes, applied = check_recipes(model, steered, model_id, images=images)
    for spec in specs:
        spec.applied = applied.get(spec.label)
    return notes
