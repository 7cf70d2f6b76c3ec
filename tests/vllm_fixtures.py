"""A tiny random Llama that vLLM's CPU backend accepts (head dim 64), saved with an offline
tokenizer, and a runner that generates with vLLM in a child process.

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


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 256, 4 query / 2 kv heads of dim 64, vocab 256) with a
    byte-level BPE tokenizer trained in code; q / k are scaled so that heads have sinks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(PROMPTS * 20 + [json.__doc__, os.__doc__], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.save_pretrained(folder)
    return folder


def run_vllm(model_dir: Path, recipe: str | None, out: Path, max_tokens: int = 6, whole_prompts: bool = False,
             env: dict | None = None, timeout: int = 300, tp: int = 1,
             focus: list | None = None, recipes: list | None = None,
             prefix_caching: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Generate greedily with vLLM in a child process; results (tokens, logprobs of every prompt
    in one batch and each alone) are written to ``out`` as JSON. ``recipe`` goes through
    ``additional_config``; ``env`` adds environment variables (e.g. ``ATTNSTEER_RECIPE``);
    ``focus`` / ``recipes``: per prompt, its focus spans / its own recipe (``SamplingParams.extra_args``)
    or None; ``prefix_caching``: "on" / "off" to override vLLM's default."""
    args = [sys.executable, str(HERE / "vllm_run.py"), "--model", str(model_dir), "--out", str(out)]
    args += ["--max-tokens", str(max_tokens)] + (["--recipe", recipe] if recipe else [])
    args += (["--whole-prompts"] if whole_prompts else []) + ["--tp", str(tp)]
    args += ["--focus", json.dumps(focus)] if focus is not None else []
    args += ["--recipes", json.dumps(recipes)] if recipes is not None else []
    args += ["--prefix-caching", prefix_caching] if prefix_caching else []
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )
