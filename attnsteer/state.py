"""Per-forward side channel: what the attention function cannot see in its own arguments.

``generate()`` rejects unknown kwargs, so padding, cache length, token roles and prompt
boundaries travel here, filled by forward hooks the handle installs:

* on the steered model (the object given to ``apply``): token roles from ``input_ids`` at
  prefill, the text-only stream added to the prefill batch (VHR) and dropped afterwards, and
  logits-level steps (PAI's ``gamma``);
* on the text decoder: :class:`ForwardInfo` (cache length, padding) of every forward, and the
  per-prompt reset of each method's state;
* on steered decoder layers (VAR): hidden-state sinks at prefill.
"""

from __future__ import annotations

import torch

from . import compat
from .attention.rows import ForwardInfo
from .errors import SteeringError
from .roles import PromptRoles, image_mask, positions_like, text_only_stream
from .sinks import HiddenSinks


def padding_facts(mask: torch.Tensor | None, batch: int, q_len: int, past_len: int):
    """Padding of one forward, from the decoder's ``attention_mask``.

    mask: None, a 2D (B, past + Q) padding mask (1 = token) or a 4D (B, 1, Q, K) mask (bool, True =
    attend; or additive float). Returns (first_valid long (B,) or None, row_valid bool (B, Q) or
    None): each row's first real token, and which query rows are real tokens (None = all). Any other
    form raises: attnsteer never assumes "no padding" for a mask it cannot read.
    """
    if mask is None:
        return None, None
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, past_len + q_len):
            raise SteeringError(
                f"attention_mask has shape {tuple(mask.shape)}, but this forward has batch {batch}, {past_len} cached "
                f"and {q_len} new tokens, so a (batch, cached + new) = {(batch, past_len + q_len)} padding mask was "
                "expected. Fix: pass the mask of the whole sequence so far (generate() does this)"
            )
        valid = mask != 0
        rows = valid[:, -q_len:]
        row_valid = None if bool(rows.all()) else rows
    elif mask.dim() == 4:
        if mask.shape[0] != batch:
            raise SteeringError(
                f"the 4D attention_mask has batch {mask.shape[0]}, this forward has batch {batch}. Fix: build the mask "
                "for the batch you pass"
            )
        visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        valid = visible[:, 0].any(-2)
        row_valid = None
    else:
        raise SteeringError(
            f"attention_mask has {mask.dim()} dimensions (shape {tuple(mask.shape)}); attnsteer reads a 2D (batch, "
            "seq) padding mask or a 4D (batch, 1, query, key) mask. Fix: pass one of those"
        )
    if bool(valid.all()):
        return None, row_valid
    return valid.int().argmax(dim=-1), row_valid


def text_only_inputs(ids, embeds, mask, drop: torch.Tensor, pad_id: int):
    """The prompt without its ``drop`` (B, L) positions, left-padded back to length L.

    Built from ``input_ids`` when given, else from ``inputs_embeds`` (whose image positions already
    hold image features, as in InstructBLIP). Returns (ids or None, embeds or None, mask (B, L)).
    """
    if ids is not None:
        text_ids, text_mask = text_only_stream(ids, mask, drop, pad_id)
        return text_ids, None, text_mask
    if embeds is None or tuple(drop.shape) != tuple(embeds.shape[:2]):
        raise SteeringError(
            "the text-only stream (VHR, PAI gamma) is built from input_ids or inputs_embeds of the prompt; "
            "this call passed neither in a usable form"
        )
    index = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2]).contiguous()
    kept, text_mask = text_only_stream(index, mask, drop, 0)
    text_embeds = torch.gather(embeds, 1, kept.unsqueeze(-1).expand_as(embeds))
    return None, text_embeds * text_mask.unsqueeze(-1).to(embeds.dtype), text_mask


