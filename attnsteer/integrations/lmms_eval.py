"""``AttnsteerLMMS``: the ``attnsteer`` model of lmms-eval -- one of lmms-eval's own Hugging Face
vision-language models with an attnsteer recipe applied.

Registered through the ``lmms_eval.models`` entry point (``pip install attnsteer[lmms]``)::

    lmms-eval --model attnsteer \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=var-llava15-7b,device_map=cuda \\
        --tasks pope_pop,coco_cap_chair

model_args: ``recipe`` (built-in name, YAML path or Hub repo id; ``none`` = unsteered),
``base`` (the lmms-eval model that loads and runs the model; by default the one lmms-eval has for
the model's type -- ``llava_hf`` for LLaVA-1.5 / LLaVA-NeXT, ``qwen2_5_vl``, ... (:data:`BASES`) --
else its generic ``huggingface`` model),
``attnsteer_backend`` (``attnsteer.apply``'s backend) and ``prompt_field`` (the document field
holding the question, default ``question``); every other argument goes to ``base``.

Per request, methods that read the prompt as text (AGLA's image-text matcher) get the
document's question without the task's answer-format suffix (``handle.prompt_text``); the model's
processor goes to ``attnsteer.apply(..., processor=)``. The recipe record (name, hash, resolved
and applied form) lands in lmms-eval's results under ``config.attnsteer``.
"""

from __future__ import annotations

import warnings
import weakref

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from . import recipe_info

CLASS_PATH = "attnsteer.integrations.lmms_eval.AttnsteerLMMS"


