"""Recipes: the validated, shareable description of what to steer.

YAML on disk (``schema_version: 1``), a :class:`Recipe` in memory::

    schema_version: 1
    name: act-default
    description: free text
    source: where the settings come from (paper, calibration run)
    model_types: [llama]          # optional; checked against model.config.model_type
    model_types_policy: error     # optional: error (default) refuses other model types, warn steers them anyway
    interventions:
      - method: act               # act | softplus | var | vhr | pai | agla | vaf | spin | seka | hgai
        layers: "2:-1"            # slice string, int, or a list of both; the method's default (docs/methods.md)
        heads: all                # or {layer: [query heads]}
        params: {beta: 0.4, threshold: 0.1, apply_to: prefill}

A recipe is loaded from a built-in name, a YAML path, a folder holding ``recipe.yaml``, a dict,
a Hugging Face Hub repo (``hf://org/repo`` or ``org/repo``, file ``recipe.yaml``) or an existing
:class:`Recipe`; :meth:`Recipe.save_pretrained` and :meth:`Recipe.push_to_hub` write the same layout.

Carried files: a method may name some of its parameters in ``carried_files`` (a class attribute,
``{param: how the file is made}``); such a parameter names a file the recipe carries, as
``{path: FILE, sha256: HEX}``. A relative ``path`` is read from the recipe's folder (a recipe given
as a dict: the current directory), the file must have that sha256 (checked when the recipe loads),
the recipe's hash covers the sha256 (not the path), and saving or sharing a recipe copies its files
beside ``recipe.yaml`` (:class:`CarriedFile`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from . import hub
from .errors import AttnsteerWarning, RecipeError, UsageError
from .methods import METHODS, PLANNED_METHODS
from .selectors import validate_heads, validate_layers

SCHEMA_VERSION = 1
RECIPE_FILENAME = "recipe.yaml"
_TOP_KEYS = ("schema_version", "name", "description", "source", "model_types", "model_types_policy", "interventions")
# What a recipe does on a model whose model_type is not in its model_types (the first is the default).
MODEL_TYPES_POLICIES = ("error", "warn")
# ``owner/name`` as the Hub spells repo ids (a bare ``name`` only where a push defaults to the user's namespace).
_HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
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

    def to_dict(self, keep_files: bool = False) -> dict:
        """Plain data (carried files as ``{path, sha256}``; ``keep_files``: as :class:`CarriedFile`)."""
        out: dict[str, Any] = {"method": self.method}
        if self.layers is not None:
            out["layers"] = copy.deepcopy(self.layers)
        out["heads"] = copy.deepcopy(self.heads)
        out["params"] = {
            k: v.to_dict() if isinstance(v, CarriedFile) and not keep_files else v for k, v in self.params.items()
        }
        return out


@dataclass
class Recipe:
    """A validated steering recipe. Build it with :func:`load_recipe` or :meth:`from_dict`."""

    name: str
    interventions: list[Intervention]
    description: str = ""
    source: str = ""
    model_types: list[str] | None = None
    model_types_policy: str = MODEL_TYPES_POLICIES[0]
    schema_version: int = SCHEMA_VERSION

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "recipe", folder: str | Path | None = None) -> Recipe:
        """Validate a plain mapping (e.g. parsed YAML). Errors name the field, value and fix.
        ``folder``: where relative paths of carried files are read (default: the current directory)."""
        if not isinstance(data, dict):
            raise RecipeError(
                f"{origin}: a recipe must be a mapping with keys {list(_TOP_KEYS)}; got {type(data).__name__}"
            )
        unknown = [k for k in data if not isinstance(k, str) or k not in _TOP_KEYS]
        if unknown:
            raise RecipeError(
                f"{origin}: unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}.{_closest(unknown[0], _TOP_KEYS)}"
            )
        _check_schema_version(data.get("schema_version", SCHEMA_VERSION), origin)
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
        policy = data.get("model_types_policy", MODEL_TYPES_POLICIES[0])
        if not isinstance(policy, str) or policy not in MODEL_TYPES_POLICIES:
            hint = _closest(policy, MODEL_TYPES_POLICIES) if isinstance(policy, str) else ""
            raise RecipeError(
                f"{origin}.model_types_policy: got {policy!r}; allowed: 'error' (the default: refuse a model whose "
                "model_type is not in model_types) or 'warn' (warn and steer it anyway)."
                f"{hint or ' Fix: use one of those, or leave it out'}"
            )
        items = data.get("interventions")
        if not isinstance(items, list) or not items:
            raise RecipeError(
                f"{origin}.interventions: got {items!r}; a recipe needs a non-empty list of interventions, e.g. "
                "[{method: act, params: {beta: 0.4}}]"
            )
        base = Path(folder).expanduser() if folder is not None else None
        interventions = [
            _parse_intervention(item, f"{origin}.interventions[{i}]", base) for i, item in enumerate(items)
        ]
        return cls(
            name=name,
            interventions=interventions,
            description=data.get("description", ""),
            source=data.get("source", ""),
            model_types=model_types,
            model_types_policy=policy,
            schema_version=SCHEMA_VERSION,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | dict | Recipe,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> Recipe:
        """Load a recipe, as :func:`load_recipe`: a built-in name, a YAML file, a folder holding
        ``recipe.yaml`` (what :meth:`save_pretrained` writes) or a Hub repo id (``owner/name`` or
        ``hf://owner/name``; ``revision`` picks a branch, tag or commit, ``token`` a private repo)."""
        return load_recipe(name_or_path, revision=revision, token=token)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self, keep_files: bool = False) -> dict:
        """Plain data, as YAML writes it (``keep_files``: carried files stay :class:`CarriedFile`)."""
        out: dict[str, Any] = {"schema_version": self.schema_version, "name": self.name}
        if self.description:
            out["description"] = self.description
        if self.source:
            out["source"] = self.source
        if self.model_types:
            out["model_types"] = list(self.model_types)
        if self.model_types_policy != MODEL_TYPES_POLICIES[0]:  # the default stays implicit (and out of the hash)
            out["model_types_policy"] = self.model_types_policy
        out["interventions"] = [iv.to_dict(keep_files) for iv in self.interventions]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        """Write YAML to ``path`` (a file, or a folder that gets ``recipe.yaml``); returns the file.
        Carried files are copied beside it (unless already there) and named by their file name."""
        path = Path(path).expanduser()
        if path.is_dir() or path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
            path = path / RECIPE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._files_beside(path.parent).to_yaml())
        return path

    @property
    def carried_files(self) -> list[CarriedFile]:
        """The files the recipe's parameters name (:class:`CarriedFile`), in recipe order."""
        return [v for iv in self.interventions for v in iv.params.values() if isinstance(v, CarriedFile)]

    def _files_beside(self, folder: Path) -> Recipe:
        """This recipe with every carried file copied into ``folder`` under its file name (a file
        already there must be the same bytes) and its ``path`` that name."""
        names: dict[str, str] = {}
        data = self.to_dict(keep_files=True)
        for item in data["interventions"]:
            for key, value in item["params"].items():
                if isinstance(value, CarriedFile):
                    item["params"][key] = value.copy_to(folder, names)
        return Recipe.from_dict(data, origin=f"recipe {self.name!r}", folder=folder)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``save_directory/recipe.yaml`` (the folder is created) and copy the recipe's carried
        files beside it (nothing else is written), the layout :meth:`from_pretrained` and
        :meth:`push_to_hub` use; returns the file's path."""
        folder = Path(save_directory).expanduser()
        if folder.exists() and not folder.is_dir():
            raise UsageError(
                f"save_pretrained: {str(folder)!r} is a file, not a folder. Fix: pass a folder (it gets "
                f"{RECIPE_FILENAME}), or use Recipe.save(path) to write a single YAML file"
            )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RECIPE_FILENAME
        path.write_text(self._files_beside(folder).to_yaml())
        return path

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> PushedRecipe:
        """Validate the recipe and upload it as ``recipe.yaml`` to the Hub model repo ``repo_id``
        (created if missing; ``private`` applies only then), with its carried files beside it in
        the same commit. The commit message names the recipe
        and its :attr:`hash`. Needs the network and a write token (``hf auth login`` or ``HF_TOKEN``).

        Returns a :class:`PushedRecipe`: the repo id, the recipe's hash and the commit URL; anyone
        loads it back with ``Recipe.from_pretrained(repo_id)`` or ``attnsteer recipes pull``."""
        import tempfile

        repo_id = _hub_repo_id(repo_id, "push_to_hub", allow_bare=True)
        recipe = load_recipe(self)  # re-validated: a Recipe built by hand may hold anything
        digest = recipe.hash
        if commit_message is None:
            commit_message = f"attnsteer recipe {recipe.name!r} (sha256 {digest})"
        elif digest not in commit_message:
            commit_message = f"{commit_message} (attnsteer recipe sha256 {digest})"
        if hub.offline_flag():
            raise UsageError(
                f"push_to_hub: cannot upload to the Hub repo {repo_id!r}: the Hub is offline (HF_HUB_OFFLINE is "
                "set); nothing was uploaded. Fix: connect to the network and unset HF_HUB_OFFLINE, or share the "
                f"folder written by Recipe.save_pretrained() ({RECIPE_FILENAME}) another way"
            )
        from huggingface_hub import HfApi

        api = HfApi(token=token) if token is not None else HfApi()
        try:
            repo_url = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
            repo_id = getattr(repo_url, "repo_id", None) or repo_id  # a bare name gets the user's namespace
            with tempfile.TemporaryDirectory() as tmp:
                file = recipe.save_pretrained(tmp)
                commit_args = dict(
                    repo_id=repo_id,
                    token=token,
                    revision=revision,
                    commit_message=commit_message,
                    commit_description=(
                        f"attnsteer recipe {recipe.name!r}, schema_version {recipe.schema_version}, "
                        f"methods {recipe.methods}; recipe hash (sha256): {digest}"
                    ),
                )
                if recipe.carried_files:  # recipe.yaml and its files in one commit
                    commit = api.upload_folder(folder_path=tmp, **commit_args)
                else:
                    commit = api.upload_file(path_or_fileobj=str(file), path_in_repo=RECIPE_FILENAME, **commit_args)
        except Exception as exc:  # no token, no network, no write access, a bad revision
            raise UsageError(
                f"push_to_hub: could not upload {RECIPE_FILENAME}{' and its files' if recipe.carried_files else ''} "
                f"to the Hub repo {repo_id!r} "
                f"({type(exc).__name__}: {_one_line(exc)}). Fix: check the network (and that HF_HUB_OFFLINE is "
                "not set), log in with a write token (`hf auth login` or HF_TOKEN), and check the repo id is "
                "yours or your organisation's"
            ) from exc
        url = getattr(commit, "commit_url", None) or (str(commit) if isinstance(commit, str) else None)
        return PushedRecipe(repo_id=repo_id, hash=digest, commit_url=url, revision=revision)

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
        recipes that steer identically except for name/description/source/model_types(_policy)
        still differ, but leaving out a default and writing it out do not (``model_types_policy:
        error`` hashes as if left out). A carried file enters by its sha256 (its path does not)."""
        data = self.resolved_dict()
        for item in data["interventions"]:  # a carried file counts by its content, not its name
            item["params"] = {
                k: {"sha256": v["sha256"]} if k in _carried(item["method"]) and isinstance(v, dict) else v
                for k, v in item["params"].items()
            }
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def methods(self) -> list[str]:
        return [iv.method for iv in self.interventions]

    def check_model_type(self, model_type: str) -> None:
        """Raise (``model_types_policy: error``, the default) or warn (``warn``) when ``model_type``
        is not one of the recipe's ``model_types``; a recipe without ``model_types`` fits any model."""
        if not self.model_types or model_type in self.model_types:
            return
        if self.model_types_policy == "warn":
            warnings.warn(
                f"recipe {self.name!r} is made for model_types {self.model_types}, and this model's model_type is "
                f"{model_type!r}; steering it anyway (model_types_policy: warn). Check the result, or add "
                f"{model_type!r} to model_types once it is known to work",
                AttnsteerWarning,
                stacklevel=4,
            )
            return
        raise RecipeError(
            f"{self.name}.model_types: the recipe is made for {self.model_types}, and this model's model_type is "
            f"{model_type!r}. Fix: use a recipe for {model_type!r}, drop model_types if it is generic, or set "
            "model_types_policy: warn to steer other model types with a warning"
        )