class TextStream:
    """The unsteered text-only copy of the prompt with its own KV cache, advanced in lockstep
    (PAI's logits step). Runs with steering switched off (``state.paused``)."""

    def __init__(self, state):
        self.state = state
        self.cache = None
        self.mask = None

    def reset(self):
        self.cache = None
        self.mask = None

    def step(self, model, kwargs: dict):
        """Run the text-only stream for this forward; returns its last-position logits (B, V)."""
        ids = kwargs.get("input_ids")
        past_len = compat.cache_length(compat.find_cache(kwargs.values()))
        if past_len == 0:
            drop = self.state.roles.image
            if ids is not None:
                drop = drop | image_mask(ids, self.state.drop_ids)
            step_ids, step_embeds, self.mask = text_only_inputs(
                ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), drop, self.state.pad_id
            )
            self.cache = None
        else:
            if self.cache is None or ids is None:
                return None
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], ids.shape[1])], dim=1)
            step_ids, step_embeds = ids, None
        width = (step_ids if step_ids is not None else step_embeds[..., 0]).shape[1]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        cache_arg = {compat.cache_argument(model.forward): self.cache}
        with self.state.paused():
            out = model(
                input_ids=step_ids,
                inputs_embeds=step_embeds,
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                **cache_arg,
            )
        self.cache = compat.output_cache(out)
        if self.cache is None:
            raise compat.CompatibilityError("KV cache", "the text-only stream's forward returned no Cache")
        return out.logits[:, -1]


