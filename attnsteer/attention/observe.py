"""Watching attention from inside every decoder layer, steered or not, without full attention maps.

``with observe(model, fn): model(**inputs)`` calls ``fn(layer, module, query, key, attention_mask,
kwargs)`` -- the arguments the layer's attention function receives (query (B, H_q, Q, D), key
(B, H_kv, K, D) after RoPE, the mask transformers built, and the call's keyword arguments, e.g.
``scaling``) -- once per layer and forward. An unsteered model is switched to attnsteer's registered
attention function for the block (layers without a steering site are delegated to the model's
own implementation unchanged, so outputs stay bit-identical) and restored exactly on exit; a
steered model already runs through it.

:class:`LastRows` is such an observer: per layer, the last query row's attention weights per head,
computed from query and key in O(K) memory per head (never the Q x K map):

* ``pre[layer]``: softmax(softcap(q_last k^T * scaling) + mask) -- the layer's own attention (on a steered
  model: before the recipe's rules, i.e. "pre-steering scores" normalised);
* ``post[layer]`` (after :meth:`LastRows.finish`): the weights the steered layer actually uses --
  the plan's score rules applied to the scores, softmax, then its weight rules (group, reweight)
  with the chunked backend's rule functions. Weight rules run after the forward, when the
  per-prompt facts they need exist (a group rule's groups may be found from the whole prompt's
  attention inside the layer). Equals ``pre`` where nothing steers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator

import torch

from .. import archs, compat
from . import dispatch
from .chunked import apply_score_rules, apply_weight_rules, grouped_qk
from .geometry import AttentionCall, MaskView, soft_cap


@contextlib.contextmanager
def observe(model, fn: Callable) -> Iterator[None]:
    """Call ``fn(layer, module, query, key, attention_mask, kwargs)`` from inside every decoder layer's
    self-attention function while the block runs. Steer (``attnsteer.apply``) before entering, not
    inside. Cross-attention layers (mllama) are not observed: their keys are vision states, not
    positions of the prompt."""
    arch = archs.resolve(model)
    impl = compat.attn_implementation(arch.text_config)
    snapshot = None
    if impl not in dispatch.REGISTERED_NAMES.values():  # not steered: route through attnsteer for the block
        impl = dispatch.check_implementation(arch.text_config)
        name = dispatch.registered_name(impl)
        snapshot = compat.snapshot_attn_implementations(model)
        try:
            compat.set_text_attention(model, arch.spec.text_config_key, name)
        except BaseException:
            compat.restore_attn_implementations(snapshot)
            raise
    watchers = []
    try:
        for layer in arch.self_attention_layers:
            module = arch.attention_modules[layer]

            def watch(module, query, key, attention_mask, kwargs, layer=layer):
                fn(layer, module, query, key, attention_mask, kwargs)

            dispatch.add_observer(module, watch)
            watchers.append((module, watch))
        yield
    finally:
        for module, watch in watchers:
            dispatch.remove_observer(module, watch)
        if snapshot is not None:
            compat.restore_attn_implementations(snapshot)


def scaling_of(module, query: torch.Tensor, kwargs: dict) -> float:
    """The softmax scale the layer uses: the ``scaling`` kwarg, else ``module.scaling``, else 1/sqrt(d)."""
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return scaling


def last_row_scores(module, query, key, attention_mask, kwargs, key_len: int | None = None):
    """Scores of the last query row over every key: (float32 (B, H_q, 1, K), -inf where masked;
    visibility bool (B|1, 1|H, 1, K) or None when every key is visible). GQA: query head h reads
    kv head h // (H_q / H_kv). ``key_len``: keys of the sequence so far (a static cache hands
    over more, empty slots)."""
    if key_len is not None and key.shape[2] > key_len:
        key = key[:, :, :key_len]
    q_len, k_len = query.shape[2], key.shape[2]
    q = query[:, :, -1:].float()
    s = soft_cap(grouped_qk(q, key.float()) * scaling_of(module, query, kwargs), dispatch.attention_softcap(kwargs))
    visible, bias = MaskView(attention_mask, q_len, k_len).chunk(q_len - 1, q_len, query.device)
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s, visible


def _softmax(s: torch.Tensor) -> torch.Tensor:
    return torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: 0


def last_row_weights(module, query, key, attention_mask, kwargs) -> torch.Tensor:
    """float32 (B, H_q, K): the last query row's softmax attention weights, per head."""
    return _softmax(last_row_scores(module, query, key, attention_mask, kwargs)[0])[:, :, 0]


