"""POPE as a task: yes/no object-hallucination questions on COCO (or A-OKVQA / GQA) images.

Data: the published question files (``pope_dir``, found by :func:`attnsteer.evals.pope.find_pope_file`,
each pinned by SHA-256 in the results) with a COCO val2014 image folder (``coco_dir``; GQA images for
``source="gqa"``), or the Hugging Face dataset ``lmms-lab/POPE`` at a pinned revision (``hf``).
Prompt: the question + " Please answer this question with one word." in the processor's chat
template. Greedy, ``max_new_tokens`` 16. Parsing: the ``parser`` profile (``pope`` default); every
sample line also carries the parse under all three profiles. Metrics per split (accuracy,
precision, recall, F1, predicted yes-ratio, unknown count) and both aggregates: the mean over splits
(LLaVA-1.5 style) and pooled over all rows (lmms-eval / VLMEvalKit style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError
from ..config import apply_limit
from ..pope import DEFAULT_POPE_TEMPLATE, PARSERS, POPE_HF_REPO, POPE_HF_REVISION, SOURCES, SPLITS
from ..task import RunContext, Samples, Task, TaskData
from ..vlm import Decoding, EvalItem

COCO_IMAGES_HELP = (
    "COCO val2014 images: download http://images.cocodataset.org/zips/val2014.zip (6.2 GB), unzip it and pass the "
    "folder holding COCO_val2014_*.jpg as --coco_dir"
)
GQA_IMAGES_HELP = (
    "GQA images: download https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip, unzip it and pass the folder "
    "holding <id>.jpg as --coco_dir (alias --image_dir)"
)


@dataclass
class PopeConfig:
    """Settings of a POPE run.

    Attributes:
        pope_dir: folder with the POPE question files (``coco_pope_<split>.json``;
            ``<source>_pope_seem_<split>.json``; the POPE repository's ``output/`` layout is searched too).
        coco_dir: the COCO val2014 image folder (the GQA image folder for ``source="gqa"``).
        hf: a Hugging Face dataset repo to read instead of files (``lmms-lab/POPE``; images included).
        hf_revision: its revision (default: the pinned commit).
        source: question source: ``coco``, ``aokvqa`` or ``gqa``.
        splits: the splits to run: ``random``, ``popular``, ``adversarial``.
        prompt_template: the user message; ``{question}`` is replaced.
        parser: answer parser profile: ``pope`` (the official rule), ``opera``, ``strict``.
        decoding: how answers are generated (greedy, 16 new tokens).
    """

    pope_dir: str | Path | None = None
    coco_dir: str | Path | None = None
    hf: str | None = None
    hf_revision: str = POPE_HF_REVISION
    source: str = "coco"
    splits: Sequence[str] = SPLITS
    prompt_template: str = DEFAULT_POPE_TEMPLATE
    parser: str = "pope"
    decoding: Decoding = field(default_factory=lambda: Decoding(16))

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UsageError(f"PopeConfig.source {self.source!r}: expected one of {', '.join(SOURCES)}")
        self.splits = [self.splits] if isinstance(self.splits, str) else list(self.splits)
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise UsageError(f"PopeConfig.splits {self.splits!r}: expected some of {', '.join(SPLITS)}")
        if self.parser not in PARSERS:
            raise UsageError(f"PopeConfig.parser {self.parser!r}: expected one of {', '.join(sorted(PARSERS))}")
        if self.hf is True:
            self.hf = POPE_HF_REPO


def _missing_data_error() -> str:
    return (
        "POPE needs its question files and images. Either (a) download the question files from "
        "https://github.com/RUCAIBox/POPE (folder output/coco: coco_pope_random.json, coco_pope_popular.json, "
        "coco_pope_adversarial.json; LLaVA-1.5 used commit e3e3926), put them in a folder and pass it as --pope_dir, "
        f"plus {COCO_IMAGES_HELP}; or (b) pass --hf to use the lmms-lab/POPE dataset (needs network or a local "
        "Hugging Face cache of it)"
    )


def load_items(cfg: PopeConfig, limit) -> tuple[list, list, dict, dict]:
    """(eval items, POPE items, data description, data identity); errors say what to download."""
    from ...errors import EvalError
    from .. import pope

    if cfg.hf and cfg.pope_dir:
        raise EvalError("--hf and --pope_dir both given. Fix: use one data source")
    pope_items: list = []
    data: dict = {"source": cfg.source, "splits": list(cfg.splits)}
    data_identity: dict = {}
    if cfg.hf:
        if cfg.source != "coco":
            raise EvalError(f"--hf holds the COCO questions only; --source {cfg.source} needs --pope_dir")
        for split in cfg.splits:
            try:
                rows = pope.load_pope_hf(split=split, revision=cfg.hf_revision, repo_id=cfg.hf)
            except RuntimeError as exc:
                raise EvalError(
                    f"--hf {cfg.hf}: {exc} (Without the network: pope_dir and coco_dir, --pope_dir DIR --coco_dir DIR on the command line.)"
                ) from None
            pope_items += apply_limit(rows, limit)
        data.update({"hf_repo": cfg.hf, "hf_revision": cfg.hf_revision})
        data_identity = {f"hf:{cfg.hf}": cfg.hf_revision}
        images = {id(it): it.image_data for it in pope_items}
        version = {}
    else:
        if not cfg.pope_dir:
            raise EvalError(_missing_data_error())
        folder = Path(cfg.pope_dir).expanduser()
        if not folder.is_dir():
            raise EvalError(f"--pope_dir {cfg.pope_dir!r}: no such folder. {_missing_data_error()}")
        files: dict = {}
        for split in cfg.splits:
            try:
                path = pope.find_pope_file(folder, cfg.source, split)
            except FileNotFoundError as exc:
                raise EvalError(f"--pope_dir {cfg.pope_dir!r}: {exc}") from None
            try:
                split_items = pope.load_pope_file(path, split=split, source=cfg.source)
            except ValueError as exc:
                raise EvalError(f"--pope_dir {cfg.pope_dir!r}: {exc}") from None
            info = pope.identify_pope_file(path)
            files[split] = {
                "path": str(path.resolve()),
                "sha256": info["sha256"],
                "known_version": info["version"],
                "questions": len(split_items),
            }
            data_identity[f"{cfg.source}/{split}"] = info["sha256"]
            pope_items += apply_limit(split_items, limit)
        data["files"] = files
        if not cfg.coco_dir:
            raise EvalError(
                f"--coco_dir is missing: the questions refer to images by file name. "
                f"{GQA_IMAGES_HELP if cfg.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        image_dir = Path(cfg.coco_dir).expanduser()
        if not image_dir.is_dir():
            raise EvalError(
                f"--coco_dir {cfg.coco_dir!r}: no such folder. "
                f"{GQA_IMAGES_HELP if cfg.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        needed = sorted({it.image for it in pope_items})
        missing = [name for name in needed if not (image_dir / name).is_file()]
        if missing:
            raise EvalError(
                f"--coco_dir {cfg.coco_dir!r}: {len(missing)} of the {len(needed)} images the questions need are not "
                f"there (first: {', '.join(missing[:3])}). {GQA_IMAGES_HELP if cfg.source == 'gqa' else COCO_IMAGES_HELP}"
            )
        data["image_dir"] = str(image_dir.resolve())
        images = {id(it): image_dir / it.image for it in pope_items}
        version = {split: f["known_version"] for split, f in files.items()}
    template = cfg.prompt_template
    try:
        pope.build_pope_prompt("x", template)
    except ValueError as exc:
        raise EvalError(f"--prompt_template: {exc}") from None
    prefix = f"hf:{cfg.hf_revision[:12]}" if cfg.hf else None
    items = []
    for it in pope_items:
        tag = prefix or (data_identity[f"{cfg.source}/{it.split}"][:12])
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


def score_outputs(pope_items, outputs: list[str], parser: str) -> tuple[dict, dict]:
    """(flat metrics, details) of one recipe and seed: the ``parser`` profile's scores, plus the
    headline numbers under the other parsers."""
    from ..pope import score_pope

    scores = score_pope(pope_items, outputs, parser)
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
    return flat_metrics(scores), {"scores": scores, "other_parsers": others}


class PopeTask(Task):
    """POPE (see the module docstring); ``PopeTask(PopeConfig(pope_dir=..., coco_dir=...))``."""

    name = "pope"
    images = None  # the plan check reads the model: POPE prompts carry an image each

    def __init__(self, config: PopeConfig | None = None):
        super().__init__(config or PopeConfig())
        self._pope_items: list = []

    def prepare(self, limit) -> TaskData:
        cfg = self.config
        items, self._pope_items, data, data_identity = load_items(cfg, limit)
        decoding = cfg.decoding.to_json()
        counts = {s: sum(1 for it in self._pope_items if it.split == s) for s in cfg.splits}
        return TaskData(
            items=items,
            identity={"source": cfg.source, "prompt_template": cfg.prompt_template, "decoding": decoding},
            config={"data": data, "prompt_template": cfg.prompt_template, "decoding": decoding, "parser": cfg.parser},
            data_files=data_identity,
            description=f"POPE {cfg.source}: {', '.join(f'{s} {c}' for s, c in counts.items())} questions",
        )

    def requests(self, context: RunContext):
        from ..generation import GenerationRequests

        return GenerationRequests(context, self.config.decoding)

    def record(self, item: EvalItem, answer: dict) -> dict:
        from ..pope import parse_answer

        parsed = {name: parse_answer(answer["output"], name) for name in PARSERS}
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
            "parser": self.config.parser,
            "correct": parsed[self.config.parser] == m["label"],
        }

    def score(self, samples: Samples) -> dict:
        pope_items, parser = self._pope_items, self.config.parser
        metrics = samples.per_seed(lambda recs: score_outputs(pope_items, [r["output"] for r in recs], parser))
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
