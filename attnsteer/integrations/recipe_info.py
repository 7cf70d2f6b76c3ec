"""The recipe a harness model steers with, and the record of it that lands in the harness's results."""

from __future__ import annotations

BASELINE_NAMES = (None, "", "none")
BASELINE_HASH = "none"  # the "recipe hash" attnsteer's own results give the unsteered baseline


def load(recipe):
    """``recipe`` from a harness's model_args -> :class:`attnsteer.Recipe`, or None for the baseline.

    Accepts what :meth:`attnsteer.Recipe.from_pretrained` does (built-in name, YAML path, Hub repo
    id), a dict, a ``Recipe``, or ``None`` / ``"none"`` (no steering)."""
    import attnsteer

    if isinstance(recipe, str) and recipe.strip().lower() in BASELINE_NAMES:
        return None
    if recipe is None or isinstance(recipe, attnsteer.Recipe):
        return recipe
    if isinstance(recipe, dict):
        return attnsteer.Recipe.from_dict(recipe, origin="model_args recipe")
    if not isinstance(recipe, str):
        raise attnsteer.RecipeError(
            f"model_args recipe={recipe!r}: expected a recipe name, YAML path or Hub repo id. "
            "Fix: e.g. recipe=act-default (`attnsteer recipes` lists the built-in ones), or recipe=none"
        )
    return attnsteer.Recipe.from_pretrained(recipe.strip())


def record(recipe, handle, backend: str) -> dict:
    """What the harness's results say about the steering: ``{"recipe": None, "recipe_hash":
    "none"}`` without a recipe, else its name, SHA-256 hash (:attr:`attnsteer.Recipe.hash`),
    resolved form (every default written out), the concrete layers and heads it steers on this
    model, and the attention backend."""
    import attnsteer

    out = {"attnsteer_version": attnsteer.__version__}
    if recipe is None:
        return {**out, "recipe": None, "recipe_hash": BASELINE_HASH}
    return {
        **out,
        "recipe": recipe.name,
        "recipe_hash": recipe.hash,
        "recipe_resolved": recipe.resolved_dict(),
        "recipe_applied": handle.resolved_recipe().to_dict() if handle is not None else None,
        "backend": backend,
    }
