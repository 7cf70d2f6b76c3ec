"""vLLM's CPU attention backend (``CPU_ATTN``) with attnsteer's steered attention on the layers a
recipe names.

vLLM hands one call per layer with the rows of every scheduled request concatenated
(``query_start_loc``), their keys already written to the paged cache. For a steered layer each
request's rows are computed by attnsteer's chunked backend (:mod:`attnsteer.attention.chunked`,
every score and weight rule kind) on that request's keys and values read from the cache -- the
same code, and so the same numbers, as ``attnsteer.apply`` on the Hugging Face model; head rules
(VHR with fixed heads) scale the output afterwards. Each request's per-prompt state is its own
:class:`~attnsteer.context.PromptState` (``requests.STATES[request id]``); the method objects are
shared by every request. Every other layer and request runs vLLM's own kernel.
"""

from __future__ import annotations

import torch

from ..attention.dispatch import SiteStats
from ..attention.geometry import ForwardInfo, MaskView
from ..context import PromptState
from ..errors import UnsupportedModelError
from ..plan import LayerPlan
from . import compat, hidden, requests
from .config import steering_for
from .paged import read_request_kv, request_info, request_inputs, run_chunked

CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder = compat.cpu_attention_classes()
DECODER = compat.decoder_attention_type()


def _keeps_no_request_state(plan: LayerPlan) -> bool:
    """Whether every rule of ``plan`` steers a decode row from the row's scores alone (re-weight
    rules, fixed head rules): no image keys and no group rule (its groups are the request's)."""
    return not any(m.needs_image or m.rules_of("group") for m in plan.methods)


class AttnsteerCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder; with a recipe, pins the cache layout to ``vec`` / ``vec16``, the one
    :func:`attnsteer.vllm.paged.read_request_kv` reads (``amx`` packs keys in VNNI tiles)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if steering_for(vllm_config) is not None and self.isa not in ("vec", "vec16"):
            self.isa = "vec" if self.head_dim % 32 == 0 else "vec16"
            self._set_isa_to_layers(layer_names)


