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


def first_sentence(text: str, limit: int = 90) -> str:
    """The start of a description up to its first ': ', '. ' or '; ', shortened to ``limit``."""
    text = " ".join((text or "").split())
    cut = len(text)
    for sep in (": ", ". ", "; "):
        i = text.find(sep)
        if 0 < i < cut:
            cut = i
    text = text[:cut].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
