"""``attnsteer eval pope``: POPE runs of a vision-language model, baseline vs recipes.

Data: the published question files (``--pope_dir``, found by :func:`attnsteer.evals.pope.find_pope_file`,
each pinned by SHA-256 in the results) with a COCO val2014 image folder (``--coco_dir``; GQA
images for ``--source gqa``), or the Hugging Face dataset ``lmms-lab/POPE`` at a pinned revision
(``--hf``). Prompt: the question + " Please answer this question with one word." in the
processor's chat template. Greedy, ``max_new_tokens`` 16. Parsing: ``--parser`` profile
(``pope`` default); every sample line also carries the parse under all three profiles.
Metrics per split (accuracy, precision, recall, F1, predicted yes-ratio, unknown count) and both
aggregates: the mean over splits (LLaVA-1.5 style) and pooled over all rows (lmms-eval /
VLMEvalKit style).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _cli

HELP = "POPE: yes/no object-hallucination questions on COCO images (vision-language models)"
EXAMPLE = (
    "attnsteer eval pope --model llava-hf/llava-1.5-7b-hf --pope_dir POPE/output/coco --coco_dir coco/val2014 "
    "--recipe none --recipe act-default --batch_size 8 --limit 100"
)
NEEDS = "LLaVA-1.5-7B from the Hub, the POPE question files and COCO val2014 images; a GPU"
DESCRIPTION = (
    "Answer the POPE yes/no questions with a vision-language model, unsteered (--recipe none) and with each recipe, "
    "and report per-split accuracy, precision, recall, F1, predicted yes-ratio and unknown count, plus the mean "
    "over splits (LLaVA-1.5 style) and the pooled score (lmms-eval / VLMEvalKit style). Data: the POPE question files "
    "(github.com/RUCAIBox/POPE, output/coco/coco_pope_<split>.json) and COCO val2014 images "
    "(http://images.cocodataset.org/zips/val2014.zip), or --hf for the lmms-lab/POPE dataset."
)

COCO_IMAGES_HELP = (
    "COCO val2014 images: download http://images.cocodataset.org/zips/val2014.zip (6.2 GB), unzip it and pass the "
    "folder holding COCO_val2014_*.jpg as --coco_dir"
)
GQA_IMAGES_HELP = (
    "GQA images: download https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip, unzip it and pass the folder "
    "holding <id>.jpg as --coco_dir (alias --image_dir)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .pope import DEFAULT_POPE_TEMPLATE, PARSERS, POPE_HF_REPO, POPE_HF_REVISION, SOURCES, SPLITS

    _cli.add_model_arguments(p, "vision-language model: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder")
    g = p.add_argument_group("data")
    g.add_argument(
        "--pope_dir",
        default=None,
        help="folder with the POPE question files (coco_pope_<split>.json; <source>_pope_seem_<split>.json; "
        "the POPE repo's output/ layout is searched too)",
    )
    g.add_argument(
        "--coco_dir",
        "--image_dir",
        dest="coco_dir",
        default=None,
        help="COCO val2014 image folder (GQA image folder for --source gqa)",
    )
    g.add_argument(
        "--hf",
        nargs="?",
        const=POPE_HF_REPO,
        default=None,
        metavar="REPO",
        help=f"load the Hugging Face dataset instead of files (default repo {POPE_HF_REPO}; images included)",
    )
    g.add_argument("--hf_revision", default=POPE_HF_REVISION, help="dataset revision (default: the pinned commit)")
    g.add_argument("--source", choices=SOURCES, default="coco", help="question source (default: coco)")
    g.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to run (default: all three)"
    )
    g = p.add_argument_group("prompt, decoding and parsing")
    g.add_argument(
        "--prompt_template",
        default=DEFAULT_POPE_TEMPLATE,
        help=f"user message; {{question}} is replaced (default: {DEFAULT_POPE_TEMPLATE!r})",
    )
    g.add_argument(
        "--parser",
        choices=sorted(PARSERS),
        default="pope",
        help="answer parser profile: pope (official rule, default), opera, strict",
    )
    _cli.add_decoding_arguments(g, 16, "default: 16")
    _cli.add_run_arguments(p, batch_default=1, limit_help="only the first N questions of each split (or a fraction)")


# ---- data ---------------------------------------------------------------------------------------
def _missing_data_error() -> str:
    return (
        "POPE needs its question files and images. Either (a) download the question files from "
        "https://github.com/RUCAIBox/POPE (folder output/coco: coco_pope_random.json, coco_pope_popular.json, "
        "coco_pope_adversarial.json; LLaVA-1.5 used commit e3e3926), put them in a folder and pass it as --pope_dir, "
        f"plus {COCO_IMAGES_HELP}; or (b) pass --hf to use the lmms-lab/POPE dataset (needs network or a local "
        "Hugging Face cache of it)"
    )


def load_items(args) -> tuple[list, list, dict, dict]:
    """(eval items, POPE items, data description, data identity); errors say what to download."""
    from ..errors import EvalError
    from . import pope
    from .runner import EvalItem

    if args.hf and args.pope_dir:
        raise EvalError("--hf and --pope_dir both given. Fix: use one data source")
    pope_items: list = []
    data: dict = {"source": args.source, "splits": list(args.splits)}
    data_identity: dict = {}
    if args.hf:
        if args.source != "coco":
            raise EvalError(f"--hf holds the COCO questions only; --source {args.source} needs --pope_dir")
        _cli.hub_offline_if_unreachable()
        for split in args.splits:
            try:
                rows = pope.load_pope_hf(split=split, revision=args.hf_revision, repo_id=args.hf)
            except RuntimeError as exc:
                raise EvalError(
                    f"--hf {args.hf}: {exc} (On the command line: --pope_dir DIR --coco_dir DIR.)"
                ) from None
            pope_items += _cli.apply_limit(rows, args.limit)
        data.update({"hf_repo": args.hf, "hf_revision": args.hf_revision})
        data_identity = {f"hf:{args.hf}": args.hf_revision}
        images = {id(it): it.image_data for it in pope_items}
        version = {}
    else:
        if not args.pope_dir:
            raise EvalError(_missing_data_error())
        folder = Path(args.pope_dir).expanduser()
        if not folder.is_dir():
            raise EvalError(f"--pope_dir {args.pope_dir!r}: no such folder. {_missing_data_error()}")
        files: dict = {}
        for split in args.splits:
            try:
                path = pope.find_pope_file(folder, args.source, split)
            except FileNotFoundError as exc:
                raise EvalError(f"--pope_dir {args.pope_dir!r}: {exc}") from None
            try:
                split_items = pope.load_pope_file(path, split=split, source=args.source)
            except ValueError as exc:
                raise EvalError(f"--pope_dir {args.pope_dir!r}: {exc}") from None
            info = pope.identify_pope_file(path)
            files[split] = {
                "path": str(path.resolve()),
                "sha256": info["sha256"],
                "known_version": info["version"],
                "questions": len(split_items),
            }
            data_identity[f"{args.source}/{split}"] = info["sha256"]
            pope_items += _cli.apply_limit(split_items, args.limit)
        data["files"] = files
        if not args.coco_dir:
            raise EvalError(
                f"--coco_dir is missing: the questions refer to images by file name. "
                f"{GQA_IMAGES_HELP if args.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        image_dir = Path(args.coco_dir).expanduser()
        if not image_dir.is_dir():
            raise EvalError(
                f"--coco_dir {args.coco_dir!r}: no such folder. "
                f"{GQA_IMAGES_HELP if args.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        needed = sorted({it.image for it in pope_items})
        missing = [name for name in needed if not (image_dir / name).is_file()]
        if missing:
            raise EvalError(
                f"--coco_dir {args.coco_dir!r}: {len(missing)} of the {len(needed)} images the questions need are not "
                f"there (first: {', '.join(missing[:3])}). {GQA_IMAGES_HELP if args.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        data["image_dir"] = str(image_dir.resolve())
        images = {id(it): image_dir / it.image for it in pope_items}
        version = {split: f["known_version"] for split, f in files.items()}
    template = args.prompt_template
    try:
        pope.build_pope_prompt("x", template)
    except ValueError as exc:
        raise EvalError(f"--prompt_template: {exc}") from None
    prefix = f"hf:{args.hf_revision[:12]}" if args.hf else None
    items = []
    for it in pope_items:
        tag = prefix or (data_identity[f"{args.source}/{it.split}"][:12])
        items.append(
            EvalItem(
                id=f"{it.source}/{it.split}/{tag}/{it.question_id}",
                prompt=pope.build_pope_prompt(it.question, template),
                query=it.question,
                image=images[id(it)],
                meta={
                    "split": it.split,
                    "source": it.source,
                    "question_id": it.question_id,
                    "image": it.image,
                    "question": it.question,
                    "label": it.label,
                },
            )
        )
    if version:
        data["versions"] = version
    return items, pope_items, data, data_identity


# ---- scoring ------------------------------------------------------------------------------------
HEADLINE = [
    {"metric": "f1_mean", "label": "F1, mean of splits (LLaVA-1.5)", "higher_is_better": True, "percent": True},
    {"metric": "acc_mean", "label": "accuracy, mean of splits", "higher_is_better": True, "percent": True},
    {"metric": "f1_pooled", "label": "F1, pooled (lmms-eval/VLMEvalKit)", "higher_is_better": True, "percent": True},
    {"metric": "acc_pooled", "label": "accuracy, pooled", "higher_is_better": True, "percent": True},
    {"metric": "yes_ratio_pooled", "label": "predicted yes-ratio", "higher_is_better": None, "percent": True},
    {"metric": "unknown", "label": "unparsable answers", "higher_is_better": False, "percent": False},
]
_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_SHORT = {"accuracy": "acc", "precision": "precision", "recall": "recall", "f1": "f1", "yes_ratio": "yes_ratio"}


def flat_metrics(scores: dict) -> dict:
    out = {}
    for k in _KEYS:
        out[f"{_SHORT[k]}_mean"] = scores["mean_over_splits"][k]
        out[f"{_SHORT[k]}_pooled"] = scores["pooled"][k]
    out["unknown"] = scores["pooled"]["unknown"]
    out["n"] = scores["pooled"]["n"]
    for split, m in scores["per_split"].items():
        for k in _KEYS:
            out[f"{split}/{_SHORT[k]}"] = m[k]
        out[f"{split}/unknown"] = m["unknown"]
    return out


def make_scorer(items, pope_items, parser: str):
    from . import _cli
    from .pope import PARSERS, score_pope
    from .runner import collect

    def score(run, specs, seeds) -> dict:
        metrics = {}
        for spec in specs:
            by_seed, details = {}, {}
            for seed in seeds:
                outputs = [r["output"] for r in collect(run, items, spec, seed)]
                scores = score_pope(pope_items, outputs, parser)
                by_seed[str(seed)] = flat_metrics(scores)
                others = {}
                for other in PARSERS:
                    if other != parser:
                        s = score_pope(pope_items, outputs, other)
                        others[other] = {
                            "f1_mean": s["mean_over_splits"]["f1"],
                            "acc_mean": s["mean_over_splits"]["accuracy"],
                            "f1_pooled": s["pooled"]["f1"],
                            "acc_pooled": s["pooled"]["accuracy"],
                            "unknown": s["pooled"]["unknown"],
                        }
                details[str(seed)] = {"scores": scores, "other_parsers": others}
            mean, std = _cli.summarize_seeds(by_seed)
            metrics[spec.label] = {
                "recipe_hash": spec.hash,
                "summary": mean,
                "summary_std": std,
                "by_seed": by_seed,
                "details": details,
            }
        splits = list(dict.fromkeys(it.split for it in pope_items))
        headline = list(HEADLINE)
        if len(splits) > 1:
            headline += [
                {"metric": f"{s}/f1", "label": f"F1 {s}", "higher_is_better": True, "percent": True} for s in splits
            ]
        return {
            "metrics": metrics,
            "headline": headline,
            "aggregates": {
                "mean": "mean over splits of the per-split metrics (LLaVA-1.5 reports the mean F1)",
                "pooled": "metrics over all rows together (lmms-eval `pope`, VLMEvalKit 'Overall')",
            },
        }

    return score


def make_record_fn(parser: str):
    from .pope import PARSERS, parse_answer

    def make_record(item, output: str) -> dict:
        parsed = {name: parse_answer(output, name) for name in PARSERS}
        m = item.meta
        return {
            "split": m["split"],
            "source": m["source"],
            "question_id": m["question_id"],
            "image": m["image"],
            "question": m["question"],
            "prompt": item.prompt,
            "label": m["label"],
            "parsed": parsed,
            "parser": parser,
            "correct": parsed[parser] == m["label"],
        }

    return make_record


# ---- entry points -------------------------------------------------------------------------------
PopeConfig = _cli.config_dataclass(
    "PopeConfig", add_arguments, "Settings of one POPE run (`attnsteer eval pope`); pass to :func:`evaluate`."
)


def evaluate(model, processor, recipes=("none",), config=None, **settings) -> dict:
    """POPE on a vision-language model you already hold: the baseline (``"none"``) and each recipe
    (built-in name, YAML path, dict or ``attnsteer.Recipe``), on ``config`` (a :data:`PopeConfig`;
    keyword ``settings`` override its fields, e.g. ``pope_dir=..., coco_dir=..., limit=20``).
    Writes the run directory like the command line (``output_path``; a rerun resumes) and returns
    its results record (``results.json``: metrics per recipe, recipes with the layers and heads
    they steered, data hashes, decoding, timings)."""
    import dataclasses

    config = dataclasses.replace(config or PopeConfig(), recipe=list(recipes), **settings)
    return _evaluate(config, loaded=(processor, model))


def run(args) -> int:
    """``attnsteer eval pope``: the parsed options are a :data:`PopeConfig`."""
    _evaluate(args)
    return 0


def _evaluate(args, loaded=None) -> dict | None:
    from ..models import resolve_model as _resolve_model
    from .runner import Decoding, execute, parse_recipes, require_vlm

    _cli.check_output_path(args)
    if args.model:
        require_vlm(args.model)
    specs = parse_recipes(args.recipe)
    seeds = _cli.seeds_of(args)
    items, pope_items, data, data_identity = load_items(args)
    if loaded is None:
        model_id, kwargs = _resolve_model(args.model, args.model_args)
    else:
        model_id, kwargs = _cli.loaded_model_identity(loaded[1], args.model)
    decoding = Decoding(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams)
    identity = {
        **_cli.model_identity(model_id, kwargs),
        "source": args.source,
        "prompt_template": args.prompt_template,
        "decoding": decoding.to_json(),
    }
    config = {
        "task": "pope",
        "model": model_id,
        "model_args": args.model_args,
        "data": data,
        "prompt_template": args.prompt_template,
        "decoding": decoding.to_json(),
        "parser": args.parser,
        "limit": args.limit,
        "n_items": len(items),
    }
    n = {s: sum(1 for it in pope_items if it.split == s) for s in args.splits}
    print(
        f"POPE {args.source}: {', '.join(f'{s} {c}' for s, c in n.items())} questions; recipes "
        f"{', '.join(s.label for s in specs)}; seeds {seeds}",
        file=sys.stderr,
    )
    return execute(
        args=args,
        task="pope",
        model_id=model_id,
        model_kwargs=kwargs,
        identity=identity,
        data=data_identity,
        config=config,
        items=items,
        specs=specs,
        seeds=seeds,
        decoding=decoding,
        make_record=make_record_fn(args.parser),
        score=make_scorer(items, pope_items, args.parser),
        loaded=loaded,
    )
