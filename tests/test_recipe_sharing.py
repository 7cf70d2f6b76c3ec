"""Sharing recipes: save_pretrained / from_pretrained round trips, push_to_hub / pull through a fake
Hub (a folder under ``tmp_path/hub``), the ``recipes pull|push`` commands, ``model_types_policy``
and recipes written by a newer attnsteer. Nothing touches the network."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from conftest import VOCAB, build_tiny
from huggingface_hub import errors as hub_errors

import attnsteer
from attnsteer import AttnsteerWarning, Recipe, RecipeError
from attnsteer.cli import main
from attnsteer.errors import SilentSiteWarning, UsageError
from attnsteer.recipe import Intervention, PushedRecipe

SHARED = {
    "name": "my-act",
    "description": "ACT with a lower threshold, for sharing",
    "source": "unit test",
    "model_types": ["llama"],
    "interventions": [
        {"method": "act", "layers": "1:", "params": {"beta": 0.3, "threshold": 0.05}},
        {"method": "softplus", "layers": [0], "params": {"p": 2.0}},
    ],
}


def shared_recipe(**changes) -> Recipe:
    return attnsteer.load_recipe({**SHARED, **changes})


# ---- a stand-in for the Hub: tmp_path/hub/<repo_id>/recipe.yaml, one snapshot per commit ------------------
def _hub_error(cls, message: str) -> Exception:
    """A huggingface_hub HTTP error without a real HTTP response."""
    exc = cls.__new__(cls)
    OSError.__init__(exc, message)
    return exc


class FakeHub:
    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.downloads: list[dict] = []

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    # huggingface_hub.HfApi
    def api(self, token=None, **_):
        hub = self

        class FakeHfApi:
            def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **_):
                folder = hub.folder(repo_id)
                if folder.exists() and not exist_ok:
                    raise RuntimeError(f"409 repo {repo_id} exists")
                if not folder.exists():
                    folder.mkdir(parents=True)
                    hub.created.append({"repo_id": repo_id, "private": private})
                return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

            def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, revision=None, **kwargs):
                folder = hub.folder(repo_id)
                if not folder.is_dir():
                    raise _hub_error(hub_errors.RepositoryNotFoundError, f"404 {repo_id}")
                assert revision in (None, "main")
                oid = f"{len(hub.commits) + 1:040x}"
                for target in (folder, folder / ".commits" / oid):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path_or_fileobj, target / path_in_repo)
                hub.commits.append({"repo_id": repo_id, "oid": oid, "path": path_in_repo, **kwargs})
                return SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

        return FakeHfApi()

    # huggingface_hub.hf_hub_download
    def download(self, repo_id, filename, *, revision=None, local_files_only=False, **kwargs):
        self.downloads.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only})
        if local_files_only:  # nothing is cached in this stand-in
            raise hub_errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
        folder = self.folder(repo_id)
        if not folder.is_dir():
            raise _hub_error(hub_errors.RepositoryNotFoundError, f"404 Repository Not Found: {repo_id}")
        if revision not in (None, "main"):
            folder = folder / ".commits" / revision
            if not folder.is_dir():
                raise _hub_error(hub_errors.RevisionNotFoundError, f"404 Revision Not Found: {revision}")
        if not (folder / filename).is_file():
            raise _hub_error(hub_errors.RemoteEntryNotFoundError, f"404 Entry Not Found: {filename}")
        cached = self.cache / repo_id / (revision or "main") / filename  # what the caller gets is a copy
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / filename, cached)
        return str(cached)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub", tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("attnsteer.hub.reachable", lambda timeout=3.0: True)  # the stand-in is reachable
    return fake


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---- a tiny model to compare what recipes do ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids, recipe=None):
    with torch.no_grad():
        if recipe is None:
            return model(ids).logits
        with attnsteer.apply(model, recipe):
            return model(ids).logits


# ---- save -> load round trips -------------------------------------------------------------------------
def test_from_pretrained_takes_a_builtin_name():
    assert Recipe.from_pretrained("act-default") == attnsteer.load_recipe("act-default")


def test_save_and_load_give_the_same_recipe_and_the_same_logits(tmp_path, tiny, ids):
    recipe = shared_recipe()
    folder_file = recipe.save_pretrained(tmp_path / "shared")
    assert folder_file == tmp_path / "shared" / "recipe.yaml"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["recipe.yaml"]  # nothing else
    yaml_file = recipe.save(tmp_path / "my-act.yaml")

    loaded = {
        "folder": Recipe.from_pretrained(tmp_path / "shared"),
        "folder (str)": Recipe.from_pretrained(str(tmp_path / "shared")),
        "recipe.yaml in the folder": Recipe.from_pretrained(folder_file),
        "yaml file": Recipe.from_pretrained(yaml_file),
    }
    for how, again in loaded.items():
        assert again == recipe, how
        assert again.to_dict() == recipe.to_dict() and again.hash == recipe.hash, how

    base = logits(tiny, ids)
    steered = logits(tiny, ids, recipe)
    assert not torch.equal(base, steered)  # the recipe changes something, so equal logits below mean something
    for how, again in loaded.items():
        assert torch.equal(logits(tiny, ids, again), steered), how
    assert torch.equal(logits(tiny, ids), base)  # each handle restored the model


def test_save_pretrained_refuses_a_file(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        shared_recipe().save_pretrained(file)


def test_a_folder_without_recipe_yaml_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="has no recipe.yaml"):
        Recipe.from_pretrained(tmp_path / "empty")


# ---- push_to_hub / from_pretrained through the fake Hub ---------------------------------------------------
def test_push_to_hub_then_from_pretrained(hub, tiny, ids):
    recipe = shared_recipe()
    pushed = recipe.push_to_hub("me/my-act", private=True)

    assert isinstance(pushed, PushedRecipe)
    assert pushed.repo_id == "me/my-act" and pushed.hash == recipe.hash
    assert pushed.commit_url == f"https://huggingface.co/me/my-act/commit/{hub.commits[0]['oid']}"
    assert str(pushed) == pushed.commit_url and pushed.url == "https://huggingface.co/me/my-act"
    assert hub.created == [{"repo_id": "me/my-act", "private": True}]
    commit = hub.commits[0]
    assert commit["path"] == "recipe.yaml"
    assert recipe.hash in commit["commit_message"] and "my-act" in commit["commit_message"]
    assert recipe.hash in commit["commit_description"]
    assert attnsteer.load_recipe(hub.folder("me/my-act") / "recipe.yaml") == recipe

    for name in ("me/my-act", "hf://me/my-act"):
        again = Recipe.from_pretrained(name)
        assert again == recipe and again.hash == recipe.hash, name
    assert torch.equal(logits(tiny, ids, Recipe.from_pretrained("me/my-act")), logits(tiny, ids, recipe))
    assert torch.equal(logits(tiny, ids, "hf://me/my-act"), logits(tiny, ids, recipe))  # apply() takes it too


def test_revisions_and_commit_messages(hub):
    first, second = shared_recipe(), shared_recipe(name="my-act-v2", model_types=None)
    one = first.push_to_hub("hf://me/my-act")
    two = second.push_to_hub("me/my-act", commit_message="lower beta")
    assert hub.created == [{"repo_id": "me/my-act", "private": None}]  # the second push reused the repo
    assert hub.commits[1]["commit_message"] == f"lower beta (attnsteer recipe sha256 {second.hash})"

    assert Recipe.from_pretrained("me/my-act") == second  # main is the latest push
    assert Recipe.from_pretrained("me/my-act", revision=one.commit_url.rsplit("/", 1)[1]) == first
    assert Recipe.from_pretrained("me/my-act", revision=two.commit_url.rsplit("/", 1)[1]) == second
    with pytest.raises(RecipeError) as err:
        Recipe.from_pretrained("me/my-act", revision="v9")
    assert "'me/my-act'" in str(err.value) and "'v9'" in str(err.value) and "no such revision" in str(err.value)


def test_push_validates_before_uploading(hub):
    bad = Recipe(name="bad", interventions=[Intervention("act", params={"beta": 5.0})])
    with pytest.raises(RecipeError, match="beta"):
        bad.push_to_hub("me/bad")
    with pytest.raises(RecipeError, match="not a Hub repo id"):
        shared_recipe().push_to_hub("me/has space")
    assert hub.created == [] and hub.commits == []


@pytest.mark.parametrize(
    "repo, exc, fragments",
    [
        ("me/missing", None, ["'me/missing'", "does not exist", "private", "local path"]),
        ("me/not-a-recipe", None, ["'me/not-a-recipe'", "holds no recipe.yaml", "attnsteer recipes push"]),
        (
            "me/unreachable",
            hub_errors.LocalEntryNotFoundError("connection error and no cache"),
            ["'me/unreachable'", "could not be reached", "connect to the network", "local path"],
        ),
    ],
)
def test_hub_errors_name_the_repo_and_the_fix(hub, monkeypatch, repo, exc, fragments):
    hub.folder("me/not-a-recipe").mkdir(parents=True)  # a repo without recipe.yaml
    if exc is not None:
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(exc))
    with pytest.raises(RecipeError) as err:
        Recipe.from_pretrained(repo)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_offline_hub_error_names_the_repo_and_what_to_do(monkeypatch):
    """The real hf_hub_download with HF_HUB_OFFLINE=1 set after import: the cache is asked, the
    network is not, and the error says how to fix it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as err:
        Recipe.from_pretrained("some-org/some-recipe-that-is-not-cached", revision="v1")
    message = str(err.value)
    for fragment in ("'some-org/some-recipe-that-is-not-cached'", "'v1'", "offline", "HF_HUB_OFFLINE", "local path"):
        assert fragment in message, (fragment, message)


