"""``attnsteer eval pope``: POPE runs of a vision-language model, baseline vs recipes."""

from __future__ import annotations

import argparse

from . import _args, _eval

HELP = "POPE: yes/no object-hallucination questions on COCO images (vision-language models)"
EXAMPLE = (
    "attnsteer eval pope --model llava-hf/llava-1.5-7b-hf --pope_dir POPE/output/coco --coco_dir coco/val2014 "
    "--recipe none --recipe act-default --batch_size 8 --limit 100"
)
NEEDS = "LLaVA-1.5-7B from the Hub, the POPE question files and COCO val2014 images; a GPU"
DESCRIPTION = (
    "Answer the POPE yes/no questions with a vision-language model, unsteered (--recipe none) and with each recipe, "
    "and report per-split accuracy, precision, recall, F1, predicted yes-ratio and unknown count, plus the mean "
    "over splits (LLaVA-1.5 style) and the pooled score (lmms-eval / VLMEvalKit style). Data: the POPE question files "
    "(github.com/RUCAIBox/POPE, output/coco/coco_pope_<split>.json) and COCO val2014 images "
    "(http://images.cocodataset.org/zips/val2014.zip), or --hf for the lmms-lab/POPE dataset."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evals.pope import DEFAULT_POPE_TEMPLATE, PARSERS, POPE_HF_REPO, POPE_HF_REVISION, SOURCES, SPLITS

    _args.add_model_arguments(p, "vision-language model: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder")
    g = p.add_argument_group("data")
    g.add_argument(
        "--pope_dir",
        default=None,
        help="folder with the POPE question files (coco_pope_<split>.json; <source>_pope_seem_<split>.json; "
        "the POPE repo's output/ layout is searched too)",
    )
    g.add_argument(
        "--coco_dir",
        "--image_dir",
        dest="coco_dir",
        default=None,
        help="COCO val2014 image folder (GQA image folder for --source gqa)",
    )
    g.add_argument(
        "--hf",
        nargs="?",
        const=POPE_HF_REPO,
        default=None,
        metavar="REPO",
        help=f"load the Hugging Face dataset instead of files (default repo {POPE_HF_REPO}; images included)",
    )
    g.add_argument("--hf_revision", default=POPE_HF_REVISION, help="dataset revision (default: the pinned commit)")
    g.add_argument("--source", choices=SOURCES, default="coco", help="question source (default: coco)")
    g.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to run (default: all three)"
    )
    g = p.add_argument_group("prompt, decoding and parsing")
    g.add_argument(
        "--prompt_template",
        default=DEFAULT_POPE_TEMPLATE,
        help=f"user message; {{question}} is replaced (default: {DEFAULT_POPE_TEMPLATE!r})",
    )
    g.add_argument(
        "--parser",
        choices=sorted(PARSERS),
        default="pope",
        help="answer parser profile: pope (official rule, default), opera, strict",
    )
    _args.add_decoding_arguments(g, 16, "default: 16")
    _args.add_run_arguments(p, batch_default=1, limit_help="only the first N questions of each split (or a fraction)")


def run(args) -> int:
    from ..evals.tasks import PopeConfig, PopeTask

    if args.hf:
        _args.hub_offline_if_unreachable()  # a missing dataset fails at once instead of retrying for minutes
    config = PopeConfig(
        pope_dir=args.pope_dir,
        coco_dir=args.coco_dir,
        hf=args.hf,
        hf_revision=args.hf_revision,
        source=args.source,
        splits=args.splits,
        prompt_template=args.prompt_template,
        parser=args.parser,
        decoding=_eval.decoding(args),
    )
    return _eval.evaluate_vlm(args, PopeTask(config))