class SteeringState:
    """Shared by all sites of one handle."""

    def __init__(self, arch, methods):
        self.arch = arch
        self.methods = list(methods)
        self.info: ForwardInfo | None = None
        self.roles: PromptRoles | None = None
        self.sinks = HiddenSinks()
        self.focus_mask: torch.Tensor | None = None
        self.stream_rows: int | None = None  # B when the prefill batch carries a text-only copy (2B rows)
        self.text_stream = TextStream(self)
        self.drop_ids = tuple(arch.image_token_ids) + tuple(arch.wrapper_token_ids)
        self.pad_id = 0
        self.forwards = 0
        self.prompts = 0
        self.rows_without_image = 0
        self.is_paused = False
        # decoder layers whose attention attnsteer steers: their key lengths are cross-checked
        self.steered_layers: tuple[int, ...] = ()
        self.pending_ids: torch.Tensor | None = None  # prompt ids seen above the stream host
        self.needs_image = any(m.needs_image for m in self.methods)
        self.needs_stream = any(m.needs_text_stream_in_batch for m in self.methods)
        # logits-level steps run once per forward and intervention (not once per steered layer)
        first_site: dict[int, object] = {}
        for method in self.methods:
            if method.has_logits_step:
                first_site.setdefault(method.intervention, method)
        self.logits_methods = list(first_site.values())

    # ---- pausing (the text-only stream runs unsteered) --------------------------------------
    class _Pause:
        def __init__(self, state):
            self.state = state

        def __enter__(self):
            self.saved = (self.state.is_paused, self.state.info)
            self.state.is_paused = True

        def __exit__(self, *exc):
            self.state.is_paused, self.state.info = self.saved

    def paused(self):
        return self._Pause(self)

    # ---- hooks on the steered model ------------------------------------------------------------
    def record_prompt_ids(self, module, args, kwargs):
        """Pre-hook on a model above the stream host (InstructBLIP): remember the prompt's ids."""
        if not self.is_paused:
            ids = compat.bind_arguments(module.forward, args, kwargs).get("input_ids")
            self.pending_ids = ids
        return None

    def wrap_generate(self, generate):
        """InstructBLIP's generate() bypasses its forward: remember the prompt ids it is given."""

        def generate_with_roles(*args, **kwargs):
            self.pending_ids = compat.generate_prompt_ids(generate, args, kwargs)
            return generate(*args, **kwargs)

        generate_with_roles.__wrapped__ = generate
        generate_with_roles.__doc__ = generate.__doc__
        return generate_with_roles

    def model_pre_hook(self, module, args, kwargs):
        if self.is_paused:
            return None
        bound = compat.bind_arguments(module.forward, args, kwargs)
        if compat.cache_length(compat.find_cache(bound.values())):
            return None
        ids = bound.get("input_ids")
        if ids is None and self.pending_ids is not None:
            embeds = bound.get("inputs_embeds")
            if embeds is not None and tuple(embeds.shape[:2]) == tuple(self.pending_ids.shape):
                ids = self.pending_ids
        self._new_prompt(ids)
        if self.needs_stream and self.roles is not None and bool(self.roles.has_image.any()):
            return (), self._append_text_stream(bound)
        return None

    def model_post_hook(self, module, args, kwargs, output):
        if self.is_paused:
            return None
        if self.stream_rows is not None:
            self._drop_text_stream(module, output)
        for method in self.logits_methods:
            method.logits_step(self, module, compat.bind_arguments(module.forward, args, kwargs), output)
        return output

    def _new_prompt(self, ids) -> None:
        self.prompts += 1
        self.sinks.reset()
        self.text_stream.reset()
        for method in self.methods:
            method.reset_prompt()
        if ids is None and self.focus_mask is None:
            self.roles = None
        else:
            if self.focus_mask is not None:
                shape = tuple(ids.shape) if ids is not None else None
                if shape is not None and tuple(self.focus_mask.shape) != shape:
                    raise SteeringError(
                        f"handle.focus(mask): mask has shape {tuple(self.focus_mask.shape)} but the prompt's input_ids "
                        f"have shape {shape}. Fix: build the mask over the padded prompt, (batch, seq)"
                    )
                marked = self.focus_mask.to(device=ids.device if ids is not None else "cpu", dtype=torch.bool)
            else:
                marked = image_mask(ids, self.arch.image_token_ids)
            self.roles = PromptRoles(marked)
        if self.needs_image:
            has = self.roles.has_image if self.roles is not None else None
            if has is None or not bool(has.any()):
                looked = list(self.arch.image_token_ids)
                what = (
                    f"image token id(s) {looked} in input_ids" if looked else "image tokens (this is a text-only model)"
                )
                raise SteeringError(
                    f"the recipe's {sorted({m.name for m in self.methods if m.needs_image})} steer attention toward "
                    f"image keys, but no row of this input has any: looked for {what}, and no focus span is set. "
                    "Fix: include the image placeholders the processor inserts, or mark key positions with "
                    "`with handle.focus(mask): ...`"
                )
            self.rows_without_image += int((~has).sum())

    def _append_text_stream(self, bound: dict) -> dict:
        ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        mask = bound.get("attention_mask")
        out = dict(bound)
        drop = self.roles.image if ids is None else self.roles.image | image_mask(ids, self.drop_ids)
        text_ids, text_embeds, text_mask = text_only_inputs(ids, embeds, mask, drop, self.pad_id)
        if ids is not None:
            out["input_ids"] = torch.cat([ids, text_ids])
        else:
            out["inputs_embeds"] = torch.cat([embeds, text_embeds])
        like = ids if ids is not None else embeds[..., 0]
        rows = like.shape[0]
        base_mask = mask if mask is not None else torch.ones(like.shape, dtype=torch.long, device=like.device)
        out["attention_mask"] = torch.cat([base_mask, text_mask.to(base_mask.dtype)])
        if bound.get("position_ids") is not None:
            pos = bound["position_ids"]
            out["position_ids"] = torch.cat([pos, positions_like(text_mask, pos)], dim=-2)
        for name in ("mm_token_type_ids", "token_type_ids"):
            if bound.get(name) is not None:
                out[name] = torch.cat([bound[name], torch.zeros_like(bound[name])])
        self.roles = PromptRoles(torch.cat([self.roles.image, torch.zeros_like(self.roles.image)]))
        self.stream_rows = rows
        return out

    def _drop_text_stream(self, module, output) -> None:
        rows = self.stream_rows
        self.stream_rows = None
        output.logits = output.logits[:rows]
        cache = compat.output_cache(output)
        if cache is not None:
            compat.keep_batch_rows(cache, rows, output.logits.device)
        for name in ("hidden_states", "attentions"):
            value = getattr(output, name, None)
            if isinstance(value, tuple):
                setattr(output, name, tuple(v[:rows] if isinstance(v, torch.Tensor) else v for v in value))
        for path in self.arch.spec.batch_state_attrs:
            owner_path, _, attr = path.rpartition(".")
            owner = module
            for part in filter(None, owner_path.split(".")):
                owner = getattr(owner, part)
            value = getattr(owner, attr, None)
            if isinstance(value, torch.Tensor) and value.shape[0] == 2 * rows:
                setattr(owner, attr, value[:rows])
        self.roles = self.roles.select(slice(0, rows))
        self.sinks.crop(rows)
        for method in self.methods:
            method.crop_batch(rows)

    # ---- hook on the text decoder -------------------------------------------------------------
    def decoder_pre_hook(self, module, args, kwargs):
        """Record this forward's :class:`ForwardInfo`: cache length from the Cache among the bound
        arguments (found by type), padding from the mask, and the key length each steered layer's
        attention must receive (checked again in :meth:`info_for`)."""
        if self.is_paused:
            self.info = None
            return None
        bound = compat.bind_arguments(module.forward, args, kwargs)
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            raise compat.CompatibilityError(
                "decoder inputs", f"{type(module).__name__}.forward received neither input_ids nor inputs_embeds"
            )
        batch, q_len = tokens.shape[0], tokens.shape[1]
        cache = compat.find_cache(bound.values())
        past = compat.cache_length(cache)
        first_valid, row_valid = padding_facts(bound.get("attention_mask"), batch, q_len, past)
        self.info = ForwardInfo(
            q_len=q_len,
            past_len=past,
            total_len=past + q_len,
            first_valid=first_valid,
            row_valid=row_valid,
            batch=batch,
            key_lengths={l: compat.expected_key_length(cache, q_len, l) for l in self.steered_layers},
        )
        self.forwards += 1
        return None

    # ---- prompt tokens of a prefill (VAR's hidden-state sinks) ---------------------------------
    def prompt_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """bool (B, L) non-pad prompt tokens of a prefill's hidden states (B, L, D); None when this
        forward is not an (unpaused) prefill."""
        info = self.info
        if self.is_paused or info is None or not info.is_prefill:
            return None
        length = hidden.shape[1]
        if info.first_valid is None:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return torch.arange(length, device=hidden.device).view(1, -1) >= info.first_valid.view(-1, 1).to(hidden.device)

    def info_for(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> ForwardInfo:
        """This forward's facts, cross-checked against what layer ``layer``'s attention function
        received: query (B, H, Q, D) and key (B, H_kv, K, D). Raises when they disagree."""
        info = self.info
        if info is None:
            raise SteeringError(
                f"layer {layer}: attention ran in a forward that attnsteer's decoder pre-hook did not see, so its "
                "cache length and padding are unknown. Fix: call the steered model (model(...) / model.generate) "
                "or its decoder, not an attention module directly"
            )
        problems = []
        if query.shape[0] != info.batch:
            problems.append(f"batch {query.shape[0]} (the decoder saw {info.batch})")
        if query.shape[2] != info.q_len:
            problems.append(f"{query.shape[2]} query rows (the decoder saw {info.q_len} new tokens)")
        expected = info.key_lengths.get(layer) if info.key_lengths is not None else None
        if expected is not None and key.shape[2] != expected:
            problems.append(
                f"{key.shape[2]} keys, but the KV cache ({info.past_len} cached tokens) makes {expected} keys expected"
            )
        if problems:
            raise compat.CompatibilityError(
                "per-forward facts", f"layer {layer}'s attention function received " + "; ".join(problems)
            )
        return info
