"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in free-form image captions.

Pure Python; ``import attnsteer.evals.chair`` imports neither NLTK nor torch. NLTK is imported
only when the ``wordnet`` or ``wordnet_noun`` lemmatiser is constructed.

Pipeline (the behaviour of the reference implementations -- LisaAnne/Hallucination ``chair.py``,
its Python 3 port by Maxlinn and OPERA's WordNet variant -- re-implemented here):

1. ``caption.lower()``, tokenised Treebank-style (``nltk.word_tokenize`` for ``wordnet``; the
   data-free re-implementation in :mod:`attnsteer.evals._text` otherwise).
2. Every token is singularised by a pluggable lemmatiser (:data:`LEMMATIZERS`):

   * ``"rules"`` (default, offline): English plural rules + an irregular-noun table, plus a
     table of the verb forms and WordNet quirks that matter for COCO words, emulating the
     ``wordnet`` lineage below without NLTK data (:class:`RulesLemmatizer`).
   * ``"rules_pattern"``: the same plural rules only (nouns only, like ``pattern.en.singularize``
     in the original LisaAnne code and Maxlinn's port).
   * ``"wordnet"``: NLTK POS tags + WordNet lemmatiser, the OPERA / less-is-more / lmms-eval
     lineage (:class:`WordNetPOSLemmatizer`). Needs ``nltk`` plus its ``punkt_tab``,
     ``averaged_perceptron_tagger_eng`` and ``wordnet`` data.
   * ``"wordnet_noun"``: WordNet noun lemmas without a POS tagger (needs only the ``wordnet``
     data, e.g. from Debian's ``wordnet-base``); a diagnostic middle ground.

3. Two-word merges, greedy left to right (:func:`build_double_words`): the COCO two-word names map
   to themselves, ``baby X`` / ``adult X`` -> ``X`` for animal words, ``passenger jet`` -> ``jet``,
   ``passenger train`` -> ``train``, ``bow tie`` -> ``tie``, ``toilet seat`` -> ``toilet``,
   ``wine glas`` -> ``wine glass``. A merge whose result is not in the vocabulary (``home plate``,
   ``train track``, ``motor bike``, ``baby cub``) swallows both words, exactly as in the original.
4. If both ``toilet`` and ``seat`` remain, every ``seat`` is dropped (it would fire *chair*).
5. Every remaining token found in the synonym vocabulary is a *mention*; its canonical category
   is looked up in the synonym file. Mentions are **not** de-duplicated.

Metrics (:meth:`CHAIRScorer.score`), all fractions in [0, 1] except the lengths:

* ``CHAIRs`` = captions with >= 1 hallucinated mention / captions.
* ``CHAIRi`` = hallucinated mentions / all mentions, summed over all captions (a hallucinated
  object named three times counts three times). 0.0 when there are no mentions at all.
* ``Recall`` = sum over captions of |distinct GT categories mentioned| / sum of |GT categories|.
* ``Len`` = mean number of tokens per caption after tokenisation and two-word merging,
  punctuation included (OPERA's ``Len``, which its script prints as this value).
* ``mean_words`` = mean number of white-space separated words per caption.
* ``repetition_rate`` = share of captions containing an exactly repeated sentence
  (:func:`has_repeated_sentence`).

Ground truth per image = its COCO 2014 instance categories + the objects the same pipeline finds
in its reference captions (:func:`build_gt_from_coco`), or a pre-built ground-truth JSON
(:func:`load_gt_json`). The 80-category synonym list is read from a file given by path
(``synonyms.txt`` of LisaAnne/Hallucination; the CLI passes it as ``--synonyms``); no copy of it
lives in this package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import (
    Any,
)

from ._text import read_json_records, split_sentences, word_tokenize

PathLike = str | Path

__all__ = [
    "COCO_DOUBLE_WORDS",
    "ANIMAL_WORDS",
    "VEHICLE_WORDS",
    "LEMMATIZERS",
    "NLTK_DOWNLOAD_COMMAND",
    "COCO_ANNOTATIONS_HELP",
    "Synonyms",
    "load_synonyms",
    "build_double_words",
    "singularize",
    "RulesLemmatizer",
    "WordNetPOSLemmatizer",
    "WordNetNounLemmatizer",
    "LemmatizerUnavailable",
    "get_lemmatizer",
    "CaptionParse",
    "CaptionRecord",
    "CHAIRResult",
    "CHAIRScorer",
    "load_gt_json",
    "build_gt_from_coco",
    "build_gt_from_coco_dir",
    "parse_coco_image_id",
    "load_caption_log",
    "drop_incomplete_last_sentence",
    "has_repeated_sentence",
]

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

#: COCO names written as two words; each merges into itself. ``stove top oven`` has three words
#: and can never be produced by a two-word merge (kept because the reference list has it).
COCO_DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
#: ``baby X`` and ``adult X`` merge into ``X`` (so that "baby" / "adult" do not fire *person*).
ANIMAL_WORDS: tuple[str, ...] = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
#: ``passenger X`` merges into ``X`` (so that "passenger" does not fire *person*).
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")

NLTK_DOWNLOAD_COMMAND = "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet"

COCO_ANNOTATIONS_HELP = (
    "Download the COCO 2014 annotations (annotations_trainval2014.zip from "
    "http://images.cocodataset.org/annotations/annotations_trainval2014.zip), unzip it and pass "
    "instances_train2014.json, instances_val2014.json, captions_train2014.json and "
    "captions_val2014.json (build_gt_from_coco) or the unzipped annotations/ folder "
    "(build_gt_from_coco_dir); or pass a pre-built ground-truth JSON "
    '{"objects": {"<image id>": [names]}} to load_gt_json instead.'
)


def build_double_words() -> dict[str, str]:
    """Return the two-word merge table ``{"w1 w2": replacement}`` used by every CHAIR lineage."""
    table: dict[str, str] = {w: w for w in COCO_DOUBLE_WORDS}
    for a in ANIMAL_WORDS:
        table[f"baby {a}"] = a
        table[f"adult {a}"] = a
    for v in VEHICLE_WORDS:
        table[f"passenger {v}"] = v
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # for singularisers that turn "glass" into "glas"
    return table


@dataclass(frozen=True)
class Synonyms:
    """The CHAIR vocabulary read from a synonym file.

    Attributes:
        categories: canonical category names in file order (80 for the COCO list).
        to_category: surface form -> canonical category (a form listed on several lines maps to
            the last one, as in the reference code).
        vocabulary: every surface form, quirks kept (``" motor bike"`` with its leading space
            and ``"iPhone"`` with its capital can never match a lower-cased token).
        path: the file it was read from, or ``None``.
    """

    categories: tuple[str, ...]
    to_category: Mapping[str, str]
    vocabulary: frozenset[str]
    path: str | None = None


def load_synonyms(path: PathLike) -> Synonyms:
    """Read a CHAIR synonym file: one category per line, ``canonical, synonym, synonym, ...``.

    Each line is stripped and split on ``", "`` (comma + one space), as the reference code does;
    blank lines are skipped.

    Raises:
        FileNotFoundError: with a hint saying where the file comes from.
        ValueError: the file has no category lines.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"CHAIR synonym file not found: {p}. Pass the 80-category list (synonyms.txt from "
            "the LisaAnne/Hallucination repository, data/synonyms.txt) "
            "as synonyms_path= / --synonyms."
        )
    categories: list[str] = []
    to_category: dict[str, str] = {}
    vocab: set = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        entries = line.strip().split(", ")
        if entries == [""]:
            continue
        categories.append(entries[0])
        for e in entries:
            vocab.add(e)
            to_category[e] = entries[0]
    if not categories:
        raise ValueError(f"CHAIR synonym file {p} has no category lines")
    return Synonyms(tuple(categories), dict(to_category), frozenset(vocab), str(p))


# ---------------------------------------------------------------------------------------------
# Lemmatisers
# ---------------------------------------------------------------------------------------------


class LemmatizerUnavailable(RuntimeError):
    """A lemmatiser's optional dependency (NLTK or its data) is missing."""


# plural -> singular for irregular nouns (and a few regular-looking ones the rules would get wrong)
_IRREGULAR_PLURALS: dict[str, str] = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "grandchildren": "grandchild",
    "persons": "person",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "feet": "foot",
    "teeth": "tooth",
    "dice": "die",
    "lice": "louse",
    "cacti": "cactus",
    "fungi": "fungus",
    "knives": "knife",
    "pocketknives": "pocketknife",
    "wives": "wife",
    "lives": "life",
    "wolves": "wolf",
    "calves": "calf",
    "halves": "half",
    "leaves": "leaf",
    "loaves": "loaf",
    "shelves": "shelf",
    "thieves": "thief",
    "scarves": "scarf",
    "hooves": "hoof",
    "elves": "elf",
    "selves": "self",
    "sheaves": "sheaf",
    "wharves": "wharf",
    "dwarves": "dwarf",
    "buses": "bus",
    "minibuses": "minibus",
    "busses": "bus",
    "lenses": "lens",
    "skis": "ski",
    "taxis": "taxi",
    "kiwis": "kiwi",
    "bikinis": "bikini",
    "buffaloes": "buffalo",
    "quizzes": "quiz",
    "criteria": "criterion",
    "phenomena": "phenomenon",
    "taxies": "taxi",
    "zebus": "zebu",
}

# Verb forms that NLTK's tagger labels as verbs in captions and whose WordNet verb lemma is a CHAIR
# vocabulary word ("a man skiing" -> ski -> skis, "seated" -> seat -> chair, "tied" -> tie). Found
# by comparing WordNet verb and noun lemmas over the OPERA caption logs (docs/chair.md); "seating",
# "training", "boating", "kayaking" and "bowling" are left out because in captions they are
# nouns ("providing seating", "a seating area"), which the tagger tags NN.
_VERB_FORMS: dict[str, str] = {
    "skiing": "ski",
    "skied": "ski",
    "seated": "seat",
    "tied": "tie",
    "tying": "tie",
    "skateboarding": "skateboard",
    "skateboarded": "skateboard",
    "snowboarding": "snowboard",
    "snowboarded": "snowboard",
    "grooming": "groom",
    "groomed": "groom",
}

# WordNet 3.0 noun lemmas that differ from plain singularisation for CHAIR vocabulary words:
# "men" is itself a WordNet noun (so it stays "men", which is not in the vocabulary), "vases"
# becomes "vas", and plurals of words WordNet does not list stay plural (so they are not
# mentions). Measured with WordNetLemmatizer on every vocabulary word's regular plurals.
_WORDNET_NOUN_QUIRKS: dict[str, str] = {
    "men": "men",
    "vases": "vas",
    **{
        w: w
        for w in """bikers bluejays brindles coworkers firetrucks hairdryers lenovos longboards
    macbooks netbooks paddleboats pitbulls riverboats sailboards shortboards skimboards
    smartphones soliders stovetops teddybears televisons""".split()
    },
}
# words that look plural (or end in s) but are left unchanged
_INVARIANT: frozenset[str] = frozenset(
    """sheep deer fish cattle bison moose swine salmon trout offspring aircraft series species
    scissors pants jeans trousers shorts clothes news police people physics politics
    this his is has was its us yes as gas plus bus tennis axis iris chassis pelvis trellis oasis
    debris lens always perhaps sometimes whereas towards afterwards upwards downwards backwards
    christmas""".split()
)
_IES_KEEP: frozenset[str] = frozenset(
    """movies cookies ties neckties bowties pies lies dies hippies zombies goalies rookies selfies
    smoothies veggies collies brownies hoodies aussies birdies calories genies budgies bookies
    freebies groupies junkies magpies pixies prairies sweeties yuppies newbies talkies boogies
    eyries cowries lingeries kiddies walkies""".split()
)
_OES_KEEP: frozenset[str] = frozenset(
    """shoes toes canoes hoes oboes floes foes does goes horseshoes tiptoes snowshoes mistletoes
    throes""".split()
)
_CHES_KEEP: frozenset[str] = frozenset(
    """aches headaches toothaches earaches backaches stomachaches mustaches moustaches niches
    caches cliches avalanches quiches psyches""".split()
)
_USES_KEEP_E: frozenset[str] = frozenset("causes muses fuses excuses abuses refuses uses".split())
_US_PLURALS: frozenset[str] = frozenset("menus emus gnus tutus haikus".split())
_MEN_NOT_PLURAL: frozenset[str] = frozenset("omen amen specimen abdomen semen stamen regimen ramen yemen hymen".split())


def singularize(word: str) -> str:
    """Singularise one lower-case English word by rule (nouns only; other words pass through).

    ``dogs`` -> ``dog``, ``benches`` -> ``bench``, ``ponies`` -> ``pony``, ``knives`` -> ``knife``,
    ``buses`` -> ``bus``, ``glasses`` -> ``glass``, ``policemen`` -> ``policeman``,
    ``people``/``sheep``/``scissors``/``tennis`` unchanged. Tokens that are not purely alphabetic
    (punctuation, ``'s``, hyphenated words, numbers) are returned unchanged.
    """
    w = word
    if len(w) < 3 or not w.isalpha() or not w.islower():
        return w
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    if w in _INVARIANT:
        return w
    if w.endswith("women"):
        return w[:-5] + "woman"
    if w.endswith("men") and len(w) > 4 and w not in _MEN_NOT_PLURAL:
        return w[:-3] + "man"
    if w.endswith("children"):
        return w[:-8] + "child"
    if not w.endswith("s"):
        return w
    if w.endswith("ss"):
        return w
    if w.endswith("us"):
        return w[:-1] if w in _US_PLURALS else w
    if w.endswith("is"):
        return w if (w.endswith("sis") or len(w) <= 3) else w[:-1]
    if w.endswith("ies"):
        if w in _IES_KEEP or len(w) <= 4:
            return w[:-1]
        return w[:-3] + "y"
    if w.endswith("oes"):
        return w[:-1] if w in _OES_KEEP else w[:-2]
    if w.endswith("sses"):
        return w[:-2]
    if w.endswith("uses"):
        if w.endswith("ouses") or w in _USES_KEEP_E:
            return w[:-1]
        return w[:-2]
    if w.endswith(("ches", "shes")):
        return w[:-1] if w in _CHES_KEEP else w[:-2]
    if w.endswith("xes"):
        return w[:-2]
    if w.endswith("zzes"):
        return w[:-2]
    if w.endswith("ys"):
        return w[:-1]
    return w[:-1]


class RulesLemmatizer:
    """Offline lemmatiser: :func:`word_tokenize` + :func:`singularize`, in one of two lineages.

    Args:
        lineage: ``"wordnet"`` (default; registered as ``"rules"``) emulates the NLTK POS-tag +
            WordNet pipeline of OPERA / less-is-more / lmms-eval, which most papers use: besides
            plural nouns it lemmatises the few verb forms whose base is a COCO word and that the
            tagger tags as verbs in captions (``skiing`` -> ``ski``, ``seated`` -> ``seat``,
            ``tied`` -> ``tie``, ...), and it reproduces WordNet's dictionary quirks on
            vocabulary words (``men`` stays ``men``, ``vases`` -> ``vas``, plurals WordNet does not
            list stay plural). ``"pattern"`` (registered as ``"rules_pattern"``) singularises
            nouns only, like ``pattern.en.singularize`` in the original CHAIR code and Maxlinn's
            port.

    Without a POS tagger the verb handling is a fixed table, so a caption that uses one of those
    forms as a noun is still lemmatised; ``docs/chair.md`` gives the measured residual difference.
    """

    def __init__(self, lineage: str = "wordnet") -> None:
        if lineage not in ("wordnet", "pattern"):
            raise ValueError(f"lineage must be 'wordnet' or 'pattern', got {lineage!r}")
        self.lineage = lineage
        self.name = "rules" if lineage == "wordnet" else "rules_pattern"
        self._extra: dict[str, str] = {**_VERB_FORMS, **_WORDNET_NOUN_QUIRKS} if lineage == "wordnet" else {}

    def tokenize(self, text: str) -> list[str]:
        return word_tokenize(text)

    def lemmatize(self, tokens: Sequence[str]) -> list[str]:
        extra = self._extra
        return [extra.get(t) or _singularize_cached(t) for t in tokens]


@lru_cache(maxsize=65536)
def _singularize_cached(token: str) -> str:
    return singularize(token)


def _import_nltk(purpose: str):
    try:
        import nltk  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LemmatizerUnavailable(
            f"the {purpose!r} lemmatiser needs NLTK: pip install nltk, then {NLTK_DOWNLOAD_COMMAND}. "
            "Offline, use lemmatizer='rules'."
        ) from e
    return nltk


class WordNetPOSLemmatizer:
    """``nltk.word_tokenize`` + ``nltk.pos_tag`` + ``WordNetLemmatizer`` (OPERA / lmms-eval lineage).

    The Penn tag selects the WordNet part of speech: ``J*`` adjective, ``V*`` verb, ``N*`` noun,
    ``R*`` adverb, anything else noun.

    Raises:
        LemmatizerUnavailable: NLTK or one of its data packages (``punkt_tab``,
            ``averaged_perceptron_tagger_eng``, ``wordnet``) is missing; the message names the
            ``python -m nltk.downloader ...`` command.
    """

    name = "wordnet"

    def __init__(self) -> None:
        nltk = _import_nltk("wordnet")
        from nltk.stem import WordNetLemmatizer

        missing = []
        try:
            nltk.word_tokenize("A dog. A cat.")
        except LookupError:
            missing.append("punkt_tab (sentence splitter used by nltk.word_tokenize)")
        try:
            nltk.pos_tag(["a", "dog"])
        except LookupError:
            missing.append("averaged_perceptron_tagger_eng (POS tagger)")
        self._wnl = WordNetLemmatizer()
        try:
            self._wnl.lemmatize("dogs")
        except LookupError:
            missing.append("wordnet (WordNet database)")
        if missing:
            raise LemmatizerUnavailable(
                "the 'wordnet' lemmatiser needs NLTK data that is not installed: "
                + "; ".join(missing)
                + f". Install it with `{NLTK_DOWNLOAD_COMMAND}` (or point NLTK_DATA at a folder "
                "that has it); offline, use lemmatizer='rules'."
            )
        self._nltk = nltk

    def tokenize(self, text: str) -> list[str]:
        return self._nltk.word_tokenize(text)

    def lemmatize(self, tokens: Sequence[str]) -> list[str]:
        out = []
        for tok, tag in self._nltk.pos_tag(list(tokens)):
            if tag.startswith("J"):
                pos = "a"
            elif tag.startswith("V"):
                pos = "v"
            elif tag.startswith("R"):
                pos = "r"
            else:
                pos = "n"
            out.append(self._wnl.lemmatize(tok, pos=pos))
        return out


class WordNetNounLemmatizer:
    """WordNet noun lemmas for every token, without a POS tagger (needs only the ``wordnet`` data).

    Uses this package's tokeniser (no ``punkt_tab`` needed). A diagnostic between ``rules`` and
    ``wordnet``: it has WordNet's exception lists and dictionary (a plural that WordNet does not
    know, e.g. "snowboarders", stays plural) but never lemmatises verbs.

    Raises:
        LemmatizerUnavailable: NLTK or its ``wordnet`` data is missing.
    """

    name = "wordnet_noun"

    def __init__(self) -> None:
        _import_nltk("wordnet_noun")
        from nltk.stem import WordNetLemmatizer

        self._wnl = WordNetLemmatizer()
        try:
            self._wnl.lemmatize("dogs")
        except LookupError as e:
            raise LemmatizerUnavailable(
                "the 'wordnet_noun' lemmatiser needs the NLTK 'wordnet' data: "
                "python -m nltk.downloader wordnet (or NLTK_DATA pointing at a folder with "
                "corpora/wordnet); offline, use lemmatizer='rules'."
            ) from e
        self._cache: dict[str, str] = {}

    def tokenize(self, text: str) -> list[str]:
        return word_tokenize(text)

    def lemmatize(self, tokens: Sequence[str]) -> list[str]:
        out = []
        for t in tokens:
            lem = self._cache.get(t)
            if lem is None:
                lem = self._wnl.lemmatize(t)
                self._cache[t] = lem
            out.append(lem)
        return out


#: name -> lemmatiser class; :func:`get_lemmatizer` builds one by name.
LEMMATIZERS: dict[str, Callable[[], Any]] = {
    "rules": RulesLemmatizer,
    "rules_pattern": lambda: RulesLemmatizer(lineage="pattern"),
    "wordnet": WordNetPOSLemmatizer,
    "wordnet_noun": WordNetNounLemmatizer,
}


def get_lemmatizer(spec: str | Any = "rules"):
    """Return a lemmatiser: a name from :data:`LEMMATIZERS` or an object with ``name``,
    ``tokenize(text) -> list[str]`` and ``lemmatize(tokens) -> list[str]``."""
    if isinstance(spec, str):
        if spec not in LEMMATIZERS:
            raise ValueError(f"unknown lemmatizer {spec!r}; choose one of {sorted(LEMMATIZERS)}")
        return LEMMATIZERS[spec]()
    for attr in ("tokenize", "lemmatize"):
        if not callable(getattr(spec, attr, None)):
            raise TypeError(f"lemmatizer object {spec!r} has no callable {attr}()")
    return spec


# ---------------------------------------------------------------------------------------------
# Caption helpers
# ---------------------------------------------------------------------------------------------

_LAST_TERMINATOR = re.compile(r"""[.!?]["'\)\]\}\u201d\u2019]*(?=\s|$)""")


def drop_incomplete_last_sentence(text: str) -> str:
    """Drop a trailing incomplete sentence (OPERA's rule for the 64-token CHAIR setting).

    Keeps the text up to and including the last sentence terminator (``.``, ``!`` or ``?``,
    plus closing quotes/brackets) that is followed by white space or the end of the text.
    Text that already ends with a terminator is returned unchanged (right-stripped); text with no
    complete sentence at all becomes ``""`` (as OPERA's ``cap[:cap.rfind('.') + 1]`` does).
    """
    stripped = text.rstrip()
    last = None
    for m in _LAST_TERMINATOR.finditer(stripped):
        last = m
    if last is None:
        return ""
    return stripped[: last.end()]


def has_repeated_sentence(text: str) -> bool:
    """True when some sentence occurs at least twice in ``text`` (after collapsing white space;
    case and punctuation must match exactly)."""
    seen = set()
    for s in split_sentences(text):
        key = " ".join(s.split())
        if key in seen:
            return True
        seen.add(key)
    return False


_COCO_ID = re.compile(r"(\d+)(?:\.\w+)?$")


def parse_coco_image_id(value: Any) -> int:
    """``310196``, ``"310196"``, ``"000000310196.jpg"`` or ``"COCO_val2014_000000310196.jpg"`` -> 310196.

    Raises:
        ValueError: the value has no trailing number.
    """
    if isinstance(value, bool):
        raise ValueError(f"image id {value!r} is not a COCO image id")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = _COCO_ID.search(str(value).strip())
    if not m:
        raise ValueError(
            f"cannot read a COCO image id from {value!r}; expected an int, digits, "
            "'000000310196.jpg' or 'COCO_val2014_000000310196.jpg'"
        )
    return int(m.group(1))


@dataclass(frozen=True)
class CaptionRecord:
    """One generated caption: COCO ``image_id`` (int) and the ``caption`` text."""

    image_id: int
    caption: str


_ID_KEYS = ("image_id", "image", "imid", "img_id")
_CAPTION_KEYS = ("caption", "text", "output", "answer", "response")


def load_caption_log(
    path: PathLike,
    image_id_key: str | None = None,
    caption_key: str | None = None,
) -> list[CaptionRecord]:
    """Read a caption log (JSON Lines or a JSON array of objects).

    Supported shapes (keys auto-detected when not given):

    * OPERA / Maxlinn: ``{"image_id": 226988, "caption": "..."}``.
    * less-is-more (LLaVA ``model_vqa`` outputs and their own logs): ``{"image_id":
      "000000002239.jpg", "text": "...", ...}``; ``question_id``/``prompt``/``model_id`` ignored.
    * anything with an id under ``image_id``/``image``/``imid``/``img_id`` and the text under
      ``caption``/``text``/``output``/``answer``/``response``.

    Image ids are normalised with :func:`parse_coco_image_id`.

    Raises:
        ValueError: a record lacks the id or caption key (the message names the record and the
            keys it has), or a caption is not a string.
    """
    records = read_json_records(path)
    out: list[CaptionRecord] = []
    for i, rec in enumerate(records):
        id_key = image_id_key or next((k for k in _ID_KEYS if k in rec), None)
        cap_key = caption_key or next((k for k in _CAPTION_KEYS if k in rec), None)
        if id_key is None or id_key not in rec:
            raise ValueError(
                f"{path}: record {i} has no image id key ({image_id_key or ' / '.join(_ID_KEYS)}); "
                f"its keys are {sorted(rec)}. Pass image_id_key=..."
            )
        if cap_key is None or cap_key not in rec:
            raise ValueError(
                f"{path}: record {i} has no caption key ({caption_key or ' / '.join(_CAPTION_KEYS)}); "
                f"its keys are {sorted(rec)}. Pass caption_key=..."
            )
        cap = rec[cap_key]
        if not isinstance(cap, str):
            raise ValueError(f"{path}: record {i}: {cap_key!r} is {type(cap).__name__}, expected a string")
        out.append(CaptionRecord(parse_coco_image_id(rec[id_key]), cap))
    return out


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------

GroundTruth = dict[int, frozenset[str]]


def load_gt_json(path: PathLike, synonyms: Synonyms | None = None) -> GroundTruth:
    """Read ground-truth object sets: ``{"objects": {"<image id>": [canonical names]}}`` (or the
    bare ``{"<image id>": [...]}`` mapping).

    If ``synonyms`` is given, every name must be a canonical category of it.

    Raises:
        FileNotFoundError: with :data:`COCO_ANNOTATIONS_HELP`.
        ValueError: wrong shape, or a name that is not a category.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ground-truth JSON not found: {p}. {COCO_ANNOTATIONS_HELP}")
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "objects" in data:
        data = data["objects"]
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected {{'objects': {{image_id: [names]}}}}, got {type(data).__name__}")
    cats = set(synonyms.categories) if synonyms is not None else None
    gt: GroundTruth = {}
    for k, names in data.items():
        if not isinstance(names, list):
            raise ValueError(f"{p}: objects[{k!r}] is {type(names).__name__}, expected a list of names")
        if cats is not None:
            bad = [n for n in names if n not in cats]
            if bad:
                raise ValueError(f"{p}: objects[{k!r}] has names that are not CHAIR categories: {bad}")
        gt[parse_coco_image_id(k)] = frozenset(names)
    return gt


def _read_coco_json(path: PathLike, kind: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"COCO {kind} annotation file not found: {p}. {COCO_ANNOTATIONS_HELP}")
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{p}: not a COCO {kind} file (no 'annotations' list)")
    return data


def build_gt_from_coco(
    instances_paths: Sequence[PathLike],
    captions_paths: Sequence[PathLike],
    scorer: CHAIRScorer,
    image_ids: Iterable[int] | None = None,
) -> GroundTruth:
    """Build ground truth from COCO ``instances_*.json`` and ``captions_*.json`` files.

    GT(image) = {canonical name of each instance annotation's category} U {objects that
    ``scorer``'s pipeline finds in each reference caption}. Pass train and val 2014 files to match
    the reference (which builds GT over all of COCO 2014). ``image_ids`` restricts the work to the
    images you will score (much faster; the sets of those images are the same).

    Raises:
        FileNotFoundError: a file is missing (the message says what to download).
        ValueError: a COCO category name is not in the synonym list.
    """
    if isinstance(instances_paths, (str, Path)) or isinstance(captions_paths, (str, Path)):
        raise TypeError("instances_paths and captions_paths must be lists of paths")
    if not instances_paths or not captions_paths:
        raise ValueError(f"need at least one instances and one captions file. {COCO_ANNOTATIONS_HELP}")
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    objects: dict[int, set] = {}

    def annotations(data):
        """(image id, annotation) of the wanted images; every wanted image gets an entry."""
        for img in data.get("images", []):
            if wanted is None or img["id"] in wanted:
                objects.setdefault(int(img["id"]), set())
        for ann in data["annotations"]:
            imid = int(ann["image_id"])
            if wanted is None or imid in wanted:
                yield imid, ann

    for path in instances_paths:
        data = _read_coco_json(path, "instances")
        id_to_name = {c["id"]: c["name"] for c in data.get("categories", [])}
        for imid, ann in annotations(data):
            name = id_to_name.get(ann["category_id"])
            if name is None:
                raise ValueError(f"{path}: category_id {ann['category_id']} is not in its 'categories'")
            cat = scorer.synonyms.to_category.get(name)
            if cat is None:
                raise ValueError(f"{path}: COCO category {name!r} is not in the synonym list {scorer.synonyms.path}")
            objects.setdefault(imid, set()).add(cat)
    for path in captions_paths:
        for imid, ann in annotations(_read_coco_json(path, "captions")):
            objects.setdefault(imid, set()).update(scorer.caption_to_objects(ann["caption"]).objects)
    return {k: frozenset(v) for k, v in objects.items()}


def build_gt_from_coco_dir(
    annotations_dir: PathLike,
    scorer: CHAIRScorer,
    splits: Sequence[str] = ("train", "val"),
    image_ids: Iterable[int] | None = None,
) -> GroundTruth:
    """:func:`build_gt_from_coco` on ``<dir>/instances_<split>2014.json`` and
    ``<dir>/captions_<split>2014.json`` for each split (default train and val, like the reference).

    Raises:
        FileNotFoundError: lists every missing file and says what to download.
    """
    d = Path(annotations_dir)
    inst = [d / f"instances_{s}2014.json" for s in splits]
    caps = [d / f"captions_{s}2014.json" for s in splits]
    missing = [str(p) for p in inst + caps if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing COCO annotation files: {missing}. {COCO_ANNOTATIONS_HELP}")
    return build_gt_from_coco(inst, caps, scorer, image_ids=image_ids)


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptionParse:
    """What the pipeline finds in one caption.

    Attributes:
        tokens: tokens after lemmatisation and two-word merging (``Len`` counts these).
        mentions: the vocabulary words found, in order, repeats kept (e.g. ``"child"``).
        objects: canonical category of each mention (e.g. ``"person"``), same length.
        positions: index of each mention in ``tokens``.
    """

    tokens: list[str]
    mentions: list[str]
    objects: list[str]
    positions: list[int]


@dataclass
class CHAIRResult:
    """Output of :meth:`CHAIRScorer.score`.

    Attributes:
        metrics: ``CHAIRs``, ``CHAIRi``, ``Recall`` (fractions), ``Len`` (mean merged tokens),
            ``mean_words``, ``repetition_rate`` and the raw counts (``n_captions``,
            ``n_hallucinated_captions``, ``n_mentions``, ``n_hallucinated_mentions``,
            ``n_gt_objects``, ``n_recalled_objects``, ``n_truncated``).
        captions: one dict per caption: ``image_id``, ``caption`` (as scored), ``words`` (tokens),
            ``mscoco_generated_words`` (canonical, repeats kept), ``mentions`` (surface forms),
            ``mscoco_gt_words`` (sorted), ``mscoco_hallucinated_words`` ([surface, canonical]
            pairs), ``hallucination_idxs``, ``repeated_sentence`` and ``metrics``.
        config: lemmatiser, synonym file, truncation flag.
    """

    metrics: dict[str, float]
    captions: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"overall_metrics": self.metrics, "config": self.config, "sentences": self.captions}


CaptionLike = CaptionRecord | tuple[Any, str] | Mapping[str, Any]


def _as_record(item: CaptionLike) -> CaptionRecord:
    if isinstance(item, CaptionRecord):
        return item
    if isinstance(item, Mapping):
        imid = next((item[k] for k in _ID_KEYS if k in item), None)
        cap = next((item[k] for k in _CAPTION_KEYS if k in item), None)
        if imid is None or cap is None:
            raise ValueError(f"caption record {dict(item)!r} needs an image id and a caption key")
        return CaptionRecord(parse_coco_image_id(imid), cap)
    imid, cap = item
    return CaptionRecord(parse_coco_image_id(imid), cap)


class CHAIRScorer:
    """Scores captions with CHAIR.

    Args:
        synonyms_path: the 80-category synonym file (``synonyms.txt``); required, no copy ships
            with the package.
        lemmatizer: ``"rules"`` (default, offline), ``"rules_pattern"``, ``"wordnet"``,
            ``"wordnet_noun"`` or an object
            with ``name``, ``tokenize`` and ``lemmatize`` (see :func:`get_lemmatizer`).

    Example::

        scorer = CHAIRScorer("data/chair/synonyms.txt")
        gt = load_gt_json("data/chair/gt_coco2014.json")
        result = scorer.score(load_caption_log("greedy.jsonl"), gt)
        result.metrics["CHAIRs"], result.metrics["CHAIRi"]
    """

    def __init__(self, synonyms_path: PathLike, lemmatizer: str | Any = "rules") -> None:
        self.synonyms = load_synonyms(synonyms_path)
        self.lemmatizer = get_lemmatizer(lemmatizer)
        self.double_words = build_double_words()

    @property
    def lemmatizer_name(self) -> str:
        return getattr(self.lemmatizer, "name", type(self.lemmatizer).__name__)

    def caption_to_objects(self, caption: str) -> CaptionParse:
        """Run the CHAIR pipeline on one caption (see the module docstring)."""
        words = self.lemmatizer.lemmatize(self.lemmatizer.tokenize(caption.lower()))
        merged: list[str] = []
        i, n = 0, len(words)
        while i < n:
            if i + 1 < n:
                repl = self.double_words.get(words[i] + " " + words[i + 1])
                if repl is not None:
                    merged.append(repl)
                    i += 2
                    continue
            merged.append(words[i])
            i += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        vocab = self.synonyms.vocabulary
        to_cat = self.synonyms.to_category
        mentions, objects, positions = [], [], []
        for idx, w in enumerate(merged):
            if w in vocab:
                mentions.append(w)
                objects.append(to_cat[w])
                positions.append(idx)
        tokens = merged
        return CaptionParse(tokens, mentions, objects, positions)

    def score(
        self,
        captions: Iterable[CaptionLike],
        gt: Mapping[int, Iterable[str]],
        drop_incomplete: bool = False,
        missing_gt: str = "error",
    ) -> CHAIRResult:
        """Score captions against ground truth.

        Args:
            captions: :class:`CaptionRecord` objects, ``(image_id, caption)`` pairs or dicts
                (as read by :func:`load_caption_log`).
            gt: image id -> canonical object names (:func:`load_gt_json`, :func:`build_gt_from_coco`).
            drop_incomplete: apply :func:`drop_incomplete_last_sentence` first (the 64-token
                setting).
            missing_gt: ``"error"`` (default) raises if an image id has no GT entry; ``"empty"``
                treats it as an image with no objects (the reference code's silent behaviour).

        Returns:
            :class:`CHAIRResult`.
        """
        if missing_gt not in ("error", "empty"):
            raise ValueError(f"missing_gt must be 'error' or 'empty', got {missing_gt!r}")
        records = [_as_record(c) for c in captions]
        if missing_gt == "error":
            missing = sorted({r.image_id for r in records if r.image_id not in gt})
            if missing:
                raise KeyError(
                    f"{len(missing)} image ids have no ground truth (first: {missing[:5]}); check the "
                    "ids or pass missing_gt='empty'"
                )
        n_caps = n_hall_caps = n_mentions = n_hall = n_gt = n_rec = n_rep = n_trunc = 0
        total_tokens = total_words = 0
        details: list[dict[str, Any]] = []
        for rec in records:
            cap = rec.caption
            if drop_incomplete:
                new = drop_incomplete_last_sentence(cap)
                n_trunc += int(new != cap.rstrip())
                cap = new
            parse = self.caption_to_objects(cap)
            gt_objs = frozenset(gt.get(rec.image_id, ()))
            hallucinated = []
            hall_idxs = []
            recalled = set()
            for m, o, pos in zip(parse.mentions, parse.objects, parse.positions):
                if o in gt_objs:
                    recalled.add(o)
                else:
                    hallucinated.append([m, o])
                    hall_idxs.append(pos)
            repeated = has_repeated_sentence(cap)
            n_caps += 1
            n_hall_caps += int(bool(hallucinated))
            n_mentions += len(parse.objects)
            n_hall += len(hallucinated)
            n_gt += len(gt_objs)
            n_rec += len(recalled)
            n_rep += int(repeated)
            total_tokens += len(parse.tokens)
            total_words += len(cap.split())
            details.append(
                {
                    "image_id": rec.image_id,
                    "caption": cap,
                    "words": parse.tokens,
                    "mentions": parse.mentions,
                    "mscoco_generated_words": parse.objects,
                    "mscoco_gt_words": sorted(gt_objs),
                    "mscoco_hallucinated_words": hallucinated,
                    "hallucination_idxs": hall_idxs,
                    "repeated_sentence": repeated,
                    "metrics": {
                        "CHAIRs": int(bool(hallucinated)),
                        "CHAIRi": len(hallucinated) / len(parse.objects) if parse.objects else 0.0,
                        "Recall": len(recalled) / len(gt_objs) if gt_objs else 0.0,
                        "Len": len(parse.tokens),
                    },
                }
            )
        metrics = {
            "CHAIRs": n_hall_caps / n_caps if n_caps else 0.0,
            "CHAIRi": n_hall / n_mentions if n_mentions else 0.0,
            "Recall": n_rec / n_gt if n_gt else 0.0,
            "Len": total_tokens / n_caps if n_caps else 0.0,
            "mean_words": total_words / n_caps if n_caps else 0.0,
            "repetition_rate": n_rep / n_caps if n_caps else 0.0,
            "n_captions": n_caps,
            "n_hallucinated_captions": n_hall_caps,
            "n_mentions": n_mentions,
            "n_hallucinated_mentions": n_hall,
            "n_gt_objects": n_gt,
            "n_recalled_objects": n_rec,
            "n_truncated": n_trunc,
        }
        config = {
            "lemmatizer": self.lemmatizer_name,
            "synonyms": self.synonyms.path,
            "drop_incomplete_last_sentence": bool(drop_incomplete),
            "missing_gt": missing_gt,
        }
        return CHAIRResult(metrics, details, config)
