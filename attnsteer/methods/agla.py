"""AGLA -- Assembly of Global and Local Attention (docs/methods.md#agla).

An et al., "AGLA: Mitigating Object Hallucinations in Large Vision-Language Models with Assembly
of Global and Local Attention", CVPR 2025 (arXiv 2406.12718).

Two views of every prompt run as one batch through the model: the original (rows ``[0, B)``)
and an augmented one (rows ``[B, 2B)``) whose images keep only the pixels relevant to the
prompt. At each decoding step the next-token logits are assembled::

    z = z_orig + alpha * z_aug,   z(v) = -inf where p_orig(v) < beta * max_v p_orig(v)

and the usual logits processors and sampling of ``generate()`` run on ``z``.

The augmented view (:mod:`.agla_views`, :mod:`.agla_pixels`): a relevance map ``R`` of each
image for its prompt, min-max, bicubic resize, Gaussian blur (sigma 0.02 x side), min-max; the
fraction ``f`` of pixels with the lowest ``R`` are set to black in the model's own pixel inputs.
Matchers (:mod:`.agla_matchers` and :class:`AttentionRelevance` here):

* ``blip_itm``: Grad-CAM of BLIP ITM's text-encoder cross-attention (layer 6) for the match
  logit; ``f = s / 2`` with ``s`` the BLIP ITC cosine similarity of image and prompt text.
* ``lvlm_attention``: the model's own (unsteered) attention from the prompt's text tokens after
  the image to the image tokens, averaged over the intervention's layers (default: the middle
  third) and its heads; ``f = mask_ratio``. One extra prefill that stops after those layers.

KV caches: each view keeps its own rows of the cache (the paper). ``share_cache: true``
reproduces the authors' released code, where from the second token on the augmented view
reuses the original view's cache -- so its logits equal the original's and
``z = (1 + alpha) z_orig`` (with the cut): the augmented rows are dropped after the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import archs, compat
from ..errors import RecipeError, SteeringError
from ..roles import PromptRoles, image_mask
from .agla_matchers import DEFAULT_BLIP_CHECKPOINT, BlipItmMatcher
from .agla_pixels import FAMILY_LAYOUT, layout_for
from .agla_views import assemble_logits
from .base import Method, param, register
from .rules import ModelStep
from .streams import IMAGE_ARGUMENTS, crop_output, crop_rows, stack_rows

MATCHERS = ("blip_itm", "lvlm_attention")
DEFAULT_MASK_RATIO = 0.5
# matcher -> (the parameter only it takes, that parameter's default)
MATCHER_PARAMETER = {
    "blip_itm": ("matcher_checkpoint", DEFAULT_BLIP_CHECKPOINT),
    "lvlm_attention": ("mask_ratio", DEFAULT_MASK_RATIO),
}


def _check_fraction(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(value)
    return float(value)


def _check_checkpoint(value):
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    return value


@dataclass(frozen=True)
class AGLAParams:
    """AGLA's parameters (docs/methods.md#agla)."""

    alpha: float = param(2.0, "weight of the augmented view's logits: z = z_orig + alpha z_aug", low=0.0)
    beta: float = param(
        0.5, "plausibility cut: tokens with p_orig < beta max p_orig get -inf (0: no cut)", low=0.0, high=1.0
    )
    matcher: str = param("blip_itm", "what finds the prompt-relevant pixels", choices=MATCHERS)
    mask_ratio: float | None = param(
        None,
        "lvlm_attention: the fraction f of pixels blacked out (default 0.5); blip_itm takes f = s/2",
        check=_check_fraction,
        allowed_text="null (the matcher's default) or a number in [0, 1), lvlm_attention only",
    )
    matcher_checkpoint: str | None = param(
        None,
        f"blip_itm: the BLIP retrieval checkpoint, a hub id or local folder (default {DEFAULT_BLIP_CHECKPOINT})",
        check=_check_checkpoint,
        allowed_text="null (the default checkpoint) or a hub id / local path, blip_itm only",
    )
    share_cache: bool = param(
        False,
        "the released code's behaviour: after the first token the augmented view reuses the original view's "
        "KV cache (only to compare with published numbers)",
    )


class _RelevanceReady(Exception):
    """Raised by the attention observer once the last layer it reads has run (stops the pass)."""


