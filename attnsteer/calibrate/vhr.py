"""``attnsteer calibrate vhr --fixed-heads``: one VHR head set for every prompt (a variant).

The paper's VHR (docs/methods.md#vhr) chooses the reinforced heads again for every prompt, from the
vision-aware head divergence of the prompt and its text-only copy. This calibration runs that
per-prompt VHR (the base recipe) over a set of prompts -- one prefill forward per prompt --, counts how
often each (layer, head) is selected (``handle.vhr_heads()``), and keeps per layer the heads selected in
at least ``--min-share`` of the prompts (share = prompts selecting it / prompts; default 0.5). It writes
a recipe with ``selection: fixed`` and those heads as its ``heads: {layer: [heads]}`` mapping: exactly
those heads are scaled on every prompt, with no text-only stream and no VHD. A layer with no head at
that share is left out (not steered). The shares are recorded in the recipe's ``source``.

In Python: :func:`calibrate_vhr` on a loaded model and its prompts' inputs, or
``calibrate(VhrCalibrationConfig(prompts=..., out=..., model=...), loaded=(processor, model))`` for
what ``attnsteer calibrate vhr --fixed-heads`` (:mod:`attnsteer.cli.calibrate_vhr`) does: it returns a
:class:`VhrCalibrationResult`; the command prints :func:`format_vhr_table`, the notes and the path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ._common import Progress
from .var import (
    PromptInputs,
    PromptSetConfig,
    check_fits,
    collect_notes,
    notes_of,
    open_prompt_set,
    passes,
    progress_bar,
    share,
    write_recipe,
)

if TYPE_CHECKING:
    from ..recipe import Recipe

# model_type -> the built-in per-prompt VHR recipe its calibration starts from
DEFAULT_BASES = {"llava": "vhr-llava15", "llava_next": "vhr-llava15", "instructblip": "vhr-instructblip"}


@dataclass
class VhrCalibration:
    """What ``calibrate vhr --fixed-heads`` found over ``prompts`` prompts.

    layers: the layers the base recipe's VHR steers. counts: (layer, head) -> prompts selecting it.
    per_prompt: each prompt's selection ``{layer: [heads]}``. heads: the fixed heads ``{layer: [heads]}``.
    """

    prompts: int
    min_share: float
    layers: list[int]
    num_heads: int
    counts: Counter
    per_prompt: list[dict[int, list[int]]]
    heads: dict[int, list[int]]

    def share_of(self, layer: int, head: int) -> float:
        return share(self.counts[(layer, head)], self.prompts)

    def mean_selected(self, layer: int) -> float:
        return sum(len(p.get(layer, [])) for p in self.per_prompt) / max(self.prompts, 1)


def default_vhr_base(model_type: str):
    """The family's built-in VHR recipe (``vhr-llava15`` / ``vhr-instructblip``), else VHR with its
    default parameters and the family's default layers."""
    from ..recipe import Recipe, load_recipe

    if model_type in DEFAULT_BASES:
        return load_recipe(DEFAULT_BASES[model_type])
    return Recipe.from_dict(
        {
            "name": f"vhr-{model_type}",
            "description": "VHR with its default parameters",
            "interventions": [{"method": "vhr"}],
        }
    )


def choose_heads(counts: Counter, prompts: int, min_share: float) -> dict[int, list[int]]:
    """Per layer, the heads selected in at least ``min_share`` of ``prompts``; layers without one are left out."""
    out: dict[int, list[int]] = {}
    for (layer, head), count in counts.items():
        if passes(count, prompts, min_share):
            out.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def count_heads(model, prompts: Sequence, recipe, *, show_progress: bool = False):
    """Run per-prompt VHR (``recipe``) on each prompt (model inputs of one prompt each; one forward).
    Returns (layers VHR steers, each prompt's selection ``{layer: [heads]}``)."""
    import torch

    import attnsteer

    per_prompt: list[dict[int, list[int]]] = []
    bar = progress_bar(len(prompts), "calibrate vhr", show_progress)
    try:
        with attnsteer.apply(model, recipe) as handle:
            layers = sorted({m.layer for m in handle.plan.methods if m.name == "vhr"})
            for inputs in prompts:
                ids = inputs.get("input_ids")
                if ids is not None and ids.shape[0] != 1:
                    raise ValueError(
                        f"calibration prompts are inputs of one prompt each; got a batch of {ids.shape[0]}"
                    )
                with torch.inference_mode():
                    model(**inputs)
                per_prompt.append({layer: rows[0] for layer, rows in handle.vhr_heads().items()})
                bar.update(1)
    finally:
        bar.close()
    return layers, per_prompt


