"""vLLM's FlexAttention backend (``FLEX_ATTENTION``, GPUs) with attnsteer's rules on the layers a
recipe names.

vLLM hands one call per layer: the rows of every scheduled request concatenated, their keys in the
paged cache. On a steered layer this impl runs vLLM's own FlexAttention kernel with a ``score_mod``
carrying every request's score rules, takes the kernel's log-sum-exp (``out_transform``, vLLM
0.34), corrects the output of requests with a group rule from it and their small key groups, runs a
second kernel pass for re-weight rules, and applies head rules after
(:func:`attnsteer.vllm.flex_rules.steer`). Each request steers with its own recipe, the engine's,
or none, in one batch. Every other layer runs vLLM's impl unchanged.

Self-check: before this impl steers a request whose rules are of a (rule kind, dtype, head dim)
not yet served in the process, that combination runs once on a small synthetic call written into a
paged cache on the device and steered by this path with vLLM's compiled FlexAttention kernel,
against attnsteer's chunked path (:mod:`attnsteer.vllm.flex_check`). A combination that fails (a
mismatch, a compile error, an exception of the kernel, also on a real call) is warned once and its
requests are given to the chunked path over their keys and values gathered from the paged cache for
the rest of the process, counted in the layer's stats under ``fallbacks``.
``ATTNSTEER_TRITON_SELFCHECK=0`` skips the check; ``ATTNSTEER_TRITON_STRICT=1`` raises instead.

CUDA graphs: a steered engine declares no CUDA-graph support for its attention
(``AttentionCGSupport.NEVER``), so vLLM runs it in piecewise mode: attention runs eagerly between
the captured pieces, where the per-request tables are rebuilt each step.
"""

from __future__ import annotations

import torch

from ..attention.dispatch import SiteStats
from ..context import PromptState
from ..errors import UnsupportedModelError
from ..plan import LayerPlan
from . import compat, flex_check, flex_rules, hidden, requests
from .config import steering_for

FlexAttentionBackend, FlexAttentionImpl, FlexAttentionMetadataBuilder, _ = compat.flex_attention_classes()
DECODER = compat.decoder_attention_type()


class AttnsteerFlexMetadataBuilder(FlexAttentionMetadataBuilder):
    """FlexAttention's builder; a steered engine runs its attention outside CUDA graphs."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        if steering_for(vllm_config, announce=False) is not None:
            return compat.cudagraph_never()
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)


class AttnsteerFlexBackend(FlexAttentionBackend):
    """Registered in place of ``FLEX_ATTENTION`` by :func:`attnsteer.vllm.register`."""

    @staticmethod
    def get_name() -> str:
        return "FLEX_ATTENTION"

    @staticmethod
    def get_impl_cls():
        return AttnsteerFlexImpl

    @staticmethod
    def get_builder_cls():
        return AttnsteerFlexMetadataBuilder


class AttnsteerFlexImpl(FlexAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steering = steering_for(compat.current_vllm_config(), *compat.tensor_parallel())
        if self.steering is not None:
            if not compat.flex_out_transform_supported(FlexAttentionImpl):
                raise UnsupportedModelError(
                    "this vLLM's FlexAttention impl hands no log-sum-exp to an out_transform, which attnsteer's "
                    f"weight rules need. Fix: install vllm{compat.TESTED_UPSTREAM}"
                )
            if self.steering.needs_requests:
                prepare = hidden.hook_layer_inputs if self.steering.input_layers != set() else None
                requests.install(self.steering.modalities, prepare)
        # which requests the kernel serves (the self-check), the chunked path for the others
        self._gate = flex_check.Gate.from_settings(compat.flex_kernel()) if self.steering is not None else None
        self._layer: int | None = None
        self._stats: dict[int, SiteStats] = {}
        self._without_roles: dict[int, LayerPlan] = {}

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):  # fmt: skip
        """query (T, H, D); ``output`` (T, H, D) written in place."""
        if self.steering is None or attn_metadata is None or self.attn_type != DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)  # fmt: skip
        if self._layer is None:
            self._layer = compat.layer_index(layer.layer_name)
        md = attn_metadata
        starts = md.query_start_loc_cpu.tolist()
        slices = []
        for r in range(md.num_reqs):
            q0, q1 = starts[r], starts[r + 1]
            if q1 == q0:
                continue
            plan, whole, facts = requests.plan_for_request(self.steering, self._layer, r, self._without_roles)
            length = compat.flex_seq_len(md, r)
            prefill = length == q1 - q0
            if plan is None or not plan.active(prefill):
                continue
            requests.check_whole_prompt(self._layer, whole, length - (q1 - q0), q1 - q0,
                                        facts.prompt_len if facts is not None else length)  # fmt: skip
            prompt = requests.prompt_state(facts, prefill) if facts is not None else PromptState()
            if prefill and facts is not None:
                for method in plan.methods:
                    if method.reads_layer_input:
                        hidden.observe(method, prompt, q0, q1)
            slices.append(self._slice(plan, prompt, md, kv_cache, r, q0, q1, length, prefill))
        if not slices:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)  # fmt: skip
        t = md.num_actual_tokens
        out = self._gate.steer(self._layer, query[:t], slices, self.scale,
                               lambda mod: self._attend(layer, query, key, value, kv_cache, md, mod),
                               self.sliding_window or 0, kv_cache.shape[2])  # fmt: skip
        for s in slices:
            s.stats.end()
        output[:t] = out.to(output.dtype)
        return output

    def _slice(self, plan, prompt, md, kv_cache, r, q0, q1, length, prefill) -> flex_rules.RequestSlice:
        stats = self._stats.get(id(plan))
        if stats is None:
            stats = self._stats[id(plan)] = SiteStats(plan.methods)
        steps = plan.steps(prefill)
        stats.begin({rule.method for rule in (*steps.score, *steps.weight, *steps.head)})
        blocks = md.block_table[r]

        def kv():
            return compat.flex_read_request_kv(kv_cache, blocks, length, self.num_kv_heads, self.head_size)

        return flex_rules.RequestSlice(q0, q1, length, steps, prompt, kv, stats)

    def _attend(self, layer, query, key, value, kv_cache, md, score_mod):
        """vLLM's FlexAttention kernel over the step with ``score_mod`` -> (out (T, H, D), lse (T, H))."""
        captured = {}

        def keep(out, lse):
            captured["lse"] = lse
            return out

        scratch = torch.empty_like(query)
        saved_mod, saved_transform = md.transformed_score_mod, self.out_transform
        md.transformed_score_mod = compat.transformed_score_mod(md, score_mod) if score_mod is not None else None
        self.out_transform = keep
        try:
            super().forward(layer, query, key, value, kv_cache, md, scratch)
        finally:
            md.transformed_score_mod, self.out_transform = saved_mod, saved_transform
        t = md.num_actual_tokens
        lse = captured["lse"][0].transpose(0, 1)[:t]  # (1, H, T) -> (T, H)
        return scratch[:t], lse
