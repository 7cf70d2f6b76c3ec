"""Per-forward side channel: what the attention function cannot see in its own arguments.

``generate()`` rejects unknown kwargs, so padding, cache length, token roles and prompt
boundaries travel here, filled by forward hooks the handle installs:

* on the steered model (the object given to ``apply``): token roles from ``input_ids`` at
  prefill, the text-only stream added to the prefill batch (VHR) and dropped afterwards, and
  logits-level steps (PAI's ``gamma``);
* on the text decoder: :class:`ForwardInfo` (cache length, padding) of every forward;
* on decoder layers whose methods read the hidden states entering them (VAR's sinks), at prefill;
* on the key projections of layers with key rules, at prefill.

What a prompt's methods find lives in the handle's :class:`~attnsteer.context.PromptState`
(``state.prompt``), a fresh one at every prefill.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from . import archs, compat
from .attention.geometry import ForwardInfo
from .context import ContextStore, PromptState
from .errors import SteeringError
from .roles import PromptRoles, image_mask, real_tokens


def padding_facts(mask: torch.Tensor | None, batch: int, q_len: int, past_len: int):
    """Padding of one forward, from the decoder's ``attention_mask``.

    mask: None, a 2D (B, past + Q) padding mask (1 = token), a 4D (B, 1, Q, K) mask (bool, True =
    attend; or additive float), or a dict of those per layer type. Returns (first_valid long (B,) or None, row_valid bool (B, Q) or
    None): each row's first real token, and which query rows are real tokens (None = all). Any other
    form raises: attnsteer never assumes "no padding" for a mask it cannot read.
    """
    if isinstance(mask, dict):
        # one mask per layer type (Gemma 3 hands its decoder {"full_attention": ..., "sliding_attention":
        # ...}); the global layers' mask shows every real key of every row
        if "full_attention" not in mask:
            raise SteeringError(
                f"attention_mask is a dict with keys {sorted(mask)}; attnsteer reads the padding from its "
                "'full_attention' entry. Fix: pass a 2D (batch, seq) padding mask"
            )
        mask = mask["full_attention"]
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
        valid = real_tokens(mask, mask.shape[-1])
        row_valid = None
    else:
        raise SteeringError(
            f"attention_mask has {mask.dim()} dimensions (shape {tuple(mask.shape)}); attnsteer reads a 2D (batch, "
            "seq) padding mask or a 4D (batch, 1, query, key) mask. Fix: pass one of those"
        )
    if bool(valid.all()):
        return None, row_valid
    return valid.int().argmax(dim=-1), row_valid


class SteeringState:
    """The side channel of one handle, shared by all its sites.

    Settings (fixed at ``apply``): ``arch``, ``methods``, ``pad_id``, ``steered_layers`` (their key
    lengths are cross-checked), ``processor`` (AGLA), ``model_ref``. Per forward: ``info`` (the
    decoder's :class:`ForwardInfo`), ``current_call`` (the steered model's forward: its phase,
    decided before it runs, and its arguments). Per prompt: the :class:`~attnsteer.context.PromptState`
    of the handle's one context, ``prompt`` (token roles, what each method found), replaced at every
    prefill. Set by the user for the prompts started inside a block: ``focus_mask``, ``prompt_text``.
    Counters: ``forwards``, ``prompts``, ``rows_without_image``.
    """

    CONTEXT = "prompt batch"  # the Hugging Face path's one context in the store

    def __init__(self, arch, methods, *, pad_id: int = 0, steered_layers=(), processor=None, model_ref=None):
        self.arch = arch
        self.methods = list(methods)
        self.pad_id = pad_id
        self.steered_layers: tuple[int, ...] = tuple(steered_layers)
        self.processor = processor  # the model's processor, given to apply(..., processor=)
        self.model_ref = model_ref or (lambda: None)  # weak reference to the model given to apply
        self.drop_ids = tuple(arch.image_token_ids) + tuple(arch.wrapper_token_ids)
        self.needs_image = any(m.needs_image for m in self.methods)
        # model steps (around the steered model's forward) run once per forward and intervention,
        # not once per steered layer; before the forward in ``order``, after it in ``after_order``
        first_site: dict[int, object] = {}
        for method in self.methods:
            if method.model_step is not None:
                first_site.setdefault(method.intervention, method.model_step)
        self.model_steps = sorted(first_site.values(), key=lambda step: step.order)
        self.model_steps_after = sorted(
            first_site.values(), key=lambda step: step.order if step.after_order is None else step.after_order
        )
        self.store = ContextStore()
        self.info: ForwardInfo | None = None
        self.current_call: tuple[bool, dict] | None = None
        self.is_paused = False
        self.focus_mask: torch.Tensor | None = None
        self.prompt_text: list[str] | None = None  # per batch row, set by handle.prompt_text(...)
        # what the current generate() / top-level forward call was given: its prompt ids (above the
        # stream host; before generate() expands them) and arguments (AGLA reads its pixels)
        self.pending_ids: torch.Tensor | None = None
        self.pending_call: dict | None = None
        self.forwards = 0
        self.prompts = 0
        self.rows_without_image = 0

    @property
    def prompt(self) -> PromptState:
        """The state of the current prompt batch."""
        return self.store[self.CONTEXT]

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

    @contextlib.contextmanager
    def observing(self, layers, fn):
        """Call ``fn(layer, module, query, key, attention_mask, kwargs)`` before the attention of
        each of ``layers`` while the block runs (AGLA's lvlm_attention matcher reads the model's
        own attention this way)."""
        from .attention import dispatch

        hooks = [(self.arch.attention_modules[layer], functools.partial(fn, layer)) for layer in layers]
        for module, hook in hooks:
            dispatch.add_observer(module, hook)
        try:
            yield
        finally:
            for module, hook in hooks:
                dispatch.remove_observer(module, hook)

    # ---- hooks on the steered model ------------------------------------------------------------
    def record_prompt_ids(self, module, args, kwargs):
        """Pre-hook on a model above the stream host (InstructBLIP): remember the prompt's ids
        and the call's arguments."""
        if not self.is_paused:
            bound = compat.bind_arguments(module.forward, args, kwargs)
            self.pending_ids = bound.get("input_ids")
            self.pending_call = bound
        return None

    def wrap_generate(self, generate):
        """Remember what a generate() call is given, for the hooks below it: InstructBLIP's
        generate() bypasses its forward (the prompt ids), and transformers may encode the images
        before the first forward (AGLA needs the pixels themselves)."""

        def generate_with_roles(*args, **kwargs):
            bound = compat.bind_arguments(generate, args, kwargs)
            self.pending_ids = bound.get("input_ids")
            self.pending_call = bound
            try:
                return generate(*args, **kwargs)
            finally:
                self.pending_call = None
                self.pending_ids = None

        generate_with_roles.__wrapped__ = generate
        generate_with_roles.__doc__ = generate.__doc__
        return generate_with_roles

    def model_pre_hook(self, module, args, kwargs):
        """Decide this forward's phase *before* it runs (``generate()`` hands the prefill an empty
        cache and fills it in place, so the post-hook cannot ask the cache) and run the methods'
        steps around it: a new prompt at prefill, ``before_decode`` otherwise."""
        if self.is_paused:
            return None
        bound = compat.bind_arguments(module.forward, args, kwargs)
        cache = compat.find_cache(bound.values())
        self.current_call = (compat.cache_length(cache) == 0, bound)
        if not self.current_call[0]:
            changed = False
            for step in self.model_steps:
                new = step.before_decode(self, bound)
                if new is not None:
                    bound, changed = new, True
            return ((), bound) if changed else None
        ids = bound.get("input_ids")
        if ids is None and self.pending_ids is not None:
            embeds = bound.get("inputs_embeds")
            if embeds is not None and tuple(embeds.shape[:2]) == tuple(self.pending_ids.shape):
                ids = self.pending_ids
        self._new_prompt(ids)
        if cache is not None:
            # beam search reorders the cache's rows between steps: every per-row state follows
            compat.on_cache_reorder(cache, self._reorder_callback())
        changed = False
        for step in self.model_steps:
            new = step.before_model(self, bound)
            if new is not None:
                bound, changed = new, True
        return ((), bound) if changed else None

    def model_post_hook(self, module, args, kwargs, output):
        if self.is_paused:
            return None
        if self.current_call is None:
            raise SteeringError(
                "attnsteer's post-forward step ran without its pre-forward step, so it cannot tell whether this "
                "forward was a prefill. Fix: call the steered model itself (model(...) / model.generate(...))"
            )
        (is_prefill, bound), self.current_call = self.current_call, None
        for step in self.model_steps_after:
            step.after_model(self, module, bound, output, is_prefill)
        return output

    # ---- batch rows of the current prompts -------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the prompt's per-row state of batch rows ``index`` (integer (R,)), in that order
        (:meth:`PromptState.select_rows`). Cropping a second stream off the batch keeps
        ``arange(B)``; beam search reorders the rows with its beam indices."""
        self.prompt.select_rows(index)

    def _reorder_callback(self):
        """``select_rows`` for the cache's reorders, for as long as this prompt is the current one
        (a weak reference: the cache may outlive the handle)."""
        ref, prompt = weakref.ref(self), self.prompts

        def reorder(beam_idx: torch.Tensor) -> None:
            state = ref()
            if state is not None and state.prompts == prompt and not state.is_paused:
                state.select_rows(beam_idx)

        return reorder

    def _new_prompt(self, ids) -> None:
        """A fresh prompt state (nothing of the previous prompt is kept), with the prompt's roles."""
        self.prompts += 1
        roles = None
        if ids is not None or self.focus_mask is not None:
            if self.focus_mask is not None:
                marked = self._focus_for(ids).to(device=ids.device if ids is not None else "cpu", dtype=torch.bool)
            else:
                marked = image_mask(ids, self.arch.image_token_ids)
            roles = PromptRoles(marked)
        self.store.new_prompt(self.CONTEXT, roles)
        if self.needs_image:
            has = roles.has_image if roles is not None else None
            if self.focus_mask is not None and not bool(has.any()):
                raise SteeringError(
                    f"handle.focus(mask): the mask (shape {tuple(self.focus_mask.shape)}) marks no position in any row, "
                    f"so the recipe's {sorted({m.name for m in self.methods if m.needs_image})} have nothing to steer "
                    "toward. Fix: set True (1) at the key positions of the span to focus on"
                )
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

    def _focus_for(self, ids) -> torch.Tensor:
        """The focus mask for this prompt's rows: as given, or -- when ``generate()`` expanded each
        prompt to ``k`` rows (``num_beams`` / ``num_return_sequences``) -- each row repeated ``k``
        times, after checking that the prompt rows are exactly the call's rows repeated so."""
        mask = self.focus_mask
        if ids is None or tuple(mask.shape) == tuple(ids.shape):
            return mask
        asked = self.pending_ids
        rows = mask.shape[0]
        if (
            asked is not None
            and tuple(asked.shape) == tuple(mask.shape)
            and ids.shape[1] == mask.shape[1]
            and ids.shape[0] % rows == 0
            and torch.equal(asked.to(ids.device).repeat_interleave(ids.shape[0] // rows, dim=0), ids)
        ):
            return mask.to(ids.device).repeat_interleave(ids.shape[0] // rows, dim=0)
        raise SteeringError(
            f"handle.focus(mask): mask has shape {tuple(mask.shape)} but the prompt's input_ids have shape "
            f"{tuple(ids.shape)}. Fix: build the mask over the padded prompt, (batch, seq), as given to "
            "model(...) / model.generate(...)"
        )

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

    # ---- hooks on decoder layers and key projections ------------------------------------------
    def layer_input_hook(self, method):
        """A forward pre-hook for ``method``'s decoder layer: at an (unpaused) prefill, hand it the
        hidden states entering the layer and the real prompt tokens."""

        def hook(module, args, kwargs):
            hidden = compat.first_argument(module.forward, args, kwargs)
            valid = self.prompt_tokens(hidden)
            if valid is not None:
                method.observe_layer_input(hidden, valid, self.prompt)
            return None

        return hook

    def key_projection_hook(self, rules, stats):
        """A forward hook for a layer's key site (``ArchSpec.key_projection``): at an (unpaused)
        prefill, ``rules`` (key rules) edit the keys of the new tokens just before RoPE; ``stats``:
        the layer's site counters. The site's output layout is ``ArchSpec.key_layout``."""
        arch = self.arch

        def hook(module, args, output):
            info = self.info
            if self.is_paused or info is None or not info.is_prefill:
                return None
            keys, put = archs.key_view(output, arch.spec.key_layout, arch.num_heads, arch.num_kv_heads, arch.head_dim)
            positions = (torch.arange(keys.shape[1], device=output.device) + info.past_len).view(1, -1)
            for rule in rules:
                keys, changed = rule.edit(keys, positions, self.prompt)
                stats.count(rule.method, changed)
            return put(output, keys)

        return hook

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
