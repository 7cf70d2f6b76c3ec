"""Whether the Hugging Face Hub can be used right now: the offline switch, and a bounded probe.

A download attempt with no network retries for tens of seconds before it fails; callers ask here
first and read the local cache alone (``local_files_only=True``) when the Hub is unusable. Nothing
here sets environment variables.
"""

from __future__ import annotations

import os
import time

_TRUTHY = ("1", "on", "yes", "true")
_REACHABLE: dict[str, tuple[float, bool]] = {}  # endpoint -> (when probed, answer)
_REACHABLE_TTL_S = 60.0


def offline_flag() -> bool:
    """``HF_HUB_OFFLINE`` as set now, or as huggingface_hub read it at its import."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing or changed
        return flag


def reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (``HF_ENDPOINT``) opens within ``timeout`` seconds, name
    lookup included (a hanging DNS resolver cannot stretch it). The answer is kept for a minute, so
    the commands that ask more than once pay one probe."""
    import socket
    import threading
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    known = _REACHABLE.get(endpoint)
    if known is not None and time.monotonic() - known[0] < _REACHABLE_TTL_S:
        return known[1]
    url = urlparse(endpoint)
    answer: list[bool] = []

    def probe() -> None:
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout).close()
            answer.append(True)
        except (OSError, TypeError, ValueError):
            answer.append(False)

    thread = threading.Thread(target=probe, name="attnsteer-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    result = bool(answer and answer[0])
    _REACHABLE[endpoint] = (time.monotonic(), result)
    return result


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached: read the cache alone."""
    return offline_flag() or not reachable()
