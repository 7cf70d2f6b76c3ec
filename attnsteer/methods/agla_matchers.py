"""AGLA's matchers: how relevant each part of an image is to the prompt, and how much of it to drop.

AGLA's augmented view (:mod:`attnsteer.methods.agla_views`) needs, for each (image, prompt) pair,
a relevance map ``R`` over the image and the fraction ``f`` of its pixels to black out.
:class:`BlipItmMatcher` (``blip_itm``) is the paper's matcher: BLIP's image-text matching model
(``Salesforce/blip-itm-large-coco``, ViT-L/16 at 384 px, a 12-layer BERT text encoder).

Inputs. Images (N, 3, H, W) in [0, 1] are resized (bicubic, antialiased) to the image
processor's size and normalised with its mean / std: pixel values (N, 3, S, S), S = 384. Prompts
are cleaned as BLIP's eval caption processor does (:func:`clean_caption`) and tokenized, padded:
ids (N, T), ``[CLS] w_1 ... w_k [SEP] [PAD]...``. The ViT gives E (N, 1 + P, D): its CLS token
and P = g * g patch tokens, g = S // patch (24).

R, Grad-CAM of the ITM head at one cross-attention layer of the text encoder (``layer``, 0-based,
6 by default). The ITM pass runs the text encoder over the ids with their first token set to
[ENC], cross-attending E; A (N, heads, T, 1 + P) are the cross-attention probabilities of that
layer, m (N,) the ITM head's raw "match" logit (``itm_score[:, 1]``, before the softmax), and
G = d(sum_n m_n) / dA -- each sample's own gradient, since samples never interact. Then::

    cam = mean_heads(A * max(G, 0))                   # (N, T, 1 + P)
    R   = mean_{t = 1..L} cam[:, t, 1:]  -> (N, g, g)  # L = (non-pad tokens) - 2

the text rows of every token but the first and the final [SEP], the image CLS column dropped. A
prompt without any word (L < 1: only [CLS] [SEP]) uses row 0, the token the ITM head reads.

f = clamp(s / 2, 0, 0.5), with s the ITC cosine similarity of the pair: the text encoder alone
over the ids as tokenized ([CLS] first), the normalised projections of the image's and the text's
first token (BLIP's ``itm_score`` with ``use_itm_head=False``, its diagonal).

[ENC]: BLIP (and LAVIS, which AGLA runs) puts [ENC] in place of [CLS] for the ITM pass;
transformers' ``BlipForImageTextRetrieval`` keeps [CLS]. Here the ITM pass uses [ENC] when the
tokenizer's vocabulary has it, and [CLS] with an :class:`~attnsteer.errors.AttnsteerWarning`
otherwise.

The probabilities A come from the BLIP text encoder's public ``output_attentions=True``
(``cross_attentions``, one tensor per layer): they must be the very tensors the forward uses
(the gradient is taken with respect to them), so any other shape, count or a tensor outside the
graph raises :class:`~attnsteer.compat.CompatibilityError` naming the transformers version.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F

from ..compat import CompatibilityError
from ..errors import AttnsteerWarning, SteeringError, UsageError

DEFAULT_BLIP_CHECKPOINT = "Salesforce/blip-itm-large-coco"
MAX_WORDS = 35  # BLIP's eval caption processor keeps the first 35 words
_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_TOUCHPOINT = "BLIP text encoder cross-attention probabilities (output_attentions=True -> cross_attentions)"


def clean_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """BLIP's eval text cleaning: lower-case, ``.!"()*#:;~`` -> space, whitespace runs collapsed,
    stripped, the first ``max_words`` words."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split()[:max_words])


