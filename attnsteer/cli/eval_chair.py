"""``attnsteer eval chair``: CHAIR runs of a vision-language model, or rescoring of caption files."""

from __future__ import annotations

import argparse
import sys

from . import _args, _eval

HELP = "CHAIR: hallucinated objects in detailed image captions (or rescore caption files)"
EXAMPLE = (
    "attnsteer eval chair --model llava-hf/llava-1.5-7b-hf --coco_dir coco/val2014 --gt gt_coco2014.json "
    "--synonyms synonyms.txt --recipe none --recipe act-default --batch_size 8"
)
NEEDS = "LLaVA-1.5-7B from the Hub, COCO val2014 images, gt_coco2014.json and synonyms.txt; a GPU"
DESCRIPTION = (
    "Caption 500 COCO val2014 images (drawn with a stated seed, or --image_list) with a vision-language model, "
    "unsteered (--recipe none) and with each recipe, and report CHAIR_s, CHAIR_i, Recall, Len and the repetition "
    "rate. --captions FILE... rescores existing caption logs instead (no model). Needs the CHAIR synonym list "
    '(--synonyms) and ground truth: --gt FILE (JSON {"objects": {id: [names]}}) or --coco_annotations DIR '
    "(instances/captions_{train,val}2014.json)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evals.chair import LEMMATIZERS
    from ..evals.tasks.chair import DEFAULT_PROMPT, OPERA_SHORT_TOKENS

    _args.add_model_arguments(p, "vision-language model: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder")
    g = p.add_argument_group("images")
    g.add_argument("--coco_dir", "--image_dir", dest="coco_dir", default=None, help="COCO val2014 image folder")
    g.add_argument(
        "--image_list",
        default=None,
        help="the image ids to caption: a text file (one id or file name per line), a JSON list, or JSON "
        "Lines with image_id/image (e.g. an OPERA caption log or less-is-more's chair-500.jsonl)",
    )
    g.add_argument("--num_images", type=_args.positive_int, default=500, help="images drawn (default: 500)")
    g.add_argument(
        "--image_seed",
        type=int,
        default=0,
        help="seed of the draw: random.Random(seed).sample(sorted ids, num_images) (default: 0)",
    )
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--captions",
        nargs="+",
        default=None,
        metavar="FILE",
        help="rescore these caption files (JSON Lines/array with image_id + caption/text) and exit; no model",
    )
    g.add_argument("--image_id_key", default=None, help="with --captions: the id key (default: auto)")
    g.add_argument("--caption_key", default=None, help="with --captions: the caption key (default: auto)")
    g.add_argument("--gt", default=None, help='ground-truth JSON {"objects": {"<image id>": [names]}}')
    g.add_argument(
        "--coco_annotations",
        default=None,
        help="folder with instances_{train,val}2014.json and captions_{train,val}2014.json",
    )
    g.add_argument("--synonyms", default=None, help="the CHAIR synonym list (synonyms.txt of LisaAnne/Hallucination)")
    g.add_argument(
        "--lemmatizer",
        choices=["auto"] + sorted(LEMMATIZERS),
        default="auto",
        help="auto (default) = wordnet when NLTK and its data are installed, else rules (offline)",
    )
    g.add_argument(
        "--drop_incomplete",
        choices=("auto", "yes", "no"),
        default="auto",
        help=f"drop the last incomplete sentence before scoring; auto = yes when max_new_tokens <= "
        f"{OPERA_SHORT_TOKENS} (OPERA's short setting)",
    )
    g = p.add_argument_group("prompt and decoding")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"user message (default: {DEFAULT_PROMPT!r})")
    _args.add_decoding_arguments(g, 512, "default: 512 (64: the short setting)")
    _args.add_run_arguments(p, batch_default=1, limit_help="only the first N images of the list (or a fraction)")


def config_of(args):
    from ..evals.tasks import ChairConfig

    return ChairConfig(
        coco_dir=args.coco_dir,
        image_list=args.image_list,
        num_images=args.num_images,
        image_seed=args.image_seed,
        gt=args.gt,
        coco_annotations=args.coco_annotations,
        synonyms=args.synonyms,
        lemmatizer=args.lemmatizer,
        drop_incomplete=args.drop_incomplete,
        prompt=args.prompt,
        decoding=_eval.decoding(args),
    )


def run(args) -> int:
    from ..evals.tasks import ChairTask

    if args.captions:
        return rescore(args)
    return _eval.evaluate_vlm(args, ChairTask(config_of(args)))


def rescore(args) -> int:
    from ..errors import EvalError
    from ..evals.compare import run_markdown
    from ..evals.tasks.chair import rescore as rescore_files

    if args.model:
        raise EvalError(
            "--captions rescores existing caption files and loads no model. Fix: drop --model (or drop "
            "--captions to generate captions)"
        )
    record = rescore_files(
        args.captions, config_of(args), args.output_path, image_id_key=args.image_id_key, caption_key=args.caption_key
    )
    for note in record.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(run_markdown(record, baseline=None))
    if args.output_path:
        print(f"wrote {args.output_path}/results.json", file=sys.stderr)
    return 0
