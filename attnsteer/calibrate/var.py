"""``attnsteer calibrate var``: freeze VAR's hidden sink dimensions on a set of prompts.

VAR (docs/methods.md#var) scores hidden-state sinks on a few fixed hidden dims ``D``
(``sink_dims``); with ``sink_dims: auto`` it finds them again for every prompt: every dim where some
prompt token reaches ``|x_d| / RMS(x) >= tau`` at the input of the intervention's lowest steered
layer. This calibration runs the base recipe with ``sink_dims: auto`` over the prompts (one prefill
forward per prompt), records the dims found in each prompt, and freezes ``sink_dims`` to the dims
found in at least ``--min-share`` of the prompts (default 0.5; a share is count / prompts). A second
pass with the frozen recipe counts VAR's sink tokens per steered layer. The counts go to the recipe's
``source``; the written recipe lists the dims sorted (the recipe validator sorts them; the order does
not matter to the rule), ``source`` lists them by frequency.

The first part of this module (prompt sets, loading the model, the shared settings) is shared with
:mod:`attnsteer.calibrate.vhr`.

In Python: :func:`calibrate_var` on a loaded model and its prompts' inputs, or
``calibrate(VarCalibrationConfig(prompts=..., out=..., model=...), loaded=(processor, model))`` for
what ``attnsteer calibrate var`` (:mod:`attnsteer.cli.calibrate_var`) does: it returns a
:class:`VarCalibrationResult`; the command prints :func:`format_var_table`, the notes and the path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SilentSiteWarning, UsageError
from ._common import Progress, check_count, emit

if TYPE_CHECKING:
    from ..recipe import Recipe

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHARE_EPS = 1e-9  # share >= min_share up to rounding (0.3 * 10 prompts is 3 prompts)
PROMPTS_FORMAT = (
    'a JSONL file of {"prompt": TEXT, "image": PATH} lines ("image" optional) or a text file with one prompt per line'
)


# ==== shared with attnsteer calibrate vhr: settings, prompt sets, the model =======================
@dataclass(frozen=True, kw_only=True)
class PromptSetConfig:
    """The settings ``calibrate var`` and ``calibrate vhr`` share; each field is the flag of the same
    name (``min_share`` is ``--min-share``), with the same default.

    prompts: the prompt set, :data:`PROMPTS_FORMAT`. images: a folder of images (or one image file):
    JSONL ``image`` paths are read relative to it, prompts without an image run on each of its images.
    out: the recipe to write (a ``.yaml`` file, or a folder that gets ``recipe.yaml``).
    model / model_args: the vision-language model to load; when one is passed loaded, its id still
    picks the processor's prompt format and goes into the recipe's ``source``. recipe: the base
    recipe (a built-in name or a YAML path; None: the family's default). min_share: the share of the
    prompts, in (0, 1], a dim or head must be found in. limit: only the first N prompts (None: all).
    name: the written recipe's name (default ``<base name>-calibrated`` / ``-fixed``). no_progress:
    no progress bar (tqdm).

    Bad values raise :class:`~attnsteer.errors.UsageError` naming the flag, the value and the fix.
    """

    prompts: str | Path
    out: str | Path
    model: str | None = None
    model_args: str | None = None
    images: str | Path | None = None
    recipe: str | None = None
    min_share: float = 0.5
    limit: int | None = None
    name: str | None = None
    no_progress: bool = False

    def __post_init__(self) -> None:
        value = self.min_share
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise UsageError(
                f"--min-share {value!r}: expected a share in (0, 1]. Fix: e.g. --min-share 0.5 (the default)"
            )
        check_count(self.limit, "--limit", "50 (or leave it out: every prompt)", optional=True)

    def prompt_items(self, command: str) -> list[PromptItem]:
        """The prompt set read and checked (each prompt with an image: ``command`` steers toward them)."""
        images = None if self.images is None else str(self.images)
        items = read_prompts(str(self.prompts), images, self.limit)
        check_images(items, command)
        return items


@dataclass
class PromptItem:
    """One calibration prompt: the user message, its image (or None) and where it came from."""

    prompt: str
    image: Path | None
    where: str  # "FILE line N", for error messages


def _image_files(images: str | None) -> tuple[Path | None, list[Path]]:
    """(base folder for relative JSONL paths, the images prompts without one run on)."""
    if images is None:
        return None, []
    path = Path(images).expanduser()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise UsageError(
            f"--images {images!r}: no such folder or file. Fix: pass the folder of the prompts' images (or one image)"
        )
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(
            f"--images {images!r}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}). Fix: pass the "
            "folder of the prompts' images"
        )
    return path, files


def read_prompts(prompts: str, images: str | None = None, limit: int | None = None) -> list[PromptItem]:
    """The prompt set of ``--prompts FILE`` (JSONL or one prompt per line) with ``--images``.

    JSONL lines are ``{"prompt": TEXT, "image": PATH}``; a relative image path is read under
    ``--images`` when it is a folder, else next to the JSONL file. A prompt without an image (a JSONL
    line without "image", every line of a text file) runs on every image of ``--images`` (sorted by
    name); without ``--images`` it stays without an image (refused later for vision recipes)."""
    import json

    path = Path(prompts).expanduser()
    if not path.is_file():
        raise UsageError(f"--prompts {prompts!r}: no such file. Fix: pass {PROMPTS_FORMAT}")
    base, pool = _image_files(images)
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    is_jsonl = path.suffix.lower() in (".jsonl", ".json") or first.startswith("{")
    items: list[PromptItem] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {prompts!r} line {number}"
        image = None
        if is_jsonl:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{where}: not valid JSON ({exc.msg}). Fix: one JSON object per line, e.g. "
                    '{"prompt": "Describe the image.", "image": "COCO_val2014_000000000042.jpg"}'
                ) from None
            text = entry.get("prompt") if isinstance(entry, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UsageError(
                    f'{where}: got {line.strip()[:80]!r}; each line needs a non-empty string "prompt". Fix: '
                    '{"prompt": "Describe the image.", "image": "PATH"}'
                )
            if entry.get("image") is not None:
                if not isinstance(entry["image"], str):
                    raise UsageError(f'{where}: "image" must be a path string; got {entry["image"]!r}')
                image = Path(entry["image"]).expanduser()
                if not image.is_absolute():
                    image = (base if base is not None else path.parent) / image
                if not image.is_file():
                    raise UsageError(
                        f"{where}: image {entry['image']!r} not found (looked at {str(image)!r}). Fix: check the path, "
                        "or pass --images DIR with the folder the paths are relative to"
                    )
        else:
            text = line.strip()
        if image is None and pool:
            items += [PromptItem(text, img, f"{where} with image {img.name}") for img in pool]
        else:
            items.append(PromptItem(text, image, where))
    if not items:
        raise UsageError(f"--prompts {prompts!r}: the file has no prompts. Fix: pass {PROMPTS_FORMAT}")
    return items[:limit] if limit else items


def check_images(items: Sequence[PromptItem], command: str) -> None:
    """Vision recipes steer toward image tokens: every prompt needs an image."""
    missing = [it for it in items if it.image is None]
    if missing:
        raise UsageError(
            f"{missing[0].where}: the prompt has no image ({len(missing)} of {len(items)} prompts have none), and "
            f'{command} steers toward image tokens. Fix: give each JSONL line an "image" path, or pass --images DIR '
            "to run the prompts on the images of that folder"
        )


def load_model(model: str | None, model_args: str | None, command: str, *, loaded=None, progress=None):
    """(model id, processor, model, arch) of ``--model``: a vision-language model attnsteer supports.
    ``loaded``: an already loaded ``(processor, model)`` for it (checked, not loaded again);
    ``progress``: called with the log line of the load (None: silent)."""
    from .. import models
    from ..console import quiet_transformers
    from ..evals.vlm import load_vlm

    model_id, kwargs = models.resolve_model(model, model_args)
    wrong_kind = (
        f"--model {model_id!r} is a text-only model; {command} finds image-token statistics, so it needs a "
        "vision-language model and prompts with images. Fix: pass one, e.g. --model llava-hf/llava-1.5-7b-hf"
    )
    if loaded is not None:
        processor, vlm = loaded
        return model_id, processor, vlm, _vlm_arch(vlm, model_id, wrong_kind)
    if model_id == models.SMOLLM2_ID:
        raise UsageError(wrong_kind)
    try:
        from transformers import AutoConfig

        hub = {k: kwargs[k] for k in models.HUB_KWARGS if k in kwargs}
        config = AutoConfig.from_pretrained(model_id, **hub)
    except (OSError, ValueError):
        config = None  # load_vlm below explains what is wrong with it
    if config is not None and getattr(config, "vision_config", None) is None:
        raise UsageError(wrong_kind.replace("is a text-only model", f"is a text-only model ({config.model_type})"))
    emit(progress, f"Loading {model_id} ...")
    with quiet_transformers():
        processor, vlm = load_vlm(model_id, kwargs)
    return model_id, processor, vlm, _vlm_arch(vlm, model_id, wrong_kind)


def _vlm_arch(model, model_id: str, wrong_kind: str):
    """The model's ArchSpec binding; a UsageError when attnsteer cannot steer it or it has no image tokens."""
    from .. import archs
    from ..errors import AttnsteerError

    try:
        arch = archs.resolve(model)
    except AttnsteerError as exc:
        raise UsageError(f"--model {model_id!r}: {exc}") from None
    if not arch.spec.is_multimodal or not arch.image_token_ids:
        raise UsageError(wrong_kind)
    return arch


class PromptInputs(Sequence):
    """The model inputs of each prompt (a batch of one), built when read: the processor's chat
    template, the image, left padding (none at batch 1). Checks that the image tokens are there."""

    def __init__(self, items: Sequence[PromptItem], processor, model, arch, model_id: str):
        from ..evals.vlm import VLMInputs

        self.items = list(items)
        self.builder = VLMInputs(processor, model_id)
        self.device = next(model.parameters()).device
        self.image_ids = list(arch.image_token_ids)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        import torch

        from ..evals.vlm import EvalItem

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self.items[index]
        inputs = self.builder([EvalItem(id=str(index), prompt=item.prompt, image=item.image)], self.device)
        ids = inputs.get("input_ids")
        if ids is not None and not bool(torch.isin(ids, torch.tensor(self.image_ids, device=ids.device)).any()):
            raise UsageError(
                f"{item.where}: the processor's prompt holds none of the image token id(s) {self.image_ids}, so "
                "there is nothing for the recipe to steer toward. Fix: use the model's own processor (a checkpoint "
                "folder with its processor files and chat template)"
            )
        return inputs


def load_base_recipe(value: str | None, default, method: str, model_type: str | None, command: str):
    """The base recipe (``--recipe`` or ``default``) and the index of its one ``method`` intervention;
    ``model_type`` (None: not checked yet) must be one of the recipe's ``model_types``."""
    from ..recipe import Recipe, load_labelled_recipes

    if value is None and isinstance(default, Recipe):
        recipe = default
    else:
        [(_, recipe)] = load_labelled_recipes([default if value is None else value], "--recipe")
    found = [i for i, iv in enumerate(recipe.interventions) if iv.method == method]
    if len(found) != 1:
        raise UsageError(
            f"--recipe {value or recipe.name!r}: {command} calibrates one {method} intervention, and the recipe has "
            f"{len(found)} (methods: {recipe.methods}). Fix: pass a recipe with exactly one {method} intervention"
        )
    if model_type is not None and recipe.model_types and model_type not in recipe.model_types:
        raise UsageError(
            f"--recipe {value or recipe.name!r} is made for {recipe.model_types}, and --model is a {model_type!r}. "
            f"Fix: pass a {method} recipe for {model_type!r} (a YAML file), or leave --recipe out for the default"
        )
    return recipe, found[0]


def check_fits(model, recipe, value: str, model_id: str):
    """``attnsteer.plan`` the recipe on the model (nothing changes); a misfit is a UsageError."""
    import attnsteer

    from ..errors import AttnsteerError

    try:
        return attnsteer.plan(model, recipe)
    except AttnsteerError as exc:
        raise UsageError(
            f"--recipe {value!r} cannot steer --model {model_id!r}: {exc}. Fix: pass a base recipe (a YAML file) whose "
            "layers and parameters fit this model"
        ) from None


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over the prompts (on stderr; ``enabled=False``: none)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled or None, leave=False)


