"""The benchmarks as task objects, each with its typed config: POPE, CHAIR, lm-eval (MMLU)."""

from __future__ import annotations

from .chair import ChairConfig, ChairTask
from .mmlu import MMLUConfig, MMLUTask
from .pope import PopeConfig, PopeTask

TASKS = {"pope": PopeTask, "chair": ChairTask, "mmlu": MMLUTask}

__all__ = ["TASKS", "ChairConfig", "ChairTask", "MMLUConfig", "MMLUTask", "PopeConfig", "PopeTask"]
