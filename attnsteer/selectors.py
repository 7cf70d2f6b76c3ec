"""Layer and head selectors of a recipe.

Layer selectors use Python slice semantics over ``0..L-1``: ``"2:-1"`` is layers 2..L-2,
``"all"`` every layer, ``5`` or ``-1`` one layer, and a list combines any of these.
Head selectors are ``"all"`` or ``{layer: [query heads]}`` (GQA: query head ``h`` reads kv head
``h // (H_q / H_kv)``).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import RecipeError

LayerSpec = int | str | list
HeadSpec = str | dict

_SLICE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")
_INT_RE = re.compile(r"^\s*-?\d+\s*$")

_LAYER_HELP = 'allowed: an int (5, -1), a slice string ("2:-1", "::2"), "all", or a list of those, e.g. [1, "-14:"]'


def _check_layer_item(item: Any, field: str) -> None:
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise RecipeError(f"{field}: got {item!r} ({type(item).__name__}); {_LAYER_HELP}")
    if isinstance(item, str) and item.strip() != "all" and not (_SLICE_RE.match(item) or _INT_RE.match(item)):
        raise RecipeError(f"{field}: got {item!r}, which is not a layer selector; {_LAYER_HELP}")
    if isinstance(item, str) and _SLICE_RE.match(item):
        step = _SLICE_RE.match(item).group(3)
        if step is not None and int(step) == 0:
            raise RecipeError(f"{field}: got {item!r}; a slice step cannot be 0. Fix: use a step of 1 or more")


def validate_layers(spec: Any, field: str) -> LayerSpec:
    """Check the syntax of a layer selector (no model needed); return it normalised."""
    if isinstance(spec, list):
        if not spec:
            raise RecipeError(f"{field}: got an empty list, which selects no layer; {_LAYER_HELP}")
        for i, item in enumerate(spec):
            _check_layer_item(item, f"{field}[{i}]")
        return list(spec)
    _check_layer_item(spec, field)
    return spec.strip() if isinstance(spec, str) else spec


def resolve_layers(spec: LayerSpec, num_layers: int, field: str) -> list[int]:
    """Turn a layer selector into the sorted list of layer indices of a model with ``num_layers``.

    Raises ``RecipeError`` when an explicit index does not exist or the selection is empty.
    """
    items = spec if isinstance(spec, list) else [spec]
    chosen: set[int] = set()
    for item in items:
        if isinstance(item, str) and item.strip() == "all":
            chosen.update(range(num_layers))
        elif isinstance(item, int) or _INT_RE.match(str(item)):
            idx = int(item)
            if not -num_layers <= idx < num_layers:
                raise RecipeError(
                    f"{field}: layer {idx} does not exist; the model has {num_layers} layers "
                    f"(valid: 0..{num_layers - 1} or -{num_layers}..-1). Fix: pick an index in that range"
                )
            chosen.add(idx % num_layers)
        else:
            start, stop, step = _SLICE_RE.match(item).groups()
            sl = slice(*(int(x) if x is not None else None for x in (start, stop, step)))
            chosen.update(range(num_layers)[sl])
    if not chosen:
        raise RecipeError(
            f"{field}: {spec!r} selects no layer of a model with {num_layers} layers. "
            f'Fix: widen the selector, e.g. "2:-1" or "all"'
        )
    return sorted(chosen)


def validate_heads(spec: Any, field: str) -> HeadSpec:
    """Check the syntax of a head selector; return ``"all"`` or ``{layer(int): sorted heads}``."""
    if isinstance(spec, str):
        if spec.strip() != "all":
            raise RecipeError(
                f'{field}: got {spec!r}; allowed: "all" or a mapping {{layer: [heads]}}, e.g. {{2: [0, 5]}}'
            )
        return "all"
    if not isinstance(spec, dict) or not spec:
        raise RecipeError(
            f'{field}: got {spec!r}; allowed: "all" or a non-empty mapping {{layer: [heads]}}, e.g. {{2: [0, 5]}}'
        )
    out: dict[int, list[int]] = {}
    for key, heads in spec.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and _INT_RE.match(key))):
            raise RecipeError(f"{field}: layer key {key!r} is not an integer. Fix: write it as e.g. 2 or -1")
        layer = int(key)
        if isinstance(heads, int) and not isinstance(heads, bool):
            heads = [heads]
        if (
            not isinstance(heads, list)
            or not heads
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads)
        ):
            raise RecipeError(
                f"{field}[{key}]: got {heads!r}; allowed: a non-empty list of query-head indices >= 0, e.g. [0, 3]"
            )
        if layer in out:
            raise RecipeError(f"{field}: layer {layer} is listed twice. Fix: merge its head lists")
        out[layer] = sorted(set(heads))
    return out


def resolve_heads(spec: HeadSpec, layer: int, num_layers: int, num_heads: int, field: str) -> list[int] | None:
    """Return the query heads steered on ``layer`` (``None`` = all heads)."""
    if spec == "all":
        return None
    for key, heads in spec.items():
        if key % num_layers == layer:
            bad = [h for h in heads if not 0 <= h < num_heads]
            if bad:
                raise RecipeError(
                    f"{field}[{key}]: head(s) {bad} do not exist; layer {layer} has {num_heads} query heads "
                    f"(valid: 0..{num_heads - 1}). Fix: drop or renumber them"
                )
            return list(heads)
    return []


def head_dict_layers(spec: dict, num_layers: int, field: str) -> list[int]:
    """Layers named in a head mapping, checked against the model."""
    seen: dict[int, int] = {}
    for key in spec:
        if not -num_layers <= key < num_layers:
            raise RecipeError(
                f"{field}: layer {key} does not exist; the model has {num_layers} layers. Fix: use 0..{num_layers - 1}"
            )
        layer = key % num_layers
        if layer in seen:
            raise RecipeError(
                f"{field}: keys {seen[layer]} and {key} both name layer {layer} of this {num_layers}-layer model. "
                "Fix: merge their head lists under one key"
            )
        seen[layer] = key
    return sorted(seen)
