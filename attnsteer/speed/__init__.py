"""Speed benchmark: prefill latency, decode tokens/s and peak memory of steered models against
the unsteered model, in one process (``attnsteer eval speed`` on the command line).

A benchmark tool beside the evaluations, not an evaluation task: no data set, no run directory to
resume; one set of result files per prompt length, which ``attnsteer compare`` reads like any run.

.. code-block:: python

    from attnsteer.speed import SpeedConfig, measure

    records = measure(None, ["act-default"], SpeedConfig(model="llama-tiny", random_weights=True))

Modules, one job each: :mod:`~attnsteer.speed.config` (the settings), :mod:`~attnsteer.speed.models`
(built-in configs, model building, prompts), :mod:`~attnsteer.speed.bench` (the settings resolved
into a model and configurations), :mod:`~attnsteer.speed.timing` (one timed run),
:mod:`~attnsteer.speed.protocol` (the ABBA protocol at one prompt length),
:mod:`~attnsteer.speed.memory` and :mod:`~attnsteer.speed.worker` (peak memory in a fresh process),
:mod:`~attnsteer.speed.machine` (what the results record of the machine), :mod:`~attnsteer.speed.report`
(summary, tables, CSV, chart) and :mod:`~attnsteer.speed.api` (:func:`measure`; the method in
:data:`~attnsteer.speed.api.METHOD`). Nothing here prints: progress lines go to ``measure``'s
``progress`` callback.
"""

from __future__ import annotations

from .api import METHOD, measure
from .config import BACKEND_CHOICES, DTYPES, SpeedConfig, SpeedError
from .models import BUILTIN_CONFIGS, build_model, build_prompt, resolve_config

__all__ = [
    "BACKEND_CHOICES",
    "BUILTIN_CONFIGS",
    "DTYPES",
    "METHOD",
    "SpeedConfig",
    "SpeedError",
    "build_model",
    "build_prompt",
    "measure",
    "resolve_config",
]
