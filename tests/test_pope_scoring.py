"""POPE scoring: parser profiles, metrics, aggregates and the published question files."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from attnsteer.evals import pope
from attnsteer.evals.pope import (
    DEFAULT_POPE_TEMPLATE,
    POPE_HF_REVISION,
    POPEItem,
    build_pope_prompt,
    file_sha256,
    find_pope_file,
    identify_pope_file,
    load_pope,
    load_pope_file,
    load_pope_hf,
    parse_answer,
    pope_items_from_hf_rows,
    pope_metrics,
    score_pope,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POPE_DATA = SHARED_DATA / "pope"
needs_data = pytest.mark.skipif(
    not POPE_DATA.is_dir(), reason=f"published POPE files not found at {POPE_DATA} (shared/data is absent)"
)

# --------------------------------------------------------------------------------------------
# Parsers: (answer, pope, opera, strict) -- the table of eval-harnesses.md section 1.3 plus edge cases
# --------------------------------------------------------------------------------------------
PARSER_TABLE = [
    ("Yes", "yes", "yes", "yes"),
    ("No", "no", "no", "no"),
    ("yes", "yes", "yes", "yes"),
    ("no", "no", "no", "no"),
    ("Yes.", "yes", "yes", "yes"),
    ("no.", "no", "no", "no"),
    (" Yes ", "yes", "yes", "yes"),
    ("Yes, there is a snowboard in the image.", "yes", "yes", "unknown"),
    ("There is no car in the image.", "no", "no", "unknown"),
    ("There is not a car.", "no", "no", "unknown"),
    ("There isn't a car.", "yes", "no", "unknown"),
    ("Not really.", "yes", "yes", "unknown"),
    ("NO", "yes", "no", "no"),
    ("I cannot tell.", "yes", "yes", "unknown"),
    ("", "yes", "yes", "unknown"),
    ("The image shows a snowboard.", "yes", "yes", "unknown"),
    ("Yes. No other objects.", "yes", "no", "unknown"),
    ("No, there is no dog.", "no", "no", "unknown"),
    # the official rule splits on single spaces only: a newline glued to "No" hides it
    ("No\nThere is none", "yes", "yes", "unknown"),
    ("Nope", "yes", "yes", "unknown"),
    ("YES!", "yes", "yes", "yes"),
]


@pytest.mark.parametrize("text,exp_pope,exp_opera,exp_strict", PARSER_TABLE)
def test_parser_profiles(text, exp_pope, exp_opera, exp_strict):
    assert parse_answer(text) == exp_pope  # default profile is the official one
    assert parse_answer(text, "pope") == exp_pope
    assert parse_answer(text, "opera") == exp_opera
    assert parse_answer(text, "strict") == exp_strict


def test_parser_errors():
    with pytest.raises(ValueError, match="unknown POPE parser"):
        parse_answer("Yes", "vcd")
    with pytest.raises(TypeError):
        parse_answer(None)  # type: ignore[arg-type]
    assert parse_answer("whatever", lambda t: "unknown") == "unknown"


# --------------------------------------------------------------------------------------------
# Metrics: a hand-computed confusion matrix
# --------------------------------------------------------------------------------------------


def _items():
    labels = ["yes", "no"] * 3
    items = [
        POPEItem(i + 1, f"img{i // 2}.jpg", "Is there a dog in the image?", lab, "random", "coco")
        for i, lab in enumerate(labels)
    ]
    items += [
        POPEItem(i + 1, f"img{i // 2}.jpg", "Is there a cat in the image?", lab, "popular", "coco")
        for i, lab in enumerate(labels)
    ]
    answers = ["Yes", "No", "No", "Yes", "maybe", "maybe"]  # random: TP TN FN FP unk(yes) unk(no)
    answers += ["Yes", "No", "Yes", "No", "Yes", "Yes"]  # popular: TP TN TP TN TP FP
    return items, answers


def test_hand_computed_confusion_matrix():
    items, answers = _items()
    res = score_pope(items, answers, parser="strict")
    r = res["per_split"]["random"]
    assert (r["tp"], r["tn"], r["fp"], r["fn"], r["unknown"], r["n"]) == (1, 1, 1, 2, 2, 6)
    assert r["accuracy"] == pytest.approx(2 / 6)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(1 / 3)  # the unknown on a yes-question is a false negative
    assert r["f1"] == pytest.approx(0.4)
    assert r["yes_ratio"] == pytest.approx(2 / 6)  # of predictions, not labels
    p = res["per_split"]["popular"]
    assert (p["tp"], p["tn"], p["fp"], p["fn"], p["unknown"]) == (3, 2, 1, 0, 0)
    assert p["accuracy"] == pytest.approx(5 / 6)
    assert p["precision"] == pytest.approx(3 / 4)
    assert p["recall"] == pytest.approx(1.0)
    assert p["f1"] == pytest.approx(6 / 7)
    assert p["yes_ratio"] == pytest.approx(4 / 6)

    mean = res["mean_over_splits"]
    assert "LLaVA" in mean["aggregate"]
    assert mean["f1"] == pytest.approx((0.4 + 6 / 7) / 2)
    assert mean["accuracy"] == pytest.approx((2 / 6 + 5 / 6) / 2)
    assert mean["unknown"] == 2 and mean["n"] == 12

    pooled = res["pooled"]
    assert "pooled" in pooled["aggregate"]
    assert (pooled["tp"], pooled["tn"], pooled["fp"], pooled["fn"], pooled["unknown"]) == (4, 3, 2, 2, 2)
    assert pooled["accuracy"] == pytest.approx(7 / 12)
    assert pooled["precision"] == pytest.approx(2 / 3)
    assert pooled["recall"] == pytest.approx(2 / 3)
    assert pooled["f1"] == pytest.approx(2 / 3)
    assert pooled["yes_ratio"] == pytest.approx(0.5)

    # the official parser reads "maybe" as yes: no unknowns
    res_pope = score_pope(items, answers)
    assert res_pope["parser"] == "pope"
    assert res_pope["per_split"]["random"]["unknown"] == 0
    assert res_pope["per_split"]["random"]["tp"] == 2


def test_positional_and_keyed_answers_agree():
    items, answers = _items()
    keyed = {it.key: a for it, a in zip(items, answers)}
    assert score_pope(items, keyed, "strict") == score_pope(items, answers, "strict")
    with pytest.raises(ValueError, match="positional"):
        score_pope(items, answers[:-1])
    with pytest.raises(KeyError):
        score_pope(items, dict(list(keyed.items())[:-1]))


def test_metrics_edge_cases():
    m = pope_metrics(["no", "no"], ["no", "no"])  # no yes predictions at all
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="length"):
        pope_metrics(["yes"], [])
    with pytest.raises(ValueError, match="not yes/no"):
        pope_metrics(["maybe"], ["yes"])


def test_prompt():
    q = "Is there a dog in the image?"
    assert build_pope_prompt(q) == "Is there a dog in the image? Please answer this question with one word."
    assert DEFAULT_POPE_TEMPLATE.startswith("{question}")
    assert build_pope_prompt(q, "{question}\nAnswer the question using a single word or phrase.").endswith("phrase.")
    with pytest.raises(ValueError, match="question"):
        build_pope_prompt(q, "no placeholder")


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def test_loader_jsonl_crlf_and_array(tmp_path):
    recs = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
    ]
    jl = tmp_path / "coco_pope_popular.json"
    jl.write_bytes(("\r\n".join(json.dumps(r) for r in recs) + "\r\n").encode())
    arr = tmp_path / "gqa_pope_seem_adversarial.json"
    arr.write_text(json.dumps(recs, indent=4))
    a = load_pope_file(jl)
    b = load_pope_file(arr)
    assert [(i.question_id, i.label, i.split, i.source) for i in a] == [
        (1, "yes", "popular", "coco"),
        (2, "no", "popular", "coco"),
    ]
    assert [(i.question, i.split, i.source) for i in b] == [
        (recs[0]["text"], "adversarial", "gqa"),
        (recs[1]["text"], "adversarial", "gqa"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "?"}) + "\n")
    with pytest.raises(ValueError, match="label"):
        load_pope_file(bad)
    with pytest.raises(FileNotFoundError, match="output/"):
        load_pope_file(tmp_path / "missing.json")


def test_find_file_error_names_file_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        find_pope_file(tmp_path, "aokvqa", "popular")
    msg = str(ei.value)
    assert "aokvqa_pope_seem_popular.json" in msg and "POPE" in msg and "output/" in msg
    with pytest.raises(ValueError):
        find_pope_file(tmp_path, "coco", "hard")
    # the POPE repository layout is found
    d = tmp_path / "output" / "seem" / "gqa"
    d.mkdir(parents=True)
    (d / "gqa_pope_seem_random.json").write_text("[]")
    assert find_pope_file(tmp_path, "gqa", "random") == d / "gqa_pope_seem_random.json"


PUBLISHED = [
    # (folder, file, records, yes, no, sha256)
    (
        "head",
        "coco_pope_random.json",
        3000,
        1500,
        1500,
        "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994",
    ),
    (
        "head",
        "coco_pope_popular.json",
        3000,
        1500,
        1500,
        "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753",
    ),
    (
        "head",
        "coco_pope_adversarial.json",
        3000,
        1500,
        1500,
        "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8",
    ),
    (
        "head",
        "aokvqa_pope_seem_random.json",
        3000,
        1500,
        1500,
        "f06eecde6d6ef4a00b95a7bbb510490708a09a6a67d952b59b8bdd33ac2c7200",
    ),
    (
        "head",
        "aokvqa_pope_seem_popular.json",
        3000,
        1500,
        1500,
        "2ae5bedee3450cda52f9b033942c7b04a3917a86a110e859a66c1e41934c6ffd",
    ),
    (
        "head",
        "aokvqa_pope_seem_adversarial.json",
        3000,
        1500,
        1500,
        "2ddd3bdfa0df7a77a2cb1765ed06ac5ed190b5a093aa405b96986e862e8cdac1",
    ),
    (
        "head",
        "gqa_pope_seem_random.json",
        3000,
        1500,
        1500,
        "6ce488eade3770185034939fabfe742fa32ed369011c8d9c3ac77bc0c85abd94",
    ),
    (
        "head",
        "gqa_pope_seem_popular.json",
        3000,
        1500,
        1500,
        "dd03f06a458dd216e83233160fbf6628af9c63c84b11e99599f4fc0304b3361d",
    ),
    (
        "head",
        "gqa_pope_seem_adversarial.json",
        3000,
        1500,
        1500,
        "74e01b41d8308e2392e3b8d961167496ff3901c01100265d931a7a392f138a7a",
    ),
    (
        "e3e3926",
        "coco_pope_random.json",
        2910,
        1500,
        1410,
        "c16b65d2df6d70bb0814c8a4375833d39cdb09928fd936d3fc546491efa37f35",
    ),
    (
        "e3e3926",
        "coco_pope_popular.json",
        3000,
        1500,
        1500,
        "5b16653023bf4f64d57eb0d168259de6627f5cde7538b85ebed3cc33034aa6cc",
    ),
    (
        "e3e3926",
        "coco_pope_adversarial.json",
        3000,
        1500,
        1500,
        "1d8f0906a9b50c05640f6f23abfac97523be2a1bed28f7eadc63b811699b2d26",
    ),
    (
        "edebdda",
        "coco_pope_random.json",
        3000,
        1500,
        1500,
        "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994",
    ),
    (
        "edebdda",
        "coco_pope_popular.json",
        3000,
        1500,
        1500,
        "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753",
    ),
    (
        "edebdda",
        "coco_pope_adversarial.json",
        3000,
        1500,
        1500,
        "207273ac3b7fdd04df206c6809b77a4e7f60360a730ade6b7e32804e8dd5602f",
    ),
]


@needs_data
@pytest.mark.parametrize("folder,name,n,n_yes,n_no,sha", PUBLISHED)
def test_published_files(folder, name, n, n_yes, n_no, sha):
    path = POPE_DATA / folder / name
    items = load_pope_file(path)
    assert len(items) == n
    assert sum(i.label == "yes" for i in items) == n_yes
    assert sum(i.label == "no" for i in items) == n_no
    assert len({i.image for i in items}) == 500
    assert [i.question_id for i in items] == list(range(1, n + 1))
    assert file_sha256(path) == sha
    info = identify_pope_file(path)
    assert info["known"] and info["sha256"] == sha and info["split"] == items[0].split
    assert items[0].source == name.split("_")[0]


@needs_data
def test_load_folder_llava_version():
    by_split = load_pope(POPE_DATA / "e3e3926")
    assert {s: len(v) for s, v in by_split.items()} == {"random": 2910, "popular": 3000, "adversarial": 3000}
    items = [it for s in by_split.values() for it in s]
    # every answer "Yes": recall 1, precision = share of yes labels, pooled over 8,910 rows
    res = score_pope(items, ["Yes"] * len(items))
    assert res["pooled"]["n"] == 8910
    assert res["per_split"]["random"]["precision"] == pytest.approx(1500 / 2910)
    assert res["pooled"]["precision"] == pytest.approx(4500 / 8910)
    assert res["mean_over_splits"]["recall"] == 1.0


# --------------------------------------------------------------------------------------------
# Hugging Face loader (a fake `datasets` module; the real download cannot run offline)
# --------------------------------------------------------------------------------------------


def _fake_datasets(monkeypatch, load_dataset):
    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hf_column_mapping(monkeypatch):
    rows = [
        {
            "id": "0",
            "question_id": "1",
            "question": "Is there a snowboard in the image?",
            "answer": "yes",
            "image_source": "COCO_val2014_000000310196",
            "image": object(),
            "category": "adversarial",
        },
        {
            "id": "1",
            "question_id": "2",
            "question": "Is there a umbrella in the imange?",
            "answer": "No",
            "image_source": "COCO_val2014_000000310196",
            "image": None,
            "category": "random",
        },
    ]
    calls = []

    def load_dataset(repo, *args, **kwargs):
        calls.append((repo, args, kwargs))
        return rows

    _fake_datasets(monkeypatch, load_dataset)
    items = load_pope_hf()
    assert calls[0][0] == "lmms-lab/POPE" and calls[0][2]["revision"] == POPE_HF_REVISION
    assert calls[0][2]["split"] == "test"
    assert items[0] == POPEItem("1", "COCO_val2014_000000310196.jpg", rows[0]["question"], "yes", "adversarial", "coco")
    assert items[0].image_data is rows[0]["image"]
    assert items[1].label == "no" and items[1].split == "random"
    load_pope_hf(split="popular", revision="abc")
    assert calls[1][1] == ("Full",) and calls[1][2]["split"] == "popular" and calls[1][2]["revision"] == "abc"
    with pytest.raises(ValueError, match="lacks columns"):
        pope_items_from_hf_rows([{"question": "?"}])


def test_hf_offline_error(monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(RuntimeError) as ei:
        load_pope_hf()
    msg = str(ei.value)
    assert "lmms-lab/POPE" in msg and POPE_HF_REVISION in msg and "load_pope_file" in msg and "output/" in msg


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_pope_hf()


def test_import_is_light():
    code = (
        "import sys, attnsteer; before = set(sys.modules); "
        "import attnsteer.evals.pope, attnsteer.evals.chair; "
        "new = set(sys.modules) - before; "
        "bad = [m for m in ('nltk', 'datasets', 'torch') if m in new]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert pope.__name__ == "attnsteer.evals.pope"
