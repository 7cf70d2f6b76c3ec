"""CHAIR as a task: hallucinated objects in detailed image captions, and rescoring caption files.

Generation: a fixed list of COCO val2014 images -- by default 500 drawn with
``random.Random(image_seed).sample`` from the sorted ids of the images in ``coco_dir``, or
``image_list`` (ids, file names or a caption log) -- the prompt "Please describe this image in
detail." in the processor's chat template, greedy, ``max_new_tokens`` 512 (or 64, where the last
incomplete sentence is dropped before scoring). The list is saved with the results
(``chair_images.json``). Scoring: :class:`attnsteer.evals.chair.CHAIRScorer` with the synonym list
(``synonyms``), the lemmatiser (``lemmatizer``; ``auto`` = NLTK WordNet when its data is installed,
else the offline ``rules``) and ground truth from ``gt`` or the COCO 2014 annotation files
(``coco_annotations``).

Rescoring (:func:`rescore`): scores existing caption logs (OPERA, less-is-more, attnsteer's own
samples.jsonl) with no model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError
from ..config import apply_limit
from ..task import RunContext, Samples, Task, TaskData
from ..vlm import Decoding, EvalItem

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


@dataclass
class ChairConfig:
    """Settings of a CHAIR run (generation) or rescoring.

    Attributes:
        coco_dir: the COCO val2014 image folder.
        image_list: the image ids to caption: a text file (one id or file name per line), a JSON
            list, or JSON Lines with image_id/image (an OPERA caption log, less-is-more's chair-500.jsonl).
        num_images: images drawn when there is no ``image_list`` (500).
        image_seed: seed of the draw: ``random.Random(seed).sample(sorted ids, num_images)``.
        gt: ground-truth JSON ``{"objects": {"<image id>": [names]}}``.
        coco_annotations: folder with instances_{train,val}2014.json and captions_{train,val}2014.json.
        synonyms: the CHAIR synonym list (synonyms.txt of LisaAnne/Hallucination).
        lemmatizer: ``auto`` (WordNet when NLTK and its data are installed, else ``rules``), ``wordnet``, ``rules``.
        drop_incomplete: drop the last incomplete sentence before scoring: ``auto`` (yes when
            ``max_new_tokens`` <= 64, OPERA's short setting), ``yes``, ``no``.
        prompt: the user message.
        decoding: how captions are generated (greedy, 512 new tokens).
    """

    coco_dir: str | Path | None = None
    image_list: str | Path | None = None
    num_images: int = 500
    image_seed: int = 0
    gt: str | Path | None = None
    coco_annotations: str | Path | None = None
    synonyms: str | Path | None = None
    lemmatizer: str = "auto"
    drop_incomplete: str = "auto"
    prompt: str = DEFAULT_PROMPT
    decoding: Decoding = field(default_factory=lambda: Decoding(512))

    def __post_init__(self):
        from ..chair import LEMMATIZERS

        if self.lemmatizer not in ("auto", *LEMMATIZERS):
            raise UsageError(
                f"ChairConfig.lemmatizer {self.lemmatizer!r}: expected auto or one of {', '.join(sorted(LEMMATIZERS))}"
            )
        if self.drop_incomplete not in ("auto", "yes", "no"):
            raise UsageError(f"ChairConfig.drop_incomplete {self.drop_incomplete!r}: expected auto, yes or no")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise UsageError(f"ChairConfig.num_images {self.num_images!r}: expected an integer >= 1")


# ---- scoring setup ------------------------------------------------------------------------------
def make_scorer(cfg: ChairConfig) -> tuple:
    """(CHAIRScorer, lemmatiser name, note or None); EvalError if the synonym list is missing."""
    from ...errors import EvalError
    from ..chair import CHAIRScorer, LemmatizerUnavailable

    if not cfg.synonyms:
        raise EvalError(f"--synonyms is missing: {SYNONYMS_HELP}")
    if not Path(cfg.synonyms).expanduser().is_file():
        raise EvalError(f"--synonyms {cfg.synonyms!r}: no such file; {SYNONYMS_HELP}")
    name, note = cfg.lemmatizer, None
    if name == "auto":
        try:
            scorer = CHAIRScorer(Path(cfg.synonyms).expanduser(), "wordnet")
            return scorer, "wordnet", None
        except LemmatizerUnavailable:
            name = "rules"
            note = (
                "NLTK WordNet data not installed; CHAIR uses the offline 'rules' lemmatiser (docs/chair.md gives its "
                "measured difference)"
            )
    try:
        return CHAIRScorer(Path(cfg.synonyms).expanduser(), name), name, note
    except LemmatizerUnavailable as exc:
        raise EvalError(f"--lemmatizer {name}: {exc}") from None


def load_gt(cfg: ChairConfig, scorer, image_ids=None) -> tuple[dict, dict]:
    """(ground truth, description with file hashes); EvalError naming what to download."""
    from ...errors import EvalError
    from .._text import file_sha256
    from ..chair import build_gt_from_coco_dir, load_gt_json

    if cfg.gt and cfg.coco_annotations:
        raise EvalError("--gt and --coco_annotations both given. Fix: pass one source of ground truth")
    if cfg.gt:
        path = Path(cfg.gt).expanduser()
        if not path.is_file():
            raise EvalError(f"--gt {cfg.gt!r}: no such file; {GT_HELP}")
        try:
            gt = load_gt_json(path, scorer.synonyms)
        except ValueError as exc:
            raise EvalError(f"--gt {cfg.gt!r}: {exc}") from None
        return gt, {"gt": str(path.resolve()), "gt_sha256": file_sha256(path)}
    if cfg.coco_annotations:
        folder = Path(cfg.coco_annotations).expanduser()
        try:
            gt = build_gt_from_coco_dir(folder, scorer, image_ids=image_ids)
        except FileNotFoundError as exc:
            raise EvalError(f"--coco_annotations {cfg.coco_annotations!r}: {exc}") from None
        files = sorted(folder.glob("*2014.json"))
        return gt, {
            "coco_annotations": str(folder.resolve()),
            "annotation_sha256": {
                f.name: file_sha256(f) for f in files if f.name.startswith(("instances_", "captions_"))
            },
        }
    raise EvalError(f"no ground truth: {GT_HELP}")


def drop_incomplete_of(cfg: ChairConfig) -> bool:
    if cfg.drop_incomplete == "auto":
        return cfg.decoding.max_new_tokens <= OPERA_SHORT_TOKENS
    return cfg.drop_incomplete == "yes"


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
def rescore(
    captions: list[str | Path],
    config: ChairConfig,
    output_path: str | Path | None = None,
    *,
    image_id_key: str | None = None,
    caption_key: str | None = None,
) -> dict:
    """Score existing caption files (JSON Lines / array with an image id and a caption: OPERA,
    less-is-more, attnsteer's samples.jsonl) with no model. Returns the results record (one column
    per file); with ``output_path`` it is also written there as ``results.json``. The last sentence
    is dropped only with ``drop_incomplete="yes"`` (the files' token limits are unknown)."""
    import json

    from ...errors import EvalError
    from .._text import file_sha256
    from ..chair import load_caption_log
    from ..paths import check_writable
    from ..results import library_versions, now_iso, write_json_atomic

    if output_path:
        check_writable(output_path, "--output_path", folder=True)  # before the scoring
    scorer, lemmatizer, note = make_scorer(config)
    drop = config.drop_incomplete == "yes"
    logs = {}
    for file in captions:
        path = Path(file).expanduser()
        if not path.is_file():
            raise EvalError(f"--captions {str(file)!r}: no such file")
        try:
            logs[str(file)] = load_caption_log(path, image_id_key, caption_key)
        except ValueError as exc:
            raise EvalError(f"--captions {str(file)!r}: {exc}") from None
    ids = {r.image_id for recs in logs.values() for r in recs}
    gt, gt_info = load_gt(config, scorer, ids)
    labels = _labels(list(logs))
    metrics, files = {}, {}
    for file, records in logs.items():
        try:
            result = scorer.score(records, gt, drop_incomplete=drop)
        except KeyError as exc:
            raise EvalError(
                f"--captions {file!r}: {exc.args[0]}. Fix: use ground truth that covers these images"
            ) from None
        metrics[labels[file]] = {"summary": _flat(result.metrics), "summary_std": {}, "file": file}
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
            "synonyms": str(Path(config.synonyms).resolve()),
            "data": {**gt_info, "captions": files},
        },
        "metrics": metrics,
        "headline": HEADLINE,
        "notes": [note] if note else [],
        "versions": library_versions(),
        "written": now_iso(),
    }
    if output_path:
        out = Path(output_path).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        existing = out / "results.json"
        if existing.is_file():
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
    return record


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
    from .._text import read_json_records
    from ..chair import parse_coco_image_id

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


def select_images(cfg: ChairConfig, limit) -> tuple[list[int], dict[int, Path], dict]:
    from ...errors import EvalError

    if not cfg.coco_dir:
        raise EvalError(f"--coco_dir is missing: CHAIR captions COCO val2014 images; {COCO_HELP}")
    folder = Path(cfg.coco_dir).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--coco_dir {cfg.coco_dir!r}: no such folder; {COCO_HELP}")
    available = index_images(folder)
    if not available:
        raise EvalError(f"--coco_dir {cfg.coco_dir!r}: no COCO images (COCO_val2014_<id>.jpg) there; {COCO_HELP}")
    if cfg.image_list:
        path = Path(cfg.image_list).expanduser()
        if not path.is_file():
            raise EvalError(f"--image_list {cfg.image_list!r}: no such file")
        try:
            ids = read_image_list(path)
        except ValueError as exc:
            raise EvalError(f"--image_list {cfg.image_list!r}: {exc}") from None
        from .._text import file_sha256

        how = {"method": "list", "file": str(path.resolve()), "sha256": file_sha256(path)}
    else:
        pool = sorted(available)
        if len(pool) < cfg.num_images:
            raise EvalError(
                f"--coco_dir {cfg.coco_dir!r} holds {len(pool)} COCO images but --num_images is {cfg.num_images}. "
                f"Fix: pass the complete val2014 folder (40,504 images; {COCO_HELP}) or a smaller --num_images"
            )
        ids = random.Random(cfg.image_seed).sample(pool, cfg.num_images)
        how = {
            "method": f"random.Random({cfg.image_seed}).sample(sorted ids of the images in coco_dir, {cfg.num_images})",
            "seed": cfg.image_seed,
            "pool_size": len(pool),
        }
    ids = apply_limit(ids, limit)
    missing = [i for i in ids if i not in available]
    if missing:
        raise EvalError(
            f"--coco_dir {cfg.coco_dir!r}: {len(missing)} of the {len(ids)} listed images are not there "
            f"(first ids: {missing[:3]}); {COCO_HELP}"
        )
    return ids, available, how


# ---- the task -----------------------------------------------------------------------------------
class ChairTask(Task):
    """CHAIR captioning (see the module docstring); ``ChairTask(ChairConfig(coco_dir=..., gt=..., synonyms=...))``."""

    name = "chair"
    images = None

    def __init__(self, config: ChairConfig | None = None):
        super().__init__(config or ChairConfig())

    def prepare(self, limit) -> TaskData:
        from ...errors import EvalError

        cfg = self.config
        self.scorer, self.lemmatizer, note = make_scorer(cfg)
        ids, files, how = select_images(cfg, limit)
        self.gt, gt_info = load_gt(cfg, self.scorer, ids)
        no_gt = [i for i in ids if i not in self.gt]
        if no_gt:
            raise EvalError(
                f"the ground truth has no entry for {len(no_gt)} of the {len(ids)} images (first ids: "
                f"{no_gt[:3]}). Fix: ground truth built from the COCO 2014 annotations covers every val2014 image"
            )
        self.drop = drop_incomplete_of(cfg)
        decoding = cfg.decoding.to_json()
        items = [
            EvalItem(id=f"coco/{i}", prompt=cfg.prompt, image=files[i], meta={"image_id": i, "file": files[i].name})
            for i in ids
        ]
        image_list = {"image_ids": ids, **how, "coco_dir": str(Path(cfg.coco_dir).resolve())}
        config = {
            "prompt": cfg.prompt,
            "decoding": decoding,
            "lemmatizer": self.lemmatizer,
            "drop_incomplete": self.drop,
            "synonyms": str(Path(cfg.synonyms).resolve()),
            "data": {
                **gt_info,
                "images": {k: v for k, v in image_list.items() if k != "image_ids"},
                "image_list_file": "chair_images.json",
            },
            "image_ids": ids,
        }
        return TaskData(
            items=items,
            identity={"prompt": cfg.prompt, "decoding": decoding},
            config=config,
            extra_files={"chair_images.json": image_list},
            description=f"CHAIR: {len(items)} images ({how['method']}); lemmatizer {self.lemmatizer}; "
            f"{'dropping' if self.drop else 'keeping'} an incomplete last sentence",
            notes=[note] if note else [],
        )

    def requests(self, context: RunContext):
        from ..generation import GenerationRequests

        return GenerationRequests(context, self.config.decoding)

    def record(self, item: EvalItem, answer: dict) -> dict:
        result = self.scorer.score([(item.meta["image_id"], answer["output"])], self.gt, drop_incomplete=self.drop)
        cap = result.captions[0]
        return {
            "image_id": item.meta["image_id"],
            "image": item.meta["file"],
            "prompt": item.prompt,
            "scored_caption": cap["caption"],
            "mentions": cap["mentions"],
            "hallucinated": cap["mscoco_hallucinated_words"],
            "chair_s": cap["metrics"]["CHAIRs"],
            "lemmatizer": self.lemmatizer,
        }

    def score(self, samples: Samples) -> dict:
        def score_one(recs: list[dict]) -> tuple[dict, None]:
            result = self.scorer.score([(r["image_id"], r["output"]) for r in recs], self.gt, drop_incomplete=self.drop)
            flat = _flat(result.metrics)
            flat["hit_max_new_tokens"] = sum(bool(r.get("hit_max_new_tokens")) for r in recs) / max(1, len(recs))
            return flat, None

        return {"metrics": samples.per_seed(score_one), "headline": HEADLINE}