def test_offline_push_uploads_nothing(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as err:
        shared_recipe().push_to_hub("me/my-act")
    assert "'me/my-act'" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert hub.created == [] and hub.commits == []


def test_local_paths_and_hub_ids_are_told_apart(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared_recipe(name="local").save_pretrained(tmp_path / "me" / "my-act")
    shared_recipe(name="remote").push_to_hub("me/my-act")
    assert Recipe.from_pretrained("me/my-act").name == "local"  # an existing folder wins ...
    assert Recipe.from_pretrained("hf://me/my-act").name == "remote"  # ... hf:// always means the Hub
    with pytest.raises(RecipeError, match="not a built-in recipe"):
        Recipe.from_pretrained("missing/recipe.yaml")  # a YAML path is never a repo id
    assert hub.downloads == [{"repo_id": "me/my-act", "revision": None, "local_files_only": False}]


# ---- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["recipes", "pull"], ["recipes", "push"], ["recipes"]])
def test_help_ends_with_a_runnable_example(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    last = out.strip().splitlines()
    assert re.fullmatch(r"example( \(needs .+\))?:", last[-2].strip()) and last[-1].strip().startswith(
        "attnsteer recipes"
    )


def test_cli_push_then_pull(hub, capsys, tmp_path, monkeypatch, tiny, ids):
    recipe = shared_recipe()
    source = tmp_path / "my-act.yaml"
    source.write_text("# shared by me\n" + recipe.to_yaml())

    code, out, _ = run(capsys, "recipes", "push", source, "me/my-act", "--private")
    assert code == 0
    assert recipe.hash in out and "hf://me/my-act" in out and f"/me/my-act/commit/{hub.commits[0]['oid']}" in out
    assert hub.created == [{"repo_id": "me/my-act", "private": True}]
    assert recipe.hash in hub.commits[0]["commit_message"]

    target = tmp_path / "pulled"
    code, out, _ = run(capsys, "recipes", "pull", "me/my-act", "--out", target)
    assert code == 0
    assert "'my-act'" in out and recipe.hash in out and str(target / "recipe.yaml") in out
    pulled = Recipe.from_pretrained(target)
    assert pulled == recipe and pulled.hash == recipe.hash
    assert (target / "recipe.yaml").read_text() == (hub.folder("me/my-act") / "recipe.yaml").read_text()
    assert torch.equal(logits(tiny, ids, pulled), logits(tiny, ids, recipe))

    # the default --out is ./<repo name>; pulling again changes nothing
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "recipes", "pull", "hf://me/my-act")[0] == 0
    assert Recipe.from_pretrained(tmp_path / "my-act") == recipe
    code, out, _ = run(capsys, "recipes", "pull", "me/my-act")
    assert code == 0 and "already up to date" in out


def test_cli_pull_keeps_local_edits_unless_forced(hub, capsys, tmp_path):
    shared_recipe().push_to_hub("me/my-act")
    edited = shared_recipe(name="edited").save_pretrained(tmp_path / "here")
    code, _, err = run(capsys, "recipes", "pull", "me/my-act", "--out", tmp_path / "here")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert Recipe.from_pretrained(edited).name == "edited"
    code, out, _ = run(capsys, "recipes", "pull", "me/my-act", "--out", tmp_path / "here", "--force")
    assert code == 0 and "replaced" in out and Recipe.from_pretrained(edited) == shared_recipe()


def test_cli_pull_a_revision_to_a_yaml_file(hub, capsys, tmp_path):
    first = shared_recipe()
    oid = first.push_to_hub("me/my-act").commit_url.rsplit("/", 1)[1]
    shared_recipe(name="newer").push_to_hub("me/my-act")
    code, out, _ = run(capsys, "recipes", "pull", "me/my-act", "--revision", oid, "--out", tmp_path / "old.yaml")
    assert code == 0 and oid in out and first.hash in out
    assert Recipe.from_pretrained(tmp_path / "old.yaml") == first


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["recipes", "pull", "me/missing"], ["'me/missing'", "does not exist"]),
        (["recipes", "pull", "not a repo"], ["'not a repo'", "not a Hub repo id"]),
        (["recipes", "push", "act-defualt", "me/x"], ["act-defualt", "nothing was uploaded"]),
        (["recipes", "push", "act-default", "me/bad id"], ["'me/bad id'", "not a Hub repo id"]),
    ],
)
def test_cli_errors_are_one_paragraph(hub, capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert hub.commits == [] and not (tmp_path / "missing").exists()


def test_cli_offline(hub, capsys, tmp_path, monkeypatch):
    shared_recipe().push_to_hub("me/my-act")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "recipes", "pull", "me/my-act", "--out", tmp_path / "x")
    assert code == 2 and "'me/my-act'" in err and "HF_HUB_OFFLINE" in err and "local path" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run(capsys, "recipes", "push", "act-default", "me/other")
    assert code == 2 and "'me/other'" in err and "HF_HUB_OFFLINE" in err
    assert len(hub.commits) == 1


