"""Evaluations: one core (:func:`run`) for every benchmark, each a task object with a typed config.

    from attnsteer.evals import RunConfig, run
    from attnsteer.evals.tasks import PopeConfig, PopeTask

    results = run(model, processor, PopeTask(PopeConfig(pope_dir=..., coco_dir=...)), ["none", "var-llava15"],
                  RunConfig(limit=100, output_path="runs/pope"))

Nothing here is imported by ``import attnsteer``; each module loads its own dependencies.
"""

from __future__ import annotations

from .config import RunConfig
from .core import Results, run

__all__ = ["Results", "RunConfig", "run"]
