"""A tiny random Llama and a tiny random Idefics3 that vLLM's CPU backend accepts (head dim 64),
saved with an offline tokenizer (and image processor), and a runner that generates with vLLM in a
child process.

Idefics3 is the vision-language family here because vLLM's LLaVA, Qwen-VL and Gemma 3 modules
import torchvision, whose PyPI build does not load against the CPU torch; vLLM's Idefics3 does not.

vLLM starts an engine-core process and workers; each engine is started in a fresh Python
(``tests/vllm_run.py``) so that a test never shares an engine or its plugin state with another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = 256
PROMPTS = [
    "The quick brown fox jumps over the lazy dog and keeps running",
    "Attention steering",
    "vLLM runs models fast on many devices, and attnsteer steers their attention weights",
]


def _tokenizer():
    """A byte-level BPE tokenizer (vocab 256) trained in code on PROMPTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(PROMPTS * 20 + [json.__doc__, os.__doc__], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _text_config(vocab_size: int, **overrides):
    """The text model both tiny models share: Llama, 2 layers, hidden 256, 4 query / 2 kv heads of dim 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )


def _random_weights(model, text_layers) -> None:
    """N(0, 0.08) matrices, with q / k of the text layers scaled by 3 so that heads have sinks."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
        for layer in text_layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 256, 4 query / 2 kv heads of dim 64, vocab 256) with a
    byte-level BPE tokenizer trained in code; q / k are scaled so that heads have sinks."""
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config(len(tokenizer)))
    _random_weights(model, model.model.layers)
    model.save_pretrained(folder)
    return folder


IMAGE_PROMPTS = [  # (text, image seed or None): Idefics3's chat layout, "<image>" where the image goes
    ("User:<image>The quick brown fox jumps<end_of_utterance>\nAssistant:", 0),
    ("User:Attention steering<end_of_utterance>\nAssistant:", None),
    ("User:Look<image>and tell: vLLM runs models fast<end_of_utterance>\nAssistant:", 1),
]


def make_image(seed: int):
    """A random 64 x 48 RGB PIL image (split into 2 x 2 tiles plus the global view: 20 image tokens)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 48, 3), dtype=np.uint8))


def build_tiny_idefics3(folder: Path, seed: int = 0) -> Path:
    """Save an Idefics3 (tiny SigLIP-like vision tower: 32 px tiles of 8 px patches, pixel shuffle 2,
    so 4 tokens per tile; the text model of :func:`build_tiny_llama`) with its processor."""
    folder.mkdir(parents=True, exist_ok=True)
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    try:  # transformers >= 5.18 names the PIL image processor apart from the torchvision one
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Idefics3ImageProcessor as ImageProcessor

    tokenizer = _tokenizer()
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    images = ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4)
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    cfg = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=_text_config(len(tokenizer), pad_token_id=0).to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    _random_weights(model, model.model.text_model.layers)
    out = folder / "tiny-idefics3"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_vllm(model_dir: Path, recipe: str | None, out: Path, max_tokens: int = 6, whole_prompts: bool = False,
             env: dict | None = None, timeout: int = 300, tp: int = 1,
             focus: list | None = None, recipes: list | None = None,
             prefix_caching: str | None = None, images: bool = False,
             eager: bool = True, bad_extra: list | None = None,
             kv_blocks: int | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Generate greedily with vLLM in a child process; results (tokens, logprobs of every prompt
    in one batch and each alone) are written to ``out`` as JSON. ``recipe`` goes through
    ``additional_config``; ``env`` adds environment variables (e.g. ``ATTNSTEER_RECIPE``);
    ``focus`` / ``recipes``: per prompt, its focus spans / its own recipe (``SamplingParams.extra_args``)
    or None; ``prefix_caching``: "on" / "off" to override vLLM's default; ``images``: the prompts are
    IMAGE_PROMPTS (with their images); ``eager``: ``enforce_eager``; ``bad_extra``: per-request
    ``extra_args["attnsteer"]`` sent first, each expected to be refused at admission; ``kv_blocks``:
    a KV cache of that many 32-token blocks, too small for the batch (vLLM preempts)."""
    args = [sys.executable, str(HERE / "vllm_run.py"), "--model", str(model_dir), "--out", str(out)]
    args += ["--max-tokens", str(max_tokens)] + (["--recipe", recipe] if recipe else [])
    args += (["--whole-prompts"] if whole_prompts else []) + ["--tp", str(tp)]
    args += ["--focus", json.dumps(focus)] if focus is not None else []
    args += ["--recipes", json.dumps(recipes)] if recipes is not None else []
    args += ["--prefix-caching", prefix_caching] if prefix_caching else []
    args += (["--images"] if images else []) + ([] if eager else ["--compiled"])
    args += ["--kv-blocks", str(kv_blocks)] if kv_blocks else []
    for extra in bad_extra or []:
        args += ["--bad-extra", json.dumps(extra)]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )
