"""Recipes: the validated, shareable description of what to steer.

YAML on disk (``schema_version: 1``), a :class:`Recipe` in memory::

    schema_version: 1
    name: act-default
    description: free text
    source: where the settings come from (paper, calibration run)
    model_types: [llama]          # optional; checked against model.config.model_type
    interventions:
      - method: act               # act | softplus | var | vhr | pai | agla
        layers: "2:-1"            # slice string, int, or a list of both; the method's default (docs/methods.md)
        heads: all                # or {layer: [query heads]}
        params: {beta: 0.4, threshold: 0.1, apply_to: prefill}

A recipe is loaded from a built-in name, a YAML path, a dict, a Hugging Face Hub repo
(``hf://org/repo`` or ``org/repo``, file ``recipe.yaml``) or an existing :class:`Recipe`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError, UsageError
from .methods import METHODS, PLANNED_METHODS
from .selectors import validate_heads, validate_layers

SCHEMA_VERSION = 1
RECIPE_FILENAME = "recipe.yaml"
_TOP_KEYS = ("schema_version", "name", "description", "source", "model_types", "interventions")
_INTERVENTION_KEYS = ("method", "layers", "heads", "params")


def _closest(word: str, options) -> str:
    import difflib

    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


@dataclass
class Intervention:
    """One method applied to a set of layers and heads, with validated parameters."""

    method: str
    layers: Any = None
    heads: Any = "all"
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        if self.layers is not None:
            out["layers"] = copy.deepcopy(self.layers)
        out["heads"] = copy.deepcopy(self.heads)
        out["params"] = dict(self.params)
        return out


@dataclass
class Recipe:
    """A validated steering recipe. Build it with :func:`load_recipe` or :meth:`from_dict`."""

    name: str
    interventions: list[Intervention]
    description: str = ""
    source: str = ""
    model_types: list[str] | None = None
    schema_version: int = SCHEMA_VERSION

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "recipe") -> Recipe:
        """Validate a plain mapping (e.g. parsed YAML). Errors name the field, value and fix."""
        if not isinstance(data, dict):
            raise RecipeError(
                f"{origin}: a recipe must be a mapping with keys {list(_TOP_KEYS)}; got {type(data).__name__}"
            )
        unknown = [k for k in data if not isinstance(k, str) or k not in _TOP_KEYS]
        if unknown:
            raise RecipeError(
                f"{origin}: unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}.{_closest(unknown[0], _TOP_KEYS)}"
            )
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecipeError(
                f"{origin}: schema_version {version!r} is not supported; this attnsteer reads schema_version: "
                f"{SCHEMA_VERSION}. Fix: set schema_version: {SCHEMA_VERSION} (or upgrade attnsteer)"
            )
        name = data.get("name", "unnamed")
        for key in ("name", "description", "source"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError(f"{origin}.{key}: got {data[key]!r}; allowed: a string")
        model_types = data.get("model_types")
        if model_types is not None:
            if isinstance(model_types, str):
                model_types = [model_types]
            if (
                not isinstance(model_types, list)
                or not model_types
                or not all(isinstance(m, str) and m.strip() for m in model_types)
            ):
                raise RecipeError(
                    f"{origin}.model_types: got {model_types!r}; allowed: a non-empty list of model_type strings, "
                    "e.g. [llama, mistral], or leave it out"
                )
        items = data.get("interventions")
        if not isinstance(items, list) or not items:
            raise RecipeError(
                f"{origin}.interventions: got {items!r}; a recipe needs a non-empty list of interventions, e.g. "
                "[{method: act, params: {beta: 0.4}}]"
            )
        interventions = [_parse_intervention(item, f"{origin}.interventions[{i}]") for i, item in enumerate(items)]
        return cls(
            name=name,
            interventions=interventions,
            description=data.get("description", ""),
            source=data.get("source", ""),
            model_types=model_types,
            schema_version=SCHEMA_VERSION,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | dict | Recipe, *, revision: str | None = None) -> Recipe:
        """Alias of :func:`load_recipe` (PEFT-style)."""
        return load_recipe(name_or_path, revision=revision)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"schema_version": self.schema_version, "name": self.name}
        if self.description:
            out["description"] = self.description
        if self.source:
            out["source"] = self.source
        if self.model_types:
            out["model_types"] = list(self.model_types)
        out["interventions"] = [iv.to_dict() for iv in self.interventions]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        """Write YAML to ``path`` (a file, or a folder that gets ``recipe.yaml``)."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
            path = path / RECIPE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    save_pretrained = save

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload as ``recipe.yaml`` to a Hub repo (needs network and a token)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, **{k: v for k, v in kwargs.items() if k in ("private", "token")})
        with tempfile.TemporaryDirectory() as tmp:
            file = self.save(Path(tmp) / RECIPE_FILENAME)
            api.upload_file(path_or_fileobj=str(file), path_in_repo=RECIPE_FILENAME, repo_id=repo_id)
        return repo_id

    def resolved_dict(self) -> dict:
        """:meth:`to_dict` with every model-independent default written out: a method's default
        layers, unless a head mapping decides the layers (then they stay implicit) or the
        default depends on the model family (VHR). The concrete layers and heads steered on a
        given model are :meth:`attnsteer.SteeringHandle.resolved_recipe`."""
        out = self.to_dict()
        for iv, item in zip(self.interventions, out["interventions"]):
            if iv.layers is None and not isinstance(iv.heads, dict):
                default = METHODS[iv.method].layers_default(iv.params)
                if default is not None:
                    item["layers"] = default
        return out

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`resolved_dict` (what results record): two
        recipes that steer identically except for name/description/source still differ, but
        leaving out a default and writing it out do not."""
        canonical = json.dumps(self.resolved_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def methods(self) -> list[str]:
        return [iv.method for iv in self.interventions]


def _parse_intervention(item: Any, where: str) -> Intervention:
    if not isinstance(item, dict):
        raise RecipeError(f"{where}: got {item!r}; an intervention is a mapping with keys {list(_INTERVENTION_KEYS)}")
    unknown = [k for k in item if not isinstance(k, str) or k not in _INTERVENTION_KEYS]
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {unknown}; allowed: {list(_INTERVENTION_KEYS)}."
            f"{_closest(unknown[0], _INTERVENTION_KEYS)} (method parameters go under params:)"
        )
    if "method" not in item:
        raise RecipeError(f"{where}.method: missing; every intervention names its method, one of {sorted(METHODS)}")
    method = item["method"]
    if not isinstance(method, str):
        raise RecipeError(
            f"{where}.method: got {method!r} ({type(method).__name__}); allowed: one method name as a string, "
            f"one of {sorted(METHODS)}"
        )
    if method in PLANNED_METHODS:
        raise RecipeError(
            f"{where}.method: {method!r} ({PLANNED_METHODS[method]}) is not implemented in this attnsteer version; "
            f"available: {sorted(METHODS)}. Fix: use one of those, or upgrade attnsteer"
        )
    if method not in METHODS:
        allowed = sorted(METHODS) + sorted(PLANNED_METHODS)
        raise RecipeError(f"{where}.method: got {method!r}; allowed: {allowed}.{_closest(method, allowed)}")
    cls = METHODS[method]
    # None = the method's default layers (docs/methods.md), resolved against the model at apply time.
    layers = validate_layers(item["layers"], f"{where}.layers") if item.get("layers") is not None else None
    heads = validate_heads(item.get("heads", "all"), f"{where}.heads")
    raw = item.get("params", {})
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}.params: got {raw!r}; allowed: a mapping of parameter names to values")
    unknown = [k for k in raw if not isinstance(k, str) or k not in cls.params]
    if unknown:
        raise RecipeError(
            f"{where}.params: unknown parameter(s) {unknown} for method {method!r}; allowed: {list(cls.params)}."
            f"{_closest(unknown[0], cls.params)}"
        )
    params = {}
    for pname, spec in cls.params.items():
        params[pname] = spec.validate(raw[pname], f"{where}.params.{pname}") if pname in raw else spec.default
    try:
        params = cls.finalize_params(params)
    except RecipeError as exc:  # a rule across parameters; the method names the field
        raise RecipeError(f"{where}.{exc}") from None
    return Intervention(method=method, layers=layers, heads=heads, params=params)


# ---- several recipes side by side (command lines, evaluations) ------------------------------------
BASELINE_LABEL = "baseline"  # the label of the unsteered model; no recipe may take it


def label_recipes(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """(argument, Recipe) -> (unique display label, Recipe); labels are recipe names."""
    out, used = [], {BASELINE_LABEL}
    for arg, recipe in pairs:
        base = recipe.name or str(arg)
        label, k = base, 1
        while label in used:
            k += 1
            label = f"{base}#{k}"
        used.add(label)
        out.append((label, recipe))
    return out


def load_labelled_recipes(values, flag: str = "--recipe") -> list[tuple[str, Recipe]]:
    """Load each recipe argument (built-in name, file, Hub repo) -> ``(unique label, Recipe)``;
    a bad one raises :class:`UsageError` naming ``flag`` and the value."""
    pairs = []
    for value in values:
        try:
            pairs.append((value, load_recipe(value)))
        except RecipeError as exc:
            is_file = isinstance(value, (str, Path)) and Path(value).exists()
            hint = f" (check the file with `attnsteer recipes validate {value}`)" if is_file else ""
            raise UsageError(f"{flag} {value!r}: {exc}{hint}") from None
    return label_recipes(pairs)


# ---- built-ins and loading -------------------------------------------------------------------
def builtin_names() -> list[str]:
    """Names of the recipes shipped inside the package (``attnsteer/recipes/*.yaml``)."""
    folder = resources.files("attnsteer") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _builtin_text(name: str) -> str:
    return (resources.files("attnsteer") / "recipes" / f"{name}.yaml").read_text()


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"key {key!r} on line {line} repeats the key of line {first_line}")
        self.key, self.line, self.first_line = key, line, first_line


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags execute) that rejects a mapping naming one key twice -- plain
    YAML keeps the last value silently."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"unhashable mapping key {key!r}", key_node.start_mark
                    ) from None
        return super().construct_mapping(node, deep=deep)


def _from_yaml_text(text: str, origin: str) -> Recipe:
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RecipeError(
            f"{origin}: line {exc.line}: the key {exc.key!r} appears twice in one mapping (first on line "
            f"{exc.first_line}); YAML would silently keep the last value. Fix: keep one {exc.key!r}"
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: not valid YAML: {exc}") from exc
    return Recipe.from_dict(data, origin=origin)


def load_recipe(recipe: str | Path | dict | Recipe, *, revision: str | None = None) -> Recipe:
    """Load a recipe from a built-in name, a YAML file or folder, a dict, a Hub repo or a Recipe."""
    if isinstance(recipe, Recipe):
        return Recipe.from_dict(recipe.to_dict(), origin=f"recipe {recipe.name!r}")
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(
            f"recipe: got {type(recipe).__name__}; allowed: a built-in name {builtin_names()}, a YAML path, "
            "a dict, a Hub repo id or an attnsteer.Recipe"
        )
    text = str(recipe)
    if text in builtin_names():
        return _from_yaml_text(_builtin_text(text), f"built-in recipe {text!r}")
    path = Path(text).expanduser()
    if path.is_dir() and (path / RECIPE_FILENAME).is_file():
        path = path / RECIPE_FILENAME
    if path.is_file():
        return _from_yaml_text(path.read_text(), str(path))
    if text.startswith("hf://") or (text.count("/") == 1 and not text.endswith((".yaml", ".yml"))):
        return _load_from_hub(text.removeprefix("hf://"), revision)
    raise RecipeError(
        f"recipe: {text!r} is not a built-in recipe, an existing YAML file, or a Hub repo id. "
        f"Built-ins: {builtin_names()}. Fix: check the path, or run `attnsteer recipes list`"
    )


def _load_from_hub(repo_id: str, revision: str | None) -> Recipe:
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(repo_id, RECIPE_FILENAME, revision=revision)
    except Exception as exc:  # network, missing repo, missing file
        raise RecipeError(
            f"recipe: could not download {RECIPE_FILENAME} from the Hub repo {repo_id!r} "
            f"({type(exc).__name__}: {exc}). Fix: check the repo id and your network, or download the file and "
            "pass its local path"
        ) from exc
    return _from_yaml_text(Path(file).read_text(), f"hf://{repo_id}")
