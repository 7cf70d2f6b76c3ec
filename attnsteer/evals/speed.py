"""``attnsteer eval speed``: prefill latency, decode tokens/s and peak memory of steered models
against the unsteered model, in one process.

Method (also written into every result file):

* The model is built once (``--random-weights``: from its config, nothing downloaded but the
  config of a hub id; built-in config names work offline) with ``attn_implementation="sdpa"`` --
  the baseline is the model's own SDPA attention.
* Configurations: ``baseline`` (no recipe) and, for each ``--recipe`` and each ``--backends``
  entry, the recipe applied with that backend (``attnsteer.apply(..., backend=...)``): ``auto``
  (the default: the Triton kernels on CUDA, PyTorch's flash kernel plus corrections on CPU, the
  chunked path for what they do not run), ``triton`` / ``flash`` / ``chunked`` (every steered call
  on that backend), and ``reference`` (float32 eager with materialised weights -- how the papers'
  code runs). Earlier names are accepted: ``fused-triton``, ``fused-chunked``, ``fused-pytorch``
  (flash on CPU, chunked elsewhere).
* Every configuration is warmed up once (Triton compiles, cuBLAS picks kernels). Then, per
  repeat, each steered configuration runs next to a baseline run (ABBA order: the order inside a
  pair flips every repeat). Ratios are medians over repeats of steered / the adjacent baseline.
* One run = prefill (one ``model(prompt, use_cache=True, logits_to_keep=1)`` call, as
  ``generate`` does it) + ``--new-tokens`` greedy decode steps with the KV cache; decode tokens/s
  counts batch x new tokens over the decode loop. CUDA is synchronised around each timed region.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the run (weights, KV cache and
  activations; also reported above the memory allocated before the run). On CPU the resident-set
  high-water mark above the RSS before the run (Linux ``/proc``; same process, so memory the
  allocator kept from earlier runs is not counted again: a lower bound, indicative only).

Results: ``<output_path>/<stem>.csv`` (long format: one row per run, metric and value, plus median
and ratio rows), ``.json`` (the same plus machine, library versions, git hash and arguments),
``.md`` (a table and the issue's goals) and ``.png`` (ratios; needs matplotlib).

Run ``python -m attnsteer.evals.speed --help`` (the same flags as ``attnsteer eval speed``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .. import compat
from ..errors import SteeringError
from . import _cli
from ._cli import example_epilog, nonnegative_int, positive_int
from .speed_models import BUILTIN_CONFIGS, SpeedError, build_model, build_prompt, resolve_config
from .speed_report import GOALS, MIB, add_fresh_memory, markdown, plot, results_record, summarise, write_csv

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 1

BACKEND_CHOICES = ("auto", "flash", "chunked", "triton", "reference", "fused-pytorch", "fused-chunked", "fused-triton")
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "auto": "auto",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- arguments ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``attnsteer eval speed`` (lm-eval-style underscores, dashed aliases accepted)."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"smollm2 (the embedded SmolLM2-135M-Instruct, real weights, offline), a built-in config name "
        f"({', '.join(BUILTIN_CONFIGS)}), a local config.json or model folder, or a hub id (with --random-weights "
        "only its config is downloaded)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        metavar="RECIPE",
        help="recipe name, YAML path or hub repo; repeat for several",
    )
    parser.add_argument(
        "--random-weights",
        "--random_weights",
        dest="random_weights",
        action="store_true",
        help="build the model from its config with random weights (no weight download)",
    )
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=1)
    parser.add_argument(
        "--prompt-len",
        "--prompt_len",
        dest="prompt_len",
        type=_lengths,
        default=None,
        help="prompt tokens; a comma-separated list sweeps the lengths (one result file set per length; default: "
        "the built-in config's, e.g. 640 = 576 + 64 for llava-1.5-7b; 512 otherwise)",
    )
    parser.add_argument(
        "--memory",
        choices=("in-process", "fresh-process"),
        default="in-process",
        help="peak memory: in the timing process (default), or also in a fresh process per (length, "
        "configuration) with the resident high-water mark reset after warm-up -- what the run itself needs, "
        "free of allocator reuse (Linux; one model load per configuration)",
    )
    parser.add_argument("--_memory-worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--new-tokens",
        "--new_tokens",
        dest="new_tokens",
        type=positive_int,
        default=128,
        help="greedy decode steps after the prefill",
    )
    parser.add_argument(
        "--image-tokens",
        "--image_tokens",
        dest="image_tokens",
        type=nonnegative_int,
        default=None,
        help="image-placeholder tokens at the start of the prompt (default: 576 for llava-1.5-7b, "
        "else 0); they are ordinary token ids for the timed language model",
    )
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a (text) config field, e.g. --override num_hidden_layers=4",
    )
    parser.add_argument(
        "--backends",
        default="auto,reference",
        help=f"comma-separated backends per recipe, from {', '.join(BACKEND_CHOICES)} (default: auto,reference)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed (baseline, steered) pairs per recipe")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs per configuration first")
    parser.add_argument(
        "--output_path",
        "--output-path",
        dest="output_path",
        default="evals/speed",
        help="folder for the CSV / JSON / Markdown / PNG results",
    )
    parser.add_argument("--label", default=None, help="name for this run in file names (default: from the flags)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    parser.add_argument("--no-plot", "--no_plot", dest="no_plot", action="store_true", help="skip the PNG chart")
    return parser


HELP = "prefill latency, decode tokens/s and peak memory: unsteered model vs recipes"
DESCRIPTION = (
    "Time the unsteered model (its own SDPA attention) against each recipe in one process, alternating runs: "
    "prefill latency, decode tokens/s, peak memory and their ratios, plus the reference (eager) backend. "
    "--random-weights builds the model from its config, so 7B shapes (built-in: llava-1.5-7b, llama-2-7b) need no "
    "weight download. Writes CSV, JSON, Markdown and a PNG chart to --output_path."
)
NEEDS = "about 14 GB of memory for the 7B config's random weights; a GPU, or a long CPU run"
EXAMPLE = (
    "attnsteer eval speed --model llava-1.5-7b --random-weights --recipe act-default --recipe softplus-reweight "
    "--batch_size 1 --new-tokens 128 --dtype bfloat16"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnsteer eval speed",
        description="Prefill latency, decode tokens/s and peak memory of recipes against the unsteered model.",
        epilog=example_epilog(EXAMPLE, NEEDS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(parser)


# ---- model -----------------------------------------------------------------------------------------
def _lengths(text: str) -> list[int]:
    """``"512,2048"`` -> [512, 2048] (argparse type of --prompt-len)."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected prompt lengths like 512 or 512,2048, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one prompt length, got {text!r}")
    return list(dict.fromkeys(values))


