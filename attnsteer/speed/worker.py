"""``python -m attnsteer.speed.worker``: one fresh-process peak-memory measurement.

Reads one JSON request on stdin and writes its answer to the file the request names (see
:mod:`attnsteer.speed.memory`). Spawned by :func:`attnsteer.speed.memory.fresh_memory`; not a
command for people. Importing this module does nothing.
"""

from __future__ import annotations

if __name__ == "__main__":
    import json
    import sys

    from attnsteer.speed.memory import serve

    serve(json.load(sys.stdin))