@dataclass(frozen=True)
class PushedRecipe:
    """What :meth:`Recipe.push_to_hub` uploaded: ``str()`` of it is the commit URL (or the repo id)."""

    repo_id: str
    hash: str
    commit_url: str | None = None
    revision: str | None = None

    @property
    def url(self) -> str:
        """The repo's page on the Hub."""
        return f"https://huggingface.co/{self.repo_id}"

    def __str__(self) -> str:
        return self.commit_url or self.repo_id


def _check_schema_version(version: Any, origin: str) -> None:
    if isinstance(version, int) and not isinstance(version, bool) and version == SCHEMA_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        from ._version import __version__

        raise RecipeError(
            f"{origin}: schema_version {version} is newer than this attnsteer ({__version__}) reads (schema_version: "
            f"{SCHEMA_VERSION}); the recipe was written by a later attnsteer. Fix: upgrade attnsteer "
            "(pip install -U attnsteer)"
        )
    raise RecipeError(
        f"{origin}: schema_version {version!r} is not supported; this attnsteer reads schema_version: "
        f"{SCHEMA_VERSION}. Fix: set schema_version: {SCHEMA_VERSION} (or leave it out)"
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_intervention(item: Any, where: str, folder: Path | None) -> Intervention:
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
    carried = _carried(method)
    for pname, spec in cls.params.items():
        if pname not in raw:
            params[pname] = spec.default
        elif pname in carried:  # null: not set (the method says whether it can steer without it)
            value = raw[pname]
            params[pname] = (
                None if value is None else CarriedFile.parse(value, f"{where}.params.{pname}", folder, carried[pname])
            )
        else:
            params[pname] = spec.validate(raw[pname], f"{where}.params.{pname}")
    try:
        params = cls.finalize_params(params)
    except RecipeError as exc:  # a rule across parameters; the method names the field
        raise RecipeError(f"{where}.{exc}") from None
    return Intervention(method=method, layers=layers, heads=heads, params=params)


# ---- files a recipe carries ------------------------------------------------------------------------
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> sha256, so re-validating is cheap


def _carried(method: Any) -> dict[str, str]:
    """``{param: how its file is made}`` of the parameters of ``method`` that name carried files."""
    cls = METHODS.get(method) if isinstance(method, str) else None
    return dict(cls.carried_files) if cls is not None else {}


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes (remembered while its size and modification time stay)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


@dataclass(frozen=True)
class CarriedFile:
    """A file a recipe parameter names: ``path`` as the recipe writes it (relative to the recipe's
    folder, or absolute), the ``sha256`` of its bytes, and ``resolved``, that file on this machine
    (checked to have the sha256 whenever the recipe is validated). Two carried files are equal when
    their path and sha256 are."""

    path: str
    sha256: str
    resolved: Path = field(compare=False)

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def parse(cls, value: Any, where: str, folder: Path | None, how: str) -> CarriedFile:
        """``{path, sha256}`` -> a CarriedFile whose file exists and has that sha256 (a CarriedFile
        is checked again); a relative path is read from ``folder`` (None: the current directory).
        ``how``: how the file is made (the fix of every error)."""
        if isinstance(value, CarriedFile):
            return value.checked(where, how)
        shape = f"allowed: a mapping {{path: FILE, sha256: HEX}} naming the file (relative to the recipe's folder). Fix: {how}"
        if not isinstance(value, dict) or not isinstance(value.get("path"), str) or not value["path"].strip():
            raise RecipeError(f"{where}: got {value!r}; {shape}")
        unknown = sorted(str(k) for k in value if k not in ("path", "sha256"))
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown}; {shape}")
        base = folder if folder is not None else Path.cwd()
        file = cls(value["path"], value.get("sha256"), (base / Path(value["path"]).expanduser()).absolute())
        if not isinstance(file.sha256, str) or not _SHA256.match(file.sha256):
            actual = (
                f" The file {str(file.resolved)!r} has sha256 {file_sha256(file.resolved)}."
                if file.resolved.is_file()
                else ""
            )
            raise RecipeError(
                f"{where}.sha256: got {file.sha256!r}; allowed: the 64 lowercase hex digits of the file's sha256, which "
                f"the recipe records so that a changed file is refused.{actual} Fix: write that sha256 if it is the "
                f"file you mean, or {how}"
            )
        return file.checked(where, how)

    def checked(self, where: str, how: str) -> CarriedFile:
        """Itself, once its file is found to exist and to have its sha256; else RecipeError."""
        if not self.resolved.is_file():
            raise RecipeError(
                f"{where}.path: the file {self.path!r} (looked for {str(self.resolved)!r}) does not exist. Fix: "
                f"{how}; keep the file beside the recipe (Recipe.save_pretrained copies it there), or correct the path"
            )
        actual = file_sha256(self.resolved)
        if actual != self.sha256:
            raise RecipeError(
                f"{where}: the file {str(self.resolved)!r} has sha256 {actual}, and the recipe records {self.sha256}: "
                "the file was changed, truncated or replaced since the recipe was written. Fix: restore the file the "
                f"recipe was written with, or {how} (it writes the recipe with the new file's sha256)"
            )
        return self

    def copy_to(self, folder: Path, names: dict[str, str]) -> CarriedFile:
        """This file copied into ``folder`` under its file name (``names``: name -> sha256 already
        placed there by this save), unless that is already this file."""
        name = self.resolved.name
        target = (folder / name).absolute()
        if names.setdefault(name, self.sha256) != self.sha256:
            raise UsageError(
                f"saving the recipe: two of its files are named {name!r} (sha256 {names[name][:12]}... and "
                f"{self.sha256[:12]}...) and both go beside recipe.yaml. Fix: rename one of them"
            )
        if target.exists() and not (target.is_file() and target.samefile(self.resolved)):
            if not target.is_file() or file_sha256(target) != self.sha256:
                raise UsageError(
                    f"saving the recipe: {str(target)!r} already exists and is not the file the recipe carries "
                    f"(sha256 {self.sha256}). Fix: save to another folder, or remove that file"
                )
        elif not target.exists():
            shutil.copyfile(self.resolved, target)
        return CarriedFile(name, self.sha256, target)