def test_cli_pull_of_a_newer_schema_says_upgrade(hub, capsys, tmp_path):
    folder = hub.folder("future/recipe")
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**SHARED, "schema_version": 2}))
    code, _, err = run(capsys, "recipes", "pull", "future/recipe", "--out", tmp_path / "out")
    assert code == 2 and "pip install -U attnsteer" in err and "hf://future/recipe" in err
    assert not (tmp_path / "out").exists()  # nothing invalid is written


def test_recipes_show_gives_model_types_and_source_of_every_builtin(capsys):
    """`recipes list` is one line per recipe; the model types and source each recipe was made for
    are in `recipes show NAME`."""
    for name in attnsteer.builtin_names():
        recipe = attnsteer.load_recipe(name)
        code, out, _ = run(capsys, "recipes", "show", name)
        assert code == 0
        shown = yaml.safe_load(out)
        assert (shown.get("model_types") or []) == list(recipe.model_types or []), name
        assert shown.get("source") == recipe.source, name


# ---- model_types_policy -------------------------------------------------------------------------------
def qwen_only(**extra) -> dict:
    return {"name": "qwen-only", "model_types": ["qwen2"], "interventions": [{"method": "act"}], **extra}


@pytest.mark.parametrize("extra", [{}, {"model_types_policy": "error"}])
def test_another_model_type_is_an_error_by_default(tiny, extra):
    with pytest.raises(RecipeError) as err:
        attnsteer.apply(tiny, qwen_only(**extra))
    for fragment in ("qwen-only.model_types", "['qwen2']", "'llama'", "model_types_policy: warn"):
        assert fragment in str(err.value), (fragment, str(err.value))
    assert tiny.config._attn_implementation == "sdpa"  # nothing applied