def calibrate_vhr(
    model,
    prompts: Sequence,
    base=None,
    *,
    min_share: float = 0.5,
    name: str | None = None,
    model_id: str | None = None,
    prompts_name: str = "the prompts",
    show_progress: bool = False,
):
    """A fixed VHR head set from ``prompts`` (model input dicts, one prompt each).

    ``base``: a recipe with one per-prompt ``vhr`` intervention (default :func:`default_vhr_base`).
    Returns ``(recipe, VhrCalibration)``: ``base`` with that intervention turned into ``selection:
    fixed`` on the heads selected in at least ``min_share`` of the prompts (its ``heads`` mapping;
    ``layers`` dropped, the mapping decides), the shares in ``source``. Raises UsageError when no
    head reaches that share."""
    from ..recipe import Recipe, load_recipe

    model_type = model.config.model_type
    base = default_vhr_base(model_type) if base is None else load_recipe(base)
    found = [i for i, iv in enumerate(base.interventions) if iv.method == "vhr"]
    if len(found) != 1:
        raise UsageError(f"--recipe {base.name!r}: needs exactly one vhr intervention; it has {len(found)}")
    index = found[0]
    if base.interventions[index].params["selection"] != "per_prompt":
        raise UsageError(
            f"--recipe {base.name!r}: its vhr intervention already has selection: "
            f"{base.interventions[index].params['selection']}; the calibration counts the heads per-prompt VHR "
            "selects. Fix: pass a recipe with selection: per_prompt (the default), e.g. vhr-llava15"
        )
    if not len(prompts):
        raise UsageError("--prompts: the prompt set is empty. Fix: pass at least one prompt")
    layers, per_prompt = count_heads(model, prompts, base, show_progress=show_progress)
    n = len(per_prompt)
    counts = Counter((layer, head) for selection in per_prompt for layer, heads in selection.items() for head in heads)
    heads = choose_heads(counts, n, min_share)
    from .. import archs

    num_heads = archs.resolve(model).num_heads
    stats = VhrCalibration(n, min_share, layers, num_heads, counts, per_prompt, heads)
    if not heads:
        top = ", ".join(
            f"layer {layer} head {head} in {c}/{n}"
            for (layer, head), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        )
        raise UsageError(
            f"calibrate vhr: no head is selected in at least {min_share:g} of the {n} prompts (most often: "
            f"{top or 'no head selected at all'}). Fix: lower --min-share, or add prompts"
        )

    data = base.to_dict()
    item = data["interventions"][index]
    item.pop("layers", None)
    item["heads"] = {layer: list(h) for layer, h in heads.items()}
    item["params"]["selection"] = "fixed"
    data["name"] = name or f"{base.name}-fixed"
    data["description"] = (
        f"{base.name} with a fixed head set: the heads per-prompt VHR selected in >= {min_share:g} of {n} prompts"
        + (f" on {model_id}" if model_id else "")
        + ", scaled on every prompt (selection: fixed, a variant; the paper selects heads per prompt)."
    )
    data["source"] = _vhr_source(stats, base, model_id, prompts_name)
    data["model_types"] = list(base.model_types or [model_type])
    return Recipe.from_dict(data, origin="calibrated recipe"), stats


def _vhr_source(stats: VhrCalibration, base, model_id: str | None, prompts_name: str) -> str:
    per_layer = "; ".join(
        f"L{layer}: " + ", ".join(f"h{h} {stats.share_of(layer, h):.2f}" for h in heads)
        for layer, heads in stats.heads.items()
    )
    return (
        f"attnsteer calibrate vhr --fixed-heads on {model_id or 'a model'}, {stats.prompts} prompts from "
        f"{prompts_name}, base recipe {base.name} ({base.hash[:12]}), layers {stats.layers}. Per layer the heads "
        f"per-prompt VHR selected in >= {stats.min_share:g} of the prompts; share of the prompts selecting each "
        f"fixed head: {per_layer}"
    )


def format_vhr_table(stats: VhrCalibration) -> str:
    n = stats.prompts
    lines = [
        f"VHR heads over {n} prompts; fixed: the heads selected in >= {stats.min_share:g} of the prompts",
        "",
        "| layer | heads selected per prompt (mean) | fixed heads (share) |",
        "|---:|---:|:---|",
    ]
    for layer in stats.layers:
        fixed = stats.heads.get(layer, [])
        shown = ", ".join(f"{h} ({stats.share_of(layer, h):.2f})" for h in fixed) or "none (layer left out)"
        lines.append(f"| {layer} | {stats.mean_selected(layer):.1f} of {stats.num_heads} | {shown} |")
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class VhrCalibrationConfig(PromptSetConfig):
    """The settings of ``attnsteer calibrate vhr --fixed-heads`` (:class:`PromptSetConfig`; the base
    ``recipe`` must be a per-prompt VHR recipe, None: the family's built-in one)."""


@dataclass(frozen=True)
class VhrCalibrationResult:
    """What :func:`calibrate` wrote and found: the recipe and its file, the statistics (the data of
    :func:`format_vhr_table`) and attnsteer's warnings during the runs, as notes."""

    recipe: Recipe
    path: Path
    stats: VhrCalibration
    notes: list[str]

    @property
    def fixed_heads(self) -> int:
        return sum(len(h) for h in self.stats.heads.values())


def calibrate(config: VhrCalibrationConfig, *, loaded=None, progress: Progress | None = None) -> VhrCalibrationResult:
    """A fixed VHR head set from the prompt set as ``config`` says; writes the recipe.

    ``loaded``: an already loaded ``(processor, model)`` for ``config.model`` (else it is loaded
    here); ``progress``: called with each log line (loading the model; None: silent). ``--out``, the
    prompts and the base recipe are checked before the model loads."""
    items, model_id, processor, model, arch, (base, _) = open_prompt_set(
        config, "vhr", default_vhr_base, loaded=loaded, progress=progress
    )
    check_fits(model, base, config.recipe or base.name, model_id)
    prompts = PromptInputs(items, processor, model, arch, model_id)
    with collect_notes() as caught:
        recipe, stats = calibrate_vhr(
            model,
            prompts,
            base,
            min_share=config.min_share,
            name=config.name,
            model_id=model_id,
            prompts_name=str(config.prompts),
            show_progress=not config.no_progress,
        )
    return VhrCalibrationResult(recipe, write_recipe(recipe, config.out), stats, notes_of(caught))
