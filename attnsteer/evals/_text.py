"""Small text helpers shared by the POPE and CHAIR scorers (pure Python, no third-party imports).

* :func:`file_sha256` -- hash of a file's bytes, written into results to pin data files.
* :func:`read_json_records` -- read a JSON array *or* JSON Lines file (LF or CRLF) into a list of dicts.
* :func:`split_sentences` -- a rule-based sentence splitter that behaves like NLTK's Punkt on
  ordinary English captions (split after ``.``, ``!`` or ``?`` followed by white space).
* :func:`word_tokenize` -- a Penn-Treebank-style word tokeniser modelled on the behaviour of
  ``nltk.word_tokenize`` (which is Punkt sentence splitting + the NLTK Treebank tokeniser), written
  from the documented behaviour so that it needs no NLTK data. Differences from NLTK are limited to
  rare cases (abbreviations that Punkt knows, exotic quoting); they only change token counts, not
  which words are found.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

PathLike = str | Path

__all__ = [
    "file_sha256",
    "read_json_records",
    "split_sentences",
    "word_tokenize",
]


def file_sha256(path: PathLike) -> str:
    """Return the SHA-256 hex digest of the file's raw bytes (as stored, line endings included)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_records(path: PathLike) -> list[dict[str, Any]]:
    """Read ``path`` as a JSON array of objects or as JSON Lines (one object per line).

    The format is detected from the first non-white-space character (``[`` means a JSON array),
    not from the file extension: POPE's ``coco_pope_*.json`` files are JSON Lines despite their
    name. CRLF line endings and blank lines are accepted. A UTF-8 byte-order mark is ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line (or the array) is not valid JSON, or a record is not a JSON object;
            the message names the file and the 1-based line number.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    text = p.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        records = data
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(f"{p}: element {i} of the JSON array is {type(rec).__name__}, expected an object")
        return list(records)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: not valid JSON ({e}); expected one JSON object per line") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------

# Abbreviations after which a period does not end a sentence (lower-case, without the final '.').
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof vs etc e.g i.e approx no fig inc ltd co mt ft".split())

# A sentence ends at '.', '!' or '?' (possibly repeated, e.g. '...' or '?!'), optionally followed by
# closing quotes/brackets, when white space or the end of the text follows.
_SENT_END = re.compile(r"""[.!?]+["'\)\]\}\u201d\u2019]*(?=\s|$)""")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (white space around each sentence stripped, empties dropped).

    A boundary is a run of ``.``/``!``/``?`` (plus closing quotes or brackets) followed by white
    space or the end of the text, except after a known abbreviation (``Mr.``, ``e.g.``, ...) or a
    single letter initial. Text after the last terminator is returned as a final (incomplete)
    sentence.
    """
    sentences: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        if m.group(0).startswith(".") and m.group(0).rstrip("\"')]}\u201d\u2019") == ".":
            # look at the word before the period
            before = text[start : m.start()]
            word = re.split(r"\s", before)[-1].lower() if before else ""
            word = word.lstrip("\"'([{\u201c\u2018")
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sent = text[start:end].strip()
        if sent:
            sentences.append(sent)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# ---------------------------------------------------------------------------------------------
# Treebank-style word tokeniser
# ---------------------------------------------------------------------------------------------

_RE_START_QUOTE = re.compile(r'^"')
_RE_QUOTE_AFTER_OPEN = re.compile(r'(?<=[\s(\[{<])"')
_RE_ELLIPSIS = re.compile(r"\.\.\.")
_RE_COMMA_COLON = re.compile(r"([:,])(?!\d)")  # ',' or ':' not followed by a digit
_RE_COMMA_COLON_END = re.compile(r"([:,])$")
_RE_MISC_PUNCT = re.compile(r"([;@#$%&?!\[\](){}<>])")
_RE_DASHES = re.compile(r"--")
_RE_FINAL_PERIOD = re.compile(r"""([^.])(\.+)([\]\)}>"']*)\s*$""")
_RE_CURLY_APOSTROPHE = re.compile("\u2019")
_RE_END_QUOTE = re.compile(r'"')
_RE_CLITIC_1 = re.compile(r"([^' ])('[sSmMdD]|') ")
_RE_CLITIC_2 = re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")
_RE_CONTRACTIONS = [
    re.compile(r"(?i)\b(can)(not)\b"),
    re.compile(r"(?i)\b(gon)(na)\b"),
    re.compile(r"(?i)\b(got)(ta)\b"),
    re.compile(r"(?i)\b(wan)(na)\b"),
]


def _tokenize_sentence(text: str) -> list[str]:
    text = _RE_START_QUOTE.sub(" `` ", text)
    text = _RE_QUOTE_AFTER_OPEN.sub(" `` ", text)
    text = _RE_ELLIPSIS.sub(" ... ", text)
    text = _RE_COMMA_COLON.sub(r" \1 ", text)
    text = _RE_COMMA_COLON_END.sub(r" \1 ", text)
    text = _RE_MISC_PUNCT.sub(r" \1 ", text)
    text = _RE_DASHES.sub(" -- ", text)
    text = _RE_FINAL_PERIOD.sub(r"\1 \2\3 ", text)
    text = _RE_END_QUOTE.sub(" '' ", text)
    text = _RE_CURLY_APOSTROPHE.sub(" \u2019 ", text)
    text = " " + text + " "
    text = _RE_CLITIC_1.sub(r"\1 \2 ", text)
    text = _RE_CLITIC_2.sub(r"\1 \2 ", text)
    for rx in _RE_CONTRACTIONS:
        text = rx.sub(r"\1 \2", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Tokenise ``text`` into words and punctuation, Treebank style.

    ``"The dog's bowl, isn't it?"`` -> ``['The', 'dog', "'s", 'bowl', ',', 'is', "n't", 'it', '?']``.
    Sentence-final periods become their own token; periods inside a sentence (``e.g.``, ``3.5``)
    stay attached, as with ``nltk.word_tokenize``. Hyphenated words stay whole.
    """
    tokens: list[str] = []
    for sent in split_sentences(text):
        tokens.extend(_tokenize_sentence(sent))
    return tokens