def test_warn_policy_warns_and_steers(tiny, ids):
    recipe = attnsteer.load_recipe(qwen_only(model_types_policy="warn"))
    with pytest.warns(AttnsteerWarning) as record:
        steered = logits(tiny, ids, recipe)
    message = " ".join(str(w.message) for w in record if issubclass(w.category, AttnsteerWarning))
    for fragment in ("'qwen-only'", "['qwen2']", "'llama'", "model_types_policy: warn"):
        assert fragment in message, (fragment, message)
    assert not any(issubclass(w.category, SilentSiteWarning) for w in record), message  # and ACT changed rows
    assert (steered - logits(tiny, ids)).abs().max() > 1e-4  # the recipe steers this prompt
    generic = logits(tiny, ids, {"name": "generic", "interventions": [{"method": "act"}]})
    assert torch.equal(steered, generic)  # it steered exactly as a recipe without model_types
    with pytest.warns(AttnsteerWarning, match="qwen2"):
        attnsteer.plan(tiny, recipe)


def test_warn_policy_is_silent_on_a_listed_model_type(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnsteerWarning)
        attnsteer.plan(tiny, qwen_only(model_types=["qwen2", "llama"], model_types_policy="warn"))


@pytest.mark.parametrize(
    "value, fragments",
    [
        ("warning", ["model_types_policy", "'warning'", "'error'", "'warn'", "Did you mean 'warn'"]),
        ("ignore", ["model_types_policy", "'ignore'", "'error'", "'warn'"]),
        (True, ["model_types_policy", "True", "'error'"]),
        (None, ["model_types_policy", "None"]),
        (["warn"], ["model_types_policy", "['warn']"]),
    ],
)
def test_bad_model_types_policy(value, fragments):
    with pytest.raises(RecipeError) as err:
        attnsteer.load_recipe(qwen_only(model_types_policy=value))
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_model_types_policy_round_trips_and_hashes_only_when_set(tmp_path):
    implicit = attnsteer.load_recipe(qwen_only())
    explicit = attnsteer.load_recipe(qwen_only(model_types_policy="error"))
    warn = attnsteer.load_recipe(qwen_only(model_types_policy="warn"))
    assert implicit == explicit and implicit.model_types_policy == "error"
    assert "model_types_policy" not in implicit.to_dict() and "model_types_policy" not in explicit.to_dict()
    assert implicit.hash == explicit.hash
    assert warn.hash != implicit.hash
    assert warn.to_dict()["model_types_policy"] == "warn"
    assert yaml.safe_load(warn.to_yaml())["model_types_policy"] == "warn"
    for again in (
        attnsteer.load_recipe(warn.to_dict()),
        attnsteer.load_recipe(warn.save(tmp_path / "w.yaml")),
        Recipe.from_pretrained(warn.save_pretrained(tmp_path / "w").parent),
        attnsteer.load_recipe(warn),
    ):
        assert again == warn and again.model_types_policy == "warn" and again.hash == warn.hash


