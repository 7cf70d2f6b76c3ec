"""``attnsteer inspect``: PNG pictures of what a recipe does to attention, baseline next to steered."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import models
from ..plan import check_recipes
from ..recipe import load_labelled_recipes
from ._common import (
    BACKEND_CHOICES,
    EXIT_OK,
    CLIError,
    add_model_arguments,
    add_recipe_argument,
    check_image_file,
    check_prompts,
    check_writable,
    seed_everything,
    subparser,
)

EXAMPLE = "attnsteer inspect --model smollm2 --recipe act-default --prompt Hi --out pictures"


def add_inspect(sub) -> None:
    p = subparser(
        sub,
        "inspect",
        "pictures of what a recipe does to attention",
        EXAMPLE,
        description="Run one prompt through the unsteered model and through each recipe, and draw PNG pictures of "
        "the last prompt row's attention (per layer and head: its share on the image tokens, or on the sinks for a "
        "text-only model; over the image grid with --image), the sinks ACT and VAR find and the heads VHR selects "
        "and SPIN keeps. Writes OUT/<label>_<picture>.png and OUT/inspect.json with every number drawn (docs/inspect.md).",
    )
    add_model_arguments(p)
    add_recipe_argument(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    p.add_argument("--image", default=None, metavar="PATH", help="an image file, for a vision-language --model")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG pictures and inspect.json")
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="the steered forward's backend (the pictures are the same; reference materialises full maps)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's (with --image: the processor's) chat template (default: on if it "
        "has one); --no-chat with --image: the image token, a new line, then the prompt",
    )
    p.add_argument("--seed", type=int, default=0, help="torch/random seed (default: 0)")
    p.set_defaults(func=cmd_inspect)


def _model_kind(model_id: str, kwargs: dict) -> tuple[str, bool | None]:
    """(model_type, is a vision-language model) from the config, without loading weights; None: unknown."""
    from .. import archs

    if model_id == models.SMOLLM2_ID:
        return "llama", False
    try:
        from transformers import AutoConfig

        hub = {k: kwargs[k] for k in models.HUB_KWARGS if k in kwargs}
        model_type = AutoConfig.from_pretrained(model_id, **hub).model_type
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(
            f"--model {model_id!r}: could not read its config ({type(exc).__name__}: {exc}). Fix: pass a folder with "
            "config.json, a hub id reachable from this machine, or smollm2 for the embedded default"
        ) from None
    spec = archs.ARCHS.get(model_type)
    return model_type, (spec.is_multimodal if spec is not None else None)


def cmd_inspect(args) -> int:
    from .. import pictures

    recipes = load_labelled_recipes(args.recipe)
    check_prompts(args.prompt)
    out = check_writable(args.out, "--out", folder=True)
    if args.image is not None:
        check_image_file(args.image)
    model_id, kwargs = models.resolve_model(args.model, args.model_args)
    model_type, is_vlm = _model_kind(model_id, kwargs)
    if args.image is not None and is_vlm is False:
        raise CLIError(
            f"--image {args.image!r}: --model {model_id!r} is a text-only model ({model_type}). Fix: drop --image, "
            "or pass a vision-language model such as llava-hf/llava-1.5-7b-hf"
        )
    if args.image is None and is_vlm:
        raise CLIError(
            f"--model {model_id!r} is a vision-language model ({model_type}) and --image is missing. Fix: pass "
            "--image PATH (the pictures show attention on the image tokens)"
        )
    seed_everything(args.seed)
    if args.image is not None:
        from ..evals.vlm import EvalItem, VLMInputs, load_vlm

        processor, model = load_vlm(model_id, kwargs)
        builder = VLMInputs(processor, model_id, chat=args.chat is not False, model=model)
        check_recipes(model, recipes, model_id, images=True)
        device = next(model.parameters()).device
        inputs = builder([EvalItem(id="0", prompt=args.prompt, image=Path(args.image))], device)
        tokenizer = builder.tokenizer
    else:
        from ..demo import build_inputs

        processor = None
        tokenizer, model = models.load_checked(model_id, kwargs, sys.stderr)
        check_recipes(model, recipes, model_id, images=False)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if args.chat and not has_template:
            raise CLIError(f"--chat: the tokenizer of --model {model_id!r} has no chat template. Fix: use --no-chat")
        chat = has_template if args.chat is None else args.chat
        inputs = build_inputs(tokenizer, [args.prompt], chat, next(model.parameters()).device)
    meta = {"model": model_id, "prompt": args.prompt, "image": args.image, "backend": args.backend}
    record = pictures.inspect(
        model,
        inputs,
        recipes,
        out,
        tokens=pictures.token_labels(tokenizer, inputs["input_ids"][0]),
        backend=args.backend,
        processor=processor,
        meta=meta,
    )
    for pic in record["pictures"]:
        print(pic["path"])
    print(record["json"])
    for note in record["skipped"]:
        print(f"note: skipped {note}", file=sys.stderr)
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_OK
