"""``attnsteer generate``: greedy answers of the model, baseline and steered, with timings."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import models
from ..console import wrap
from ..plan import check_recipes
from ..recipe import load_labelled_recipes
from ._common import (
    BACKEND_CHOICES,
    BACKEND_HELP,
    EXIT_OK,
    CLIError,
    add_model_arguments,
    add_recipe_argument,
    check_image_file,
    check_prompts,
    check_writable,
    output_file,
    positive_int,
    seed_everything,
    subparser,
)


def add_generate(sub) -> None:
    p = subparser(
        sub,
        "generate",
        "greedy answers of the model, baseline and steered, with timings",
        "attnsteer generate --model smollm2 --recipe act-default --recipe softplus-gentle "
        '--prompt "What is the capital of France?" --max_new_tokens 32',
        description="Generate greedily with the unsteered model (baseline) and with each recipe, and print the "
        "answers one after the other with prefill time and decode tokens/s.",
    )
    add_model_arguments(p)
    add_recipe_argument(p)
    p.add_argument(
        "--prompt", action="extend", nargs="+", required=True, metavar="TEXT", help="prompt text; repeat for several"
    )
    p.add_argument("--max_new_tokens", type=positive_int, default=64, help="default: 64")
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help=BACKEND_HELP,
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the tokenizer's (or, with --image, the processor's) chat template (default: on if it "
        "has one); --no-chat with --image: the image token, a new line, then the prompt",
    )
    p.add_argument("--batch_size", type=positive_int, default=1, help="prompts per generate call (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="torch/random seed (decoding is greedy; default: 0)")
    p.add_argument(
        "--output_path",
        default=None,
        help="write a JSON of answers and timings (a .json file, or a folder for attnsteer_generate.json)",
    )
    p.add_argument("--show_sinks", action="store_true", help="also print the hidden sinks ACT recipes find")
    p.add_argument(
        "--image",
        action="extend",
        nargs="+",
        default=None,
        metavar="PATH",
        help="image file(s) for a vision-language --model: one for every prompt, or one per prompt",
    )
    p.add_argument(
        "--save-views",
        "--save_views",
        dest="save_views",
        default=None,
        metavar="DIR",
        help="with --image and an AGLA recipe: write each prompt's image and AGLA's augmented view as PNG to DIR",
    )
    p.set_defaults(func=cmd_generate)


def _save_png(image, path) -> None:
    """image: float (3, H, W) in [0, 1] -> an 8-bit RGB PNG at ``path``."""
    import torch
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def cmd_generate_vlm(args, recipes) -> int:
    """``attnsteer generate --image ...``: greedy answers of a vision-language model per recipe."""
    from pathlib import Path

    import torch

    import attnsteer

    from ..evals.vlm import EvalItem, VLMInputs, load_vlm

    if len(args.image) not in (1, len(args.prompt)):
        raise CLIError(
            f"--image: got {len(args.image)} images for {len(args.prompt)} prompts. Fix: one image for all prompts, "
            "or one per prompt"
        )
    images = [check_image_file(p) for p in args.image]
    out_path = output_file(args.output_path, "attnsteer_generate.json") if args.output_path else None
    model_id, kwargs = models.resolve_model(args.model, args.model_args)
    seed_everything(args.seed)
    processor, model = load_vlm(model_id, kwargs)
    chat = args.chat is not False
    builder = VLMInputs(processor, model_id, chat=chat, model=model)
    _, applied = check_recipes(model, recipes, model_id, images=True)
    device = next(model.parameters()).device
    items = [
        EvalItem(id=str(i), prompt=prompt, image=images[i if len(images) > 1 else 0])
        for i, prompt in enumerate(args.prompt)
    ]
    saved = 0
    answers: dict[str, dict[str, str]] = {it.id: {} for it in items}
    for label, recipe in [("baseline", None), *recipes]:
        handle = None if recipe is None else attnsteer.apply(model, recipe, backend=args.backend, processor=processor)
        try:
            for start in range(0, len(items), args.batch_size):
                batch = items[start : start + args.batch_size]
                inputs = builder(batch, device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
                elapsed = time.perf_counter() - t0
                for it, row in zip(batch, out[:, inputs["input_ids"].shape[1] :]):
                    answer = builder.tokenizer.decode(row, skip_special_tokens=True).strip()
                    answers[it.id][label] = answer
                    print(f"[{label}] prompt {int(it.id) + 1}: {answer}  ({elapsed:.2f} s for the batch)")
                if handle is not None and args.save_views:
                    saved += _save_views(handle, batch, Path(args.save_views) / label)
        finally:
            if handle is not None:
                handle.remove()
    if args.save_views:
        if not saved:
            raise CLIError(
                f"--save-views {args.save_views!r}: no recipe among {[lbl for lbl, _ in recipes]} builds an augmented "
                "view (only AGLA does). Fix: add an AGLA recipe, e.g. --recipe agla-lvlm-attention"
            )
        print(f"wrote {saved} image pairs to {args.save_views}", file=sys.stderr)
    if out_path is not None:
        record = _run_record(args, model_id, chat, recipes, applied)
        record["results"] = [
            {
                "prompt": it.prompt,
                "image": str(it.image),
                "prompt_text": builder.prompt_text(it.prompt),
                "outputs": answers[it.id],
            }
            for it in items
        ]
        _write_json(out_path, record)
    return EXIT_OK


def _run_record(args, model_id: str, chat: bool, recipes, applied: dict) -> dict:
    """What decided the answers of one ``generate`` run, for its JSON: model, decoding, recipes as applied."""
    return {
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
    }


def _write_json(out, record: dict) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:  # checked up front; the folder changed during the run
        raise CLIError(
            f"--output_path {str(out)!r}: cannot write the results ({exc}); the answers are printed above. "
            "Fix: pass a path you can write to"
        ) from None
    print(f"wrote {out}", file=sys.stderr)


def _save_views(handle, batch, folder) -> int:
    """Write the last batch's AGLA views as ``<prompt>_<image>_original.png`` / ``_augmented.png``."""
    written = 0
    for by_method in handle.report().values():
        views = by_method.get("agla", {}).get("views", [])
        folder.mkdir(parents=True, exist_ok=True)
        for k, view in enumerate(views):
            stem = f"prompt{int(batch[view['row']].id) + 1}_image{k + 1}"
            _save_png(view["original"], folder / f"{stem}_original.png")
            _save_png(view["augmented"], folder / f"{stem}_augmented.png")
            written += 1
    return written