class Assembly(ModelStep):
    """The augmented view rides in the batch (prefill and every decode step, its own KV cache
    rows); the next-token logits of the two views are assembled after the forward."""

    order = -1  # the augmented view joins the batch before VHR adds its text-only stream
    after_order = 2  # and the logits are assembled after every other model step
    replaces_logits = True
    serving = "it decodes two views of every image in lockstep and assembles their logits"

    def before_model(self, state, bound):
        return self.method.add_view(state, bound)

    def before_decode(self, state, bound):
        return self.method.follow_view(state, bound)

    def after_model(self, state, model, bound, output, is_prefill) -> None:
        self.method.assemble(state, model, output, is_prefill)


@register
class AGLA(Method):
    name = "agla"
    docs = "docs/methods.md#agla"
    citation = "An et al., CVPR 2025, arXiv 2406.12718"
    needs_image = True
    needs_processor = True
    needs_call_inputs = True
    Params = AGLAParams

    def __init__(self, params, layer, heads):
        super().__init__(params, layer, heads)
        # per handle (not per prompt): the model-sized resources, loaded once on first use
        self.matcher = None  # BlipItmMatcher
        self.layout = None

    def build_rules(self) -> list:
        return [Assembly(self)]

    # ---- recipe-level facts -------------------------------------------------------------------
    @classmethod
    def finalize_params(cls, params):
        """Each matcher takes one parameter of its own (filled with its default); the other's is refused."""
        params = dict(params)
        matcher = params["matcher"]
        for other, (name, _) in MATCHER_PARAMETER.items():
            if other != matcher and params[name] is not None:
                raise RecipeError(
                    f"params.{name}: got {params[name]!r}, but only matcher {other} takes it and this one is "
                    f"{matcher}. Fix: drop {name}, or use matcher: {other}"
                )
        name, default = MATCHER_PARAMETER[matcher]
        if params[name] is None:
            params[name] = default
        return params

    @classmethod
    def is_identity_params(cls, params) -> bool:
        return params["alpha"] == 0.0 and params["beta"] == 0.0

    @classmethod
    def replaces_logits(cls, params) -> bool:
        return True

    @classmethod
    def check_model(cls, params, arch, where) -> None:
        family = arch.spec.model_type
        if family not in FAMILY_LAYOUT:
            raise RecipeError(
                f"{where}.method: agla builds an augmented image and needs a vision-language model of one of "
                f"{sorted(FAMILY_LAYOUT)}; this model is {family!r}"
            )
        if params["matcher"] == "lvlm_attention" and family == "instructblip":
            raise RecipeError(
                f"{where}.params.matcher: lvlm_attention reads attention to image tokens laid out on a grid; "
                "InstructBLIP's image tokens are Q-Former queries with no spatial layout. Fix: use matcher: blip_itm"
            )

    @classmethod
    def layers_default(cls, params, arch=None):
        """The middle third of the layers (what lvlm_attention reads); None without a model."""
        if arch is None:
            return None
        n = arch.num_layers
        start = n // 3
        return f"{start}:{max(2 * n // 3, start + 1)}"

    # ---- per prompt ---------------------------------------------------------------------------
    def report(self, prompt) -> dict | None:
        """``{"matcher", "views": [per image {"row", "fraction", "relevance", "original",
        "augmented"}]}`` of the prompt: the matcher's relevance map (h, w) and the fraction of
        pixels it dropped; the views are float (3, H, W) tensors in [0, 1], as the model sees them."""
        return prompt.get(self.key, "views")

    def _siblings(self, state) -> list[int]:
        return sorted(m.layer for m in state.methods if m.name == self.name and m.intervention == self.intervention)

    # ---- the augmented view joins the prefill batch ---------------------------------------------
    def add_view(self, state, bound):
        """Before the prefill: build the augmented view of every image and append its rows."""
        ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        if ids is None and state.pending_ids is not None and embeds is not None:
            if tuple(state.pending_ids.shape) == tuple(embeds.shape[:2]):
                ids = state.pending_ids
        if ids is None:
            raise SteeringError(
                "AGLA needs the prompt's input_ids (to find each image's tokens and text); this call passed "
                "inputs_embeds only. Fix: pass input_ids (with the image placeholders) to generate / the model"
            )
        rows = ids.shape[0]
        asked = state.pending_ids
        if asked is not None and asked.shape[0] != rows:
            raise SteeringError(
                f"AGLA: generate() expanded the {asked.shape[0]} prompts to {rows} rows (num_beams or "
                "num_return_sequences > 1); AGLA decodes both views of each prompt in lockstep, one sequence per "
                "prompt, greedy or sampled. Fix: num_beams=1 and num_return_sequences=1 (to sample several answers, "
                "repeat the prompts in the batch)"
            )
        direct = not state.arch.spec.stream_host  # the steered forward takes the pixels itself
        pixels = self._pixel_inputs(state, bound if direct else state.pending_call or {})
        layout = self._layout(state)
        images = layout.count(pixels)
        if images == 0:
            raise SteeringError("AGLA: this prompt has image tokens but no pixel_values reached the model")
        owners, positions = self._image_tokens(state, ids, layout, pixels, images)
        originals = layout.views(pixels)
        relevance, fractions = self._relevance(state, bound, ids, layout, pixels, originals, owners, positions)
        new_pixels, augmented = layout.augment(pixels, relevance, fractions)
        if direct:
            base = {k: v for k, v in bound.items() if k != "mm_encoder_outputs"} | pixels
            second = {**pixels, **new_pixels}
        else:
            base, second = bound, {"inputs_embeds": self._embeds_of(state, new_pixels)}
        out = stack_rows(base, second, rows, "AGLA's augmented view")
        prompt = state.prompt
        prompt.roles = PromptRoles(torch.cat([prompt.roles.image, prompt.roles.image]))
        prompt.put(self.key, "rows", rows)
        prompt.put(
            self.key,
            "views",
            {
                "matcher": self.p.matcher,
                "views": [
                    {
                        "row": int(r),
                        "fraction": float(f),
                        "relevance": m.detach().float().cpu(),
                        "original": o.detach().cpu(),
                        "augmented": a.detach().cpu(),
                    }
                    for r, f, m, o, a in zip(owners, fractions, relevance, originals, augmented)
                ],
            },
        )
        return out

    def _layout(self, state):
        if self.layout is None:
            processor = state.processor
            image_processor = getattr(processor, "image_processor", processor)
            self.layout = layout_for(state.model_ref().config, image_processor)
        return self.layout

    @staticmethod
    def _pixel_inputs(state, call: dict) -> dict:
        """The pixel arguments of this prompt: from the forward itself, or (when transformers
        encoded the images before the first forward, or the model is InstructBLIP) from the
        generate() / top-level call that started it."""
        found = {k: call[k] for k in IMAGE_ARGUMENTS if isinstance(call.get(k), torch.Tensor)}
        if "pixel_values" not in found and call.get("mm_encoder_outputs") is not None and state.pending_call:
            pending = state.pending_call
            found = {k: pending[k] for k in IMAGE_ARGUMENTS if isinstance(pending.get(k), torch.Tensor)}
        if "pixel_values" not in found:
            raise SteeringError(
                "AGLA could not find this prompt's pixel_values (it builds the augmented image from them). Fix: "
                "pass pixel_values from the processor to model.generate(...) / model(...)"
            )
        return found

    def _image_tokens(self, state, ids, layout, pixels, images):
        """For each image: the batch row showing it and its placeholder positions (long (n_i,))."""
        marks = image_mask(ids, state.arch.image_token_ids)
        per_row = [row.nonzero().flatten() for row in marks]
        with_images = [r for r, p in enumerate(per_row) if p.numel()]
        if images == len(with_images):
            return with_images, [per_row[r] for r in with_images]
        sizes = layout.tokens_per_image(pixels)
        if sizes is None or len(sizes) != images or sum(sizes) != int(marks.sum()):
            raise SteeringError(
                f"AGLA: {images} images reached the model for {len(with_images)} prompts with image tokens, and the "
                f"{state.arch.spec.model_type} layout cannot tell which tokens belong to which image. Fix: one image "
                "per prompt for this family"
            )
        owners, positions, taken = [], [], [0] * len(per_row)
        row = 0
        for size in sizes:
            while row < len(per_row) and taken[row] >= per_row[row].numel():
                row += 1
            owners.append(row)
            positions.append(per_row[row][taken[row] : taken[row] + size])
            taken[row] += size
        return owners, positions

    def _text_rows(self, state, ids, mask) -> torch.Tensor:
        """bool (B, L): the prompt's text tokens after each row's last image token."""
        drop = image_mask(ids, state.drop_ids)
        last = state.prompt.roles.last_image.to(ids.device)
        after = torch.arange(ids.shape[1], device=ids.device).view(1, -1) > last.view(-1, 1)
        valid = mask.bool() if mask is not None else torch.ones_like(drop)
        return after & ~drop & valid

    def _relevance(self, state, bound, ids, layout, pixels, originals, owners, positions):
        text_rows = self._text_rows(state, ids, bound.get("attention_mask"))
        if self.p.matcher == "lvlm_attention":
            weights = AttentionRelevance(self._siblings(state), self.heads, text_rows).run(state, bound)
            maps = []
            for index, (row, where) in enumerate(zip(owners, positions)):
                frames, h, w = layout.token_grid(pixels, index)
                grid = weights[row, where[: frames * h * w]].reshape(frames, h, w).mean(0)
                maps.append(grid)
            return maps, [self.p.mask_ratio] * len(maps)
        texts = self._texts(state, ids, text_rows)
        if self.matcher is None:
            self.matcher = BlipItmMatcher(self.p.matcher_checkpoint)
        model = state.model_ref()
        dtype = next(model.parameters()).dtype
        stacked = torch.stack([v.to(pixels["pixel_values"].device) for v in _same_size(originals)])
        maps, fractions = self.matcher.relevance(
            stacked, [texts[r] for r in owners], pixels["pixel_values"].device, dtype
        )
        return list(maps), [float(f) for f in fractions]

    def _texts(self, state, ids, text_rows) -> list[str]:
        """The text each row asks about: ``handle.prompt_text(...)``, else its text after the image."""
        rows = ids.shape[0]
        if state.prompt_text is not None:
            if len(state.prompt_text) != rows:
                raise SteeringError(
                    f"handle.prompt_text(...) gave {len(state.prompt_text)} texts for a batch of {rows} prompts. "
                    "Fix: one text per batch row"
                )
            return list(state.prompt_text)
        tokenizer = getattr(state.processor, "tokenizer", state.processor)
        if not hasattr(tokenizer, "decode"):
            raise SteeringError(
                "AGLA's blip_itm matcher reads each prompt's text, but the processor given to apply has no tokenizer "
                "to decode it. Fix: pass the model's full processor, or the question with `with "
                "handle.prompt_text([...]):`"
            )
        return [tokenizer.decode(ids[r][text_rows[r]].tolist(), skip_special_tokens=True).strip() for r in range(rows)]

    def _embeds_of(self, state, new_pixels: dict) -> torch.Tensor:
        """The stream host's inputs_embeds for the augmented view (InstructBLIP: the language
        model's input): the top-level forward run unsteered on the augmented pixels, stopped
        where it calls the host."""
        model = state.model_ref()
        host = archs.get_path(model, state.arch.spec.stream_host)
        call = {k: v for k, v in (state.pending_call or {}).items() if isinstance(v, torch.Tensor)}
        call.update(new_pixels)
        captured = {}

        def grab(module, args, kwargs):
            captured["embeds"] = compat.bind_arguments(module.forward, args, kwargs).get("inputs_embeds")
            raise _RelevanceReady

        hook = host.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            with state.paused():
                model(**{k: v for k, v in call.items() if k in compat.parameter_names(model.forward)})
        except _RelevanceReady:
            pass
        finally:
            hook.remove()
        if captured.get("embeds") is None:
            raise compat.CompatibilityError(
                "AGLA augmented view",
                f"{type(model).__name__}.forward did not pass inputs_embeds to its language model",
            )
        return captured["embeds"]

    # ---- every decode step: the augmented rows follow with their own cache ----------------------
    def _rows(self, state) -> int:
        """The prompts of the current batch (B; the augmented view is rows [B, 2B))."""
        return state.prompt.require(
            self.key,
            "rows",
            "AGLA (a decode step without the prompt's prefill through the steered model)",
            "start each prompt with model.generate(...) or model(...) on the steered model",
        )

    def follow_view(self, state, bound):
        """Before every decode step: the augmented rows follow with their own cache rows."""
        rows = self._rows(state)
        if self.p.share_cache:
            return None
        ids = bound.get("input_ids")
        batch = (ids if ids is not None else bound["inputs_embeds"]).shape[0]
        cached = compat.cache_batch_size(compat.find_cache(bound.values()))
        if batch != rows or cached != 2 * rows:
            raise SteeringError(
                f"AGLA: this decode step has {batch} rows and a KV cache of {cached}, but the prompt batch was "
                f"{rows} (cache {2 * rows}: both views). Beam search (num_beams > 1) reorders the cache "
                "without the augmented view's rows and is not supported with AGLA. Fix: greedy or sampling "
                "(num_beams=1)"
            )
        second = {k: bound[k] for k in IMAGE_ARGUMENTS if isinstance(bound.get(k), torch.Tensor)}
        return stack_rows(bound, second, batch, "AGLA's augmented view")

    def assemble(self, state, model, output, is_prefill) -> None:
        """After every forward: the assembled next-token logits of the prompt rows."""
        rows = self._rows(state)
        logits = output.logits
        if logits.shape[0] == 2 * rows:
            z = assemble_logits(logits[:rows, -1], logits[rows:, -1], self.p.alpha, self.p.beta)
        elif logits.shape[0] == rows and self.p.share_cache and not is_prefill:
            z = assemble_logits(logits[:, -1], logits[:, -1], self.p.alpha, self.p.beta)
        else:
            raise SteeringError(
                f"AGLA: the model returned logits for {logits.shape[0]} rows; expected {2 * rows} (both views)"
            )
        assembled = logits[:rows].float()
        assembled[:, -1] = z
        if logits.shape[0] == 2 * rows:
            if self.p.share_cache:
                crop_rows(state, model, output, rows)  # the augmented view is dropped for good
            else:
                crop_output(output, rows)  # the cache keeps both views' rows
        output.logits = assembled


