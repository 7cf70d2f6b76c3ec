"""attnsteer inside vLLM: a general plugin (entry point group ``vllm.general_plugins``) that
wraps vLLM's own CPU attention backend and, on GPUs, its FlexAttention backend, so a recipe steers
``vllm serve`` / ``vllm.LLM``.

Usage::

    ATTNSTEER_RECIPE=softplus-gentle vllm serve MODEL                                  # CPU build
    ATTNSTEER_RECIPE=softplus-gentle vllm serve MODEL --attention-backend FLEX_ATTENTION  # GPU
    # or in Python: vllm.LLM(model, additional_config={"attnsteer": {"recipe": "softplus-gentle"}})

vLLM calls :func:`register` once in every process (front end, engine core, workers). With no
recipe configured, the wrapped backend delegates every call unchanged. Which methods run, which
are refused and why: ``docs/vllm.md``. Layers: this package sits on top of the recipes, methods
and attention paths; nothing in attnsteer imports it.
"""

from __future__ import annotations

BACKEND_PATH = "attnsteer.vllm.cpu_backend.AttnsteerCPUBackend"
FLEX_BACKEND_PATH = "attnsteer.vllm.flex_backend.AttnsteerFlexBackend"
_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: route vLLM's ``CPU_ATTN`` backend through
    :class:`attnsteer.vllm.cpu_backend.AttnsteerCPUBackend` and ``FLEX_ATTENTION`` through
    :class:`attnsteer.vllm.flex_backend.AttnsteerFlexBackend` (idempotent), and check a recipe
    named by ``$ATTNSTEER_RECIPE`` right away, so a refused method fails at engine start."""
    global _registered
    if _registered:
        return
    _registered = True
    from ..settings import import_method_modules
    from . import compat
    from .config import check_environment_recipe

    import_method_modules()  # the user's own method modules (ATTNSTEER_METHODS), in every process
    check_environment_recipe()
    compat.register_backend("CPU_ATTN", BACKEND_PATH)
    compat.register_backend("FLEX_ATTENTION", FLEX_BACKEND_PATH)
    from .frontend import check_backend_at_engine_start, check_requests_at_admission, show_recipe_in_model_cards

    show_recipe_in_model_cards()
    check_requests_at_admission()
    check_backend_at_engine_start()


def recipe_info(llm) -> dict | None:
    """The recipe steering a ``vllm.LLM`` (or an engine's ``VllmConfig``): ``{"recipe": name,
    "hash": ..., "per_request_recipes": bool}``, or None when it runs unsteered. ``vllm serve``
    shows the same under ``"attnsteer"`` in each base model's card of ``/v1/models``."""
    from .config import served_recipe

    engine = getattr(llm, "llm_engine", None)
    return served_recipe(getattr(engine, "vllm_config", None) or getattr(llm, "vllm_config", llm))
