"""Vision-language generation: items, decoding settings, prompts through the processor's chat
template, left-padded batches, and loading a vision-language model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .dist import Dist, default_device


@dataclass
class EvalItem:
    """One model call: a stable ``id``, the user message, an image (path or PIL image) and the
    task's own fields (label, split, ...)."""

    id: str
    prompt: str
    image: Any = None
    meta: dict = field(default_factory=dict)
    # the question without answer-format suffixes, for methods that match the image against the
    # prompt's text (AGLA's blip_itm); None: the prompt itself
    query: str | None = None


@dataclass
class Decoding:
    """How answers are generated (greedy by default)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.do_sample:
            out.pop("temperature")
            out.pop("top_p")
        out["strategy"] = "sampling" if self.do_sample else ("beam" if self.num_beams > 1 else "greedy")
        return out

    def generation_config(self, model, pad_id: int | None, eos_id):
        import copy

        config = copy.deepcopy(model.generation_config)
        eos = config.eos_token_id if config.eos_token_id is not None else eos_id
        pad = pad_id if pad_id is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=None,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        config.update(**kwargs)
        return config


def item_seed(seed: int, item_id: str) -> int:
    """The per-batch torch seed derived from the run seed and the batch's first item."""
    return int(hashlib.sha256(f"{seed}|{item_id}".encode()).hexdigest()[:8], 16)


# ---- inputs -------------------------------------------------------------------------------------
def load_image(image):
    """A PIL RGB image from a path or an image object."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as img:
            return img.convert("RGB")
    return image.convert("RGB") if hasattr(image, "convert") else image


class VLMInputs:
    """Batches of (prompt, image) through the processor's chat template, left-padded.

    ``chat=False`` (``--no-chat``): no chat template; the text is the processor's image token
    (which the processor expands to the image's placeholders) on its own line, then the prompt."""

    def __init__(self, processor, model_id: str = "the model", chat: bool = True, model=None):
        from ..errors import EvalError

        self.processor = processor
        self.chat = chat
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise EvalError(f"--model {model_id!r}: its processor has no tokenizer; a vision-language model is needed")
        self.image_token = getattr(processor, "image_token", None)
        if not chat and not isinstance(self.image_token, str):
            raise EvalError(
                f"--no-chat: the processor of --model {model_id!r} names no image token (processor.image_token), so "
                "the image cannot be placed in a prompt without its chat template. Fix: drop --no-chat"
            )
        if not chat and model is not None:
            from .. import archs

            arch = archs.resolve(model)
            if arch.wrapper_token_ids:
                raise EvalError(
                    f"--no-chat: --model {model_id!r} ({arch.spec.model_type}) wraps each image in marker tokens (ids "
                    f"{list(arch.wrapper_token_ids)}) that its chat template writes around the image token; a prompt "
                    "without the template would lack them. Fix: drop --no-chat"
                )
        if chat and not getattr(processor, "chat_template", None):
            raise EvalError(
                f"--model {model_id!r}: its processor has no chat template, so prompts cannot be formatted the way "
                "the model was trained. Fix: use a checkpoint whose processor ships one (e.g. the llava-hf/* "
                "conversions)"
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def prompt_text(self, prompt: str, with_image: bool = True) -> str:
        if not self.chat:
            return f"{self.image_token}\n{prompt}" if with_image else prompt
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def __call__(self, items: Sequence[EvalItem], device) -> dict:
        texts = [self.prompt_text(it.prompt, it.image is not None) for it in items]
        images = [load_image(it.image) for it in items if it.image is not None]
        kwargs: dict = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        enc = self.processor(**kwargs)
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in enc.items()}


def generate_batch(model, builder: VLMInputs, items: Sequence[EvalItem], decoding: Decoding, device, handle=None):
    """Generate for a batch; returns ``(texts, new_token_counts, hit_limit_flags)``. With a
    steering ``handle``, each item's ``query`` is the prompt text its methods match against."""
    import contextlib

    import torch

    inputs = builder(items, device)
    config = decoding.generation_config(model, builder.tokenizer.pad_token_id, builder.tokenizer.eos_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    queries = [it.query if it.query is not None else it.prompt for it in items]
    text = handle.prompt_text(queries) if handle is not None else contextlib.nullcontext()
    with torch.inference_mode(), text:
        out = model.generate(**inputs, generation_config=config)
    new = out[:, prompt_len:].tolist()
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    texts, counts, hit = [], [], []
    for row in new:
        n = len(row)
        stopped = False
        for i, tok in enumerate(row):
            if tok in eos_ids:
                n, stopped = i, True
                break
        while n and row[n - 1] == config.pad_token_id and config.pad_token_id not in eos_ids:
            n -= 1
        texts.append(builder.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
        counts.append(n + int(stopped))
        hit.append(not stopped and n >= decoding.max_new_tokens)
    return texts, counts, hit


def require_vlm(model_id: str) -> None:
    """Refuse the embedded text-only default up front (before any data or run directory work)."""
    from ..errors import EvalError
    from ..models import SMOLLM2_ID

    if model_id == SMOLLM2_ID:
        raise EvalError(
            f"--model {SMOLLM2_ID}: this benchmark needs a vision-language model (images in, text out), and "
            f"{SMOLLM2_ID} reads text only. Fix: pass e.g. --model llava-hf/llava-1.5-7b-hf (or a local folder of it)"
        )


def load_vlm(model_id: str, kwargs: dict, dist: Dist | None = None):
    """(processor, model) of a vision-language model from a hub id or local folder.

    ``kwargs`` come from ``--model_args`` (dtype, device, attn_implementation, revision,
    trust_remote_code). Under ``accelerate launch`` each process loads onto its own device.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..errors import EvalError
    from ..models import HUB_KWARGS

    require_vlm(model_id)
    kwargs = dict(kwargs)
    device = kwargs.pop("device", None) or default_device(dist)
    dtype = kwargs.pop("dtype", None)
    attn = kwargs.pop("attn_implementation", "sdpa")
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(model_id, **hub)
        processor = AutoProcessor.from_pretrained(model_id, **hub)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=dtype if dtype is not None else torch.float32, attn_implementation=attn, **hub
        )
    except (OSError, ValueError) as exc:
        raise EvalError(
            f"--model {model_id!r}: could not load it as a vision-language model ({type(exc).__name__}: {exc}). "
            "Fix: pass a folder (or hub id) with config.json, the processor files and weights of an image-text-to-text "
            "model such as llava-hf/llava-1.5-7b-hf"
        ) from None
    del config
    model.eval()
    if device:
        model.to(device)
    return processor, model