@dataclasses.dataclass
class _Pending:
    scores: torch.Tensor  # (B, H, 1, K) after the score rules
    visible: torch.Tensor | None
    call: AttentionCall | None


class LastRows:
    """An observer (for :func:`observe`) keeping each layer's last-row attention of one forward.

    plans: ``{layer: LayerPlan}`` of a steered model (``handle.plans``), for ``post``; state: its
    steering state, so passes run with steering paused (PAI's text stream, AGLA's relevance pass)
    are skipped and the forward's facts (cache length, padding, the prompt's state) are known.
    batch: keep the first ``batch`` rows (the caller's input; a prefill may carry extra streams).
    The first forward observed per layer is kept (call :meth:`reset` for another); ``calls``
    counts all of them.
    """

    def __init__(self, plans: dict | None = None, state=None, batch: int | None = None):
        self.plans = plans or {}
        self.state = state
        self.batch = batch
        self.pre: dict[int, torch.Tensor] = {}  # layer -> float32 (b, H, K)
        self.post: dict[int, torch.Tensor] = {}  # filled by finish()
        self.calls: Counter = Counter()
        self._pending: dict[int, _Pending] = {}

    @classmethod
    def of_handle(cls, handle, batch: int | None = None) -> LastRows:
        """The observer for a model steered by ``handle`` (what ``attnsteer.apply`` returned)."""
        return cls(handle.plans, handle._state, batch)

    def reset(self) -> None:
        self.pre, self.post, self._pending = {}, {}, {}
        self.calls.clear()

    def __call__(self, layer, module, query, key, attention_mask, kwargs) -> None:
        state = self.state
        if state is not None and state.is_paused:
            return
        self.calls[layer] += 1
        if layer in self.pre:
            return
        info = state.info if state is not None else None
        s, visible = last_row_scores(module, query, key, attention_mask, kwargs, info.total_len if info else None)
        plan = self.plans.get(layer)
        steered, call = s, None
        if plan is not None and info is not None:
            k_len = s.shape[-1]
            mask = MaskView(attention_mask, query.shape[2], k_len)
            call = AttentionCall(
                layer, info, query, key[:, :, :k_len], mask, scaling_of(module, query, kwargs), state.prompt
            )
            rows = call.rows(visible, query.shape[2] - 1, rows=1)
            q, k = query[:, :, -1:].float(), key[:, :, :k_len].float()
            steered = apply_score_rules(plan.steps(info.is_prefill).score, s, q, k, rows, call)
        self.pre[layer] = _softmax(s[: self.batch])[:, :, 0]
        self._pending[layer] = _Pending(steered, visible, call)

    def finish(self) -> dict[int, torch.Tensor]:
        """After the forward: apply each steered layer's weight rules to its row -> ``post``."""
        for layer, pending in sorted(self._pending.items()):
            a = _softmax(pending.scores)
            plan, call = self.plans.get(layer), pending.call
            if plan is not None and call is not None:
                call, visible = _cropped(call, pending.visible, _prompt_rows(call, a.shape[0]))
                a = a[: call.batch]
                rows = call.rows(visible, call.info.q_len - 1, rows=1)
                a = apply_weight_rules(plan.steps(call.is_prefill).weight, a, rows, call)
            self.post[layer] = a[: self.batch, :, 0]
        return self.post

    def changed(self, layer: int) -> torch.Tensor:
        """bool (b, H): heads whose last row the recipe's rules changed at ``layer``."""
        return (self.post[layer] != self.pre[layer]).any(-1)


def _prompt_rows(call: AttentionCall, rows: int) -> int:
    """The prompt's batch rows now (after the forward a second stream may have been cropped off)."""
    roles = call.prompt.roles
    return min(rows, roles.image.shape[0]) if roles is not None else rows


def _cropped(call: AttentionCall, visible, rows: int):
    """``call`` (and its visibility) for its first ``rows`` batch rows."""
    if call.batch == rows:
        return call, visible
    info = call.info
    crop = copy.copy(call)
    crop.batch = rows
    crop.info = dataclasses.replace(
        info,
        first_valid=info.first_valid[:rows] if info.first_valid is not None else None,
        row_valid=info.row_valid[:rows] if info.row_valid is not None else None,
        batch=rows,
    )
    return crop, (visible[:rows] if visible is not None and visible.shape[0] > rows else visible)