def test_warn_policy_travels_through_the_hub(hub):
    recipe = attnsteer.load_recipe(qwen_only(model_types_policy="warn"))
    recipe.push_to_hub("me/qwen-only")
    assert Recipe.from_pretrained("me/qwen-only").model_types_policy == "warn"


# ---- schema versions ----------------------------------------------------------------------------------
def test_a_newer_schema_version_says_upgrade(tmp_path):
    data = {**SHARED, "schema_version": 2}
    path = tmp_path / "future.yaml"
    path.write_text(yaml.safe_dump(data))
    for source, origin in ((data, "recipe"), (path, str(path))):
        with pytest.raises(RecipeError) as err:
            attnsteer.load_recipe(source)
        message = str(err.value)
        for fragment in (origin, "schema_version 2", "newer", f"schema_version: {attnsteer.recipe.SCHEMA_VERSION}"):
            assert fragment in message, (fragment, message)
        assert "pip install -U attnsteer" in message and attnsteer.__version__ in message


@pytest.mark.parametrize("version", [0, -1, "1", 1.0 + 0.5, True, None])
def test_an_unknown_schema_version_is_not_an_upgrade(version):
    with pytest.raises(RecipeError) as err:
        attnsteer.load_recipe({**SHARED, "schema_version": version})
    assert "schema_version" in str(err.value) and "not supported" in str(err.value)
    assert "pip install" not in str(err.value)
