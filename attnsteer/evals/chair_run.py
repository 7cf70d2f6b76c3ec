"""``attnsteer eval chair``: CHAIR runs of a vision-language model, or rescoring of caption files.

Generation (the protocol of docs/evals.md): a fixed list of COCO val2014 images -- by default 500 drawn
with ``random.Random(--image_seed).sample`` from the sorted ids of the images in ``--coco_dir``,
or ``--image_list`` (ids, file names or a caption log) -- the prompt "Please describe this image
in detail." in the processor's chat template, greedy, ``max_new_tokens`` 512 (or 64, where the
last incomplete sentence is dropped before scoring). The list is saved with the results
(``chair_images.json``). Scoring: :class:`attnsteer.evals.chair.CHAIRScorer` with the synonym
list (``--synonyms``), the lemmatiser (``--lemmatizer``; ``auto`` = NLTK WordNet when its data is
installed, else the offline ``rules``) and ground truth from ``--gt FILE`` or the COCO 2014
annotation files (``--coco_annotations DIR``).

Rescoring: ``attnsteer eval chair --captions FILE...`` scores existing caption logs (OPERA,
less-is-more, our own samples.jsonl) with no model.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from . import _cli

HELP = "CHAIR: hallucinated objects in detailed image captions (or rescore caption files)"
EXAMPLE = (
    "attnsteer eval chair --model llava-hf/llava-1.5-7b-hf --coco_dir coco/val2014 --gt gt_coco2014.json "
    "--synonyms synonyms.txt --recipe none --recipe act-default --batch_size 8"
)
NEEDS = "LLaVA-1.5-7B from the Hub, COCO val2014 images, gt_coco2014.json and synonyms.txt; a GPU"
DESCRIPTION = (
    "Caption 500 COCO val2014 images (drawn with a stated seed, or --image_list) with a vision-language model, "
    "unsteered (--recipe none) and with each recipe, and report CHAIR_s, CHAIR_i, Recall, Len and the repetition "
    "rate. --captions FILE... rescores existing caption logs instead (no model). Needs the CHAIR synonym list "
    '(--synonyms) and ground truth: --gt FILE (JSON {"objects": {id: [names]}}) or --coco_annotations DIR '
    "(instances/captions_{train,val}2014.json)."
)
DEFAULT_PROMPT = "Please describe this image in detail."
OPERA_SHORT_TOKENS = 64

SYNONYMS_HELP = (
    "the CHAIR synonym list is data/synonyms.txt of https://github.com/LisaAnne/Hallucination (80 lines); download "
    "it and pass it as --synonyms"
)
GT_HELP = (
    'ground truth is needed: pass --gt FILE (a JSON {"objects": {"<image id>": [category names]}}), or download '
    "http://images.cocodataset.org/annotations/annotations_trainval2014.zip, unzip it and pass the annotations/ "
    "folder (instances_train2014.json, instances_val2014.json, captions_train2014.json, captions_val2014.json) as "
    "--coco_annotations"
)
COCO_HELP = (
    "download http://images.cocodataset.org/zips/val2014.zip (6.2 GB), unzip it and pass the folder holding "
    "COCO_val2014_*.jpg as --coco_dir"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .chair import LEMMATIZERS

    _cli.add_model_arguments(p, "vision-language model: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder")
    g = p.add_argument_group("images")
    g.add_argument("--coco_dir", "--image_dir", dest="coco_dir", default=None, help="COCO val2014 image folder")
    g.add_argument(
        "--image_list",
        default=None,
        help="the image ids to caption: a text file (one id or file name per line), a JSON list, or JSON "
        "Lines with image_id/image (e.g. an OPERA caption log or less-is-more's chair-500.jsonl)",
    )
    g.add_argument("--num_images", type=_cli.positive_int, default=500, help="images drawn (default: 500)")
    g.add_argument(
        "--image_seed",
        type=int,
        default=0,
        help="seed of the draw: random.Random(seed).sample(sorted ids, num_images) (default: 0)",
    )
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--captions",
        nargs="+",
        default=None,
        metavar="FILE",
        help="rescore these caption files (JSON Lines/array with image_id + caption/text) and exit; no model",
    )
    g.add_argument("--image_id_key", default=None, help="with --captions: the id key (default: auto)")
    g.add_argument("--caption_key", default=None, help="with --captions: the caption key (default: auto)")
    g.add_argument("--gt", default=None, help='ground-truth JSON {"objects": {"<image id>": [names]}}')
    g.add_argument(
        "--coco_annotations",
        default=None,
        help="folder with instances_{train,val}2014.json and captions_{train,val}2014.json",
    )
    g.add_argument("--synonyms", default=None, help="the CHAIR synonym list (synonyms.txt of LisaAnne/Hallucination)")
    g.add_argument(
        "--lemmatizer",
        choices=["auto"] + sorted(LEMMATIZERS),
        default="auto",
        help="auto (default) = wordnet when NLTK and its data are installed, else rules (offline)",
    )
    g.add_argument(
        "--drop_incomplete",
        choices=("auto", "yes", "no"),
        default="auto",
        help=f"drop the last incomplete sentence before scoring; auto = yes when max_new_tokens <= "
        f"{OPERA_SHORT_TOKENS} (OPERA's short setting)",
    )
    g = p.add_argument_group("prompt and decoding")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"user message (default: {DEFAULT_PROMPT!r})")
    _cli.add_decoding_arguments(g, 512, "default: 512 (64: the short setting)")
    _cli.add_run_arguments(p, batch_default=1, limit_help="only the first N images of the list (or a fraction)")


# ---- scoring setup ------------------------------------------------------------------------------
def make_scorer(args):
    """(CHAIRScorer, lemmatiser name); EvalError if the synonym list is missing."""
    from ..errors import EvalError
    from .chair import CHAIRScorer, LemmatizerUnavailable

    if not args.synonyms:
        raise EvalError(f"--synonyms is missing: {SYNONYMS_HELP}")
    if not Path(args.synonyms).expanduser().is_file():
        raise EvalError(f"--synonyms {args.synonyms!r}: no such file; {SYNONYMS_HELP}")
    name = args.lemmatizer
    if name == "auto":
        try:
            scorer = CHAIRScorer(Path(args.synonyms).expanduser(), "wordnet")
            return scorer, "wordnet"
        except LemmatizerUnavailable:
            name = "rules"
            print(
                "note: NLTK WordNet data not installed; CHAIR uses the offline 'rules' lemmatiser (docs/chair.md "
                "gives its measured difference)",
                file=sys.stderr,
            )
    try:
        return CHAIRScorer(Path(args.synonyms).expanduser(), name), name
    except LemmatizerUnavailable as exc:
        raise EvalError(f"--lemmatizer {name}: {exc}") from None


def load_gt(args, scorer, image_ids=None) -> tuple[dict, dict]:
    """(ground truth, description with file hashes); EvalError naming what to download."""
    from ..errors import EvalError
    from ._text import file_sha256
    from .chair import build_gt_from_coco_dir, load_gt_json

    if args.gt and args.coco_annotations:
        raise EvalError("--gt and --coco_annotations both given. Fix: pass one source of ground truth")
    if args.gt:
        path = Path(args.gt).expanduser()
        if not path.is_file():
            raise EvalError(f"--gt {args.gt!r}: no such file; {GT_HELP}")
        try:
            gt = load_gt_json(path, scorer.synonyms)
        except ValueError as exc:
            raise EvalError(f"--gt {args.gt!r}: {exc}") from None
        return gt, {"gt": str(path.resolve()), "gt_sha256": file_sha256(path)}
    if args.coco_annotations:
        folder = Path(args.coco_annotations).expanduser()
        try:
            gt = build_gt_from_coco_dir(folder, scorer, image_ids=image_ids)
        except FileNotFoundError as exc:
            raise EvalError(f"--coco_annotations {args.coco_annotations!r}: {exc}") from None
        files = sorted(folder.glob("*2014.json"))
        return gt, {
            "coco_annotations": str(folder.resolve()),
            "annotation_sha256": {
                f.name: file_sha256(f) for f in files if f.name.startswith(("instances_", "captions_"))
            },
        }
    raise EvalError(f"no ground truth: {GT_HELP}")


def drop_incomplete_of(args) -> bool:
    if args.drop_incomplete == "auto":
        return args.max_new_tokens <= OPERA_SHORT_TOKENS
    return args.drop_incomplete == "yes"


HEADLINE = [
    {"metric": "CHAIRs", "label": "CHAIR_s", "higher_is_better": False, "percent": True},
    {"metric": "CHAIRi", "label": "CHAIR_i", "higher_is_better": False, "percent": True},
    {"metric": "Recall", "label": "Recall", "higher_is_better": True, "percent": True},
    {"metric": "Len", "label": "Len (tokens)", "higher_is_better": None, "percent": False},
    {"metric": "repetition_rate", "label": "repeated-sentence captions", "higher_is_better": False, "percent": True},
]


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ---- rescoring ----------------------------------------------------------------------------------
def rescore(args) -> int:
    from ..errors import EvalError
    from ._text import file_sha256
    from .chair import load_caption_log
    from .compare import run_markdown
    from .results import library_versions, now_iso, write_json_atomic

    if args.model:
        raise EvalError(
            "--captions rescores existing caption files and loads no model. Fix: drop --model (or drop "
            "--captions to generate captions)"
        )
    _cli.check_output_path(args)  # before the scoring
    scorer, lemmatizer = make_scorer(args)
    drop = args.drop_incomplete == "yes"
    logs = {}
    for file in args.captions:
        path = Path(file).expanduser()
        if not path.is_file():
            raise EvalError(f"--captions {file!r}: no such file")
        try:
            logs[file] = load_caption_log(path, args.image_id_key, args.caption_key)
        except ValueError as exc:
            raise EvalError(f"--captions {file!r}: {exc}") from None
    ids = {r.image_id for recs in logs.values() for r in recs}
    gt, gt_info = load_gt(args, scorer, ids)
    labels = _labels(list(logs))
    metrics, files = {}, {}
    for file, records in logs.items():
        try:
            result = scorer.score(records, gt, drop_incomplete=drop)
        except KeyError as exc:
            raise EvalError(
                f"--captions {file!r}: {exc.args[0]}. Fix: use ground truth that covers these images"
            ) from None
        metrics[labels[file]] = {"summary": _flat(result.metrics), "summary_std": {}, "file": str(file)}
        files[labels[file]] = {"path": str(Path(file).resolve()), "sha256": file_sha256(file), "captions": len(records)}
    record = {
        "attnsteer_results": 1,
        "task": "chair",
        "mode": "rescore",
        "status": "complete",
        "config": {
            "model": "caption files",
            "lemmatizer": lemmatizer,
            "drop_incomplete": drop,
            "synonyms": str(Path(args.synonyms).resolve()),
            "data": {**gt_info, "captions": files},
        },
        "metrics": metrics,
        "headline": HEADLINE,
        "versions": library_versions(),
        "written": now_iso(),
    }
    print(run_markdown(record, baseline=None))
    if args.output_path:
        out = Path(args.output_path).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        existing = out / "results.json"
        if existing.is_file():
            import json

            try:
                old = json.loads(existing.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("mode") != "rescore":
                raise EvalError(
                    f"--output_path {out} holds an evaluation run; rescoring would overwrite its results. "
                    "Fix: pass another --output_path"
                )
        write_json_atomic(existing, record)
        print(f"wrote {existing}", file=sys.stderr)
    return 0


def _labels(files: list[str]) -> dict[str, str]:
    """Short unique column labels: the file stem, with parent folders added until unique."""
    parts = {f: Path(f).with_suffix("").parts for f in files}
    depth = 1
    while True:
        labels = {f: "/".join(p[-depth:]) for f, p in parts.items()}
        if len(set(labels.values())) == len(files) or depth > max(len(p) for p in parts.values()):
            return labels
        depth += 1


# ---- images -------------------------------------------------------------------------------------
_ID_IN_NAME = re.compile(r"(?:COCO_val2014_)?(\d{6,12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def index_images(folder: Path) -> dict[int, Path]:
    """COCO image id -> file in ``folder`` (``COCO_val2014_<12 digits>.jpg`` or ``<12 digits>.jpg``)."""
    out = {}
    for f in folder.iterdir():
        m = _ID_IN_NAME.fullmatch(f.name)
        if m and f.is_file():
            out.setdefault(int(m.group(1)), f)
    return out


def read_image_list(path: Path) -> list[int]:
    from ._text import read_json_records
    from .chair import parse_coco_image_id

    text = path.read_text(encoding="utf-8-sig").strip()
    if not text:
        return []
    if text.startswith("[") and not text.startswith("[{"):
        import json

        return [parse_coco_image_id(v) for v in json.loads(text)]
    if text.startswith(("{", "[")):
        ids = []
        for i, rec in enumerate(read_json_records(path)):
            key = next((k for k in ("image_id", "image", "imid", "img_id") if k in rec), None)
            if key is None:
                raise ValueError(f"{path}: record {i} has no image_id/image key (keys: {sorted(rec)})")
            ids.append(parse_coco_image_id(rec[key]))
        return list(dict.fromkeys(ids))
    return list(dict.fromkeys(parse_coco_image_id(line) for line in text.splitlines() if line.strip()))


def select_images(args) -> tuple[list[int], dict[int, Path], dict]:
    from ..errors import EvalError

    if not args.coco_dir:
        raise EvalError(f"--coco_dir is missing: CHAIR captions COCO val2014 images; {COCO_HELP}")
    folder = Path(args.coco_dir).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--coco_dir {args.coco_dir!r}: no such folder; {COCO_HELP}")
    available = index_images(folder)
    if not available:
        raise EvalError(f"--coco_dir {args.coco_dir!r}: no COCO images (COCO_val2014_<id>.jpg) there; {COCO_HELP}")
    if args.image_list:
        path = Path(args.image_list).expanduser()
        if not path.is_file():
            raise EvalError(f"--image_list {args.image_list!r}: no such file")
        try:
            ids = read_image_list(path)
        except ValueError as exc:
            raise EvalError(f"--image_list {args.image_list!r}: {exc}") from None
        from ._text import file_sha256

        how = {"method": "list", "file": str(path.resolve()), "sha256": file_sha256(path)}
    else:
        pool = sorted(available)
        if len(pool) < args.num_images:
            raise EvalError(
                f"--coco_dir {args.coco_dir!r} holds {len(pool)} COCO images but --num_images is {args.num_images}. "
                f"Fix: pass the complete val2014 folder (40,504 images; {COCO_HELP}) or a smaller --num_images"
            )
        ids = random.Random(args.image_seed).sample(pool, args.num_images)
        how = {
            "method": f"random.Random({args.image_seed}).sample(sorted ids of the images in coco_dir, "
            f"{args.num_images})",
            "seed": args.image_seed,
            "pool_size": len(pool),
        }
    ids = _cli.apply_limit(ids, args.limit)
    missing = [i for i in ids if i not in available]
    if missing:
        raise EvalError(
            f"--coco_dir {args.coco_dir!r}: {len(missing)} of the {len(ids)} listed images are not there "
            f"(first ids: {missing[:3]}); {COCO_HELP}"
        )
    return ids, available, how


# ---- entry points -------------------------------------------------------------------------------
ChairConfig = _cli.config_dataclass(
    "ChairConfig", add_arguments, "Settings of one CHAIR run (`attnsteer eval chair`); pass to :func:`evaluate`."
)


def evaluate(model, processor, recipes=("none",), config=None, **settings) -> dict:
    """CHAIR captioning on a vision-language model you already hold: the baseline (``"none"``) and
    each recipe (built-in name, YAML path, dict or ``attnsteer.Recipe``), on ``config`` (a
    :data:`ChairConfig`; keyword ``settings`` override its fields, e.g. ``coco_dir=..., gt=...,
    synonyms=..., num_images=50``). Writes the run directory like the command line and returns
    its results record (``results.json``)."""
    import dataclasses

    from ..errors import EvalError

    config = dataclasses.replace(config or ChairConfig(), recipe=list(recipes), **settings)
    if config.captions:
        raise EvalError(
            "evaluate() generates captions; to re-score caption files use `attnsteer eval chair --captions`"
        )
    return _evaluate(config, loaded=(processor, model))


def run(args) -> int:
    """``attnsteer eval chair``: the parsed options are a :data:`ChairConfig`."""
    if args.captions:
        return rescore(args)
    _evaluate(args)
    return 0


def _evaluate(args, loaded=None) -> dict | None:
    from ..errors import EvalError
    from ..models import resolve_model as _resolve_model
    from .runner import Decoding, EvalItem, collect, execute, parse_recipes, require_vlm

    _cli.check_output_path(args)
    if args.model:
        require_vlm(args.model)
    specs = parse_recipes(args.recipe)
    seeds = _cli.seeds_of(args)
    scorer, lemmatizer = make_scorer(args)
    ids, files, how = select_images(args)
    gt, gt_info = load_gt(args, scorer, ids)
    no_gt = [i for i in ids if i not in gt]
    if no_gt:
        raise EvalError(
            f"the ground truth has no entry for {len(no_gt)} of the {len(ids)} images (first ids: "
            f"{no_gt[:3]}). Fix: ground truth built from the COCO 2014 annotations covers every val2014 image"
        )
    drop = drop_incomplete_of(args)
    if loaded is None:
        model_id, kwargs = _resolve_model(args.model, args.model_args)
    else:
        model_id, kwargs = _cli.loaded_model_identity(loaded[1], args.model)
    decoding = Decoding(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams)
    items = [
        EvalItem(id=f"coco/{i}", prompt=args.prompt, image=files[i], meta={"image_id": i, "file": files[i].name})
        for i in ids
    ]
    identity = {**_cli.model_identity(model_id, kwargs), "prompt": args.prompt, "decoding": decoding.to_json()}
    image_list = {"image_ids": ids, **how, "coco_dir": str(Path(args.coco_dir).resolve())}
    config = {
        "task": "chair",
        "model": model_id,
        "model_args": args.model_args,
        "prompt": args.prompt,
        "decoding": decoding.to_json(),
        "lemmatizer": lemmatizer,
        "drop_incomplete": drop,
        "synonyms": str(Path(args.synonyms).resolve()),
        "limit": args.limit,
        "n_items": len(items),
        "data": {
            **gt_info,
            "images": {k: v for k, v in image_list.items() if k != "image_ids"},
            "image_list_file": "chair_images.json",
        },
        "image_ids": ids,
    }

    def make_record(item, output: str) -> dict:
        result = scorer.score([(item.meta["image_id"], output)], gt, drop_incomplete=drop)
        cap = result.captions[0]
        return {
            "image_id": item.meta["image_id"],
            "image": item.meta["file"],
            "prompt": item.prompt,
            "scored_caption": cap["caption"],
            "mentions": cap["mentions"],
            "hallucinated": cap["mscoco_hallucinated_words"],
            "chair_s": cap["metrics"]["CHAIRs"],
            "lemmatizer": lemmatizer,
        }

    def score(run, specs_, seeds_) -> dict:
        metrics = {}
        for spec in specs_:
            by_seed = {}
            for seed in seeds_:
                recs = collect(run, items, spec, seed)
                result = scorer.score([(r["image_id"], r["output"]) for r in recs], gt, drop_incomplete=drop)
                flat = _flat(result.metrics)
                flat["hit_max_new_tokens"] = sum(bool(r.get("hit_max_new_tokens")) for r in recs) / max(1, len(recs))
                by_seed[str(seed)] = flat
            mean, std = _cli.summarize_seeds(by_seed)
            metrics[spec.label] = {"recipe_hash": spec.hash, "summary": mean, "summary_std": std, "by_seed": by_seed}
        return {"metrics": metrics, "headline": HEADLINE}

    print(
        f"CHAIR: {len(items)} images ({how['method']}); recipes {', '.join(s.label for s in specs)}; seeds {seeds}; "
        f"lemmatizer {lemmatizer}; {'dropping' if drop else 'keeping'} an incomplete last sentence",
        file=sys.stderr,
    )
    return execute(
        args=args,
        task="chair",
        model_id=model_id,
        model_kwargs=kwargs,
        identity=identity,
        data={},
        config=config,
        items=items,
        specs=specs,
        seeds=seeds,
        decoding=decoding,
        make_record=make_record,
        score=score,
        extra_files={"chair_images.json": image_list},
        loaded=loaded,
    )