# lmms-eval's own model for a transformers model type; others: its generic ``huggingface`` model
BASES = {"llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_hf", "qwen2_5_vl": "qwen2_5_vl",
         "qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "idefics2": "idefics2", "instructblip": "instructblip"}  # fmt: skip


def default_base(pretrained: str, trust_remote_code: bool = False) -> str:
    """The lmms-eval model that runs ``pretrained`` when model_args give no ``base``:
    :data:`BASES` by its config's ``model_type``, else ``huggingface``."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(pretrained, trust_remote_code=bool(trust_remote_code)).model_type
    return BASES.get(model_type, "huggingface")


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: ``--model attnsteer``."""
    return ModelManifest(model_id="attnsteer", chat_class_path=CLASS_PATH)


_ACTIVE: weakref.ref | None = None  # the AttnsteerLMMS whose record goes into the next results


class AttnsteerLMMS(lmms):
    """An lmms-eval model (``base``) whose transformers model is steered by one recipe.

    Args:
        pretrained: hub id or local folder of the vision-language model.
        recipe: built-in name, YAML path, Hub repo id, dict or ``attnsteer.Recipe``; None/"none": unsteered.
        base: the lmms-eval model name that loads and runs it (default: :func:`default_base`).
        attnsteer_backend: ``attnsteer.apply(backend=...)``.
        prompt_field: document field with the question text for ``handle.prompt_text``.
        **kwargs: ``base``'s own arguments (device, device_map, batch_size, ...).
    """

    is_simple = False  # as registered (chat); an instance takes its base's value

    def __init__(
        self,
        pretrained: str,
        recipe=None,
        base: str | None = None,
        attnsteer_backend: str = "auto",
        prompt_field: str = "question",
        **kwargs,
    ) -> None:
        super().__init__()
        from lmms_eval import models

        steering = recipe_info.load(recipe)
        if base == "attnsteer":
            raise ValueError(
                "model_args base='attnsteer': base names the lmms-eval model to steer, e.g. base=huggingface"
            )
        base = base or default_base(pretrained, kwargs.get("trust_remote_code", False))
        self.inner = models.get_model(base)(pretrained=pretrained, **kwargs)
        self.is_simple = self.inner.is_simple
        self.task_dict = self.inner.task_dict  # the evaluator fills ours; the base reads its own
        self.base, self.prompt_field = base, prompt_field
        self.attnsteer_recipe, self.attnsteer_backend = steering, attnsteer_backend
        self.attnsteer_handle = None
        if steering is not None:
            import attnsteer

            self.attnsteer_handle = attnsteer.apply(
                self.inner.model, steering, backend=attnsteer_backend, processor=self.processor
            )
        _record_in_results()

    # ---- what lmms-eval reads off a model -----------------------------------------------------
    @property
    def model(self):
        return self.inner.model

    @property
    def processor(self):
        """The base model's processor (lmms-eval's classes keep it as ``processor`` or ``_image_processor``)."""
        for name in ("processor", "_processor", "_image_processor"):
            found = getattr(self.inner, name, None)
            if found is not None:
                return found
        return None

    @property
    def rank(self):
        return self.inner.rank

    @property
    def world_size(self):
        return self.inner.world_size

    def __getattr__(self, name):  # accelerator, device, batch_size, tokenizer, ...: the base's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_cache_hook(self, cache_hook) -> None:
        self.cache_hook = cache_hook
        self.inner.set_cache_hook(cache_hook)

    # ---- requests -----------------------------------------------------------------------------
    def loglikelihood(self, requests):
        return self._each(self.inner.loglikelihood, requests)

    def generate_until(self, requests):
        return self._each(self.inner.generate_until, requests)

    def generate_until_multi_round(self, requests):
        return self._each(self.inner.generate_until_multi_round, requests)

    def _each(self, run, requests):
        """Run requests through the base; steered, one at a time, each with its question text."""
        global _ACTIVE
        _ACTIVE = weakref.ref(self)  # the model that answers is the one whose results come next
        if self.attnsteer_handle is None:
            return run(requests)
        out = []
        for request in requests:
            with self.attnsteer_handle.prompt_text([self.question_text(request)]):
                out.extend(run([request]))
        return out

    def question_text(self, request) -> str:
        """The question a request asks, without the task's answer-format suffix: its document's
        ``prompt_field`` (POPE, HallusionBench: ``question``), else the request's context."""
        args = request.args
        doc = None
        try:
            doc_id, task, split = args[3], args[4], args[5]
            doc = self.task_dict[task][split][doc_id]
        except (IndexError, KeyError, TypeError):
            pass
        value = doc.get(self.prompt_field) if isinstance(doc, dict) else None
        return (value if isinstance(value, str) else str(args[0])).strip()

    # ---- the record -------------------------------------------------------------------------------
    def attnsteer_info(self) -> dict:
        return {**recipe_info.record(self.attnsteer_recipe, self.attnsteer_handle, self.attnsteer_backend),
                "base": self.base}  # fmt: skip

    def remove_steering(self) -> None:
        """Restore the unsteered model (idempotent)."""
        if self.attnsteer_handle is not None:
            self.attnsteer_handle.remove()
            self.attnsteer_handle = None


def _record_in_results() -> None:
    """Make lmms-eval's results carry ``config.attnsteer``, the record of the AttnsteerLMMS that
    answered the evaluation's requests last.

    lmms-eval (0.7) asks a model nothing for its results' ``config``; every results dict passes
    through ``lmms_eval.evaluator._redact_eval_config_secrets(config)`` before it is returned and
    saved, so that function is wrapped (once) to add the record."""
    import lmms_eval.evaluator as ev

    original = getattr(ev, "_redact_eval_config_secrets", None)
    if original is None:
        import attnsteer

        warnings.warn(
            "lmms-eval has no evaluator._redact_eval_config_secrets (a version other than 0.7.x): the recipe and its "
            "hash are not written into its results; the model's attnsteer_info() has them",
            attnsteer.AttnsteerWarning,
            stacklevel=3,
        )
        return
    if getattr(original, "_attnsteer", False):
        return

    def with_attnsteer(config):
        active = _ACTIVE() if _ACTIVE is not None else None
        ours = (
            CLASS_PATH.rsplit(".", 1)[1] in str(config.get("model_backend", "")) if isinstance(config, dict) else False
        )
        if ours and active is not None:
            config = {**config, "attnsteer": active.attnsteer_info()}
        return original(config)

    with_attnsteer._attnsteer = True
    ev._redact_eval_config_secrets = with_attnsteer
