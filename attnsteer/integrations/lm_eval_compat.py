"""Every lm-evaluation-harness internal attnsteer touches, in one module.

lm-eval's public surface (``simple_evaluate``, ``HFLM``, ``TaskManager``, ``register_model``) moves
slowly; the private names below move without notice. Each is used only through a function here, and
``tests/test_lm_eval_compat.py`` checks every one of them on the installed lm-eval, so an lm-eval
release that renames or reshapes one fails that test by name instead of changing results quietly.

Touchpoints (lm-eval 0.4.10 - 0.4.13, the range CI tests):

- ``lm_eval.models.huggingface.pad_and_concat(max_length, tensors, padding_side)``: HFLM pads its
  log-likelihood batches with it; :func:`recording_right_padding` wraps it to learn the true row
  lengths (attnsteer feeds those rows left-padded with a mask).
- ``HFLM._loglikelihood_tokens(requests, disable_tqdm, override_bs)`` and
  ``HFLM._model_call(inps, attn_mask, labels)``: overridden by :class:`AttnsteerLM`.
- ``HFLM._rank`` / ``HFLM._world_size`` / ``HFLM.accelerator``: set by :func:`share_out` for data
  parallelism over ``accelerate launch`` processes on a model the caller loaded.
- ``lm_eval.evaluator.add_env_info`` / ``get_git_commit_hash``: silenced by :func:`quiet` (a slow
  environment dump and a ``git describe`` in the working directory on every call).
- ``lm_eval.api.instance.Instance(request_type, doc, arguments, idx)``: built by
  :func:`loglikelihood_request`.
- ``TaskManager.all_tasks`` / ``all_groups`` / ``all_tags``: read by :func:`known_task_names`.
- ``lm_eval.__main__.cli_evaluate``: lm-eval's command line (:func:`command_line`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import lm_eval.evaluator as _evaluator
import lm_eval.models.huggingface as _hf

HFLM = _hf.HFLM


def version() -> str:
    """The installed lm-eval's version (recorded in results)."""
    from importlib import metadata

    return metadata.version("lm-eval")


@contextlib.contextmanager
def recording_right_padding(record: Callable[[list[int]], None]) -> Iterator[None]:
    """While active, every right-padded batch HFLM builds reports its rows' true lengths to
    ``record`` (a list of ints, one per row) before it is padded."""
    original = _hf.pad_and_concat

    def recording(max_length, tensors, padding_side="right"):
        if padding_side == "right":
            record([int(t.shape[-1]) for t in tensors])
        return original(max_length, tensors, padding_side=padding_side)

    _hf.pad_and_concat = recording
    try:
        yield
    finally:
        _hf.pad_and_concat = original


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside the block: lm-eval logs errors only, and skips its per-call environment dump
    (``torch.utils.collect_env``, slow) and ``git describe`` in the working directory (which prints
    "fatal: not a git repository" outside a checkout); attnsteer's results record versions, machine
    and commit themselves."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    replaced = [
        (name, getattr(_evaluator, name))
        for name in ("add_env_info", "get_git_commit_hash")
        if hasattr(_evaluator, name)
    ]
    silent = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None}
    for name, _ in replaced:
        setattr(_evaluator, name, silent[name])
    try:
        yield
    finally:
        logger.setLevel(level)
        for name, original in replaced:
            setattr(_evaluator, name, original)


def share_out(lm, rank: int, world_size: int, accelerator) -> None:
    """Make ``lm`` (an HFLM on a model the caller loaded, so HFLM did not set up accelerate itself)
    one of ``world_size`` data-parallel processes: lm-eval then gives it every ``world_size``-th
    request and gathers the results on rank 0."""
    lm._rank, lm._world_size, lm.accelerator = rank, world_size, accelerator


def loglikelihood_request(context: str, continuation: str, idx: int):
    """One log-likelihood request, as HFLM's ``loglikelihood`` takes them."""
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=idx)


def task_manager(include_path: list[str], include_defaults: bool):
    """lm-eval's task index over ``include_path`` folders (and its own tasks when ``include_defaults``)."""
    from lm_eval.tasks import TaskManager

    with quiet():
        return TaskManager(include_path=include_path, include_defaults=include_defaults)


def known_task_names(manager) -> set[str]:
    """Every task, group and tag name ``manager`` can run."""
    return set(manager.all_tasks) | set(manager.all_groups) | set(getattr(manager, "all_tags", []) or [])


def simple_evaluate(**kwargs) -> dict | None:
    """``lm_eval.simple_evaluate`` inside :func:`quiet` (None on non-zero ranks)."""
    from lm_eval import simple_evaluate as evaluate

    with quiet():
        return evaluate(**kwargs)


def command_line() -> Callable[[], None]:
    """lm-eval's own command-line entry (reads ``sys.argv``)."""
    from lm_eval.__main__ import cli_evaluate

    return cli_evaluate
