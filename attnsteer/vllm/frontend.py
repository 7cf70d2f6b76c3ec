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
_wrapped = False
_checking = False


def check_requests_at_admission() -> None:
    """Wrap vLLM's input processor once per process (idempotent): every request's
    ``extra_args["attnsteer"]`` is checked against its prompt before it reaches the engine."""
    global _checking
    if _checking:
        return
    _checking = True
    try:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError as error:
        LOG.warning("attnsteer: per-request inputs are checked in the workers only (%s)", error)
        return
    original = getattr(InputProcessor, "process_inputs", None)
    if original is None:
        LOG.warning("attnsteer: per-request inputs are checked in the workers only (no process_inputs)")
        return

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

    InputProcessor.process_inputs = process_inputs


def show_recipe_in_model_cards() -> None:
    """Wrap the OpenAI server's model listing once per process (idempotent)."""
    global _wrapped
    if _wrapped:
        return
    _wrapped = True
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError as error:
        LOG.warning("attnsteer: /v1/models will not show the recipe (this vLLM has no OpenAIServingModels: %s)", error)
        return
    original = getattr(OpenAIServingModels, "show_available_models", None)
    if original is None:
        LOG.warning(
            "attnsteer: /v1/models will not show the recipe (OpenAIServingModels.show_available_models is gone)"
        )
        return

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

    OpenAIServingModels.show_available_models = show_available_models
