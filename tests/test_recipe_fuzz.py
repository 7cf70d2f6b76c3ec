"""Property-based: every malformed recipe gets an attnsteer error that names the offending field.

A valid recipe is drawn, then exactly one thing in it is broken (a wrong type, an out-of-range
value, an unknown key at some level, a bad layer or head selector, a bad container, a missing
required field). Loading must raise :class:`RecipeError` whose message contains the broken
field's path -- never a bare TypeError / KeyError, never silent acceptance.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnsteer
from attnsteer import RecipeError
from attnsteer.methods import METHODS

ORIGIN = "recipe"
NOT_A_MAPPING = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _valid_value(param):
    """A strategy for values ``param`` accepts."""
    if param.name == "projections":  # a carried file (SEKA): valid ones exist only on disk; unset is valid
        return st.none()
    if param.check is not None:  # sink_dims, gamma, mask_ratio, matcher_checkpoint: their documented valid forms
        if param.name == "sink_dims":
            return st.one_of(st.just("auto"), st.lists(st.integers(0, 60), min_size=1, max_size=3, unique=True))
        if param.name == "mask_ratio":
            return st.one_of(st.none(), st.floats(0.0, 0.99))
        if param.name == "matcher_checkpoint":
            return st.one_of(st.none(), st.from_regex(r"[a-z]{1,5}/[a-z]{1,5}", fullmatch=True))
        return st.one_of(st.none(), st.floats(0.1, 5.0))
    if param.choices is not None:
        return st.sampled_from(param.choices)
    if param.kind is bool:
        return st.booleans()
    lo = param.low if param.low is not None else -100.0
    hi = param.high if param.high is not None else 100.0
    if param.low_open:
        lo = lo + 1e-3
    if param.high_open:
        hi = hi - 1e-3
    if param.kind is int:
        return st.integers(math.ceil(lo), math.floor(hi))
    return st.floats(lo, hi)


def _invalid_value(param):
    """A strategy for values ``param`` must reject."""
    if param.name == "projections":
        return st.one_of(st.floats(), st.text(max_size=4), st.booleans(), st.just({"path": "x.safetensors"}))
    if param.check is not None:
        if param.name == "sink_dims":
            return st.one_of(
                st.text(max_size=5).filter(lambda s: s != "auto"),
                st.just([]),
                st.integers(),
                st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                st.just([True]),
                st.lists(st.floats(0.5, 9.5), min_size=1, max_size=2),
            )
        if param.name == "mask_ratio":
            return st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-3), st.text(max_size=4), st.booleans())
        if param.name == "matcher_checkpoint":
            return st.one_of(
                st.just(""), st.just("  "), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)
            )
        return st.one_of(
            st.floats(max_value=0.0), st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=2)
        )
    wrong_type = st.one_of(
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.none(),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    )
    if param.choices is not None:
        return st.one_of(st.text(max_size=8).filter(lambda s: s not in param.choices), st.integers(), st.none())
    if param.kind is bool:
        return st.one_of(st.integers(0, 1), st.text(max_size=4), st.none())
    options = [wrong_type, st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf])]
    if param.low is not None:
        below = st.floats(max_value=param.low, exclude_max=not param.low_open, allow_nan=False, allow_infinity=False)
        options.append(below.filter(lambda v: v < param.low or (param.low_open and v == param.low)))
    if param.high is not None:
        above = st.floats(min_value=param.high, exclude_min=not param.high_open, allow_nan=False, allow_infinity=False)
        options.append(above.filter(lambda v: v > param.high or (param.high_open and v == param.high)))
    return st.one_of(options)


@st.composite
def valid_intervention(draw, method=None):
    method = method or draw(st.sampled_from(sorted(METHODS)))
    cls = METHODS[method]
    names = draw(st.lists(st.sampled_from(sorted(cls.params)), unique=True, max_size=len(cls.params)))
    item = {"method": method, "params": {n: draw(_valid_value(cls.params[n])) for n in names}}
    if method == "agla":  # each matcher takes only its own parameter
        unused = "matcher_checkpoint" if item["params"].get("matcher") == "lvlm_attention" else "mask_ratio"
        item["params"].pop(unused, None)
    if draw(st.booleans()):
        item["layers"] = draw(st.sampled_from(["all", "1:", [0, "2:"], 1, -1, "::2"]))
    return item


@st.composite
def malformed(draw):
    """(recipe dict, the field path its error must name)."""
    items = draw(st.lists(valid_intervention(), min_size=1, max_size=3))
    recipe = {"schema_version": 1, "name": "fuzz", "interventions": items}
    i = draw(st.integers(0, len(items) - 1))
    where = f"{ORIGIN}.interventions[{i}]"
    item = items[i]
    kind = draw(
        st.sampled_from(
            [
                "param_value",
                "param_value",
                "param_value",
                "param_unknown",
                "params_container",
                "method",
                "method_missing",
                "layers",
                "heads",
                "item_unknown",
                "item_container",
                "top_unknown",
                "top_field",
                "schema",
                "model_types",
                "interventions",
            ]
        )
    )
    if kind == "param_value":
        cls = METHODS[item["method"]]
        name = draw(st.sampled_from(sorted(cls.params)))
        item["params"][name] = draw(_invalid_value(cls.params[name]))
        return recipe, f"{where}.params.{name}"
    if kind == "param_unknown":
        key = draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in METHODS[item["method"]].params))
        item["params"][key] = draw(JUNK)
        return recipe, f"{where}.params"
    if kind == "params_container":
        item["params"] = draw(NOT_A_MAPPING)
        return recipe, f"{where}.params"
    if kind == "method":
        item["method"] = draw(
            st.one_of(
                st.text(max_size=8).filter(lambda m: m not in METHODS),
                st.integers(),
                st.none(),
                st.lists(st.sampled_from(sorted(METHODS)), min_size=1, max_size=2),
                st.booleans(),
            )
        )
        item.pop("params")  # a bad method name must be reported as such, not via its params
        return recipe, f"{where}.method"
    if kind == "method_missing":
        del item["method"]
        item.pop("params")
        return recipe, f"{where}.method"
    if kind == "layers":
        item["layers"] = draw(
            st.one_of(
                st.booleans(),
                st.floats(allow_nan=False),
                st.just([]),
                st.text(max_size=6).filter(lambda s: not _is_layer_text(s)),
                st.lists(
                    st.one_of(st.floats(0.5, 3.5), st.booleans(), st.lists(st.integers(), max_size=1)),
                    min_size=1,
                    max_size=2,
                ),
                st.sampled_from(["1:2:0", "::0", "a:b", "1-3", "all:"]),
                st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=2),
            )
        )
        return recipe, f"{where}.layers"
    if kind == "heads":
        item["heads"] = draw(
            st.one_of(
                st.text(max_size=6).filter(lambda s: s.strip() != "all"),
                st.just([]),
                st.just({}),
                st.integers(),
                st.dictionaries(
                    st.integers(0, 3),
                    st.one_of(
                        st.just([]),
                        st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                        st.lists(st.booleans(), min_size=1, max_size=2),
                        st.text(max_size=3),
                        st.lists(st.floats(0.5, 2.5), min_size=1, max_size=2),
                    ),
                    min_size=1,
                    max_size=2,
                ),
                st.dictionaries(
                    st.text(min_size=1, max_size=3).filter(lambda s: not s.strip().lstrip("-").isdigit()),
                    st.just([0]),
                    min_size=1,
                    max_size=1,
                ),
            )
        )
        return recipe, f"{where}.heads"
    if kind == "item_unknown":
        key = draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("method", "layers", "heads", "params")))
        item[key] = draw(JUNK)
        return recipe, where
    if kind == "item_container":
        items[i] = draw(NOT_A_MAPPING)
        return recipe, where
    if kind == "top_unknown":
        key = draw(
            st.text(min_size=1, max_size=10).filter(
                lambda k: k not in ("schema_version", "name", "description", "source", "model_types", "interventions")
            )
        )
        recipe[key] = draw(JUNK)
        return recipe, ORIGIN
    if kind == "top_field":
        field = draw(st.sampled_from(["name", "description", "source"]))
        recipe[field] = draw(
            st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2), st.none())
        )
        return recipe, f"{ORIGIN}.{field}"
    if kind == "schema":
        recipe["schema_version"] = draw(
            st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=3), st.none(), st.floats(1.5, 9))
        )
        return recipe, "schema_version"
    if kind == "model_types":
        recipe["model_types"] = draw(
            st.one_of(
                st.just([]),
                st.integers(),
                st.lists(st.integers(), min_size=1, max_size=2),
                st.just([""]),
                st.just({"llama": 1}),
            )
        )
        return recipe, f"{ORIGIN}.model_types"
    recipe["interventions"] = draw(
        st.one_of(st.just([]), st.none(), st.integers(), st.text(max_size=4), st.just({"method": "act"}))
    )
    return recipe, f"{ORIGIN}.interventions"


def _is_layer_text(text: str) -> bool:
    try:
        attnsteer.selectors.validate_layers(text, "x")
        return True
    except RecipeError:
        return False


def _canonical(recipe) -> str:
    return json.dumps(recipe, sort_keys=True, default=repr)


def test_at_least_500_distinct_malformed_recipes_each_raise_naming_the_field():
    seen: set[str] = set()
    escapes: list[str] = []

    @settings(
        max_examples=900,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(malformed())
    def check(case):
        recipe, field = case
        seen.add(_canonical(recipe))
        try:
            attnsteer.load_recipe(recipe)
        except RecipeError as exc:
            if field not in str(exc):
                escapes.append(f"{recipe!r}: message {str(exc)!r} does not name {field!r}")
        except Exception as exc:  # noqa: BLE001 - anything but RecipeError is an escape
            escapes.append(f"{recipe!r}: {type(exc).__name__}: {exc}")
        else:
            escapes.append(f"{recipe!r}: accepted (expected an error naming {field!r})")

    check()
    assert not escapes, f"{len(escapes)} malformed recipes escaped:\n" + "\n".join(escapes[:20])
    assert len(seen) >= 500, f"only {len(seen)} distinct malformed recipes were generated"


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.lists(valid_intervention(), min_size=1, max_size=3))
def test_valid_recipes_load_and_round_trip(items):
    recipe = attnsteer.load_recipe({"name": "ok", "interventions": items})
    assert attnsteer.load_recipe(recipe.to_dict()) == recipe
    assert attnsteer.Recipe.from_dict(__import__("yaml").safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("interventions: [{method: act, params: {beta: 0.4, beta: 0.5}}]", "beta", 1),
        ("name: a\nname: b\ninterventions: [{method: act}]", "name", 2),
        ("interventions:\n  - method: act\n    method: softplus\n", "method", 3),
        (
            "interventions:\n  - method: act\n    params:\n      beta: 0.3\n      threshold: 0.2\n      beta: 0.2\n",
            "beta",
            6,
        ),
    ],
)
def test_duplicate_yaml_keys_are_rejected_with_key_and_line(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        attnsteer.load_recipe(path)
    assert f"line {line}" in str(err.value) and repr(key) in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch /tmp/attnsteer_pwned']",
        "interventions: !!python/object/new:os.system ['touch /tmp/attnsteer_pwned']",
    ],
)
def test_yaml_tags_never_execute(tmp_path, text):
    import os

    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="not valid YAML"):
        attnsteer.load_recipe(path)
    assert not os.path.exists("/tmp/attnsteer_pwned")
