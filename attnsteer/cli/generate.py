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
from ._common import EXIT_OK, CLIError, output_file, positive_int, seed_everything, subparser


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
    p.add_argument(
        "--model", default=None, help="hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--model_args",
        default=None,
        help="key=value,... e.g. dtype=bfloat16,device=cpu; keys: " + ", ".join(models.MODEL_ARG_KEYS),
    )
    p.add_argument(
        "--recipe",
        action="extend",
        nargs="+",
        required=True,
        metavar="R",
        help="built-in name, YAML path or hub repo; repeat for several",
    )
    p.add_argument(
        "--prompt", action="extend", nargs="+", required=True, metavar="TEXT", help="prompt text; repeat for several"
    )
    p.add_argument("--max_new_tokens", type=positive_int, default=64, help="default: 64")
    p.add_argument(
        "--backend",
        choices=("auto", "fused", "reference"),
        default="auto",
        help="auto = fused (O(N) memory); reference = float32 eager oracle",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the tokenizer's chat template (default: on if it has one)",
    )
    p.add_argument("--batch_size", type=positive_int, default=1, help="prompts per generate call (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="torch/random seed (decoding is greedy; default: 0)")
    p.add_argument(
        "--output_path",
        default=None,
        help="write a JSON of answers and timings (a .json file, or a folder for attnsteer_generate.json)",
    )
    p.add_argument("--show_sinks", action="store_true", help="also print the hidden sinks ACT recipes find")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    import attnsteer

    from .. import demo

    recipes = load_labelled_recipes(args.recipe)
    model_id, kwargs = models.resolve_model(args.model, args.model_args)
    seed_everything(args.seed)
    t_start = time.perf_counter()
    tokenizer, model = models.load_checked(model_id, kwargs, sys.stderr)
    notes, applied = check_recipes(model, recipes, model_id)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise CLIError(f"--chat: the tokenizer of --model {model_id!r} has no chat template. Fix: use --no-chat")
    chat = has_template if args.chat is None else args.chat
    print(
        f"model {model_id} ({models.describe_model(model)}); greedy, max_new_tokens {args.max_new_tokens}, "
        f"chat template {'on' if chat else 'off'}, backend {'fused' if args.backend == 'auto' else args.backend}",
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
            "versions": {
                "attnsteer": attnsteer.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "results": demo.results_to_json(results),
            "notes": notes,
            "total_s": round(time.perf_counter() - t_start, 3),
        }
        out = output_file(args.output_path, "attnsteer_generate.json")
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK
