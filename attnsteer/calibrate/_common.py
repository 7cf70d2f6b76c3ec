"""What the calibrations share: the ``progress`` callback for log lines, and the checks of their
configs' fields.

The library never prints: the caller passes ``progress`` (``None``: silent); the CLI passes one that
writes each line to stderr. A bad field is a :class:`~attnsteer.errors.UsageError` naming the flag
(the field's command-line name), the value and the fix.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UsageError

Progress = Callable[[str], None]


class LineStream:
    """A write-only text stream that hands each complete line to ``progress`` (dropped when it is
    None): for the library helpers that report to a stream (``attnsteer.models.load_checked``)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            emit(self.progress, line)
        return len(text)

    def flush(self) -> None:
        """Partial lines wait for their newline (``print(..., flush=True)`` writes it first)."""


def emit(progress: Progress | None, line: str) -> None:
    """``progress(line)`` unless the caller asked for silence (``progress=None``)."""
    if progress is not None:
        progress(line)


def check_count(value, flag: str, example: str, *, optional: bool = False) -> None:
    """``value`` a positive int (or None when ``optional``), else a UsageError naming ``flag``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} {value!r}: expected a positive integer. Fix: e.g. {flag} {example}")


def check_number(value, flag: str, example: str) -> None:
    """``value`` an int or float (not a bool), else a UsageError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{flag} {value!r}: expected a number. Fix: e.g. {flag} {example}")
