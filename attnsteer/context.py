"""Per-prompt state, kept outside the method objects, in a store keyed by context.

A method object is one intervention on one layer and is shared by every prompt it steers: the
handle's successive prompt batches on the Hugging Face path, every request of a vLLM engine. What
it finds for one prompt -- ACT's sink sets, VAR's hidden-state sinks, VHR's selected heads, the
token roles (image / focus keys) -- lives in a :class:`PromptState`, the state of one *context*:
the handle's current prompt batch, or one vLLM request. Rules read and write it through
``prompt.get(key, name)`` / ``prompt.put(key, name, value)`` with ``key`` their site's
:attr:`attnsteer.methods.base.Method.key` (layer, intervention); backends keep tables they derive
from it (a rule's group ids over the prompt, gathered member lists) with :meth:`PromptState.memo`.

Every tensor stored here has the batch as its first dimension, so :meth:`PromptState.select_rows`
can crop a second stream off the batch or follow beam search's reorders.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from .errors import SteeringError
from .roles import PromptRoles


class PromptState:
    """The state of one context's current prompt (batch rows ``B`` of its prefill).

    roles:        the prompt's token roles (image / focus keys), or None when it has none.
    stream_rows:  B while the prefill batch carries a second stream after the prompts (rows
                  ``[B, 2B)``, VHR's text-only copy), else None.
    """

    def __init__(self, roles: PromptRoles | None = None):
        self.roles = roles
        self.stream_rows: int | None = None
        self._data: dict[tuple[Hashable, str], Any] = {}
        self._memo: dict[Hashable, tuple[tuple, Any]] = {}

    # ---- what rules found for this prompt ----------------------------------------------------------
    def get(self, key: Hashable, name: str, default: Any = None) -> Any:
        return self._data.get((key, name), default)

    def put(self, key: Hashable, name: str, value: Any) -> None:
        self._data[(key, name)] = value

    def require(self, key: Hashable, name: str, who: str, fix: str) -> Any:
        """``get`` that raises, naming ``who`` needs it and the ``fix``, when nothing was stored."""
        value = self._data.get((key, name))
        if value is None:
            raise SteeringError(f"{who} has no {name} for this prompt. Fix: {fix}")
        return value

    # ---- tables backends derive from it ---------------------------------------------------------------
    def memo(self, key: Hashable, depends: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` while the objects ``depends`` names stay the same (compared by
        identity: a table rebuilt by a new prefill, or reordered by beam search, is a new object)."""
        hit = self._memo.get(key)
        if hit is not None and len(hit[0]) == len(depends) and all(a is b for a, b in zip(hit[0], depends)):
            return hit[1]
        value = build()
        self._memo[key] = (tuple(depends), value)
        return value

    # ---- batch rows -----------------------------------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (integer (R,)), in that order, of every per-row tensor."""
        if self.roles is not None:
            self.roles = self.roles.select(index.to(self.roles.image.device))
        for name, value in list(self._data.items()):
            self._data[name] = _select(value, index)
        self._memo.clear()


def _select(value: Any, index: torch.Tensor) -> Any:
    """``value`` for batch rows ``index``: tensors indexed, dicts entry by entry, objects that keep
    rows of their own (a second stream's KV cache) through their ``select_rows(index)``."""
    if isinstance(value, torch.Tensor) and value.dim():
        return value[index.to(value.device)]
    if isinstance(value, dict):
        return {k: _select(v, index) for k, v in value.items()}
    if hasattr(value, "select_rows"):
        value.select_rows(index)
    return value


class ContextStore:
    """Prompt states by context: ``store[context]``; a missing context starts empty. The Hugging
    Face path uses one context per handle (its current prompt batch, replaced at each prefill); the
    vLLM backend one per request id (dropped when the request finishes)."""

    def __init__(self):
        self._states: dict[Hashable, PromptState] = {}

    def __getitem__(self, context: Hashable) -> PromptState:
        state = self._states.get(context)
        if state is None:
            state = self._states[context] = PromptState()
        return state

    def new_prompt(self, context: Hashable, roles: PromptRoles | None = None) -> PromptState:
        """A fresh state for ``context``'s next prompt (nothing of the previous one is kept)."""
        state = self._states[context] = PromptState(roles)
        return state

    def keep_only(self, contexts) -> None:
        """Drop every context not in ``contexts`` (finished requests)."""
        for gone in [c for c in self._states if c not in contexts]:
            del self._states[gone]