def _same_size(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The views resized to the first one's size (the matcher resizes them all again anyway)."""
    import torch.nn.functional as F

    size = views[0].shape[-2:]
    return [v if v.shape[-2:] == size else F.interpolate(v[None], size=tuple(size), mode="bilinear")[0] for v in views]


class AttentionRelevance:
    """The ``lvlm_attention`` matcher: the model's own attention from text to image tokens.

    One unsteered pass over the original prompt (no KV cache), stopped after the last layer it
    reads. At each of ``layers``, for each batch row, the post-softmax weights of the text rows
    ``text_rows`` (bool (B, L)) over every key, averaged over the heads (``heads``: bool (H,) or
    None) and those rows; then averaged over the layers -> (B, L) weights per key position.
    """

    def __init__(self, layers: list[int], heads, text_rows: torch.Tensor):
        self.layers = layers
        self.heads = heads
        self.text_rows = text_rows
        self.total = None
        self.seen = 0

    def observe(self, layer, module, query, key, attention_mask, kwargs) -> None:
        if layer not in self.layers:
            return
        rows = self.text_rows.to(query.device)
        start = int(rows.any(0).nonzero().min()) if bool(rows.any()) else query.shape[2]
        q = query[:, :, start:].float()
        k = key.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        scores = (q @ k.transpose(-1, -2)) * scaling  # (B, H, T, K)
        n_rows, n_keys = scores.shape[-2], scores.shape[-1]
        if attention_mask is None:
            positions = torch.arange(n_keys, device=q.device)
            visible = positions.view(1, -1) <= (positions[start : start + n_rows]).view(-1, 1)
            visible = visible.view(1, 1, n_rows, n_keys)
        else:
            part = attention_mask[:, :, start : start + n_rows, :n_keys]
            visible = part if part.dtype == torch.bool else part > torch.finfo(part.dtype).min / 2
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        if self.heads is not None:
            weights = weights[:, self.heads.to(weights.device)]
        weights = weights.mean(1)  # (B, T, K)
        use = rows[:, start:].float()
        per_row = (weights * use[..., None]).sum(1) / use.sum(1, keepdim=True).clamp(min=1.0)
        self.total = per_row if self.total is None else self.total + per_row
        self.seen += 1
        if self.seen == len(self.layers):
            raise _RelevanceReady

    def run(self, state, bound) -> torch.Tensor:
        """(B, L) mean attention weight of each key position, from the pass over ``bound``."""
        host = archs.get_path(state.model_ref(), state.arch.spec.stream_host)
        cache = compat.find_cache(bound.values())
        call = {k: v for k, v in bound.items() if v is not cache}
        call["use_cache"] = False
        try:
            with state.observing(self.layers, self.observe), state.paused():
                host(**call)
        except _RelevanceReady:
            pass
        if self.seen != len(self.layers):
            raise compat.CompatibilityError(
                "AGLA lvlm_attention", f"the relevance pass reached {self.seen} of the layers {self.layers}"
            )
        return self.total
