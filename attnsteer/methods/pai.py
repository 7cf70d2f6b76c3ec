"""PAI -- Paying More Attention to Image (docs/methods.md#pai).

Liu et al., ECCV 2024 (arXiv 2407.21771).

Attention step (score level): in the last prompt row and every decode row,
``s_ij <- s_ij + alpha |s_ij|`` for visible image keys ``j``. Optional logits step (``gamma``):
with a text-only stream (same prompt without the image, its own KV cache, not steered),
``z = gamma (log p_img - log p_text) + log p_text``, keeping tokens with
``p_img >= 0.1 max p_img``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import compat
from ..errors import SteeringError
from ..roles import image_mask, text_only_inputs
from .base import Method, param, register
from .rules import AnsweringRowsScoreRule, ModelStep

PLAUSIBILITY = 0.1


def _check_gamma(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(value)
    return float(value)


def contrast_logits(image_logits: torch.Tensor, text_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, V) logits of the image and text-only streams -> PAI's log-space contrast (B, V) float32:
    ``gamma (log p_img - log p_text) + log p_text``, -inf where ``p_img < 0.1 max p_img``."""
    log_img = torch.log_softmax(image_logits.float(), dim=-1)
    log_text = torch.log_softmax(text_logits.float(), dim=-1)
    z = gamma * (log_img - log_text) + log_text
    cutoff = log_img.max(-1, keepdim=True).values + math.log(PLAUSIBILITY)
    return z.masked_fill(log_img < cutoff, float("-inf"))


@dataclass(frozen=True)
class PAIParams:
    """PAI's parameters (docs/methods.md#pai)."""

    alpha: float = param(0.5, "amplification of image-key scores (paper 0.5; code 0.2)", low=0.0)
    gamma: object = param(
        None,
        "logits-step strength with a text-only stream",
        check=_check_gamma,
        allowed_text="null (off) or a number > 0, e.g. 1.1 (paper)",
    )


class ImageAmplification(AnsweringRowsScoreRule):
    """``s_ij <- s_ij + alpha |s_ij|`` for image keys ``j`` in the last prompt row and every decode row."""

    def modify(self, s, target):
        return torch.where(target, s + self.method.p.alpha * s.abs(), s)


class Contrast(ModelStep):
    """The logits step: the last position's logits contrasted with those of the unsteered
    text-only stream (the same prompt without its image), which runs in lockstep with its own KV
    cache, kept in the prompt's state."""

    order = 1  # logits level: after VHR's stream is cropped
    replaces_logits = True
    serving = "PAI's logit contrast needs a second, text-only decode stream per request"
    serving_fix = "params.gamma: null (the attention step alone)"

    def after_model(self, state, model, bound, output, is_prefill) -> None:
        prompt = state.prompt
        if is_prefill:
            stream = TextStream(state)
            prompt.put(self.key, "text stream", stream)
        else:
            stream = prompt.require(
                self.key,
                "text stream",
                "PAI (gamma)",
                "start each prompt with model.generate(...) or model(...) on the steered model (its prefill starts "
                "the text-only stream)",
            )
        text_logits = stream.step(model, bound, is_prefill)
        logits = output.logits.clone()
        logits[:, -1] = contrast_logits(logits[:, -1], text_logits, self.method.p.gamma).to(logits.dtype)
        output.logits = logits


@register
class PAI(Method):
    name = "pai"
    docs = "docs/methods.md#pai"
    citation = "Liu et al., ECCV 2024, arXiv 2407.21771"
    default_layers = "2:"
    needs_image = True
    prompt_length_dependent = (
        "steers the prompt's last row and the generated rows, so a block cached for one prompt holds steered "
        "keys at positions a longer prompt does not steer"
    )
    Params = PAIParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["alpha"] == 0.0 and params.get("gamma") is None

    @classmethod
    def replaces_logits(cls, params) -> bool:
        return params.get("gamma") is not None

    def build_rules(self) -> list:
        rules = [ImageAmplification(self)] if self.p.alpha != 0.0 else []
        return rules + ([Contrast(self)] if self.p.gamma is not None else [])


class TextStream:
    """The unsteered text-only copy of one prompt batch with its own KV cache, advanced in lockstep
    for PAI's logits step (kept in the prompt's state). Runs with steering switched off
    (``state.paused``)."""

    def __init__(self, state):
        self.state = state
        self.cache = None
        self.mask = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (integer (R,)) of the stream, in that order (beam search)."""
        if self.cache is not None:
            self.cache.reorder_cache(index.to(self.mask.device))
            self.mask = self.mask[index.to(self.mask.device)]

    def step(self, model, kwargs: dict, is_prefill: bool):
        """Run the text-only stream for this forward of the steered model (``kwargs``: its
        arguments; ``is_prefill``: its phase, decided before it ran); returns the stream's
        last-position logits (B, V)."""
        ids = kwargs.get("input_ids")
        if is_prefill:
            drop = self.state.prompt.roles.image
            if ids is not None:
                drop = drop | image_mask(ids, self.state.drop_ids)
            step_ids, step_embeds, self.mask = text_only_inputs(
                ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), drop, self.state.pad_id
            )
            self.cache = None
        else:
            if self.cache is None:
                raise SteeringError(
                    "PAI (gamma): a decode step arrived without the prompt's prefill through the steered model, so "
                    "the text-only stream has no cache. Fix: start each prompt with model.generate(...) or "
                    "model(...) on the steered model"
                )
            if ids is None:
                raise SteeringError(
                    "PAI (gamma): this decode step passed inputs_embeds only; the text-only stream continues with "
                    "the generated token ids. Fix: pass input_ids (generate() does)"
                )
            rows = self.mask.shape[0]
            if ids.shape[0] != rows:
                raise SteeringError(
                    f"PAI (gamma): this decode step has {ids.shape[0]} rows, the text-only stream {rows}. Fix: keep "
                    "the prompt batch through generation (start a new prompt for a new batch)"
                )
            self.mask = torch.cat([self.mask, self.mask.new_ones(rows, ids.shape[1])], dim=1)
            step_ids, step_embeds = ids, None
        width = (step_ids if step_ids is not None else step_embeds[..., 0]).shape[1]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        cache_arg = {compat.cache_argument(model.forward): self.cache}
        with self.state.paused():
            out = model(
                input_ids=step_ids,
                inputs_embeds=step_embeds,
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                **cache_arg,
            )
        self.cache = compat.output_cache(out)
        if self.cache is None:
            raise compat.CompatibilityError("KV cache", "the text-only stream's forward returned no Cache")
        return out.logits[:, -1]
