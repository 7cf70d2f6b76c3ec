"""Terminal output helpers shared by the CLI, the demo and the evaluations (no model code)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import textwrap


def term_width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))


def wrap(text: str, indent: str = "  ", width: int | None = None) -> list[str]:
    """Wrap each paragraph of ``text`` (kept line breaks) with a hanging ``indent``."""
    width = width or term_width()
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        if not para.strip():
            lines.append(indent.rstrip())
            continue
        lines.extend(
            textwrap.wrap(
                para,
                width=width,
                initial_indent=indent,
                subsequent_indent=indent,
                break_on_hyphens=False,
                replace_whitespace=False,
                drop_whitespace=True,
            )
            or [indent.rstrip()]
        )
    return lines


def wrap_items(
    prefix: str, items: list[str], indent: str = "  ", sep: str = "  ", width: int | None = None
) -> list[str]:
    """``indent + prefix`` followed by ``items`` packed into lines; an item is never split."""
    width = width or term_width()
    lines, line = [], indent + prefix
    cont = indent + " " * min(len(prefix), 4)
    for i, item in enumerate(items):
        piece = item if i == 0 else sep + item
        if i > 0 and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line, piece = cont + item, ""
        line += piece
    lines.append(line.rstrip())
    return lines


@contextlib.contextmanager
def quiet_transformers():
    """No weight-loading progress bars or advisory logs from transformers inside the block
    (the previous settings come back afterwards, so in-process callers are not affected)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_logger = logging.getLogger("huggingface_hub")  # download retries log there
    hub_level = hub_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logger.setLevel(hub_level)
        if bars:
            hf_logging.enable_progress_bar()


_OPENERS, _CLOSERS = "([{", ")]}"
_ABBREVIATIONS = {"e.g", "i.e", "vs", "cf", "al", "fig", "eq", "approx"}


def one_line(text: str, width: int, ellipsis: str = "\u2026") -> str:
    """The first sentence of ``text`` on one line of at most ``width`` characters.

    The sentence ends at the first ``. ``, ``: `` or ``; `` outside brackets and backticks (so
    ``(p keeps 0.6, i.e. moves 0.4)`` is never split). A longer sentence is cut at the last word
    boundary where no bracket or backtick is open and marked with ``ellipsis``; brackets in the
    result are always balanced."""
    text = " ".join((text or "").split())
    width = max(1, width)
    stack: list[str] = []  # open brackets / backtick before position i
    balanced_spaces: list[int] = []  # spaces with nothing open: where a cut keeps brackets balanced
    end = len(text)
    for i, ch in enumerate(text):
        if stack and stack[-1] == "`":
            if ch == "`":
                stack.pop()
            continue
        if ch == "`" or ch in _OPENERS:
            stack.append(ch)
        elif ch in _CLOSERS:
            if stack and stack[-1] == _OPENERS[_CLOSERS.index(ch)]:
                stack.pop()
        elif not stack and ch == " ":
            balanced_spaces.append(i)
        elif not stack and ch in ".:;" and text[i + 1 : i + 2] == " ":
            word = text[:i].rsplit(" ", 1)[-1].lower()
            if ch != "." or word not in _ABBREVIATIONS:
                end = i
                break
    sentence = text[:end].rstrip(".")
    if len(sentence) <= width:
        return sentence
    trailing = " ,;:-\u2013"
    for i in reversed(balanced_spaces):
        head = sentence[:i].rstrip(trailing)
        if head and i < len(sentence) and len(head) + len(ellipsis) <= width:
            return head + ellipsis
    # no word boundary outside brackets fits: cut inside and close what is open
    head, closing = sentence[: max(0, width - len(ellipsis))], ""
    while True:
        opened: list[str] = []
        for ch in head:
            if opened and opened[-1] == "`":
                if ch == "`":
                    opened.pop()
            elif ch == "`" or ch in _OPENERS:
                opened.append(ch)
            elif ch in _CLOSERS and opened and opened[-1] == _OPENERS[_CLOSERS.index(ch)]:
                opened.pop()
        closing = "".join("`" if c == "`" else _CLOSERS[_OPENERS.index(c)] for c in reversed(opened))
        if len(head) + len(ellipsis) + len(closing) <= width or not head:
            break
        head = head[:-1]
    return head.rstrip(trailing) + ellipsis + closing
