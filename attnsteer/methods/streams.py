"""A second copy of every prompt in the steered model's batch, and cropping it off again.

Two methods run a second version of each prompt in the same forward as the prompt itself:
VHR's text-only stream (prefill only) and AGLA's augmented view (prefill and, with its own KV
cache, every decode step). Both append ``B`` rows to a batch of ``B``: rows ``[0, B)`` are the
prompts, rows ``[B, 2B)`` their second versions. These helpers own the argument bookkeeping:

* :func:`stack_rows`: a forward's arguments with the second rows appended, every per-row argument
  along its batch dimension, every per-image argument (image grids, sizes) after the first
  rows' images. An unknown tensor argument raises: attnsteer never guesses whether it is per row.
* :func:`crop_output`: a model output cut back to the first ``B`` rows (logits, hidden states...).
* :func:`crop_rows`: the same for the KV cache, the model's own per-batch state and every
  method's per-prompt state, when the second rows are dropped for good.
"""

from __future__ import annotations

import torch

from .. import compat
from ..errors import SteeringError

# per-row arguments of a forward -> their batch dimension
ROW_ARGUMENTS = {
    "input_ids": 0,
    "inputs_embeds": 0,
    "attention_mask": 0,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
    "position_ids": -2,  # (B, L), or (3|4, B, L) for M-RoPE
}
# image arguments: one entry per image (or video) in the order of the batch rows, or per row with
# padding images the model skips (Idefics3 / SmolVLM's pixel_values and pixel_attention_mask), or
# per-row image counts (LLaVA-OneVision's batch_num_images): either way, kept as they are they give
# the first rows their images and the second rows none
IMAGE_ARGUMENTS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "video_grid_thw",
    "pixel_values_videos",
    "pixel_attention_mask",
    "batch_num_images",
)
# tensors without a batch dimension
SHARED_ARGUMENTS = ("cache_position",)


def stack_rows(bound: dict, second: dict, rows: int, what: str) -> dict:
    """The arguments of a forward of ``rows`` prompts with a second version of each appended.

    bound: the forward's arguments by name. second: replacements for the second rows (same
    names; e.g. text-only ``input_ids`` (B, L), augmented ``pixel_values``); an argument that is
    not replaced is repeated. Per-row arguments grow to 2B rows; per-image ones (pixels, grids)
    grow only when ``second`` gives the second rows' own images, else the second rows show none.
    ``what`` names the second version in errors. Returns the new arguments; the Cache and
    non-tensor arguments are passed through.
    """
    cache = compat.find_cache(bound.values())
    if cache is not None and compat.cache_is_static(cache):
        raise SteeringError(
            f"{what} rides in the model's batch as {rows} extra rows, but this forward's KV cache "
            f"({type(cache).__name__}) is preallocated for the prompt batch. Fix: use the default dynamic cache "
            "(no cache_implementation='static' in generate())"
        )
    out = dict(bound)
    for name, value in bound.items():
        if not isinstance(value, torch.Tensor):
            continue
        other = second.get(name, value)
        if name in ROW_ARGUMENTS:
            dim = ROW_ARGUMENTS[name] if value.dim() > 1 else 0
            if value.shape[dim] != rows:
                raise SteeringError(
                    f"the forward's {name} has shape {tuple(value.shape)}, whose batch dimension is not the prompt "
                    f"batch of {rows}; cannot add the second version of each prompt"
                )
            out[name] = torch.cat([value, other.to(value.dtype)], dim=dim)
        elif name in IMAGE_ARGUMENTS:
            if name in second:  # the second rows show images of their own (else they show none)
                out[name] = torch.cat([value, other.to(value.dtype)], dim=0)
        elif name not in SHARED_ARGUMENTS:
            raise SteeringError(
                f"the steered forward received a tensor argument {name!r} (shape {tuple(value.shape)}) that attnsteer "
                "does not know how to repeat for the second version of each prompt (VHR's text-only stream, AGLA's "
                "augmented view). Fix: leave it out, or report this model and argument to attnsteer"
            )
    for name, value in second.items():
        if name not in bound:
            out[name] = value
    return out


def crop_output(output, rows: int) -> None:
    """Keep the first ``rows`` batch rows of every tensor of a model output (in place), except
    the KV cache: logits, hidden states and attentions (tuples of tensors), rope deltas."""
    cache = compat.output_cache(output)
    for name in list(output.keys()):
        value = output[name]
        if value is cache:
            continue
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > rows:
            output[name] = value[:rows]
        elif isinstance(value, tuple):
            output[name] = tuple(v[:rows] if isinstance(v, torch.Tensor) and v.dim() else v for v in value)


def crop_rows(state, module, output, rows: int) -> None:
    """Drop every row past ``rows`` for good: from the output, its KV cache, the model's
    per-batch state (``ArchSpec.batch_state_attrs``), the token roles, hidden-state sinks and
    every method's per-prompt state."""
    crop_output(output, rows)
    cache = compat.output_cache(output)
    if cache is not None:
        compat.keep_batch_rows(cache, rows, output.logits.device)
    for path in state.arch.spec.batch_state_attrs:
        owner_path, _, attr = path.rpartition(".")
        owner = module
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > rows:
            setattr(owner, attr, value[:rows])
    state.select_rows(torch.arange(rows))
