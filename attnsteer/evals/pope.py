"""POPE (Li et al., EMNLP 2023): object hallucination measured with yes/no questions.

Pure Python; imports neither torch nor ``datasets`` at module load.

* Loading: the original question files (:func:`load_pope_file`, :func:`find_pope_file`,
  :func:`load_pope`) -- JSON Lines ``{question_id, image, text, label}`` (COCO; LF or CRLF) or
  pretty-printed JSON arrays (A-OKVQA, GQA) -- and the Hugging Face dataset ``lmms-lab/POPE``
  (:func:`load_pope_hf`). Pin the file by SHA-256 (:func:`file_sha256`,
  :func:`identify_pope_file`) and write the hash into the results.
* Prompting: :func:`build_pope_prompt` (default :data:`DEFAULT_POPE_TEMPLATE`).
* Parsing: named profiles (:data:`PARSERS`, :func:`parse_answer`):

  - ``pope`` (default; the official POPE ``evaluate.py`` rule, shared by LLaVA's
    ``eval_pope.py``): if the text contains ``.``, keep only what precedes the first ``.``;
    delete ``,``; split on single spaces; ``no`` if a token equals ``No``, ``not`` or ``no``,
    otherwise ``yes`` (so empty text, "NO", "Not really" and "isn't" are all ``yes``).
  - ``opera`` (OPERA ``pope_eval.py`` / PAI): delete every ``.`` and ``,`` (no first-sentence
    cut); split on single spaces; ``no`` if a token is ``No``/``not``/``no``/``NO`` or ends with
    ``n't``, otherwise ``yes``.
  - ``strict``: lower-case, strip white space and punctuation at both ends; exactly ``yes`` or
    ``no``, otherwise ``unknown``.

* Metrics: :func:`pope_metrics` per split and :func:`score_pope` with both aggregates.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._text import file_sha256, read_json_records

PathLike = str | Path

__all__ = [
    "SPLITS",
    "SOURCES",
    "DEFAULT_POPE_TEMPLATE",
    "POPE_HF_REPO",
    "POPE_HF_REVISION",
    "KNOWN_POPE_SHA256",
    "POPEItem",
    "file_sha256",
    "pope_file_name",
    "find_pope_file",
    "load_pope_file",
    "load_pope",
    "identify_pope_file",
    "pope_items_from_hf_rows",
    "load_pope_hf",
    "build_pope_prompt",
    "PARSERS",
    "parse_answer",
    "parse_pope",
    "parse_opera",
    "parse_strict",
    "pope_metrics",
    "score_pope",
]

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
SOURCES: tuple[str, ...] = ("coco", "aokvqa", "gqa")

#: Default prompt: the question followed by the one-word instruction (used by VCD and others).
DEFAULT_POPE_TEMPLATE = "{question} Please answer this question with one word."

#: Hugging Face dataset used by lmms-eval (later also published as ``lmms-lab-encoder/POPE``).
POPE_HF_REPO = "lmms-lab/POPE"
#: Pinned dataset revision: the ``main`` commit "Upload dataset" (4db1276) that added the ``Full``
#: config (splits adversarial/popular/random) next to the default config (split ``test``).
POPE_HF_REVISION = "4db1276663dfa5eb8ad16a52d24c31a09e470896"

#: SHA-256 of the published COCO question files (whole-file bytes as stored in git) ->
#: (POPE repository commit, source, split). The A-OKVQA / GQA files exist in one version only.
KNOWN_POPE_SHA256: dict[str, tuple[str, str, str]] = {
    "c16b65d2df6d70bb0814c8a4375833d39cdb09928fd936d3fc546491efa37f35": ("e3e3926", "coco", "random"),
    "5b16653023bf4f64d57eb0d168259de6627f5cde7538b85ebed3cc33034aa6cc": ("e3e3926", "coco", "popular"),
    "1d8f0906a9b50c05640f6f23abfac97523be2a1bed28f7eadc63b811699b2d26": ("e3e3926", "coco", "adversarial"),
    "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994": ("edebdda/109985c", "coco", "random"),
    "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753": ("edebdda/109985c", "coco", "popular"),
    "207273ac3b7fdd04df206c6809b77a4e7f60360a730ade6b7e32804e8dd5602f": ("edebdda", "coco", "adversarial"),
    "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8": ("109985c", "coco", "adversarial"),
    "f06eecde6d6ef4a00b95a7bbb510490708a09a6a67d952b59b8bdd33ac2c7200": ("9b54106", "aokvqa", "random"),
    "2ae5bedee3450cda52f9b033942c7b04a3917a86a110e859a66c1e41934c6ffd": ("9b54106", "aokvqa", "popular"),
    "2ddd3bdfa0df7a77a2cb1765ed06ac5ed190b5a093aa405b96986e862e8cdac1": ("9b54106", "aokvqa", "adversarial"),
    "6ce488eade3770185034939fabfe742fa32ed369011c8d9c3ac77bc0c85abd94": ("9b54106", "gqa", "random"),
    "dd03f06a458dd216e83233160fbf6628af9c63c84b11e99599f4fc0304b3361d": ("9b54106", "gqa", "popular"),
    "74e01b41d8308e2392e3b8d961167496ff3901c01100265d931a7a392f138a7a": ("9b54106", "gqa", "adversarial"),
}

_POPE_REPO_HINT = (
    "The question files are in the POPE repository (github.com/RUCAIBox/POPE, mirrored as "
    "AoiDragon/POPE), folder output/: output/coco/coco_pope_<split>.json and "
    "output/seem/<aokvqa|gqa>/<source>_pope_seem_<split>.json. LLaVA-1.5 numbers use the COCO "
    "files of commit e3e3926 (random split = 2,910 questions)."
)


@dataclass(frozen=True)
class POPEItem:
    """One POPE question.

    Attributes:
        question_id: id within its file (int in the original files, may be str from HF).
        image: image file name, e.g. ``COCO_val2014_000000310196.jpg`` (GQA: ``2405722.jpg``).
        question: the question text, e.g. ``Is there a snowboard in the image?``.
        label: ``"yes"`` or ``"no"`` (lower-cased).
        split: ``random`` / ``popular`` / ``adversarial`` (or ``None`` if unknown).
        source: ``coco`` / ``aokvqa`` / ``gqa`` (or ``None`` if unknown).
        image_data: the decoded image when loaded from Hugging Face, else ``None`` (excluded
            from equality and repr).
    """

    question_id: int | str
    image: str
    question: str
    label: str
    split: str | None = None
    source: str | None = None
    image_data: Any = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str | None, str | None, int | str]:
        """``(source, split, question_id)``: unique across the files of one version."""
        return (self.source, self.split, self.question_id)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _check(source: str, split: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown POPE source {source!r}; expected one of {SOURCES}")
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")


def pope_file_name(source: str, split: str) -> str:
    """Original file name: ``coco_pope_<split>.json`` or ``<aokvqa|gqa>_pope_seem_<split>.json``."""
    _check(source, split)
    if source == "coco":
        return f"coco_pope_{split}.json"
    return f"{source}_pope_seem_{split}.json"


def find_pope_file(folder: PathLike, source: str = "coco", split: str = "random") -> Path:
    """Find the question file for ``(source, split)`` under ``folder``.

    Looks for the original name (:func:`pope_file_name`) in ``folder`` itself, then in the
    POPE repository layout below it (``coco/``, ``seem/<source>/``, ``output/coco/``,
    ``output/seem/<source>/``, ``<source>/``), and also accepts a ``.jsonl`` extension.

    Raises:
        FileNotFoundError: naming the file, the places searched and where to get it.
    """
    name = pope_file_name(source, split)
    base = Path(folder)
    subdirs = ["", source, "coco" if source == "coco" else f"seem/{source}"]
    subdirs += [f"output/{d}" for d in subdirs if d]
    tried = []
    for sub in dict.fromkeys(subdirs):
        for fname in (name, name[: -len(".json")] + ".jsonl"):
            p = base / sub / fname if sub else base / fname
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"POPE question file {name} ({source}, {split}) not found under {base} (looked at: "
        f"{', '.join(tried[:4])}, ...). {_POPE_REPO_HINT}"
    )


_NAME_RE = re.compile(r"(coco|aokvqa|gqa)_pope_(?:seem_)?(random|popular|adversarial)")


def load_pope_file(path: PathLike, split: str | None = None, source: str | None = None) -> list[POPEItem]:
    """Load one POPE question file (JSON Lines, LF or CRLF, or a JSON array).

    ``split`` and ``source`` default to what the file name says (``coco_pope_random.json`` ->
    coco/random); ``None`` if the name does not tell.

    Raises:
        FileNotFoundError: the file is missing (the message says where to get it).
        ValueError: a record lacks ``question_id``/``image``/``text``/``label`` or has a label
            other than yes/no; the message names the record.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"POPE question file not found: {p}. {_POPE_REPO_HINT}")
    m = _NAME_RE.search(p.name)
    if m:
        source = source or m.group(1)
        split = split or m.group(2)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    items = []
    for i, rec in enumerate(read_json_records(p)):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise ValueError(f"{p}: record {i} lacks {missing}; POPE records have question_id, image, text, label")
        label = str(rec["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(
                f"{p}: record {i} (question_id {rec['question_id']}) has label {rec['label']!r}; expected yes/no"
            )
        items.append(POPEItem(rec["question_id"], rec["image"], rec["text"], label, split, source))
    return items


def load_pope(folder: PathLike, source: str = "coco", splits: Sequence[str] = SPLITS) -> dict[str, list[POPEItem]]:
    """Load several splits from a folder: ``{split: [POPEItem, ...]}`` (see :func:`find_pope_file`)."""
    return {s: load_pope_file(find_pope_file(folder, source, s), split=s, source=source) for s in splits}


def identify_pope_file(path: PathLike) -> dict[str, Any]:
    """Hash a question file and say which published version it is.

    Returns:
        ``{"path", "sha256", "known": bool, "version", "source", "split"}`` (the last three
        ``None`` for an unknown file).
    """
    sha = file_sha256(path)
    ver = KNOWN_POPE_SHA256.get(sha)
    return {
        "path": str(path),
        "sha256": sha,
        "known": ver is not None,
        "version": ver[0] if ver else None,
        "source": ver[1] if ver else None,
        "split": ver[2] if ver else None,
    }


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def pope_items_from_hf_rows(rows: Iterable[Mapping[str, Any]], split: str | None = None) -> list[POPEItem]:
    """Map rows of ``lmms-lab/POPE`` to :class:`POPEItem`.

    Column mapping: ``question_id`` -> question_id (kept as given, usually a str),
    ``question`` -> question, ``answer`` -> label (lower-cased), ``image_source`` -> image (``.jpg``
    appended when it has no extension, so the name matches the original files),
    ``category`` -> split (unless ``split`` is given), ``image`` -> image_data; source is ``coco``.

    Raises:
        ValueError: a row lacks a column or has an answer other than yes/no.
    """
    items = []
    for i, row in enumerate(rows):
        missing = [k for k in ("question_id", "question", "answer", "image_source") if k not in row]
        if missing:
            raise ValueError(
                f"row {i} of the POPE dataset lacks columns {missing}; expected question_id, question, "
                "answer, image_source, image, category (lmms-lab/POPE)"
            )
        label = str(row["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"row {i}: answer {row['answer']!r} is not yes/no")
        img = str(row["image_source"])
        if not Path(img).suffix:
            img += ".jpg"
        row_split = split or row.get("category")
        items.append(POPEItem(row["question_id"], img, row["question"], label, row_split, "coco", row.get("image")))
    return items


def load_pope_hf(
    split: str | None = None,
    revision: str = POPE_HF_REVISION,
    repo_id: str = POPE_HF_REPO,
    cache_dir: PathLike | None = None,
    **load_kwargs: Any,
) -> list[POPEItem]:
    """Load POPE from the Hugging Face dataset (``datasets`` is imported here, not at module load).

    Args:
        split: ``random``/``popular``/``adversarial`` loads config ``Full`` with that split (3,000
            rows); ``None`` loads the default config's ``test`` split (all 9,000 rows, split taken
            from ``category``).
        revision: dataset commit, pinned by default (:data:`POPE_HF_REVISION`).
        repo_id: dataset id (default ``lmms-lab/POPE``).
        cache_dir, load_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        RuntimeError: ``datasets`` is not installed, or the dataset cannot be downloaded (e.g.
            offline); the message says what to download and how to use local files instead.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS} or None")
    offline_hint = (
        f"Either download the dataset {repo_id} (revision {revision}) where you have network access "
        "(e.g. `huggingface-cli download --repo-type dataset "
        f"{repo_id} --revision {revision}`, then set HF_DATASETS_OFFLINE=1 and use the same "
        "cache), or use the original question files instead: load_pope_file(<path to "
        "coco_pope_<split>.json>) / load_pope(<folder>) with a COCO val2014 image folder. " + _POPE_REPO_HINT
    )
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"load_pope_hf needs the 'datasets' package (pip install datasets). {offline_hint}") from e
    try:
        if split is None:
            ds = datasets.load_dataset(repo_id, revision=revision, split="test", cache_dir=cache_dir, **load_kwargs)
        else:
            ds = datasets.load_dataset(
                repo_id, "Full", revision=revision, split=split, cache_dir=cache_dir, **load_kwargs
            )
    except Exception as e:  # network errors, missing cache, auth: all end up here
        raise RuntimeError(f"could not load {repo_id}@{revision}: {type(e).__name__}: {e}. {offline_hint}") from e
    return pope_items_from_hf_rows(ds, split=split)


# ---------------------------------------------------------------------------------------------
# Prompt and parsing
# ---------------------------------------------------------------------------------------------


def build_pope_prompt(question: str, template: str = DEFAULT_POPE_TEMPLATE) -> str:
    """Fill ``template`` (must contain ``{question}``) with the question text.

    The result is the user message; the model's own chat template is applied by the caller.
    """
    if "{question}" not in template:
        raise ValueError(f"POPE prompt template {template!r} must contain '{{question}}'")
    return template.replace("{question}", question)


def parse_pope(text: str) -> str:
    """Official POPE / LLaVA rule (see the module docstring). Returns ``"yes"`` or ``"no"``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_opera(text: str) -> str:
    """OPERA / PAI rule (see the module docstring). Returns ``"yes"`` or ``"no"``."""
    words = text.replace(".", "").replace(",", "").split(" ")
    neg = {"No", "not", "no", "NO"}
    return "no" if any(w in neg or w.endswith("n't") for w in words) else "yes"


_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


def parse_strict(text: str) -> str:
    """``"yes"``/``"no"`` if the whole answer is exactly that word (case, surrounding white space
    and punctuation ignored: ``"Yes."`` -> yes, ``"Yes, there is"`` -> unknown), else ``"unknown"``."""
    t = text.strip().strip(_PUNCT + " \t\r\n").lower()
    return t if t in ("yes", "no") else "unknown"


#: Parser profiles by name.
PARSERS: dict[str, Callable[[str], str]] = {"pope": parse_pope, "opera": parse_opera, "strict": parse_strict}


def parse_answer(text: str, parser: str | Callable[[str], str] = "pope") -> str:
    """Parse a raw model answer with a named profile (:data:`PARSERS`) or a callable.

    Returns ``"yes"``, ``"no"`` or ``"unknown"``.
    """
    if callable(parser):
        fn = parser
    else:
        if parser not in PARSERS:
            raise ValueError(f"unknown POPE parser {parser!r}; choose one of {sorted(PARSERS)}")
        fn = PARSERS[parser]
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    out = fn(text)
    if out not in ("yes", "no", "unknown"):
        raise ValueError(f"parser returned {out!r}; expected yes/no/unknown")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def pope_metrics(labels: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio and counts for one set of answers.

    The positive class is ``yes``. ``unknown`` predictions count as wrong for accuracy and as
    *not yes* for precision/recall: an unknown on a yes-question is a false negative (lowers
    recall), an unknown on a no-question is neither TP nor FP (precision unaffected) but still
    wrong. So accuracy = (TP + TN) / N with N including unknowns; precision = TP / (TP + FP);
    recall = TP / (TP + FN) where FN counts every yes-question not answered yes; F1 = 2PR/(P+R);
    yes_ratio = predicted yes / N (of predictions, not of labels). A zero denominator gives 0.0.

    Args:
        labels: ``"yes"``/``"no"`` ground truth.
        preds: ``"yes"``/``"no"``/``"unknown"`` parsed answers, same length.

    Returns:
        dict with ``accuracy, precision, recall, f1, yes_ratio, unknown, n, tp, fp, tn, fn``.
    """
    if len(labels) != len(preds):
        raise ValueError(f"labels ({len(labels)}) and predictions ({len(preds)}) differ in length")
    tp = fp = tn = fn = unk = 0
    for lab, pred in zip(labels, preds):
        if lab not in ("yes", "no"):
            raise ValueError(f"label {lab!r} is not yes/no")
        if pred not in ("yes", "no", "unknown"):
            raise ValueError(f"prediction {pred!r} is not yes/no/unknown")
        if pred == "unknown":
            unk += 1
        if lab == "yes":
            if pred == "yes":
                tp += 1
            else:
                fn += 1
        else:
            if pred == "yes":
                fp += 1
            elif pred == "no":
                tn += 1
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "unknown": unk,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


_AVERAGED = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(
    items: Sequence[POPEItem],
    answers: Sequence[str] | Mapping[Any, str],
    parser: str | Callable[[str], str] = "pope",
) -> dict[str, Any]:
    """Parse raw answers and compute per-split metrics plus both aggregates.

    Args:
        items: questions (from one or several splits; ``item.split`` groups them).
        answers: raw model outputs, either a sequence in the same order as ``items`` (matched by
            position, as the official script does) or a mapping keyed by ``item.key``
            (``(source, split, question_id)``).
        parser: profile name (:data:`PARSERS`) or a callable.

    Returns:
        ``{"parser", "per_split": {split: metrics}, "mean_over_splits": {...}, "pooled": {...}}``.
        ``mean_over_splits`` is the unweighted mean of the per-split accuracy/precision/recall/
        F1/yes-ratio (LLaVA-1.5 reports this mean F1), with ``unknown``/``n`` summed;
        ``pooled`` computes the metrics over all rows together (lmms-eval / VLMEvalKit
        "Overall"). Each aggregate carries an ``"aggregate"`` label saying which it is.
    """
    if isinstance(answers, Mapping):
        try:
            raw = [answers[it.key] for it in items]
        except KeyError as e:
            raise KeyError(f"no answer for item key {e.args[0]!r} (keys are (source, split, question_id))") from None
    else:
        raw = list(answers)
        if len(raw) != len(items):
            raise ValueError(f"{len(items)} items but {len(raw)} answers; positional matching needs equal lengths")
    preds = [parse_answer(t, parser) for t in raw]
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for it, p in zip(items, preds):
        key = it.split if it.split is not None else "all"
        labs, ps = by_split.setdefault(key, ([], []))
        labs.append(it.label)
        ps.append(p)
    order = [s for s in SPLITS if s in by_split] + [s for s in by_split if s not in SPLITS]
    per_split = {s: pope_metrics(*by_split[s]) for s in order}
    mean = {
        "aggregate": "mean over splits of per-split metrics (LLaVA-1.5 style)",
        "splits": order,
    }
    for k in _AVERAGED:
        mean[k] = sum(per_split[s][k] for s in order) / len(order) if order else 0.0
    mean["unknown"] = sum(per_split[s]["unknown"] for s in order)
    mean["n"] = sum(per_split[s]["n"] for s in order)
    pooled = {"aggregate": "pooled over all rows (lmms-eval / VLMEvalKit style)", "splits": order}
    pooled.update(pope_metrics([it.label for it in items], preds))
    return {
        "parser": parser if isinstance(parser, str) else getattr(parser, "__name__", "custom"),
        "per_split": per_split,
        "mean_over_splits": mean,
        "pooled": pooled,
    }