def _carried_paths(data: Any) -> list[str]:
    """The relative paths of the files a parsed recipe mapping carries (malformed parts are skipped:
    :meth:`Recipe.from_dict` names them)."""
    out = []
    items = data.get("interventions") if isinstance(data, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            continue
        for key in _carried(item.get("method")):
            value = item["params"].get(key)
            if isinstance(value, dict) and isinstance(value.get("path"), str):
                out.append(value["path"])
    return out


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


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RecipeError(
            f"{origin}: line {exc.line}: the key {exc.key!r} appears twice in one mapping (first on line "
            f"{exc.first_line}); YAML would silently keep the last value. Fix: keep one {exc.key!r}"
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: not valid YAML: {exc}") from exc
    return data


def _from_yaml_text(text: str, origin: str, folder: Path | None = None) -> Recipe:
    return Recipe.from_dict(_parse_yaml(text, origin), origin=origin, folder=folder)


def load_recipe(
    recipe: str | Path | dict | Recipe, *, revision: str | None = None, token: str | bool | None = None
) -> Recipe:
    """Load a recipe from a built-in name, a YAML file or folder, a dict, a Hub repo or a Recipe.

    Strings are tried in that order: a built-in name, an existing file or folder holding
    ``recipe.yaml``, then a Hub repo id (``owner/name``, or ``hf://owner/name`` to skip the local
    look-up); ``revision`` and ``token`` apply to the Hub only."""
    if isinstance(recipe, Recipe):
        return Recipe.from_dict(recipe.to_dict(keep_files=True), origin=f"recipe {recipe.name!r}")
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)  # carried files: relative to the current directory
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(
            f"recipe: got {type(recipe).__name__}; allowed: a built-in name {builtin_names()}, a YAML path, "
            "a folder with recipe.yaml, a dict, a Hub repo id or an attnsteer.Recipe"
        )
    text = str(recipe)
    if text.startswith(HUB_PREFIX):
        return load_hub_recipe(text, revision=revision, token=token)[0]
    if text in builtin_names():
        return _from_yaml_text(_builtin_text(text), f"built-in recipe {text!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / RECIPE_FILENAME).is_file():
            raise RecipeError(
                f"recipe: the folder {text!r} has no {RECIPE_FILENAME}. Fix: pass the YAML file itself, or a "
                f"folder written by Recipe.save_pretrained() / `attnsteer recipes pull`"
            )
        path = path / RECIPE_FILENAME
    if path.is_file():
        return _from_yaml_text(path.read_text(), str(path), path.parent)
    if isinstance(recipe, str) and "/" in text and _is_hub_repo_id(text):
        return load_hub_recipe(text, revision=revision, token=token)[0]
    raise RecipeError(
        f"recipe: {text!r} is not a built-in recipe, an existing YAML file or folder, or a Hub repo id "
        f"(owner/name). Built-ins: {builtin_names()}. Fix: check the path, or run `attnsteer recipes list`"
    )


# ---- the Hugging Face Hub -----------------------------------------------------------------------------
HUB_PREFIX = "hf://"


def _is_hub_repo_id(text: str, allow_bare: bool = False) -> bool:
    if not _HUB_REPO_ID.match(text) or ".." in text or text.endswith((".yaml", ".yml")):
        return False
    return allow_bare or "/" in text


def _hub_repo_id(value: str, where: str, allow_bare: bool = False) -> str:
    """``hf://owner/name`` or ``owner/name`` -> ``owner/name``; anything else raises naming ``where``."""
    repo_id = str(value).removeprefix(HUB_PREFIX).strip("/")
    if not _is_hub_repo_id(repo_id, allow_bare=allow_bare):
        raise RecipeError(
            f"{where}: {str(value)!r} is not a Hub repo id; allowed: owner/name (or hf://owner/name) with letters, "
            "digits, '-', '_' and '.', e.g. me/my-act"
        )
    return repo_id


def hub_recipe_file(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, filename: str = RECIPE_FILENAME
) -> Path:
    """Download ``recipe.yaml`` (or another ``filename`` of the recipe: a file it carries) of the
    Hub repo ``repo_id`` (or take it from the local Hugging Face cache) and return its path. Raises
    :class:`RecipeError` naming the repo and the fix."""
    repo_id = _hub_repo_id(repo_id, "recipe")
    at = f" at revision {revision!r}" if revision else ""
    where = f"the Hub repo {repo_id!r}{at}"
    offline = hub.offline_flag()
    unreachable = not offline and not hub.reachable()  # no download retries (tens of seconds): the cache alone
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise RecipeError(
            f"recipe: loading {where} needs huggingface_hub. Fix: pip install huggingface_hub, or pass a local path"
        ) from exc
    try:
        file = hf_hub_download(
            repo_id, filename, revision=revision, token=token, local_files_only=offline or unreachable
        )
    except Exception as exc:  # classified below; every branch names the repo and the fix
        detail = f"({type(exc).__name__}: {_one_line(exc)})"
        local = "or download recipe.yaml (and the files it names) and pass its local path (a YAML file, or a folder holding recipe.yaml)"
        if isinstance(exc, hub_errors.LocalEntryNotFoundError) or offline or unreachable:
            state = "the Hub is offline (HF_HUB_OFFLINE is set)" if offline else "the Hub could not be reached"
            message = (
                f"recipe: could not download {filename} from {where}: {state}, and the local Hugging Face "
                f"cache does not hold it {detail}. Fix: connect to the network"
                f"{' and unset HF_HUB_OFFLINE' if offline else ''}, {local}"
            )
        elif isinstance(exc, hub_errors.RevisionNotFoundError):
            message = (
                f"recipe: could not download {filename} from {where}: the repo has no such revision {detail}. "
                "Fix: pass an existing branch, tag or commit (or no revision for main)"
            )
        elif isinstance(exc, hub_errors.RepositoryNotFoundError):  # also gated / private without a token
            message = (
                f"recipe: could not download {filename} from {where}: the repo does not exist, or it is "
                f"private or gated {detail}. Fix: check the repo id, log in (`hf auth login` or HF_TOKEN) for a "
                f"private repo, {local}"
            )
        elif isinstance(exc, hub_errors.EntryNotFoundError):
            message = (
                f"recipe: could not download {filename} from {where}: the repo exists but holds no {filename}"
                + (
                    f", so it is not an attnsteer recipe repo {detail}. Fix: check the repo id; "
                    if filename == RECIPE_FILENAME
                    else f", which its {RECIPE_FILENAME} names {detail}. Fix: push the recipe again with its files; "
                )
                + "recipes are shared with Recipe.push_to_hub() or `attnsteer recipes push`"
            )
        else:  # network, validation, server errors
            message = (
                f"recipe: could not download {filename} from {where} {detail}. Fix: check the repo id and "
                f"your network (HF_HUB_OFFLINE=1 makes the Hub offline on purpose), {local}"
            )
        raise RecipeError(message) from exc
    return Path(file)


def load_hub_recipe(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> tuple[Recipe, str]:
    """The recipe of the Hub repo ``repo_id`` and the downloaded YAML text (validated). The files
    it carries are downloaded beside ``recipe.yaml`` (in the Hugging Face cache)."""
    repo_id = _hub_repo_id(repo_id, "recipe")
    file = hub_recipe_file(repo_id, revision=revision, token=token)
    text = file.read_text()
    origin = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    data = _parse_yaml(text, origin)
    for path in _carried_paths(data):
        name = PurePosixPath(path)
        if name.is_absolute() or ".." in name.parts or "\\" in path:
            raise RecipeError(
                f"{origin}: the recipe names the file {path!r}, which is not a path inside the repo. Fix: publish it "
                "with Recipe.push_to_hub(), which puts the recipe's files beside recipe.yaml"
            )
        hub_recipe_file(repo_id, revision=revision, token=token, filename=str(name))
    return Recipe.from_dict(data, origin=origin, folder=file.parent), text
