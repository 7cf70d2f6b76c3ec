"""``attnsteer eval mmlu``: MMLU (or any lm-eval task) on the steered model through lm-eval."""

from __future__ import annotations

import argparse
import sys

from . import _args, _eval

NEEDS = None  # attnsteer_mc_demo runs offline on a CPU
HELP = "MMLU or any lm-eval task (lm-evaluation-harness) on the steered model"
EXAMPLE = (
    "attnsteer eval mmlu --model smollm2 --tasks attnsteer_mc_demo --recipe none --recipe act-default "
    "--recipe softplus-gentle"
)
DESCRIPTION = (
    "Run lm-evaluation-harness tasks (default: mmlu, 5-shot) on the unsteered model (--recipe none) and with each "
    "recipe, one loaded model, and report accuracy and standard error per task and group. attnsteer ships an offline "
    "96-question set: --tasks attnsteer_mc_demo (cloze scoring, 0-shot; a few minutes on a CPU with --model smollm2) "
    "and attnsteer_mc_demo_mmlu (MMLU letter format). The mmlu task itself needs the cais/mmlu dataset (network or "
    "a Hugging Face cache)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evals.tasks.mmlu import MMLU_FEWSHOT

    _args.add_model_arguments(
        p, "causal LM: hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)"
    )
    g = p.add_argument_group("lm-eval")
    g.add_argument(
        "--tasks",
        action="extend",
        nargs="+",
        default=None,
        metavar="TASK",
        help="lm-eval task or group names, comma-separated or repeated (default: mmlu). Shipped offline: "
        "attnsteer_mc_demo, attnsteer_mc_demo_mmlu",
    )
    g.add_argument(
        "--num_fewshot",
        type=int,
        default=None,
        help=f"few-shot examples (default: {MMLU_FEWSHOT} for mmlu* tasks, else the task's default, 0 for "
        "attnsteer_mc_demo)",
    )
    g.add_argument(
        "--include_path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of lm-eval task YAMLs (repeatable)",
    )
    g.add_argument(
        "--apply_chat_template",
        action="store_true",
        help="format prompts with the tokenizer's chat template (lm-eval flag; off for MMLU numbers)",
    )
    g.add_argument(
        "--bootstrap_iters",
        type=int,
        default=100000,
        help="lm-eval bootstrap iterations for non-mean metrics (acc uses the closed form; 0 = no stderr)",
    )
    g.add_argument(
        "--no_cache",
        action="store_true",
        help="do not keep lm-eval's per-request cache (then an interrupted recipe restarts from scratch)",
    )
    _args.add_run_arguments(
        p,
        batch_default=8,
        limit_help="lm-eval --limit: the first N documents of each task (or a fraction); for quick checks only",
        samples_help="also write every document's log-likelihoods and score to samples.jsonl (lm-eval log_samples)",
    )


def run(args) -> int:
    from ..evals import run as run_eval
    from ..evals.dist import Dist, default_device
    from ..evals.specs import parse_recipes
    from ..evals.tasks import MMLUConfig, MMLUTask
    from ..evals.tasks.mmlu import DEFAULT_TASKS
    from ..models import load_checked, resolve_model

    _eval.check_output_path(args)
    specs = parse_recipes(args.recipe)
    model_id, kwargs = resolve_model(
        args.model, args.model_args
    )  # before the offline switch: a hub miss is told as it is
    _args.hub_offline_if_unreachable()
    config = MMLUConfig(
        tasks=args.tasks or DEFAULT_TASKS,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        apply_chat_template=args.apply_chat_template,
        bootstrap_iters=args.bootstrap_iters,
        use_cache=not args.no_cache,
        log_samples=args.log_samples,
    )
    task = MMLUTask(config)
    task.prepared(args.limit)
    device = kwargs.get("device") or default_device(Dist())
    tokenizer, model = load_checked(model_id, {**kwargs, "device": device} if device else kwargs, sys.stderr)
    return _eval.report(run_eval(model, tokenizer, task, specs, _eval.run_config(args, model_id, kwargs)))