@contextlib.contextmanager
def collect_notes():
    """Collect attnsteer's warnings (``never changed a row`` ...) inside the block, to report them
    as notes (:func:`notes_of`) instead of warning."""
    import warnings

    from ..errors import AttnsteerWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AttnsteerWarning)
        yield caught


def notes_of(caught) -> list[str]:
    """The distinct messages of the attnsteer warnings :func:`collect_notes` caught, in order."""
    from ..errors import AttnsteerWarning

    return list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, AttnsteerWarning)))


def share(count: int, total: int) -> float:
    return count / total if total else 0.0


def passes(count: int, total: int, threshold: float) -> bool:
    """The calibrations' rule: ``count / total >= threshold`` (up to float rounding)."""
    return share(count, total) >= threshold - SHARE_EPS


def check_out(out: str | Path) -> Path:
    """``--out`` (a .yaml file, or a folder that gets recipe.yaml, as ``Recipe.save`` reads it)
    checked writable before the model loads."""
    from ..evals.paths import check_writable

    target = Path(out).expanduser()
    return check_writable(out, "--out", folder=target.is_dir() or target.suffix == "")


def write_recipe(recipe, out: str | Path) -> Path:
    try:
        return recipe.save(out)
    except OSError as exc:
        raise UsageError(f"--out {out!r}: cannot write the recipe ({exc}). Fix: pass a writable path") from None


# ==== VAR ==========================================================================================
DEFAULT_BASE = "var-llava15-7b"


@dataclass
class VarCalibration:
    """What ``calibrate var`` found over ``prompts`` prompts.

    first_layer: the layer at whose input VAR finds its ``auto`` dims (its lowest steered layer).
    dims_per_prompt: the dims found in each prompt. counts: dim -> prompts it was found in.
    sink_dims: the frozen dims, by frequency (ties: lower dim first).
    sinks_per_layer: layer -> sink tokens of each prompt with the frozen dims (VAR's own sets).
    image_sinks_per_layer: the same, counting image tokens only. fired: layer -> prompts in which
    the frozen recipe changed at least one attention row there.
    """

    prompts: int
    tau: float
    min_share: float
    first_layer: int
    dims_per_prompt: list[list[int]]
    counts: Counter
    sink_dims: list[int]
    sinks_per_layer: dict[int, list[int]] = field(default_factory=dict)
    image_sinks_per_layer: dict[int, list[int]] = field(default_factory=dict)
    fired: dict[int, int] = field(default_factory=dict)

    def by_frequency(self) -> list[tuple[int, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def layer_summary(self) -> dict[int, tuple[float, int, int]]:
        """layer -> (mean, min, max) sink tokens per prompt."""
        return {layer: (sum(v) / len(v), min(v), max(v)) for layer, v in sorted(self.sinks_per_layer.items()) if len(v)}


def _var_recipe(base, index: int, **params):
    from ..recipe import Recipe

    data = base.to_dict()
    data["interventions"][index]["params"].update(params)
    return Recipe.from_dict(data, origin=f"recipe {base.name!r}")


def _generic_var(model_type: str):
    from ..recipe import Recipe

    return Recipe.from_dict(
        {
            "name": f"var-{model_type}",
            "description": "VAR with the paper's default parameters",
            "interventions": [{"method": "var"}],
        }
    )


def default_var_base(model_type: str):
    """``var-llava15-7b`` for the families it is made for, else a generic VAR intervention."""
    from ..recipe import load_recipe

    builtin = load_recipe(DEFAULT_BASE)
    return builtin if model_type in (builtin.model_types or ()) else _generic_var(model_type)


def _check_one(inputs) -> None:
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if ids is not None and ids.shape[0] != 1:
        raise ValueError(f"calibration prompts are model inputs of one prompt each; got a batch of {ids.shape[0]}")


def _first_var_layer(planned, index: int) -> tuple[int, list[int]]:
    layers = sorted(m.layer for m in planned.methods if m.name == "var" and m.intervention == index)
    if not layers:
        raise UsageError(
            f"--recipe {planned.recipe.name!r}: its var intervention steers no layer (identity parameters, p: 0, are "
            "skipped). Fix: pass a VAR recipe with p > 0"
        )
    return layers[0], layers


def calibrate_var(
    model,
    prompts: Sequence,
    base=None,
    *,
    min_share: float = 0.5,
    tau: float | None = None,
    name: str | None = None,
    model_id: str | None = None,
    prompts_name: str = "the prompts",
    show_progress: bool = False,
):
    """Freeze VAR's ``sink_dims`` on ``prompts`` (model input dicts, one prompt each).

    ``base``: a recipe with one ``var`` intervention (default :func:`default_var_base`); ``tau``
    overrides its threshold. Returns ``(recipe, VarCalibration)``; the recipe is ``base`` with
    ``sink_dims`` frozen to the dims found (``auto``) in at least ``min_share`` of the prompts and
    the statistics in ``source``. Raises UsageError when no dim reaches that share."""
    import torch

    import attnsteer

    from .. import compat
    from ..recipe import Recipe, load_recipe
    from ..sinks import activation_ratio

    model_type = model.config.model_type
    base = default_var_base(model_type) if base is None else load_recipe(base)
    index = next((i for i, iv in enumerate(base.interventions) if iv.method == "var"), None)
    if index is None:
        raise UsageError(f"--recipe {base.name!r}: has no var intervention (methods: {base.methods})")
    tau = float(base.interventions[index].params["tau"] if tau is None else tau)
    auto = _var_recipe(base, index, sink_dims="auto", tau=tau)
    planned = attnsteer.plan(model, auto)
    first_layer, var_layers = _first_var_layer(planned, index)
    if not prompts:
        raise UsageError("--prompts: the prompt set is empty. Fix: pass at least one prompt")

    # ---- pass 1: the dims VAR's ``auto`` finds at its first layer, per prompt -------------------------
    found: list[list[int]] = []
    current: list[list[int]] = []

    def record_dims(module, args, kwargs):
        hidden = compat.first_argument(module.forward, args, kwargs)  # (B, L, D); row 0 is the prompt
        current.append((activation_ratio(hidden[:1]) >= tau)[0].any(0).nonzero().flatten().tolist())
        return None

    n = len(prompts)
    bar = progress_bar(2 * n, "calibrate var", show_progress)
    # pass 1 only reads the hidden states entering the first VAR layer: whether VAR changed a row
    # there is no result of the calibration, so its silent-site warning is not raised to the user
    with warnings.catch_warnings(), attnsteer.apply(model, auto) as handle:
        warnings.simplefilter("ignore", SilentSiteWarning)
        hook = handle.arch.decoder.layers[first_layer].register_forward_pre_hook(record_dims, with_kwargs=True)
        try:
            for inputs in prompts:
                _check_one(inputs)
                current.clear()
                with torch.inference_mode():
                    model(**inputs, use_cache=False)
                found.append(current[0] if current else [])
                bar.update(1)
        finally:
            hook.remove()
    counts = Counter(d for dims in found for d in dims)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    chosen = [d for d, c in ranked if passes(c, n, min_share)]
    if not chosen:
        hidden = planned.arch.text_config.hidden_size
        reach = (
            f" With hidden size {hidden}, |x_d| / RMS(x) is at most sqrt({hidden}) = {hidden**0.5:.1f}, below tau {tau:g}."
            if tau >= hidden**0.5
            else ""
        )
        top = ", ".join(f"{d} in {c}/{n}" for d, c in ranked[:5]) or "none at all"
        bar.close()
        raise UsageError(
            f"calibrate var: no hidden dim reaches tau {tau:g} in at least {min_share:g} of the {n} prompts "
            f"(most frequent: {top}).{reach} Fix: lower --min-share or --tau, add prompts, or keep sink_dims: auto"
        )
    stats = VarCalibration(n, tau, min_share, first_layer, found, counts, chosen)

    # ---- pass 2: VAR's sink sets with the frozen dims ------------------------------------------------
    frozen = _var_recipe(base, index, sink_dims=chosen, tau=tau)
    image_ids = torch.tensor(list(planned.arch.image_token_ids) or [-1])
    with attnsteer.apply(model, frozen) as handle:
        fired_before = {s["layer"]: 0 for s in handle.stats() if s["method"] == "var"}
        for inputs in prompts:
            with torch.inference_mode():
                model(**inputs, use_cache=False)
            report = handle.report()
            image = torch.isin(inputs["input_ids"][0].cpu(), image_ids) if "input_ids" in inputs else None
            for layer in var_layers:
                sinks = report.get(layer, {}).get("var", {}).get("sinks", [[]])[0]
                stats.sinks_per_layer.setdefault(layer, []).append(len(sinks))
                on_image = int(image[sinks].sum()) if image is not None and sinks else 0
                stats.image_sinks_per_layer.setdefault(layer, []).append(on_image)
            for site in handle.stats():
                if site["method"] == "var" and site["fired"] > fired_before[site["layer"]]:
                    stats.fired[site["layer"]] = stats.fired.get(site["layer"], 0) + 1
                    fired_before[site["layer"]] = site["fired"]
            bar.update(1)
    bar.close()

    data = frozen.to_dict()
    data["name"] = name or f"{base.name}-calibrated"
    data["description"] = (
        f"{base.name} with sink_dims frozen to {sorted(chosen)} by `attnsteer calibrate var`"
        + (f" on {model_id}" if model_id else "")
        + f" ({n} prompts). "
        + (base.description or "")
    ).strip()
    data["source"] = _var_source(stats, base, model_id, prompts_name)
    data["model_types"] = list(base.model_types or [model_type])
    return Recipe.from_dict(data, origin="calibrated recipe"), stats


def _var_source(stats: VarCalibration, base, model_id: str | None, prompts_name: str) -> str:
    n = stats.prompts
    dims = "; ".join(f"{d}: {c}/{n} ({share(c, n):.2f})" for d, c in stats.by_frequency()[:20])
    more = len(stats.counts) - 20
    layers = "; ".join(f"L{layer} {mean:.1f}/{lo}/{hi}" for layer, (mean, lo, hi) in stats.layer_summary().items())
    return (
        f"attnsteer calibrate var on {model_id or 'a model'}, {n} prompts from {prompts_name}, base recipe "
        f"{base.name} ({base.hash[:12]}). Dims found per prompt (sink_dims: auto, |x_d|/RMS >= tau {stats.tau:g} at the "
        f"input of layer {stats.first_layer}), prompts with each dim: {dims}"
        + (f" (+{more} rarer dims)" if more > 0 else "")
        + f". Frozen: the dims found in >= {stats.min_share:g} of the prompts, by frequency: {stats.sink_dims}. "
        f"Sink tokens per layer with the frozen dims (mean/min/max over the prompts): {layers}"
    )


def format_var_table(stats: VarCalibration) -> str:
    n = stats.prompts
    lines = [
        f"sink dims found per prompt: {n} prompts, |x_d|/RMS >= tau {stats.tau:g} at the input of layer "
        f"{stats.first_layer}; frozen: dims in >= {stats.min_share:g} of the prompts",
        "",
        "| dim | prompts | share | frozen |",
        "|---:|---:|---:|:---:|",
    ]
    for d, c in stats.by_frequency()[:30]:
        lines.append(f"| {d} | {c}/{n} | {share(c, n):.2f} | {'yes' if d in stats.sink_dims else ''} |")
    if len(stats.counts) > 30:
        lines.append(f"| ... | {len(stats.counts) - 30} rarer dims | | |")
    lines += [
        "",
        f"sink tokens per layer with sink_dims {sorted(stats.sink_dims)} (per prompt):",
        "",
        "| layer | mean | min | max | mean on image tokens | prompts steered |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, (mean, lo, hi) in stats.layer_summary().items():
        image = stats.image_sinks_per_layer.get(layer, [0])
        lines.append(
            f"| {layer} | {mean:.1f} | {lo} | {hi} | {sum(image) / max(len(image), 1):.1f} | "
            f"{stats.fired.get(layer, 0)}/{n} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class VarCalibrationConfig(PromptSetConfig):
    """The settings of ``attnsteer calibrate var`` (:class:`PromptSetConfig`, and ``tau``: the
    massive-activation threshold, > 0; None: the base recipe's)."""

    tau: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        tau = self.tau
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0):
            raise UsageError(f"--tau {tau!r}: the threshold must be > 0. Fix: e.g. --tau 20 (the paper's)")


@dataclass(frozen=True)
class VarCalibrationResult:
    """What :func:`calibrate` wrote and found: the recipe and its file, the statistics (the data of
    :func:`format_var_table`) and attnsteer's warnings during the runs, as notes."""

    recipe: Recipe
    path: Path
    stats: VarCalibration
    notes: list[str]


def open_prompt_set(config, method: str, default_base, *, loaded=None, progress: Progress | None = None) -> tuple:
    """What ``calibrate var`` and ``calibrate vhr`` do first: check ``--out``, read the prompts, check
    the base recipe (before the model loads), load the model, and resolve the base recipe for its
    family (``default_base(model_type)`` when ``config.recipe`` is None). Returns ``(items, model_id,
    processor, model, arch, (base, intervention index))``."""
    check_out(config.out)
    items = config.prompt_items(method.upper())
    if config.recipe is not None:  # a wrong base fails before the model loads
        load_base_recipe(config.recipe, None, method, None, f"calibrate {method}")
    model_id, processor, model, arch = load_model(
        config.model, config.model_args, f"attnsteer calibrate {method}", loaded=loaded, progress=progress
    )
    model_type = model.config.model_type
    base = load_base_recipe(config.recipe, default_base(model_type), method, model_type, f"calibrate {method}")
    return items, model_id, processor, model, arch, base


def calibrate(config: VarCalibrationConfig, *, loaded=None, progress: Progress | None = None) -> VarCalibrationResult:
    """Freeze VAR's ``sink_dims`` on the prompt set as ``config`` says and write the recipe.

    ``loaded``: an already loaded ``(processor, model)`` for ``config.model`` (else it is loaded
    here); ``progress``: called with each log line (loading the model; None: silent). ``--out``, the
    prompts and the base recipe are checked before the model loads."""
    items, model_id, processor, model, arch, (base, index) = open_prompt_set(
        config, "var", default_var_base, loaded=loaded, progress=progress
    )
    override = {"tau": config.tau} if config.tau is not None else {}
    check_fits(model, _var_recipe(base, index, sink_dims="auto", **override), config.recipe or base.name, model_id)
    prompts = PromptInputs(items, processor, model, arch, model_id)
    with collect_notes() as caught:
        recipe, stats = calibrate_var(
            model,
            prompts,
            base,
            min_share=config.min_share,
            tau=config.tau,
            name=config.name,
            model_id=model_id,
            prompts_name=str(config.prompts),
            show_progress=not config.no_progress,
        )
    return VarCalibrationResult(recipe, write_recipe(recipe, config.out), stats, notes_of(caught))
