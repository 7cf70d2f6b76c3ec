"""VHR -- Vision-aware Head Reinforcement with the VHD score (docs/methods.md#vhr).

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
arXiv 2412.13949 (ACL 2025).

The prompt runs together with its text-only copy (image tokens removed) as one prefill batch.
At each steered layer, at the last prompt position: ``VHD_h = ||A_h(img) - A_h(text)||_2``,
``TA_h = ||A_h(text)||_2^2``; heads with both VHD and TA above mean + std (population, over the
layer's heads) get VHD 0; ``H_l = {h : VHD_h > median(VHD)}``. Their outputs are multiplied by
``alpha`` at every prefill position and every later decode step (frozen heads); later layers
see earlier layers already reinforced. The text-only rows are dropped after the prefill.

Variant ``selection: fixed``: no text-only stream and no VHD; the heads the intervention's
``heads: {layer: [heads]}`` mapping names are scaled in every row, at every position and step
(e.g. a head set written by ``attnsteer calibrate vhr --fixed-heads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError, SteeringError
from ..roles import PromptRoles, image_mask, positions_like, text_only_inputs
from .base import Method, param, register
from .rules import HeadRule, ModelStep
from .streams import crop_rows, stack_rows


@dataclass(frozen=True)
class VHRParams:
    """VHR's parameters (docs/methods.md#vhr)."""

    alpha: float = param(2.0, "scale of the selected heads' outputs (paper: 2; 4 breaks generation)", low=0.0)
    reinforce_text_stream: bool = param(True, "also scale the text-only stream (later layers' VHD see it)")
    selection: str = param(
        "per_prompt",
        "per_prompt: heads chosen by VHD for every prompt (the paper); fixed: the heads the `heads` mapping names",
        choices=("per_prompt", "fixed"),
    )


class TextStreamInBatch(ModelStep):
    """At a prompt with an image, the text-only copy of every row rides in the prefill batch (rows
    ``[B, 2B)``) and is cropped off after it."""

    order = 0  # head level: before the logits level (PAI's gamma) sees the batch
    serving = "per_prompt VHR runs a text-only copy of every prompt in the same prefill"
    serving_fix = "params.selection: fixed with the heads written by `attnsteer calibrate vhr --fixed-heads`"

    def before_model(self, state, bound):
        prompt = state.prompt
        if prompt.stream_rows is None and prompt.roles is not None and bool(prompt.roles.has_image.any()):
            return append_text_stream(state, bound)
        return None

    def after_model(self, state, model, bound, output, is_prefill) -> None:
        if state.prompt.stream_rows is not None:
            drop_text_stream(state, model, output)


class Reinforcement(HeadRule):
    """``A_{l,h} <- alpha A_{l,h}`` for the heads selected at the prompt (or the fixed heads)."""

    def apply(self, out, call, prompt):
        method = self.method
        if method.fixed:
            return method.fixed_output(out, call, prompt)
        if call.is_prefill and method.cross_attention:
            # a cross-attention layer contributes nothing to the prompt without its image: A_h(text) = 0
            return method.reinforce_prompt(out, out[:, -1], torch.zeros_like(out[:, -1]), None, prompt)
        if call.is_prefill:
            base = prompt.stream_rows
            if base is None or out.shape[0] != 2 * base:
                raise SteeringError(
                    f"VHR on layer {method.layer}: the prefill has no text-only stream in its batch (batch "
                    f"{out.shape[0]}). It is added by the model's forward pre-hook; call the steered model itself "
                    "(model(...) or model.generate(...)), not one of its sub-modules"
                )
            return method.reinforce_prompt(out, out[:base, -1], out[base:, -1], base, prompt)
        selected = prompt.require(
            method.key,
            "heads",
            f"VHR on layer {method.layer}",
            "decode steps reuse the heads chosen at the prompt: run the prompt through the steered model first "
            "(model.generate does)",
        )
        if selected.shape[0] != out.shape[0]:
            raise SteeringError(
                f"VHR on layer {method.layer}: heads were selected for batch {selected.shape[0]}, this forward has "
                f"{out.shape[0]} rows. Fix: keep the prompt batch through generation (start a new prompt for a new "
                "batch; generate()'s num_beams / num_return_sequences are followed)"
            )
        scale = torch.where(selected, method.p.alpha, 1.0).to(out.dtype)[:, None, :, None]
        return out * scale, selected.sum() * out.shape[1]


