"""Generation requests: items (a prompt and an image) answered by ``model.generate`` in
left-padded batches through the processor's chat template (:class:`~attnsteer.evals.vlm.VLMInputs`).

With sampling the random stream is re-seeded per batch from ``(seed, first item id)``, so sampled
outputs match across sharding at ``batch_size=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .specs import RecipeSpec
from .task import RunContext
from .vlm import Decoding, EvalItem, VLMInputs, generate_batch, item_seed


class GenerationRequests:
    """Answers :class:`EvalItem` batches with generated text: each answer is ``{"output": text,
    "new_tokens": n, "hit_max_new_tokens": bool}``."""

    sharded = True

    def __init__(self, context: RunContext, decoding: Decoding):
        self.model = context.model
        self.builder = VLMInputs(context.processor, context.model_id)
        self.decoding = decoding
        self.batch_size = context.run.batch_size
        self.device = next(self.model.parameters()).device
        self.apply_kwargs = {"processor": context.processor}

    def batches(self, items: Sequence[EvalItem]) -> list[list[EvalItem]]:
        items = list(items)
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def answer(self, batch: Sequence[EvalItem], spec: RecipeSpec, seed: int, handle) -> list[dict]:
        import torch

        torch.manual_seed(item_seed(seed, batch[0].id))
        texts, counts, hit = generate_batch(self.model, self.builder, batch, self.decoding, self.device, handle)
        return [{"output": t, "new_tokens": n, "hit_max_new_tokens": h} for t, n, h in zip(texts, counts, hit)]

    def describe(self, items: Sequence[EvalItem]) -> dict:
        first = items[0] if items else None
        example = self.builder.prompt_text(first.prompt, first.image is not None) if first is not None else None
        return {"prompt_example": example}