def load_blip(checkpoint: str):
    """``(BlipForImageTextRetrieval, BlipProcessor)`` from ``checkpoint`` (a hub id or a local
    directory); a :class:`SteeringError` saying how to get it when it cannot be loaded."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    try:
        model = BlipForImageTextRetrieval.from_pretrained(checkpoint)
        processor = BlipProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:  # hub / connection errors are OSErrors
        raise SteeringError(
            f"matcher blip_itm: cannot load the BLIP checkpoint {checkpoint!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Fix: download it while online with "
            f"`huggingface-cli download {checkpoint}` (or `hf download {checkpoint}`), or set the recipe's "
            "`matcher_checkpoint` to a local directory holding a BlipForImageTextRetrieval checkpoint"
        ) from err
    return model, processor


def _size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    if not height or not width:
        raise CompatibilityError("BLIP image processor size", f"expected a height and a width, got {size!r}")
    return int(height), int(width)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class BlipItmMatcher:
    """AGLA's ``blip_itm`` matcher: Grad-CAM of BLIP's ITM head at one text-encoder cross-attention
    layer (relevance) and the ITC similarity halved (fraction); see the module docstring.

    ``model`` / ``processor``: already-built ``BlipForImageTextRetrieval`` and processor (an object
    with ``.image_processor`` and ``.tokenizer``), both or neither; otherwise both are loaded from
    ``checkpoint`` on first use, once. The model is moved to the caller's device and dtype, put in
    eval mode and its parameters frozen (``requires_grad`` off): the backward only reaches the
    attention probabilities, so no parameter gradient is ever accumulated.
    """

    name = "blip_itm"

    def __init__(self, checkpoint: str = DEFAULT_BLIP_CHECKPOINT, layer: int = 6, *, model=None, processor=None):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise UsageError(
                f"matcher blip_itm: layer: got {layer!r}; allowed: a 0-based text-encoder layer index >= 0"
            )
        if (model is None) != (processor is None):
            raise UsageError(
                "matcher blip_itm: model and processor: got only one of them; allowed: both (already built) or "
                "neither (loaded from the checkpoint)"
            )
        self.checkpoint = checkpoint
        self.layer = layer
        self._model = None
        self._processor = None
        self._placed = None
        self._enc_id = None
        if model is not None:
            self._adopt(model, processor)

    def _adopt(self, model, processor) -> None:
        for attr in ("vision_model", "text_encoder", "itm_head", "vision_proj", "text_proj"):
            if not hasattr(model, attr):
                raise CompatibilityError("BlipForImageTextRetrieval layout", f"the model has no `{attr}`")
        layers = model.text_encoder.encoder.layer
        if self.layer >= len(layers):
            raise UsageError(
                f"matcher blip_itm: layer: got {self.layer}; allowed: 0..{len(layers) - 1} (the BLIP text encoder of "
                f"{self.checkpoint!r} has {len(layers)} layers). Fix: set the matcher layer in that range (6 in AGLA)"
            )
        if not hasattr(layers[self.layer], "crossattention"):
            raise CompatibilityError(
                "BLIP text encoder layout", f"text-encoder layer {self.layer} has no cross-attention (is_decoder off?)"
            )
        tokenizer = processor.tokenizer
        enc_id = tokenizer.get_vocab().get("[ENC]")
        if enc_id is None or enc_id >= model.config.text_config.vocab_size:
            warnings.warn(
                "matcher blip_itm: the BLIP tokenizer has no [ENC] token; the ITM pass uses [CLS] as transformers' "
                "BlipForImageTextRetrieval does, where BLIP (and AGLA) use [ENC]: relevance maps may differ",
                AttnsteerWarning,
                stacklevel=3,
            )
            enc_id = None
        self._model, self._processor, self._enc_id = model, processor, enc_id

    def _prepare(self, device, dtype):
        if self._model is None:
            self._adopt(*load_blip(self.checkpoint))
        placed = (torch.device(device), dtype)
        if self._placed != placed:
            self._model.to(device=device, dtype=dtype).eval().requires_grad_(False)
            self._placed = placed
        return self._model, self._processor

    def _pixel_values(self, images: torch.Tensor, device, dtype) -> torch.Tensor:
        image_processor = self._processor.image_processor
        x = F.interpolate(
            images.to(device=device, dtype=torch.float32),
            size=_size(image_processor),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        ).clamp(0.0, 1.0)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(dtype)

    def relevance(self, images: torch.Tensor, texts: list[str], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) float in [0, 1]; texts: N strings -> (relevance (N, g, g) float32,
        fraction (N,) float32 = clamp(s / 2, 0, 0.5)), both on ``device``; the BLIP model runs in
        ``dtype``. Callable under ``torch.no_grad()`` and ``torch.inference_mode()``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"matcher blip_itm: images: got shape {tuple(images.shape)}; allowed: (N, 3, H, W)")
        if len(texts) != images.shape[0]:
            raise UsageError(
                f"matcher blip_itm: texts: got {len(texts)} for {images.shape[0]} images; allowed: one each"
            )
        # the Grad-CAM needs autograd even when the caller runs without it
        with torch.inference_mode(False), torch.enable_grad():
            model, processor = self._prepare(device, dtype)
            tokens = processor.tokenizer(
                [clean_caption(t) for t in texts],
                padding=True,
                padding_side="right",  # the rows 1..L below assume it
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            with torch.no_grad():
                embeds = model.vision_model(pixel_values=self._pixel_values(images, device, dtype)).last_hidden_state
                text_states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                image_feat = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
                text_feat = F.normalize(model.text_proj(text_states[:, 0]), dim=-1)
                fraction = ((image_feat * text_feat).sum(-1).float() / 2).clamp(0.0, 0.5)
            cam = self._gradcam(model, ids, mask, embeds.detach().requires_grad_(True))
        return self._reduce(cam, mask, model), fraction

    def _gradcam(self, model, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """(N, T, 1 + P) float32: the head mean of A * max(G, 0) at the chosen layer."""
        itm_ids = ids.clone()
        if self._enc_id is not None:
            itm_ids[:, 0] = self._enc_id
        out = model.text_encoder(
            input_ids=itm_ids,
            attention_mask=mask,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            output_attentions=True,
        )
        cross = getattr(out, "cross_attentions", None)
        n_layers = len(model.text_encoder.encoder.layer)
        if cross is None or len(cross) != n_layers:
            got = "none" if cross is None else f"{len(cross)} tensors"
            raise CompatibilityError(_TOUCHPOINT, f"expected one tensor per layer ({n_layers}), got {got}")
        attn = cross[self.layer]
        expected = (ids.shape[0], model.config.text_config.num_attention_heads, ids.shape[1], embeds.shape[1])
        if not isinstance(attn, torch.Tensor) or tuple(attn.shape) != expected:
            got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise CompatibilityError(
                _TOUCHPOINT, f"expected a tensor (batch, heads, text, image) {expected}, got {got}"
            )
        match = model.itm_head(out.last_hidden_state[:, 0, :])[:, 1]
        try:
            (grad,) = torch.autograd.grad(match.sum(), attn)
        except RuntimeError as err:
            raise CompatibilityError(
                _TOUCHPOINT, f"the returned probabilities are not the ones the ITM logit depends on ({err})"
            ) from err
        return (attn.detach() * grad.clamp(min=0)).float().mean(dim=1)

    def _reduce(self, cam: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
        """cam (N, T, 1 + P) -> R (N, g_h, g_w): the mean of rows 1..L (row 0 when L < 1), no image CLS."""
        n, t, _ = cam.shape
        length = mask.sum(dim=1) - 2  # every token but the first and the final [SEP]
        rows = torch.arange(t, device=cam.device)[None]
        weights = ((rows >= 1) & (rows <= length[:, None])).float()
        weights[length < 1, 0] = 1.0  # no word: the token the ITM head reads
        weights = weights / weights.sum(dim=1, keepdim=True)
        per_patch = torch.einsum("nt,ntp->np", weights, cam)[:, 1:]
        size_h, size_w = _size(self._processor.image_processor)
        patch_h, patch_w = _pair(model.config.vision_config.patch_size)
        grid = (size_h // patch_h, size_w // patch_w)
        if per_patch.shape[1] != grid[0] * grid[1]:
            raise CompatibilityError(
                "BLIP vision tokens", f"expected 1 + {grid[0]}x{grid[1]} image tokens, got {per_patch.shape[1] + 1}"
            )
        return per_patch.reshape(n, *grid)
