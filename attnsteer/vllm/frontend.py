"""What attnsteer adds to vLLM's front end (the process that takes requests).

- ``/v1/models`` lists each base model with an ``"attnsteer"`` entry (recipe name, hash, whether
  requests may name their own), so a client can check which steering produced an answer.
  vLLM has no hook for extra model-card fields; :func:`show_recipe_in_model_cards` wraps
  ``OpenAIServingModels.show_available_models`` at run time (its cards allow extra fields).
- A request's ``extra_args["attnsteer"]`` is checked when vLLM admits it
  (:func:`check_requests_at_admission` wraps ``InputProcessor.process_inputs``): a malformed focus span
  or a refused recipe is the client's error (HTTP 400, or a ValueError from ``LLM.generate``), not
  an exception in a worker that would stop the engine for every request.

Where a vLLM release moves these methods, the plugin logs a warning and goes on without them.
"""

from __future__ import annotations

import logging

LOG = logging.getLogger("attnsteer.vllm")
_done: set[str] = set()  # wrappers installed in this process


def _wrap(module: str, cls: str, method: str, make, lost: str) -> None:
    """Replace ``module.cls.method`` by ``make(original)`` once per process; when this vLLM has no
    such method, warn that ``lost`` and go on."""
    key = f"{module}.{cls}.{method}"
    if key in _done:
        return
    _done.add(key)
    import importlib

    try:
        owner = getattr(importlib.import_module(module), cls)
        original = getattr(owner, method)
    except (ImportError, AttributeError) as error:
        LOG.warning("attnsteer: %s (this vLLM has no %s: %s)", lost, key, error)
        return
    setattr(owner, method, make(original))


def check_requests_at_admission() -> None:
    """Wrap vLLM's input processor once per process (idempotent): every request's
    ``extra_args["attnsteer"]`` is checked against its prompt before it reaches the engine."""
    from .compat import FRONTEND_TARGETS

    lost = "per-request inputs are checked in the workers only"
    _wrap(*FRONTEND_TARGETS["admission"], _checking_admission, lost)


def check_backend_at_engine_start() -> None:
    """Wrap vLLM's input processor's constructor once per process: a steered engine on a GPU platform
    that would run another attention backend than FLEX_ATTENTION fails as it starts."""
    from .compat import FRONTEND_TARGETS

    lost = "a steered GPU engine on another attention backend is refused in its workers only"
    _wrap(*FRONTEND_TARGETS["engine_start"], _checking_backend, lost)


def _checking_backend(original):
    def __init__(self, vllm_config, *args, **kwargs):
        from .config import check_gpu_backend

        check_gpu_backend(vllm_config)
        original(self, vllm_config, *args, **kwargs)

    return __init__


def _checking_admission(original):
    """``InputProcessor.process_inputs`` that checks ``extra_args["attnsteer"]`` of the request it builds."""
    from .compat import validation_error

    VLLMValidationError = validation_error()

    def process_inputs(self, *args, **kwargs):
        from ..errors import AttnsteerError
        from .requests import check_request

        request = original(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get("attnsteer")
        if extra is not None:
            ids, embeds = request.prompt_token_ids, getattr(request, "prompt_embeds", None)
            length = len(ids) if ids is not None else int(embeds.shape[0])
            try:
                check_request(self.vllm_config, extra, length)
            except AttnsteerError as error:
                raise VLLMValidationError(str(error), parameter='extra_args["attnsteer"]') from error
        return request

    return process_inputs


def show_recipe_in_model_cards() -> None:
    """Wrap the OpenAI server's model listing once per process (idempotent)."""
    from .compat import FRONTEND_TARGETS

    lost = "/v1/models will not show the recipe"
    _wrap(*FRONTEND_TARGETS["model_cards"], _with_recipe, lost)


def _with_recipe(original):
    """``OpenAIServingModels.show_available_models`` whose base-model cards carry ``"attnsteer"``."""

    async def show_available_models(self):
        from .config import served_recipe

        listing = await original(self)
        info = served_recipe(self.engine_client.vllm_config)
        if info is not None:
            base = {path.name for path in self.base_model_paths}
            for card in listing.data:
                if card.id in base:
                    card.attnsteer = info
        return listing

    return show_available_models
