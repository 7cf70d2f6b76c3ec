"""This process in an ``accelerate launch`` run (or the only one): rank, world size, sharding."""

from __future__ import annotations

import os
from collections.abc import Sequence


def use_cpu_processes() -> bool:
    """Whether the processes of a launch run on the CPU (gloo): asked for (``accelerate launch --cpu``
    sets ACCELERATE_USE_CPU), or no CUDA device exists. Without it accelerate leaves a torchrun-style
    launch (``accelerate launch --multi_gpu`` or ``torchrun``) on a CPU-only machine undistributed."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


class Dist:
    """This process in an ``accelerate launch`` run (or the only one).

    GPUs: ``accelerate launch --num_processes N -m attnsteer.cli eval ...``. CPU-only machines:
    ``accelerate launch --multi_gpu --num_processes N ...`` or ``torchrun --nproc_per_node N -m
    attnsteer.cli eval ...`` (``accelerate launch --cpu`` starts several CPU processes only through
    MPI); the processes then talk over gloo."""

    def __init__(self):
        self._state = None
        try:
            from accelerate import PartialState

            self._state = PartialState(cpu=use_cpu_processes())
        except ImportError:  # pragma: no cover - accelerate is a dependency
            self._state = None

    @property
    def rank(self) -> int:
        return self._state.process_index if self._state is not None else 0

    @property
    def world_size(self) -> int:
        return self._state.num_processes if self._state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> str | None:
        """The device this process should use in a multi-process run (None = leave it)."""
        if self._state is None or not self.distributed:
            return None
        return str(self._state.device)

    def barrier(self) -> None:
        if self._state is not None and self.distributed:
            self._state.wait_for_everyone()

    def shard(self, items: Sequence) -> list:
        """The items this process takes: those with ``index % world_size == rank``."""
        return [it for i, it in enumerate(items) if i % self.world_size == self.rank]


def default_device(dist: Dist | None = None) -> str | None:
    """Where a command loads its model when ``--model_args`` names no device: this process's own
    device under a launch, else the GPU when there is one (lm-eval's default), else None (leave it)."""
    import torch

    own = dist.device() if dist is not None else None
    return own or ("cuda" if torch.cuda.is_available() else None)
