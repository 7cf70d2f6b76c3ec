"""The ``attnsteer`` command line.

One ``add_<command>`` function builds each subcommand's parser and one ``cmd_<command>`` function
runs it; :data:`COMMANDS` lists them in the order ``attnsteer --help`` shows them, so a new
subcommand is one pair of functions and one entry. Flag names follow lm-eval where they apply
(``--model``, ``--model_args``, ``--batch_size``, ``--seed``, ``--output_path``).

Exit codes: 0 success, 2 usage error (bad flag, recipe, model or ``--model_args``; the message
names the flag, the value and the fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

from .evals._cli import _positive_int

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
NOT_IMPLEMENTED = "not implemented yet in this version"


class CLIError(Exception):
    """A usage problem: printed as one paragraph, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` (caught in :func:`main`) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: {message}. Fix: see `{self.prog} --help` for the flags and an example")


def _subparser(sub, name: str, help_text: str, example: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description or help_text, 79),
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(_prog=parser.prog, _accepts_extra=False)
    return parser


# ---- --model / --model_args ---------------------------------------------------------------------
MODEL_ARG_KEYS = {
    "pretrained": "model id or folder (lm-eval style; same as --model)",
    "dtype": "float32 | bfloat16 | float16 | auto",
    "device": "cpu | cuda | cuda:N | mps",
    "attn_implementation": "sdpa | eager (the implementations attnsteer steers)",
    "revision": "hub revision (branch, tag or commit)",
    "trust_remote_code": "true | false",
}
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "auto": "auto",
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_MODEL_ARGS_FIX = "Fix: pass comma-separated key=value pairs, e.g. --model_args dtype=bfloat16,device=cpu"


def parse_model_args(text: str | None) -> dict:
    """``"dtype=bfloat16,device=cpu"`` -> validated dict (values converted)."""
    import torch

    out: dict = {}
    if not text:
        return out
    allowed = ", ".join(f"{k} ({v})" for k, v in MODEL_ARG_KEYS.items())
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise CLIError(f"--model_args {text!r}: {item!r} is not key=value. {_MODEL_ARGS_FIX}")
        if key not in MODEL_ARG_KEYS:
            raise CLIError(f"--model_args {text!r}: unknown key {key!r}; allowed: {allowed}. {_MODEL_ARGS_FIX}")
        if key in out:
            raise CLIError(f"--model_args {text!r}: {key!r} is given twice. Fix: keep one {key}=...")
        if key == "dtype":
            if value.lower().removeprefix("torch.") not in _DTYPES:
                raise CLIError(
                    f"--model_args {text!r}: dtype={value!r} is not a dtype; allowed: float32, bfloat16, float16, "
                    "auto. Fix: e.g. --model_args dtype=bfloat16"
                )
            name = _DTYPES[value.lower().removeprefix("torch.")]
            out[key] = name if name == "auto" else getattr(torch, name)
        elif key == "device":
            try:
                device = torch.device(value)
            except (RuntimeError, ValueError):
                raise CLIError(
                    f"--model_args {text!r}: device={value!r} is not a torch device. Fix: device=cpu, device=cuda "
                    "or device=cuda:0"
                ) from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise CLIError(
                    f"--model_args {text!r}: device={value!r} but this machine has no usable CUDA device. "
                    "Fix: use device=cpu (or run on a machine with a GPU)"
                )
            if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
                raise CLIError(f"--model_args {text!r}: device={value!r} but MPS is not available. Fix: device=cpu")
            out[key] = str(device)
        elif key == "attn_implementation":
            if value not in ("sdpa", "eager"):
                raise CLIError(
                    f"--model_args {text!r}: attn_implementation={value!r}; attnsteer steers 'sdpa' and 'eager' "
                    "attention. Fix: attn_implementation=sdpa"
                )
            out[key] = value
        elif key == "trust_remote_code":
            if value.lower() not in _BOOLS:
                raise CLIError(f"--model_args {text!r}: trust_remote_code={value!r}; allowed: true or false")
            out[key] = _BOOLS[value.lower()]
        else:
            if not value:
                raise CLIError(f"--model_args {text!r}: {key}= has no value. {_MODEL_ARGS_FIX}")
            out[key] = value
    return out


def _resolve_model(model: str | None, model_args: str | None) -> tuple[str, dict]:
    """(model id, load_model kwargs) from --model and --model_args; checks local paths up front."""
    from . import models

    kwargs = parse_model_args(model_args)
    pretrained = kwargs.pop("pretrained", None)
    if pretrained is not None and model not in (None, "hf", "huggingface", pretrained):
        raise CLIError(
            f"--model {model!r} and --model_args pretrained={pretrained!r} name different models. "
            "Fix: give the model once, with --model (or lm-eval style: --model hf --model_args pretrained=...)"
        )
    model_id = pretrained or model
    if not model_id or model_id in ("hf", "huggingface"):
        raise CLIError(
            "--model is missing. Fix: pass --model smollm2 (the embedded offline default), a local folder with "
            "config.json, or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    if model_id == models.SMOLLM2_ID:
        extra = [k for k in ("revision", "trust_remote_code") if k in kwargs]
        if extra:
            raise CLIError(
                f"--model_args {model_args!r}: {extra} do not apply to the embedded model {models.SMOLLM2_ID!r}. "
                "Fix: drop them (dtype, device and attn_implementation do apply)"
            )
        return model_id, kwargs
    path = Path(model_id).expanduser()
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id
    if path.exists():
        if not (path / "config.json").is_file():
            raise CLIError(
                f"--model {model_id!r}: the folder has no config.json, so it is not a saved transformers model. "
                f"Fix: pass the folder written by save_pretrained(), a hub id, or {models.SMOLLM2_ID!r}"
            )
        return str(path), kwargs
    if looks_local:
        raise CLIError(
            f"--model {model_id!r}: no such local folder. "
            f"Fix: check the path, pass a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), or "
            f"--model {models.SMOLLM2_ID} for the embedded offline default"
        )
    _check_hub_model(model_id, kwargs.get("revision"))
    return model_id, kwargs


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except (OSError, TypeError):
        return False


def _check_hub_model(model_id: str, revision: str | None) -> None:
    """Fail fast (instead of minutes of download retries) when a hub id can be neither found in
    the local Hugging Face cache nor downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return
    except ValueError as exc:  # HFValidationError: not a well-formed repo id
        raise CLIError(
            f"--model {model_id!r}: not a local folder and not a valid hub id ({exc}). Fix: pass an existing "
            f"folder, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or smollm2 for the embedded default"
        ) from None
    if isinstance(cached, str):
        return
    fix = "Fix: download it where there is network and pass the folder, or use --model smollm2 (embedded, offline)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CLIError(f"--model {model_id!r}: not a local folder, not in the Hugging Face cache, and HF_HUB_OFFLINE "
                       f"is set. {fix}")
    if not _hub_reachable():
        raise CLIError(f"--model {model_id!r}: not a local folder, not in the Hugging Face cache, and the hub is not "
                       f"reachable from this machine. {fix}")


def _load_model(model_id: str, kwargs: dict, err):
    """Load (tokenizer, model) and check that attnsteer supports its architecture."""
    from . import archs
    from .demo import load_with_progress
    from .errors import AttnsteerError

    try:
        tokenizer, model = load_with_progress(model_id, err, **kwargs)
        archs.resolve(model)
    except AttnsteerError as exc:
        msg = str(exc)
        raise CLIError(msg if msg.startswith("--model") else f"--model {model_id!r}: {msg}") from None
    except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
        raise CLIError(
            f"--model {model_id!r}: could not load it ({type(exc).__name__}: {exc}). Fix: pass a local folder with "
            "config.json and weights, a hub id reachable from this machine, or smollm2 for the embedded default"
        ) from None
    return tokenizer, model


def _load_recipes(values: list[str], flag: str = "--recipe") -> list[tuple[str, object]]:
    """Load each recipe argument; a bad one is a CLIError naming the flag and value."""
    import attnsteer

    from .demo import label_recipes

    pairs = []
    for value in values:
        try:
            pairs.append((value, attnsteer.load_recipe(value)))
        except attnsteer.AttnsteerError as exc:
            hint = f" (check the file with `attnsteer recipes validate {value}`)" if Path(value).exists() else ""
            raise CLIError(f"{flag} {value!r}: {exc}{hint}") from None
    return label_recipes(pairs)


def _check_recipes_fit(model, recipes: list[tuple[str, object]], model_id: str, backend: str):
    """Build each recipe's plan on the model (apply, then remove at once). Returns the warnings
    and, per label, the recipe with the concrete layers and heads it steers on this model."""
    import warnings

    import attnsteer

    notes, applied = [], {}
    for label, recipe in recipes:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always", attnsteer.AttnsteerWarning)
            try:
                handle = attnsteer.apply(model, recipe, backend=backend)
                applied[label] = handle.resolved_recipe().to_dict()
                handle.remove()
            except attnsteer.AttnsteerError as exc:
                raise CLIError(f"--recipe {label!r} does not fit --model {model_id!r}: {exc}") from None
        notes += [str(w.message) for w in record if issubclass(w.category, attnsteer.AttnsteerWarning)]
    return notes, applied


def _seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _output_file(path: str, default_name: str) -> Path:
    out = Path(path).expanduser()
    if out.suffix.lower() != ".json":
        out = out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# ---- recipes ------------------------------------------------------------------------------------
def add_recipes(sub) -> None:
    parser = _subparser(
        sub, "recipes", "list, show and validate steering recipes", "attnsteer recipes list",
        description="List the built-in recipes, show one resolved, or validate a recipe file.",
    )
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))
    rsub = parser.add_subparsers(title="recipes commands", metavar="{list,show,validate}", parser_class=_Parser)

    p = _subparser(rsub, "list", "table of the built-in recipes", "attnsteer recipes list")
    p.set_defaults(func=cmd_recipes_list)

    p = _subparser(
        rsub, "show", "print a recipe as resolved YAML (defaults filled in) with its hash",
        "attnsteer recipes show act-default",
    )
    p.add_argument("recipe", metavar="NAME_OR_PATH", help="built-in name, YAML file, folder with recipe.yaml or hub repo")
    p.set_defaults(func=cmd_recipes_show)

    p = _subparser(
        rsub, "validate", "check a recipe file (exit 0 valid, 2 invalid)",
        "attnsteer recipes validate my-recipe.yaml --model smollm2",
        description="Check a recipe's schema; with --model also resolve its layers and heads on that model.",
    )
    p.add_argument("recipe", metavar="PATH", help="YAML file (or built-in name, folder, hub repo)")
    p.add_argument("--model", default=None, help="also resolve layers/heads against this model (id, folder or smollm2)")
    p.add_argument("--model_args", default=None, help="key=value,... e.g. dtype=bfloat16,device=cpu")
    p.set_defaults(func=cmd_recipes_validate)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def cmd_recipes_list(args) -> int:
    import attnsteer

    from .demo import first_sentence, term_width

    rows = []
    for name in attnsteer.builtin_names():
        try:
            recipe = attnsteer.load_recipe(name)
            rows.append((name, ",".join(dict.fromkeys(recipe.methods)), first_sentence(recipe.description, 200)))
        except attnsteer.AttnsteerError as exc:
            rows.append((name, "?", f"INVALID: {exc}"))
    name_w = max([len("NAME")] + [len(r[0]) for r in rows])
    meth_w = max([len("METHODS")] + [len(r[1]) for r in rows])
    desc_w = max(20, term_width() - name_w - meth_w - 4) if sys.stdout.isatty() else 10**6
    print(f"{'NAME':<{name_w}}  {'METHODS':<{meth_w}}  DESCRIPTION")
    for name, methods, desc in rows:
        if len(desc) > desc_w:
            desc = desc[: desc_w - 3].rstrip() + "..."
        print(f"{name:<{name_w}}  {methods:<{meth_w}}  {desc}")
    print(f"\n{len(rows)} built-in recipes. Details: attnsteer recipes show NAME")
    return EXIT_OK


def resolved_yaml(recipe) -> str:
    """The recipe as YAML with every default written out; layers that come from the method's
    default are marked with a comment (the file as written leaves them out)."""
    import yaml

    from .methods import METHODS

    data = recipe.to_dict()
    filled = {}
    for i, iv in enumerate(data["interventions"]):
        if "layers" not in iv:
            marker = f"__attnsteer_default_layers_{i}__"
            filled[marker] = METHODS[iv["method"]].default_layers
            # keep the usual key order: method, layers, heads, params
            data["interventions"][i] = {"method": iv["method"], "layers": marker, **{k: v for k, v in iv.items() if k != "method"}}
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    for marker, value in filled.items():
        scalar = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        text = text.replace(marker, f"{scalar}  # the method's default layers")
    return text


def cmd_recipes_show(args) -> int:
    import attnsteer

    try:
        recipe = attnsteer.load_recipe(args.recipe)
    except attnsteer.AttnsteerError as exc:
        raise CLIError(f"recipes show {args.recipe!r}: {exc}") from None
    origin = "built-in" if args.recipe in attnsteer.builtin_names() else str(args.recipe)
    print(f"# recipe {recipe.name!r} ({origin})")
    print(f"# hash (sha256, as recorded with results): {recipe.hash}")
    print(resolved_yaml(recipe), end="")
    return EXIT_OK


def _layer_ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def cmd_recipes_validate(args) -> int:
    import warnings

    import attnsteer

    try:
        recipe = attnsteer.load_recipe(args.recipe)
    except attnsteer.AttnsteerError as exc:
        print(f"INVALID: {args.recipe}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    methods = ", ".join(recipe.methods)
    print(f"valid: {args.recipe} (recipe {recipe.name!r}, {len(recipe.interventions)} intervention(s): {methods})")
    print(f"hash: {recipe.hash}")
    if not args.model:
        return EXIT_OK
    model_id, kwargs = _resolve_model(args.model, args.model_args)
    _, model = _load_model(model_id, kwargs, sys.stderr)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", attnsteer.AttnsteerWarning)
        try:
            handle = attnsteer.apply(model, recipe)
        except attnsteer.AttnsteerError as exc:
            print(f"INVALID on --model {model_id!r}: {args.recipe}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        plans, arch = handle.plans, handle.arch
        handle.remove()
    for w in record:
        if issubclass(w.category, attnsteer.AttnsteerWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(
        f"resolves on {model_id} ({model.config.model_type}, {arch.num_layers} layers x {arch.num_heads} query heads, "
        f"{arch.num_kv_heads} kv heads):"
    )
    by_method: dict[str, list[tuple[int, int]]] = {}
    for layer, plan in sorted(plans.items()):
        for m in plan.methods:
            heads = arch.num_heads if m.heads is None else int(m.heads.sum())
            by_method.setdefault(m.name, []).append((layer, heads))
    if not by_method:
        print("  nothing to steer (every intervention was skipped)")
    for name, items in by_method.items():
        layers = [layer for layer, _ in items]
        heads = {h for _, h in items}
        head_text = f"all {arch.num_heads} heads" if heads == {arch.num_heads} else "selected heads " + "/".join(
            f"L{layer}:{h}" for layer, h in items
        )
        print(f"  {name}: layers {_layer_ranges(layers)} ({len(layers)} layers), {head_text}")
    return EXIT_OK


# ---- generate -----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = _subparser(
        sub, "generate", "greedy answers of the model, baseline and steered, with timings",
        'attnsteer generate --model smollm2 --recipe act-default --recipe softplus-gentle '
        '--prompt "What is the capital of France?" --max_new_tokens 32',
        description="Generate greedily with the unsteered model (baseline) and with each recipe, and print the "
        "answers one after the other with prefill time and decode tokens/s.",
    )
    p.add_argument("--model", default=None,
                   help="hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)")
    p.add_argument("--model_args", default=None, help="key=value,... e.g. dtype=bfloat16,device=cpu; keys: "
                   + ", ".join(MODEL_ARG_KEYS))
    p.add_argument("--recipe", action="extend", nargs="+", required=True, metavar="R",
                   help="built-in name, YAML path or hub repo; repeat for several")
    p.add_argument("--prompt", action="extend", nargs="+", required=True, metavar="TEXT",
                   help="prompt text; repeat for several")
    p.add_argument("--max_new_tokens", type=_positive_int, default=64, help="default: 64")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto",
                   help="auto = fused (O(N) memory); reference = float32 eager oracle")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: on if it has one)")
    p.add_argument("--batch_size", type=_positive_int, default=1, help="prompts per generate call (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="torch/random seed (decoding is greedy; default: 0)")
    p.add_argument("--output_path", default=None,
                   help="write a JSON of answers and timings (a .json file, or a folder for attnsteer_generate.json)")
    p.add_argument("--show_sinks", action="store_true", help="also print the hidden sinks ACT recipes find")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import attnsteer
    import torch

    from . import demo

    recipes = _load_recipes(args.recipe)
    model_id, kwargs = _resolve_model(args.model, args.model_args)
    _seed(args.seed)
    t_start = time.perf_counter()
    tokenizer, model = _load_model(model_id, kwargs, sys.stderr)
    notes, applied = _check_recipes_fit(model, recipes, model_id, args.backend)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise CLIError(f"--chat: the tokenizer of --model {model_id!r} has no chat template. Fix: use --no-chat")
    chat = has_template if args.chat is None else args.chat
    print(
        f"model {model_id} ({demo.describe_model(model)}); greedy, max_new_tokens {args.max_new_tokens}, "
        f"chat template {'on' if chat else 'off'}, backend {'fused' if args.backend == 'auto' else args.backend}",
        file=sys.stderr,
    )
    act = demo.act_params_of(recipes)

    def show(i: int, result) -> None:
        print(demo.format_result(i, len(args.prompt), result, tokenizer, chat=chat, act_params=act,
                                 show_sinks=args.show_sinks), flush=True)
        print()

    results = demo.run_prompts(
        model, tokenizer, args.prompt, recipes, backend=args.backend, max_new_tokens=args.max_new_tokens, chat=chat,
        batch_size=args.batch_size, on_result=show, notes=notes,
    )
    print(demo.format_summary(results))
    for note in notes:
        print("\n".join(demo.wrap(f"note: {note}", "")), file=sys.stderr)
    if args.output_path:
        import transformers

        record = {
            "model": model_id,
            "model_args": args.model_args,
            "backend": args.backend,
            "max_new_tokens": args.max_new_tokens,
            "chat": chat,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "recipes": [
                {"label": lbl, "name": r.name, "hash": r.hash, "recipe": r.to_dict(), "applied": applied[lbl]}
                for lbl, r in recipes
            ],
            "versions": {"attnsteer": attnsteer.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "results": demo.results_to_json(results),
            "notes": notes,
            "total_s": round(time.perf_counter() - t_start, 3),
        }
        out = _output_file(args.output_path, "attnsteer_generate.json")
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


# ---- demo ---------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    from .demo import DEMO_MAX_NEW_TOKENS, DEMO_RECIPES

    p = _subparser(
        sub, "demo", "offline tour on the embedded SmolLM2-135M-Instruct (start here)",
        "attnsteer demo --max_new_tokens 24",
        description="Offline, no download: on a few built-in prompts, show the hidden attention sinks ACT finds, "
        f"the baseline vs steered answers ({', '.join(DEMO_RECIPES)}) and the time each took. The first run "
        "de-quantises the embedded model once (~25 s).",
    )
    p.add_argument("--prompts", "--prompt", dest="prompts", action="extend", nargs="+", metavar="TEXT",
                   help="your own prompts instead of the 3 built-in ones")
    p.add_argument("--recipe", dest="recipes", action="extend", nargs="+", metavar="R",
                   help=f"recipes to compare (default: {' '.join(DEMO_RECIPES)})")
    p.add_argument("--max_new_tokens", type=_positive_int, default=DEMO_MAX_NEW_TOKENS,
                   help=f"default: {DEMO_MAX_NEW_TOKENS}")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto", help="default: auto (fused)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from . import demo
    from .errors import AttnsteerError

    recipes = args.recipes or list(demo.DEMO_RECIPES)
    _load_recipes(recipes)  # a bad --recipe fails before the model loads, naming the flag
    try:
        return demo.run_demo(args.prompts, recipes, max_new_tokens=args.max_new_tokens, backend=args.backend)
    except AttnsteerError as exc:
        raise CLIError(f"demo: {exc}") from None


# ---- reserved -----------------------------------------------------------------------------------
def _add_reserved(name: str, help_text: str, example: str) -> Callable:
    def add(sub) -> None:
        p = _subparser(sub, name, f"{help_text} (not implemented yet)", example,
                       description=f"{help_text[0].upper()}{help_text[1:]}: {NOT_IMPLEMENTED}.")
        p.set_defaults(func=lambda args: _not_implemented(name), _accepts_extra=True)  # any flags, for now

    return add


def _not_implemented(name: str) -> int:
    print(f"attnsteer {name}: {NOT_IMPLEMENTED}.", file=sys.stderr)
    return EXIT_USAGE


# ---- eval / compare -----------------------------------------------------------------------------
# name -> module under attnsteer.evals exposing add_arguments(parser) and run(args) -> int
EVAL_COMMANDS = ("pope", "chair", "mmlu", "speed")
_EVAL_MODULES = {"pope": "pope_run", "chair": "chair_run", "mmlu": "mmlu", "speed": "speed"}
EVAL_EXAMPLE = ("attnsteer eval mmlu --model smollm2 --tasks attnsteer_mc_demo --recipe none --recipe act-default "
                "--recipe softplus-gentle")


def _eval_module(name: str):
    """The module of ``attnsteer eval NAME``, or None if it is not part of this install."""
    import importlib

    module_name = f"attnsteer.evals.{_EVAL_MODULES[name]}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None


def add_eval(sub) -> None:
    parser = _subparser(
        sub, "eval", "benchmarks, baseline vs recipes: pope | chair | mmlu (lm-eval) | speed", EVAL_EXAMPLE,
        description="Evaluate the unsteered model (--recipe none) and each recipe on one loaded model, with results "
        "(results.json + samples.jsonl) in a run directory that a rerun resumes. Subcommands: pope, chair (vision-"
        "language models), mmlu (any lm-eval task; attnsteer_mc_demo runs offline on CPU), speed. Under `accelerate "
        "launch` the items are shared out over the processes.",
    )
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))
    esub = parser.add_subparsers(title="eval commands", metavar="{" + ",".join(EVAL_COMMANDS) + "}",
                                 parser_class=_Parser)
    for name in EVAL_COMMANDS:
        module = _eval_module(name)
        if module is None:
            p = _subparser(esub, name, f"{name} (not available in this install)", f"attnsteer eval {name} --help",
                           description=f"attnsteer eval {name}: {NOT_IMPLEMENTED}.")
            p.set_defaults(func=lambda args, n=name: _not_implemented(f"eval {n}"), _accepts_extra=True)
            continue
        help_text = getattr(module, "HELP", f"{name} benchmark")
        example = getattr(module, "EXAMPLE", f"attnsteer eval {name} --model smollm2")
        p = _subparser(esub, name, help_text, example, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def add_compare(sub) -> None:
    from .evals import compare

    p = _subparser(sub, "compare", compare.HELP, compare.EXAMPLE, description=compare.DESCRIPTION)
    compare.add_arguments(p)
    p.set_defaults(func=compare.run)


add_calibrate = _add_reserved(
    "calibrate", "search recipe parameters on a model", "attnsteer calibrate --model smollm2 --method act"
)

COMMANDS: list[Callable] = [add_demo, add_generate, add_recipes, add_eval, add_compare, add_calibrate]


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="attnsteer",
        description="Training-free attention interventions (ACT, softplus re-weighting, ...) for Hugging Face models.",
        epilog="example:\n  attnsteer demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"attnsteer {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _print_error(message: str) -> None:
    """One paragraph: line breaks inside wrapped library messages become spaces."""
    import re

    print("attnsteer: error: " + re.sub(r"\s*\n\s*", " ", message.strip()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 usage error, 130 interrupted)."""
    import attnsteer

    if hasattr(sys.stdout, "reconfigure"):
        try:  # generated text may not fit a non-UTF-8 terminal; never crash on printing it
            sys.stdout.reconfigure(errors="replace")
        except (ValueError, OSError):  # pragma: no cover - detached or exotic streams
            pass
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "_accepts_extra", False):
            prog = getattr(args, "_prog", parser.prog)
            raise CLIError(
                f"{prog}: unrecognized arguments: {' '.join(extra)}. Fix: see `{prog} --help` for the flags and an "
                "example"
            )
    except CLIError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from .demo import quiet_transformers

    try:
        with quiet_transformers():
            return args.func(args)
    except CLIError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except attnsteer.AttnsteerError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnsteer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `attnsteer recipes list | head`: the reader left; stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - no real file descriptor
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