@register
class VHR(Method):
    name = "vhr"
    docs = "docs/methods.md#vhr"
    citation = "He et al., ACL 2025, arXiv 2412.13949"
    default_layers = [1, "-14:"]  # 32-layer LLaVA-1.5 / LLaVA-NeXT: the second layer and the last 14
    # model_type -> the paper's layers for families that differ from default_layers
    family_layers = {"instructblip": "14:"}
    needs_image = True
    # mllama's cross-attention layers: without the image they are skipped (their heads give 0), so
    # VHD_h = ||A_h(img)|| there and no text-only stream is needed
    on_cross_attention = True
    Params = VHRParams

    def __init__(self, params, layer, heads):
        self.fixed = params.get("selection") == "fixed"
        if self.fixed and heads is None:
            raise RecipeError(
                f"vhr on layer {layer}: params.selection: fixed scales exactly the heads the intervention's `heads` "
                'field names, and heads is "all". Fix: give heads: {layer: [query heads]} (e.g. the file written by '
                "`attnsteer calibrate vhr --fixed-heads`), or use selection: per_prompt"
            )
        # fixed heads need no text-only stream (no model step) and no image in the prompt
        self.needs_image = not self.fixed
        super().__init__(params, layer, heads)

    def build_rules(self) -> list:
        return [Reinforcement(self)] + ([] if self.fixed else [TextStreamInBatch(self)])

    @property
    def model_step(self):
        """The text-only stream, except on cross-attention layers (they need none)."""
        return None if self.cross_attention else super().model_step

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["alpha"] == 1.0

    @classmethod
    def layers_default(cls, params, arch=None):
        """The family's default layers; None without a model (it depends on the family)."""
        if arch is None:
            return None
        if arch.cross_layers:  # the image enters through these layers only
            return sorted(arch.cross_layers)
        default = cls.family_layers.get(arch.spec.model_type, cls.default_layers)
        return list(default) if isinstance(default, list) else default

    def report(self, prompt) -> dict | None:
        """``{"heads": [per batch row [heads]]}`` selected at the last prompt (``fixed``: the fixed
        heads, the same for every row)."""
        heads = prompt.get(self.key, "heads")
        return None if heads is None else {"heads": [row.nonzero().flatten().tolist() for row in heads]}

    @staticmethod
    def select_heads(image_out: torch.Tensor, text_out: torch.Tensor) -> torch.Tensor:
        """image_out, text_out: (B, H, D) head outputs at the last prompt position -> bool (B, H)."""
        image_out, text_out = image_out.float(), text_out.float()
        vhd = (image_out - text_out).norm(dim=-1)
        ta = text_out.pow(2).sum(-1)
        outlier = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)) & (
            ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
        )
        vhd = vhd.masked_fill(outlier, 0.0)
        return vhd > vhd.quantile(0.5, dim=-1, keepdim=True)

    def reinforce_prompt(self, out: torch.Tensor, image_last, text_last, base: int | None, prompt):
        """Select the prompt's heads from the last position's head outputs (B, H, D) with and
        without the image, keep them in ``prompt``, and scale them in ``out`` (B, Q, H, D); ``base``:
        the prompt rows when the text-only stream rides in the batch after them (scaled with
        ``reinforce_text_stream``)."""
        selected = self.select_heads(image_last, text_last)
        if self.heads is not None:
            selected = selected & self.heads.to(selected.device).view(1, -1)
        prompt.put(self.key, "heads", selected)
        scale = torch.where(selected, self.p.alpha, 1.0).to(out.dtype)[:, None, :, None]
        changed = selected.sum() * out.shape[1]
        if base is None:
            return out * scale, changed
        text_scale = scale if self.p.reinforce_text_stream else torch.ones_like(scale)
        return torch.cat([out[:base] * scale, out[base:] * text_scale]), changed

    def fixed_output(self, out: torch.Tensor, call, prompt):
        """``selection: fixed``: the heads of the mask scaled in every row, position and step. Only
        when another VHR intervention put a text-only stream in the batch are its rows told apart
        (scaled with ``reinforce_text_stream``)."""
        mask = self.heads.to(out.device)
        scale = torch.where(mask, self.p.alpha, 1.0).to(out.dtype).view(1, 1, -1, 1)
        rows = out.shape[0]
        base = prompt.stream_rows if call.is_prefill else None
        has_stream = base is not None and rows == 2 * base
        if call.is_prefill:
            prompts = base if has_stream else rows
            prompt.put(self.key, "heads", mask.view(1, -1).expand(prompts, -1).clone())
        if has_stream and not self.p.reinforce_text_stream:
            return torch.cat([out[:base] * scale, out[base:]]), mask.sum() * base * out.shape[1]
        return out * scale, mask.sum() * rows * out.shape[1]


def append_text_stream(state, bound: dict) -> dict:
    """The prefill's arguments with the text-only copy of every row appended to the batch (2B rows):
    ids or embeddings, mask, positions (M-RoPE too) and token types; roles cover both halves."""
    ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    mask = bound.get("attention_mask")
    prompt = state.prompt
    drop = prompt.roles.image if ids is None else prompt.roles.image | image_mask(ids, state.drop_ids)
    text_ids, text_embeds, text_mask = text_only_inputs(ids, embeds, mask, drop, state.pad_id)
    like = ids if ids is not None else embeds[..., 0]
    rows = like.shape[0]
    second = {"attention_mask": text_mask}
    if ids is not None:
        second["input_ids"] = text_ids
    else:
        second["inputs_embeds"] = text_embeds
    if mask is None:
        bound = {**bound, "attention_mask": torch.ones(like.shape, dtype=torch.long, device=like.device)}
    if bound.get("position_ids") is not None:
        second["position_ids"] = positions_like(text_mask, bound["position_ids"])
    for name in ("mm_token_type_ids", "token_type_ids"):
        if bound.get(name) is not None:
            second[name] = torch.zeros_like(bound[name])
    out = stack_rows(bound, second, rows, "VHR's text-only stream")
    prompt.roles = PromptRoles(torch.cat([prompt.roles.image, torch.zeros_like(prompt.roles.image)]))
    prompt.stream_rows = rows
    return out


def drop_text_stream(state, module, output) -> None:
    """Crop the text-only rows off the output, the KV cache and the model's per-batch state."""
    rows = state.prompt.stream_rows
    state.prompt.stream_rows = None
    crop_rows(state, module, output, rows)
