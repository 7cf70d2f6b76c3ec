"""``AttnsteerLM``: lm-evaluation-harness's Hugging Face model (``HFLM``) with an attnsteer recipe.

Registered in lm-eval's model registry as ``attnsteer`` when this module is imported. lm-eval
(0.4.x) has no plugin entry point for models, so its command line is run through
``python -m attnsteer.lm_eval`` (lm-eval's own arguments, unchanged), which imports this module
first::

    python -m attnsteer.lm_eval --model attnsteer \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,recipe=act-default --tasks mmlu

From Python, ``lm_eval.simple_evaluate(model=AttnsteerLM(pretrained=model, tokenizer=tok,
recipe="act-default"), ...)``, or ``model="attnsteer"`` after importing this module.

model_args beyond HFLM's: ``recipe`` (built-in name, YAML path or Hub repo id; ``none`` = no
steering) and ``attnsteer_backend`` (``attnsteer.apply``'s backend, default ``auto``).
``pretrained=smollm2`` loads the embedded offline SmolLM2-135M-Instruct. The recipe, its hash
and the layers and heads it steers land in lm-eval's results under ``config.attnsteer``.

Log-likelihood batches are fed to the model left-padded with an attention mask and position ids
(HFLM right-pads them and passes no mask): padding rows then never enter per-prompt steering
statistics (ACT's sink detection), so steered results do not depend on ``batch_size``.
"""

from __future__ import annotations

import contextlib

import torch
from lm_eval.api.registry import register_model

from . import recipe_info
from .lm_eval_compat import HFLM, recording_right_padding

SMOLLM2_ID = "smollm2"


@register_model("attnsteer")
class AttnsteerLM(HFLM):
    """HFLM steered by one attnsteer recipe, applied to the model for the object's lifetime
    (``self.attnsteer_handle``; :meth:`remove_steering` takes it off).

    Args:
        pretrained: hub id, local folder, ``"smollm2"``, or a loaded ``PreTrainedModel``.
        recipe: built-in name, YAML path, Hub repo id, dict or ``attnsteer.Recipe``; None/"none": unsteered.
        attnsteer_backend: ``attnsteer.apply(backend=...)`` ("auto", "chunked", "flash", ...).
        **kwargs: HFLM's arguments (tokenizer, batch_size, device, dtype, ...).
    """

    def __init__(self, pretrained, recipe=None, attnsteer_backend: str = "auto", **kwargs):
        steering = recipe_info.load(recipe)
        if pretrained == SMOLLM2_ID:
            pretrained, kwargs = _load_smollm2(kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        self._row_lengths: list[int] | None = None
        self.attnsteer_recipe = steering
        self.attnsteer_backend = attnsteer_backend
        self.attnsteer_handle = None
        if steering is not None:
            import attnsteer

            self.attnsteer_handle = attnsteer.apply(self._model, steering, backend=attnsteer_backend)

    def remove_steering(self) -> None:
        """Restore the unsteered model (idempotent)."""
        if self.attnsteer_handle is not None:
            self.attnsteer_handle.remove()
            self.attnsteer_handle = None

    def attnsteer_info(self) -> dict:
        """The record of the steering that lm-eval's results carry (``config.attnsteer``)."""
        return recipe_info.record(self.attnsteer_recipe, self.attnsteer_handle, self.attnsteer_backend)

    def get_model_info(self) -> dict:
        if isinstance(self.pretrained, str):
            info = super().get_model_info()
        else:  # a model object: no hub revision to look up
            info = {"model_num_parameters": self._model.num_parameters(), "model_dtype": str(self._model.dtype)}
        return {**info, "attnsteer": self.attnsteer_info()}

    # ---- left-padded log-likelihood batches ----------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        with self._recording_row_lengths():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    @contextlib.contextmanager
    def _recording_row_lengths(self):
        """While active, ``self._row_lengths`` holds the true lengths of the rows of the batch
        HFLM last right-padded."""

        def record(lengths: list[int]) -> None:
            self._row_lengths = lengths

        try:
            with recording_right_padding(record):
                yield
        finally:
            self._row_lengths = None

    def _model_call(self, inps, attn_mask=None, labels=None):
        """``inps`` (batch, width) right-padded token ids -> logits (batch, width, vocab) in
        HFLM's right-padded layout, computed on the left-padded, masked rows."""
        lengths = self._row_lengths
        if (
            attn_mask is not None
            or labels is not None
            or lengths is None
            or len(lengths) != inps.shape[0]
            or max(lengths) != inps.shape[1]
            or min(lengths) == inps.shape[1]
        ):
            return super()._model_call(inps, attn_mask, labels)
        return self._left_padded_call(inps, lengths)

    def _left_padded_call(self, inps: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        rows, width = inps.shape
        left = torch.zeros_like(inps)
        mask = torch.zeros_like(inps)
        for i, n in enumerate(lengths):
            left[i, width - n :] = inps[i, :n]
            mask[i, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dtype = getattr(self, "mixed_precision_dtype", None)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(input_ids=left, attention_mask=mask, position_ids=positions).logits
        for i, n in enumerate(lengths):
            if n < width:
                logits[i] = torch.roll(logits[i], shifts=n - width, dims=0)
        return logits


def _load_smollm2(kwargs: dict) -> tuple[object, dict]:
    """(model, HFLM kwargs with its tokenizer) for ``pretrained=smollm2`` (offline, float32 unless dtype says)."""
    from attnsteer.models import load_model

    dtype = kwargs.pop("dtype", None)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype.removeprefix("torch."))
    device = kwargs.get("device")
    if device == "cuda" and not torch.cuda.is_available():  # HFLM's default device
        device = None
    tokenizer, model = load_model(SMOLLM2_ID, dtype=dtype, device=device)
    return model, {**kwargs, "tokenizer": tokenizer}