def cmd_generate(args) -> int:
    import torch

    import attnsteer

    from .. import demo

    recipes = load_labelled_recipes(args.recipe)
    check_prompts(args.prompt)
    if args.save_views:
        if not args.image:
            raise CLIError(
                "--save-views: AGLA's views need images. Fix: pass --image PATH with a vision-language --model"
            )
        check_writable(args.save_views, "--save-views", folder=True)
    if args.image:
        return cmd_generate_vlm(args, recipes)
    out = output_file(args.output_path, "attnsteer_generate.json") if args.output_path else None
    model_id, kwargs = models.resolve_model(args.model, args.model_args)
    seed_everything(args.seed)
    t_start = time.perf_counter()
    tokenizer, model = models.load_checked(model_id, kwargs, sys.stderr)
    notes, applied = check_recipes(model, recipes, model_id, images=False)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise CLIError(f"--chat: the tokenizer of --model {model_id!r} has no chat template. Fix: use --no-chat")
    chat = has_template if args.chat is None else args.chat
    print(
        f"model {model_id} ({models.describe_model(model)}); greedy, max_new_tokens {args.max_new_tokens}, "
        f"chat template {'on' if chat else 'off'}, backend {args.backend}",
        file=sys.stderr,
    )
    act = demo.act_params_of(recipes)

    def show(i: int, result) -> None:
        print(
            demo.format_result(
                i, len(args.prompt), result, tokenizer, chat=chat, act_params=act, show_sinks=args.show_sinks
            ),
            flush=True,
        )
        print()

    results = demo.run_prompts(
        model,
        tokenizer,
        args.prompt,
        recipes,
        backend=args.backend,
        max_new_tokens=args.max_new_tokens,
        chat=chat,
        batch_size=args.batch_size,
        on_result=show,
        notes=notes,
    )
    print(demo.format_summary(results))
    for note in notes:
        print("\n".join(wrap(f"note: {note}", "")), file=sys.stderr)
    if out is not None:
        import transformers

        record = _run_record(args, model_id, chat, recipes, applied)
        record["versions"] = {
            "attnsteer": attnsteer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        record.update(
            results=demo.results_to_json(results), notes=notes, total_s=round(time.perf_counter() - t_start, 3)
        )
        _write_json(out, record)
    return EXIT_OK
