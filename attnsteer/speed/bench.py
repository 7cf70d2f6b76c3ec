"""What a speed measurement times, resolved before any timing: the device and dtype, the model
(built, or the caller's), the recipes with their labels, the configurations (baseline, then each
recipe on each backend) and the prompts. Every check that can refuse the settings runs here."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import models
from .config import DTYPES, SpeedConfig, SpeedError

Progress = Callable[[str], None]


@dataclass
class Bench:
    """A resolved measurement. ``config`` has the model's name, the prompt lengths, the image
    tokens and the dtype filled in; ``configs`` are the configurations (dicts with ``name``,
    ``recipe``, ``recipe_label``, ``backend``, ``methods``), the baseline first."""

    config: SpeedConfig
    device: Any
    model: Any
    hf_config: Any
    model_info: dict
    recipes: list[tuple[str, Any]]
    sources: list[Any]
    configs: list[dict]

    @property
    def lengths(self) -> list[int]:
        return list(self.config.prompt_len)


def recipe_label(value, taken: list[str]) -> str:
    """Short name of a recipe in tables and charts: a YAML file's stem (e.g. var-timing), else the
    value itself; the full value when the stem is already taken."""
    path = Path(value)
    label = path.stem if path.suffix in (".yaml", ".yml") else str(value)
    return str(value) if label in taken else label


def load_recipes(values: Sequence) -> list[tuple[str, Any]]:
    """(label, Recipe) of each recipe value (name, YAML path, hub repo, dict or ``attnsteer.Recipe``):
    names and paths are labelled by :func:`recipe_label`, the others by the recipe's name."""
    import attnsteer

    if isinstance(values, (str, Path)) or not values:
        raise SpeedError(
            f"--recipe {values!r}: expected a list of recipes. Fix: pass e.g. ['act-default'] (at least one)"
        )
    out: list[tuple[str, Any]] = []
    for value in values:
        try:
            recipe = attnsteer.load_recipe(value)
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(f"--recipe {value!r}: {exc}") from None
        named = isinstance(value, (str, Path))
        out.append((recipe_label(value, [lbl for lbl, _ in out]) if named else recipe.name, recipe))
    return out


