#!/usr/bin/env python
"""Re-score OPERA's twelve released CHAIR caption logs and compare with the published numbers.

The logs (4 models x greedy / beam5 / OPERA, 500 captions each, max_new_tokens 512) and the
numbers of the OPERA paper's CHAIR table are described in the data folder's MANIFEST.md. Ground
truth is the pre-built gt_coco2014.json (COCO 2014 instances + reference-caption objects).

Usage (from the repository root):

    python evals/rescore_published_chair.py \
        --data DATA --gt DATA/gt_coco2014.json \
        --lemmatizers rules rules_pattern wordnet_noun wordnet --output table.md

A lemmatiser whose dependencies are missing (``wordnet`` needs NLTK plus its punkt_tab, tagger and
wordnet data) is reported as unavailable instead of failing the run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attnsteer.evals._text import file_sha256  # noqa: E402
from attnsteer.evals.chair import (  # noqa: E402
    CHAIRScorer,
    LemmatizerUnavailable,
    load_caption_log,
    load_gt_json,
)

MODELS = ("instructblip", "minigpt4", "llava-1.5", "shikra")
DECODINGS = ("greedy", "beam5", "ours")
DECODING_NAMES = {"greedy": "greedy", "beam5": "beam search (5)", "ours": "OPERA"}

#: OPERA paper (CVPR 2024, arXiv 2311.17911), CHAIR table, max new tokens 512: (C_S, C_I).
PUBLISHED = {
    ("instructblip", "greedy"): (58.8, 23.7),
    ("instructblip", "beam5"): (55.6, 15.8),
    ("instructblip", "ours"): (46.4, 14.2),
    ("minigpt4", "greedy"): (31.8, 9.9),
    ("minigpt4", "beam5"): (30.6, 9.5),
    ("minigpt4", "ours"): (26.2, 9.5),
    ("llava-1.5", "greedy"): (45.0, 14.7),
    ("llava-1.5", "beam5"): (48.8, 13.9),
    ("llava-1.5", "ours"): (44.6, 12.8),
    ("shikra", "greedy"): (55.8, 15.4),
    ("shikra", "beam5"): (50.4, 13.3),
    ("shikra", "ours"): (36.2, 12.1),
}
TOLERANCE = 1.0


def main(argv=None) -> int:
    default_data = REPO.parent / "shared" / "data" / "chair"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=default_data,
        help="folder with opera_chair_eval_results/, gt_coco2014.json and synonyms.txt",
    )
    ap.add_argument("--gt", type=Path, default=None, help="ground-truth JSON (default: <data>/gt_coco2014.json)")
    ap.add_argument("--synonyms", type=Path, default=None, help="CHAIR synonym list (default: <data>/synonyms.txt)")
    ap.add_argument(
        "--lemmatizers",
        nargs="+",
        default=["rules", "rules_pattern", "wordnet_noun", "wordnet"],
        help="lemmatisers to compare (default: rules rules_pattern wordnet_noun wordnet)",
    )
    ap.add_argument("--output", type=Path, default=None, help="also write the Markdown to this file")
    args = ap.parse_args(argv)

    gt_path = args.gt or args.data / "gt_coco2014.json"
    syn_path = args.synonyms or args.data / "synonyms.txt"
    gt = load_gt_json(gt_path)
    logs = {}
    for m in MODELS:
        for d in DECODINGS:
            logs[m, d] = load_caption_log(args.data / "opera_chair_eval_results" / m / f"{d}.jsonl")

    scorers, unavailable = {}, {}
    for name in args.lemmatizers:
        try:
            scorers[name] = CHAIRScorer(syn_path, lemmatizer=name)
        except LemmatizerUnavailable as e:
            unavailable[name] = str(e)

    results = {name: {key: sc.score(recs, gt).metrics for key, recs in logs.items()} for name, sc in scorers.items()}

    try:
        import nltk

        nltk_version = nltk.__version__
    except ImportError:
        nltk_version = "not installed"
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [str(Path(sys.argv[0]))] + list(argv if argv is not None else sys.argv[1:])
    )
    out = []
    out.append(f"Generated {_dt.date.today().isoformat()} by `{cmd}`  ")
    out.append(
        f"Python {platform.python_version()}, nltk {nltk_version}; ground truth `{gt_path.name}` "
        f"(sha256 `{file_sha256(gt_path)[:16]}…`), synonyms `{syn_path.name}` (sha256 `{file_sha256(syn_path)[:16]}…`)."
    )
    out.append("")
    out.append(f"CHAIR_s / CHAIR_i in percent; Δ = ours − published; ✓ = both within {TOLERANCE} point.")
    out.append("")
    header = "| model | decoding | published C_S / C_I |"
    sep = "|---|---|---|"
    for name in results:
        header += f" `{name}` C_S / C_I | Δ | |"
        sep += "---|---|---|"
    out.append(header)
    out.append(sep)
    within = {name: 0 for name in results}
    for (m, d), (ps, pi) in PUBLISHED.items():
        row = f"| {m} | {DECODING_NAMES[d]} | {ps:.1f} / {pi:.1f} |"
        for name, res in results.items():
            cs, ci = 100 * res[m, d]["CHAIRs"], 100 * res[m, d]["CHAIRi"]
            ok = abs(cs - ps) <= TOLERANCE and abs(ci - pi) <= TOLERANCE
            within[name] += ok
            ds, di = round(cs - ps, 1) + 0.0, round(ci - pi, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
            row += f" {cs:.1f} / {ci:.1f} | {ds:+.1f} / {di:+.1f} | {'✓' if ok else '✗'} |"
        out.append(row)
    out.append("")
    for name, n in within.items():
        out.append(f"- `{name}`: {n} of {len(PUBLISHED)} logs within {TOLERANCE} point on both CHAIR_s and CHAIR_i.")
    for name, msg in unavailable.items():
        out.append(f"- `{name}`: not run here: {msg}")
    if results:
        first = next(iter(results))
        out.append("")
        out.append(
            f"Other metrics with `{first}` (not published for these logs): Recall and Len as OPERA's "
            "`chair.py` prints them (Len = mean tokens after tokenisation and two-word merging), mean "
            "white-space words, share of captions with an exactly repeated sentence."
        )
        out.append("")
        out.append(
            "| model | decoding | Recall | Len | mean words | repetition rate | mentions | hallucinated mentions |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for m, d in PUBLISHED:
            r = results[first][m, d]
            out.append(
                f"| {m} | {DECODING_NAMES[d]} | {100 * r['Recall']:.1f} | {r['Len']:.1f} | {r['mean_words']:.1f} | "
                f"{100 * r['repetition_rate']:.1f}% | {r['n_mentions']} | {r['n_hallucinated_mentions']} |"
            )
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