class AttnsteerCPUBackend(CPUAttentionBackend):
    """Registered in place of ``CPU_ATTN`` by :func:`attnsteer.vllm.register`."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return AttnsteerCPUImpl

    @staticmethod
    def get_builder_cls():
        return AttnsteerCPUMetadataBuilder


class AttnsteerCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # built while the model is: the only time the engine's config can be read
        self.steering = steering_for(compat.current_vllm_config(), *compat.tensor_parallel())
        if self.steering is not None:
            if self.alibi_slopes is not None or self.sinks is not None:
                raise UnsupportedModelError(
                    "attnsteer's vLLM backend does not implement ALiBi slopes or learned attention sinks; "
                    "this model uses them. Fix: serve it without a recipe"
                )
            if compat.kv_cache_quantized(self):
                raise UnsupportedModelError("attnsteer reads the KV cache in the model's dtype; fp8 caches are refused")
            if self.steering.needs_requests:  # which request each row belongs to; layer inputs
                prepare = hidden.hook_layer_inputs if self.steering.input_layers != set() else None
                requests.install(self.steering.modalities, prepare)
        self._layer: int | None = None
        self._stats: dict[int, SiteStats] = {}  # id(LayerPlan) -> its counters
        self._without_roles: dict[int, LayerPlan] = {}  # id(LayerPlan) -> it minus the focus-span methods

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        """query (T, H, D), key / value (T, H_kv, D) of this call's rows; ``output`` (T, H, D)."""
        if self.steering is None or attn_metadata is None or self.attn_type != DECODER:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if self._layer is None:
            self._layer = compat.layer_index(layer.layer_name)
        md = attn_metadata
        starts = md.query_start_loc.tolist()
        lengths = md.seq_lens.tolist()
        # (request index, first row, end row, tokens so far, its plan, needs whole prompts) of every
        # request with rows in this call
        rows = []
        for r, n in enumerate(lengths):
            q0, q1 = starts[r], starts[r + 1]
            if q1 == q0:
                continue
            plan, whole, facts = requests.plan_for_request(self.steering, self._layer, r, self._without_roles)
            prompt = facts.prompt_len if facts is not None else None
            if prompt is not None and n == q1 - q0 and n > prompt:
                # vLLM recomputes a preempted request: its prompt and its generated tokens in one
                # forward -- the prompt rows as its prefill, the generated rows as decode rows
                rows.append((r, q0, q0 + prompt, prompt, plan, whole, facts))
                rows.append((r, q0 + prompt, q1, n, plan, whole, facts))
            else:
                rows.append((r, q0, q1, n, plan, whole, facts))
        own_attention = any(  # some rows keep vLLM's own attention (or scale its output)
            plan is None or not plan.steps(n == q1 - q0).attention for _, q0, q1, n, plan, _, _ in rows
        )
        if own_attention:
            output = super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        decoding: dict[int, tuple[LayerPlan, list]] = {}  # id(plan) -> decode rows that can share one call
        for r, q0, q1, n, plan, whole, facts in rows:
            if plan is None or not plan.active(n == q1 - q0):
                continue
            if q1 - q0 == 1 and n > 1 and _keeps_no_request_state(plan):
                decoding.setdefault(id(plan), (plan, []))[1].append((r, q0, n))
            else:
                self._steer_request(plan, whole, facts, md.block_table[r], query, kv_cache, output, q0, q1, n)
        for plan, steps in decoding.values():
            self._steer_decode_steps(plan, steps, md.block_table, query, kv_cache, output)
        return output

    def _steer_decode_steps(self, plan: LayerPlan, steps: list, block_table, query, kv_cache, output) -> None:
        """One decode row each of the requests in ``steps`` ((request index, row, tokens so far)),
        in place, as one left-padded batch: request i's keys right-aligned in (n, H_kv, L, D) for
        the longest length L, padding masked -- the layout of a left-padded batch on the Hugging
        Face path, so one call of the chunked path serves every request."""
        lengths = [n for _, _, n in steps]
        longest = max(lengths)
        pads = torch.tensor([longest - n for n in lengths])
        info = ForwardInfo(q_len=1, past_len=longest - 1, total_len=longest, first_valid=pads, batch=len(steps))
        rows = [q0 for _, q0, _ in steps]

        def inputs():
            k = v = None
            for i, (r, _, n) in enumerate(steps):
                ki, vi = read_request_kv(kv_cache, block_table[r], n)
                if k is None:
                    k = ki.new_zeros(len(steps), ki.shape[0], longest, ki.shape[-1])
                    v = torch.zeros_like(k)
                k[i, :, longest - n :], v[i, :, longest - n :] = ki, vi
            keys = torch.arange(longest).view(1, -1)
            visible = keys >= pads.view(-1, 1)
            if self.sliding_window > 0:  # key j of request i sits at position j - pad_i; its row at L - 1 - pad_i
                visible &= keys > longest - 1 - self.sliding_window
            return query[rows].unsqueeze(2), k, v, MaskView(visible.view(len(steps), 1, 1, longest), 1, longest)

        out = self._attend(plan, info, PromptState(), inputs, lambda: output[rows].unsqueeze(1))
        output[rows] = out[:, 0].to(output.dtype)

    def _attend(self, plan: LayerPlan, info: ForwardInfo, prompt: PromptState, inputs, own):
        """The plan's rules on one call of the request(s) whose state is ``prompt``
        (:func:`attnsteer.vllm.paged.run_chunked`: ``inputs()`` -> (q, k, v, MaskView), ``own()`` ->
        vLLM's output (B, Q, H, D)). Returns (B, Q, H, D)."""
        steps = plan.steps(info.is_prefill)
        stats = self._stats.get(id(plan))
        if stats is None:
            stats = self._stats[id(plan)] = SiteStats(plan.methods)
        stats.begin({rule.method for rule in (*steps.score, *steps.weight, *steps.head)})
        out = run_chunked(
            self._layer, steps, info, prompt, inputs, own, stats, self.scale, self.logits_soft_cap or None
        )
        stats.end()
        return out

    def _request_state(self, plan: LayerPlan, facts, prefill: bool, q0: int, q1: int) -> PromptState:
        """The request's :class:`PromptState` (a fresh one at its prefill, with its image keys; the
        same from its prefill to its last decode step). At its prefill, methods that read their
        layer's input get the rows of this request entering the layer now."""
        prompt = requests.prompt_state(facts, prefill)
        if prefill:
            for method in plan.methods:
                if method.reads_layer_input:
                    hidden.observe(method, prompt, q0, q1)
        return prompt

    def _steer_request(self, plan, whole: bool, facts, blocks, query, kv_cache, output, q0: int, q1: int, length: int):
        """Rows q0..q1 of one request (``blocks``: its block-table row; ``facts``: its
        RequestFacts or None) whose sequence so far has ``length`` tokens, in place."""
        q_len = q1 - q0
        past = length - q_len
        prefill = past == 0
        prompt = self._request_state(plan, facts, prefill, q0, q1) if facts is not None else PromptState()
        requests.check_whole_prompt(self._layer, whole, past, q_len, facts.prompt_len if facts is not None else length)

        def read():
            return read_request_kv(kv_cache, blocks, length)

        inputs = request_inputs(query, q0, q1, length, self.sliding_window, read)
        out = self._attend(plan, request_info(q_len, length), prompt, inputs, lambda: output[q0:q1].unsqueeze(0))
        output[q0:q1] = out[0].to(output.dtype)