def device_and_dtype(config: SpeedConfig):
    """(torch.device, dtype name) of ``config``: cuda when available unless ``device`` says otherwise;
    bfloat16 on CUDA and float32 on CPU unless ``dtype`` says otherwise."""
    import torch

    try:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise SpeedError(f"--device {config.device!r}: not a device. Fix: cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpeedError(f"--device {config.device}: CUDA is not available on this machine. Fix: --device cpu")
    name = DTYPES[config.dtype] if config.dtype else "auto"
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return device, name


def loaded_device_and_dtype(model, config: SpeedConfig):
    """(torch.device, dtype name) of a model the caller loaded: it is timed where and as it is, so
    a ``device`` or ``dtype`` setting must agree with it."""
    param = next(model.parameters())
    device, dtype_name = param.device, str(param.dtype).removeprefix("torch.")
    wanted = device_and_dtype(config)[0] if config.device is not None else device
    if wanted.type != device.type or wanted.index not in (None, device.index):
        raise SpeedError(
            f"--device {config.device!r}: the loaded model is on {device}, and measure() times it where it is. "
            "Fix: move the model there first, or leave device unset"
        )
    if config.dtype is not None and DTYPES[config.dtype] not in ("auto", dtype_name):
        raise SpeedError(
            f"--dtype {config.dtype!r}: the loaded model is in {dtype_name}, and measure() times it as it is. "
            "Fix: cast the model first, or leave dtype unset"
        )
    return device, dtype_name


def prepare(
    model, recipes: list[tuple[str, Any]], config: SpeedConfig, progress: Progress | None = None, sources=None
) -> Bench:
    """Resolve ``config`` for ``model`` (None: build ``config.model``) and the labelled ``recipes``;
    raise :class:`SpeedError` (naming the setting and the fix) before any timing when they cannot run.
    ``sources``: the recipe values as given (kept for the command line written in the results)."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    device, dtype_name = device_and_dtype(config) if model is None else loaded_device_and_dtype(model, config)
    if model is None and config.model is None:
        raise SpeedError("--model: not set. Fix: pass a model to measure(), or set SpeedConfig.model (e.g. smollm2)")
    if model is None and config.model == "smollm2" and config.override and not config.random_weights:
        raise SpeedError(
            "--override changes the config of the embedded SmolLM2, whose real weights would no longer fit. "
            "Fix: add --random-weights to time a changed shape, or drop --override"
        )
    hf_config, info, preloaded = _resolve(model, config)
    lengths = config.prompt_len or [info["prompt_len"]]
    image_tokens = info["image_tokens"] if config.image_tokens is None else config.image_tokens
    _check_lengths(hf_config, lengths, image_tokens, config.new_tokens)
    config = config.replace(model=info["model"], prompt_len=lengths, image_tokens=image_tokens, dtype=dtype_name)
    if progress is not None:
        progress(
            f"building {config.model} ({'random weights' if config.random_weights else 'pretrained'}) on {device} "
            f"in {dtype_name}: {hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}"
        )
    torch.manual_seed(config.seed)
    if model is None:
        dtype = getattr(torch, dtype_name)
        model = models.build_model(hf_config, config.model, config.random_weights, dtype, device, preloaded)
    else:
        model = model.eval()
    configs = configurations(model, recipes, config)
    srcs = list(sources) if sources is not None else [label for label, _ in recipes]
    return Bench(config, device, model, hf_config, info, recipes, srcs, configs)


def _resolve(model, config: SpeedConfig):
    """(text config, model info, preloaded model or None) of the caller's model or ``config.model``."""
    if model is None:
        hf_config, info = models.resolve_config(config.model, config.override)
        return hf_config, info, info.pop("preloaded", None)
    from ..evals.paths import loaded_model_identity

    hf_config = model.config
    info = {
        "model": loaded_model_identity(model, config.model)[0],
        "source": "loaded by the caller",
        "image_tokens": 0,
        "prompt_len": 512,
        "description": "",
        "image_token_id": getattr(hf_config, "image_token_id", None),
    }
    return hf_config, info, None


def _check_lengths(hf_config, lengths: list[int], image_tokens: int, new_tokens: int) -> None:
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    for prompt_len in lengths:
        if image_tokens >= prompt_len:
            raise SpeedError(
                f"--image_tokens {image_tokens} leaves no text in a {prompt_len}-token prompt. Fix: fewer image "
                "tokens, or a longer --prompt_len"
            )
        if max_pos and prompt_len + new_tokens > max_pos:
            raise SpeedError(
                f"--prompt_len {prompt_len} + --new_tokens {new_tokens} exceeds max_position_embeddings "
                f"{max_pos}. Fix: shorter prompt, or --override max_position_embeddings={prompt_len + new_tokens}"
            )


def configurations(model, recipes: list[tuple[str, Any]], config: SpeedConfig) -> list[dict]:
    """The baseline, then each recipe on each backend; a recipe that does not fit the model (or
    steers toward image tokens the prompt lacks) raises :class:`SpeedError` here, not mid-timing."""
    import attnsteer

    from ..plan import check_image_keys

    configs = [{"name": "baseline", "recipe": None, "recipe_label": None, "backend": None, "methods": []}]
    for label, recipe in recipes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                planned = attnsteer.plan(model, recipe)
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(f"--recipe {label!r} does not fit --model {config.model!r}: {exc}") from None
        try:  # methods that steer toward the image need placeholders to focus on (--image-tokens)
            check_image_keys(planned, label, config.model, images=bool(config.image_tokens))
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(
                f"{exc}; or time it on this model with --image-tokens N (N placeholder tokens play the image)"
            ) from None
        methods = sorted({i.method for i in recipe.interventions})
        for backend in config.backend_list:
            configs.append(
                {"name": f"{label}@{backend}", "recipe": recipe, "recipe_label": label, "backend": backend,
                 "methods": methods}
            )  # fmt: skip
    return configs


def inputs(bench: Bench, prompt_len: int):
    """(ids (B, L), focus bool (B, L) of the image placeholders or None) of one prompt length."""
    import torch

    c = bench.config
    ids = models.build_prompt(
        bench.hf_config, c.batch_size, prompt_len, c.image_tokens, bench.model_info.get("image_token_id"), c.seed,
        bench.device,
    )  # fmt: skip
    focus = None
    if c.image_tokens:  # the placeholders play the image role for VAR / VHR / PAI (handle.focus)
        focus = torch.zeros_like(ids, dtype=torch.bool)
        focus[:, 1 : 1 + c.image_tokens] = True
    return ids, focus