# ---- measurement -----------------------------------------------------------------------------------
def _proc_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --backends entries of earlier releases -> attnsteer.apply's backend (by device where they differed)
_OLD_NAMES = {"fused-chunked": "chunked", "fused-triton": "triton"}


def _api_backend(backend: str, device) -> str:
    """The ``attnsteer.apply`` backend of a ``--backends`` entry (``fused-pytorch``: the PyTorch fused
    path of the device -- flash plus corrections on CPU, chunked elsewhere)."""
    if backend == "fused-pytorch":
        return "flash" if device.type == "cpu" else "chunked"
    return _OLD_NAMES.get(backend, backend)


def run_once(model, ids, new_tokens: int, config: dict, device, focus=None) -> dict:
    """One prefill + greedy decode under ``config``; timings in seconds, memory in bytes.

    focus: bool (B, L) image-placeholder positions of ``ids``; when given, the recipe runs inside
    ``handle.focus(focus)`` so methods that steer toward the image (VAR, VHR, PAI) see them."""
    import torch

    import attnsteer

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    handle = None
    paths: collections.Counter = collections.Counter()
    if config["recipe"] is not None:
        handle = attnsteer.apply(model, config["recipe"], backend=_api_backend(config["backend"] or "auto", device))
    focused = handle.focus(focus) if (handle is not None and focus is not None) else contextlib.nullcontext()
    try:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            mem_before = torch.cuda.memory_allocated(device)
        else:
            mem_before = (_proc_kib("VmRSS") or 0) * 1024
            hwm_ok = _reset_hwm()
        with torch.inference_mode(), focused:
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            cache = compat.output_cache(out)
            del out
            sync()
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=tok, use_cache=True, **compat.with_cache(model, cache))
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t3 = time.perf_counter()
            del cache
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            extra = peak - mem_before
        else:
            hwm = _proc_kib("VmHWM")
            extra = (hwm * 1024 - mem_before) if (hwm and hwm_ok) else None
            peak = hwm * 1024 if (hwm and hwm_ok) else None
    finally:
        summary = None
        if handle is not None:
            stats = handle.stats()
            summary = {
                "sites": len(stats),
                "sites_fired": sum(1 for s in stats if s["fired"] > 0),
                "rows_modified": int(sum(int(s["rows_modified"]) for s in stats)),
            }
            for layer in {s["layer"]: s for s in stats}.values():  # each layer's calls once
                paths.update(layer["paths"])
                paths.update({f"fallback/{reason}": n for reason, n in layer["fallbacks"].items()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle.remove()
    decode_s = t3 - t2
    return {
        "prefill_s": t1 - t0,
        "decode_s": decode_s,
        "decode_tok_s": ids.shape[0] * new_tokens / decode_s if new_tokens and decode_s > 0 else None,
        "peak_mem_bytes": peak,
        "peak_extra_bytes": extra,
        "steering": summary,
        "kernel_calls": dict(paths),
    }


def _impl(backend: str | None, counters: dict, device) -> str:
    """Which implementation actually ran the steered layers."""
    if backend is None:
        return "sdpa"
    if backend == "reference":
        return "reference"
    ran = {path.split("/")[0] for path, calls in counters.items() if calls and not path.startswith("fallback/")}
    return "+".join(sorted(ran)) or "none"


# ---- machine facts ---------------------------------------------------------------------------------
def _git_hash() -> str:
    here = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device) -> dict:
    from importlib import metadata

    import torch

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {
        "device": str(device),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "triton": ver("triton"),
        "attnsteer": ver("attnsteer"),
        "cuda": torch.version.cuda,
        "git": _git_hash(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    info["hardware"] = info.get("gpu") or info["cpu_model"]
    return info


# ---- the command -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _validate(args) -> None:
    if getattr(args, "memory_worker", None) is None:  # a worker writes nothing
        _cli.check_writable(args.output_path, "--output_path", folder=True)  # before the model is built
    for name in ("batch_size", "new_tokens", "repeats"):
        if getattr(args, name) < (0 if name == "new_tokens" else 1):
            raise SpeedError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if args.warmup < 0:
        raise SpeedError(f"--warmup {args.warmup}: must be >= 0")
    if args.prompt_len is not None and min(args.prompt_len) < 2:
        raise SpeedError(f"--prompt-len {','.join(map(str, args.prompt_len))}: every length must be >= 2")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKEND_CHOICES]
    if bad or not backends:
        raise SpeedError(f"--backends {args.backends!r}: allowed entries are {', '.join(BACKEND_CHOICES)}")
    args.backend_list = list(dict.fromkeys(backends))


def run(args) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`); returns an exit code."""
    try:
        _validate(args)
        return _run(args)[0]
    except SpeedError as exc:
        print(f"attnsteer eval speed: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def evaluate(model, recipes, config=None, **settings) -> list[dict]:
    """Time a causal LM you already hold: the unsteered model against each recipe (name, YAML
    path, dict or ``attnsteer.Recipe``) on ``config`` (a :data:`SpeedConfig`; keyword
    ``settings`` override its fields, e.g. ``prompt_len=[512, 2048], new_tokens=32``). Writes the
    result files like the command line and returns one results record per prompt length."""
    import dataclasses

    config = dataclasses.replace(config or SpeedConfig(), recipe=list(recipes), **settings)
    if config.prompt_len is not None and not isinstance(config.prompt_len, list):
        config.prompt_len = [int(config.prompt_len)]
    if config.memory != "in-process":
        raise SpeedError("evaluate() times the model it is given; --memory fresh-process needs a model it can rebuild")
    _validate(config)
    status, records = _run(config, loaded=model)
    if status != EXIT_OK:
        raise SpeedError(f"every steered configuration failed (see the log); results in {config.output_path}")
    return records


def _recipe_label(value: str, taken: list[str]) -> str:
    """Short name of a --recipe in tables and charts: a YAML file's stem (e.g. var-timing), else
    the value itself; the full value when the stem is already taken."""
    path = Path(value)
    label = path.stem if path.suffix in (".yaml", ".yml") else value
    return value if label in taken else label


def _run(args, loaded=None) -> tuple[int, list[dict]]:
    """The benchmark; ``loaded``: a model to time instead of building ``args.model``. Returns the
    exit code and the results record of each prompt length."""
    import torch
    import transformers

    import attnsteer

    from ..plan import check_image_keys

    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpeedError(f"--device {args.device}: CUDA is not available on this machine. Fix: --device cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)

    recipes = []
    for value in args.recipe:
        try:
            recipe = attnsteer.load_recipe(value)
            named = isinstance(value, (str, Path))
            recipes.append((_recipe_label(value, [lbl for lbl, _ in recipes]) if named else recipe.name, recipe))
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(f"--recipe {value!r}: {exc}") from None
    if args.model == "smollm2" and args.override and not args.random_weights:
        raise SpeedError(
            "--override changes the config of the embedded SmolLM2, whose real weights would no longer fit. "
            "Fix: add --random-weights to time a changed shape, or drop --override"
        )
    if loaded is not None:
        config = loaded.config
        args.model = _cli.loaded_model_identity(loaded, args.model)[0]
        model_info = {
            "model": args.model,
            "source": "loaded by the caller",
            "image_tokens": 0,
            "prompt_len": 512,
            "description": "",
            "image_token_id": getattr(config, "image_token_id", None),
        }
    else:
        config, model_info = resolve_config(args.model, args.override)
        preloaded = model_info.pop("preloaded", None)
    lengths = args.prompt_len or [model_info["prompt_len"]]
    image_tokens = model_info["image_tokens"] if args.image_tokens is None else args.image_tokens
    max_pos = getattr(config, "max_position_embeddings", None)
    for prompt_len in lengths:
        if image_tokens >= prompt_len:
            raise SpeedError(f"--image-tokens {image_tokens} leaves no text in a {prompt_len}-token prompt")
        if max_pos and prompt_len + args.new_tokens > max_pos:
            raise SpeedError(
                f"--prompt-len {prompt_len} + --new-tokens {args.new_tokens} exceeds max_position_embeddings "
                f"{max_pos}. Fix: shorter prompt, or --override max_position_embeddings={prompt_len + args.new_tokens}"
            )
    args.prompt_lens, args.image_tokens, args.dtype = lengths, image_tokens, dtype_name

    if args.memory_worker is None:
        _log(
            f"building {args.model} ({'random weights' if args.random_weights else 'pretrained'}) on {device} "
            f"in {dtype_name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}"
        )
    torch.manual_seed(args.seed)
    model = (
        loaded.eval()
        if loaded is not None
        else build_model(config, args.model, args.random_weights, dtype, device, preloaded)
    )

    configs = [{"name": "baseline", "recipe": None, "recipe_label": None, "backend": None, "methods": []}]
    for label, recipe in recipes:
        try:  # does the recipe fit the model? (fails here, not in the middle of the timing)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                planned = attnsteer.plan(model, recipe)
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(f"--recipe {label!r} does not fit --model {args.model!r}: {exc}") from None
        try:  # methods that steer toward the image need placeholders to focus on (--image-tokens)
            check_image_keys(planned, label, args.model, images=bool(args.image_tokens))
        except attnsteer.AttnsteerError as exc:
            raise SpeedError(
                f"{exc}; or time it on this model with --image-tokens N (N placeholder tokens play the image)"
            ) from None
        for backend in args.backend_list:
            configs.append(
                {
                    "name": f"{label}@{backend}",
                    "recipe": recipe,
                    "recipe_label": label,
                    "backend": backend,
                    "methods": sorted({i.method for i in recipe.interventions}),
                }
            )
    if args.memory_worker is not None:
        return _memory_worker(args, model, config, model_info, configs, device), []
    status, records = EXIT_OK, []
    for prompt_len in lengths:
        args.prompt_len = prompt_len
        code, record = _measure_length(args, model, config, model_info, recipes, configs, device, prompt_len)
        status = max(status, code)
        records.append(record)
    args.prompt_len = lengths if len(lengths) > 1 else lengths[0]
    return status, records


def _inputs(args, config, model_info, prompt_len: int, device):
    """(ids (B, L), focus bool (B, L) of the image placeholders or None) of one prompt length."""
    import torch

    ids = build_prompt(
        config, args.batch_size, prompt_len, args.image_tokens, model_info.get("image_token_id"), args.seed, device
    )
    focus = None
    if args.image_tokens:  # the placeholders play the image role for VAR / VHR / PAI (handle.focus)
        focus = torch.zeros_like(ids, dtype=torch.bool)
        focus[:, 1 : 1 + args.image_tokens] = True
    return ids, focus


def _memory_worker(args, model, config, model_info, configs, device) -> int:
    """``--_memory-worker NAME``: in this fresh process, warm configuration NAME up on a short
    prompt, release what the warm-up freed (gc, malloc_trim), then measure one prefill + decode
    (run_once resets the resident high-water mark first). Prints one JSON line."""
    import ctypes

    by_name = {c["name"]: c for c in configs}
    c = by_name[args.memory_worker]
    prompt_len = args.prompt_lens[0]
    ids, focus = _inputs(args, config, model_info, prompt_len, device)
    warm = min(prompt_len, max(args.image_tokens + 2, 16))
    run_once(model, ids[:, :warm], 1, c, device, focus=None if focus is None else focus[:, :warm])
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    res = run_once(model, ids, args.new_tokens, c, device, focus=focus)
    print(
        json.dumps(
            {
                "config": c["name"],
                "prompt_len": prompt_len,
                "peak_extra_bytes": res["peak_extra_bytes"],
                "peak_mem_bytes": res["peak_mem_bytes"],
            }
        )
    )
    return EXIT_OK


def _fresh_memory(args, configs, prompt_len: int) -> dict[str, dict]:
    """Peak memory of each configuration measured in its own fresh process (``--memory fresh-process``)."""
    base = _worker_argv(args, prompt_len)
    out = {}
    for c in configs:
        cmd = [sys.executable, "-m", "attnsteer.evals.speed", *base, "--_memory-worker", c["name"]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[c["name"]] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
            _log(f"  fresh-process memory of {c['name']}: failed ({out[c['name']]['error'][0][:200]})")
            continue
        out[c["name"]] = json.loads(lines[-1])
        _log(
            f"  fresh-process memory {c['name']:<34s} peak extra {(out[c['name']]['peak_extra_bytes'] or 0) / MIB:8.1f} MiB"
        )
    return out


def _worker_argv(args, prompt_len: int) -> list[str]:
    """The flags that rebuild this run's model and configurations in a worker process."""
    argv = [
        "--model",
        args.model,
        "--batch_size",
        str(args.batch_size),
        "--prompt-len",
        str(prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--dtype",
        args.dtype,
        "--backends",
        args.backends,
        "--seed",
        str(args.seed),
        "--image-tokens",
        str(args.image_tokens),
    ]
    for value in args.recipe:
        argv += ["--recipe", value]
    if args.random_weights:
        argv.append("--random-weights")
    for item in args.override:
        argv += ["--override", item]
    if args.device:
        argv += ["--device", args.device]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def _measure_length(args, model, config, model_info, recipes, configs, device, prompt_len: int) -> int:
    """The timing protocol at one prompt length; writes its CSV / JSON / Markdown / PNG."""
    import torch

    ids, focus = _inputs(args, config, model_info, prompt_len, device)
    runs: list[dict] = []
    failed: set[str] = set()
    dtype_name = args.dtype

    def one(c, repeat, pair, warm=False):
        if c["name"] in failed:
            return None
        try:
            res = run_once(model, ids, min(args.new_tokens, 4) if warm else args.new_tokens, c, device, focus=focus)
            status = "ok"
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            res, status = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}, "oom"
        except SteeringError as exc:  # a forced backend that cannot run one of the recipe's calls says why
            res, status = {"error": str(exc).splitlines()[0][:300]}, "unsupported"
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            res, status = {"error": str(exc).splitlines()[0][:200]}, "oom"
        if status != "ok":
            failed.add(c["name"])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _log(f"  {c['name']}: {status} ({res['error']}); skipping its remaining runs")
        if warm:
            return res
        rec = {
            "config": c["name"],
            "recipe": c["recipe_label"],
            "backend": c["backend"],
            "repeat": repeat,
            "pair": pair,
            "status": status,
            **res,
        }
        rec["impl"] = _impl(c["backend"], res.get("kernel_calls") or {}, device) if status == "ok" else None
        runs.append(rec)
        if status == "ok":
            _log(
                f"  rep {repeat} {c['name']:<34s} prefill {res['prefill_s'] * 1000:9.1f} ms  decode "
                f"{(res['decode_tok_s'] or 0):8.1f} tok/s  peak {((res['peak_mem_bytes'] or 0) / MIB):8.0f} MiB  "
                f"[{rec['impl']}]"
            )
        return rec

    t_start = time.perf_counter()
    for c in configs:
        for _ in range(args.warmup):
            one(c, -1, None, warm=True)
    steered = configs[1:]
    for r in range(args.repeats):
        for c in steered:
            order = (configs[0], c) if r % 2 == 0 else (c, configs[0])
            for x in order:
                one(x, r, c["name"])
    elapsed = time.perf_counter() - t_start

    summary = summarise(runs, configs)
    if args.memory == "fresh-process":  # on CUDA too: a fresh process has no cached allocations either
        add_fresh_memory(summary, _fresh_memory(args, configs, prompt_len))
    mach = machine_info(device)
    command = "attnsteer eval speed " + _args_to_cli(args)
    meta = {
        "command": command,
        "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v) and k != "memory_worker"
        },
        "model": {
            **model_info,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            "model_type": config.model_type,
        },
        "machine": mach,
        "recipes": [{"label": label, "name": recipe.name, "hash": recipe.hash} for label, recipe in recipes],
        "memory_note": (
            "torch.cuda.max_memory_allocated during the run (weights + KV cache + activations)"
            if device.type == "cuda"
            else "CPU: VmHWM - VmRSS before the run (Linux /proc; same process, allocator reuse makes it a "
            "lower bound); the memory ratio compares these peaks including the resident model"
        ),
        "method": __doc__.split("Results:")[0].strip(),
        "goals": GOALS,
        "elapsed_s": elapsed,
    }
    out_dir = Path(args.output_path).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (
        (f"{args.label}_n{prompt_len}" if len(args.prompt_lens) > 1 else args.label)
        if args.label
        else f"speed_{_slug(args.model)}_b{args.batch_size}_n{prompt_len}_t{args.new_tokens}_{dtype_name}_{device.type}"
    )
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md", "png")}
    paths["json"].write_text(
        json.dumps(
            {
                **results_record(meta, summary),
                "meta": meta,
                "configs": [
                    {k: (v if k != "recipe" else (v.name if v is not None else None)) for k, v in c.items()}
                    for c in configs
                ],
                "runs": runs,
                "summary": summary,
            },
            indent=2,
            default=str,
        )
    )
    write_csv(paths["csv"], meta, runs, summary)
    paths["md"].write_text(markdown(meta, summary))
    note = None if args.no_plot else plot(paths["png"], meta, summary)
    if note:
        _log(f"note: {note}")
    print(markdown(meta, summary))
    written = [str(p) for k, p in paths.items() if p.exists() and (k != "png" or not (args.no_plot or note))]
    print("wrote " + ", ".join(written))
    return (EXIT_OK if not failed or len(failed) < len(configs) else EXIT_FAILED), json.loads(paths["json"].read_text())


def _args_to_cli(args) -> str:
    parts = [f"--model {args.model}"] + [f"--recipe {r}" for r in args.recipe if isinstance(r, (str, Path))]
    if args.random_weights:
        parts.append("--random-weights")
    parts += [
        f"--batch_size {args.batch_size}",
        f"--prompt-len {args.prompt_len}",
        f"--new-tokens {args.new_tokens}",
        f"--dtype {args.dtype}",
        f"--backends {args.backends}",
        f"--repeats {args.repeats}",
    ]
    if args.image_tokens:
        parts.append(f"--image-tokens {args.image_tokens}")
    if args.memory != "in-process":
        parts.append(f"--memory {args.memory}")
    parts += [f"--override {o}" for o in args.override]
    if args.device:
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def _speed_config():
    return _cli.config_dataclass(
        "SpeedConfig", add_arguments, "Settings of one speed run (`attnsteer eval speed`); pass to :func:`evaluate`."
    )


SpeedConfig = _speed_config()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
