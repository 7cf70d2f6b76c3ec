"""SEKA on SmolLM2-135M-Instruct: does steering toward a marked context change what the model
answers when the context contradicts what it knows (a knowledge conflict)?

Builds SEKA's projections from a small synthetic question-answering set (fictional facts, below),
then answers a few hand-made conflict prompts ("Context: The capital of France is Lyon. Question:
What is the capital of France?") greedily, without steering and with SEKA focused on the context
sentence (``handle.focus``), for a few gains. Prints the build time and a table. Offline, CPU:

    .venv/bin/python benchmarks/seka_conflict.py [--gains 0.8,2,4] [--max-new-tokens 12]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

import attnsteer
from attnsteer.calibrate.seka import QAExample, build_projections, seka_recipe
from attnsteer.methods.seka import Projections
from attnsteer.models import load_smollm2

# (context, question, answer): fictional facts, so the answer can only come from the context
SYNTHETIC = [
    ("The lighthouse on Marrow Point is painted in green and white stripes.", "What colours is the Marrow Point lighthouse painted in?", "green and white stripes"),
    ("Professor Ilse Varga keeps her notes in a locked oak cabinet.", "Where does Professor Varga keep her notes?", "a locked oak cabinet"),
    ("The village of Hollin Creek holds its harvest fair every October.", "When is the Hollin Creek harvest fair held?", "every October"),
    ("The river barge Calloway carries timber from the northern forests.", "What does the barge Calloway carry?", "timber from the northern forests"),
    ("In the game of Tessel, each player starts with seven copper tokens.", "How many tokens does each Tessel player start with?", "seven copper tokens"),
    ("The Orvane telescope was built on a plateau above the salt flats.", "Where was the Orvane telescope built?", "a plateau above the salt flats"),
    ("Chef Amara Osei seasons her soup with smoked paprika and lime.", "What does Chef Osei season her soup with?", "smoked paprika and lime"),
    ("The clock tower in Dunmere chimes thirteen times at midnight.", "How many times does the Dunmere clock tower chime at midnight?", "thirteen times"),
]  # fmt: skip

# (context, question, the context's answer, the answer the model knows)
CONFLICTS = [
    ("The capital of France is Lyon.", "What is the capital of France?", "Lyon", "Paris"),
    ("The Eiffel Tower is located in Rome.", "In which city is the Eiffel Tower located?", "Rome", "Paris"),
    ("Romeo and Juliet was written by Charles Dickens.", "Who wrote Romeo and Juliet?", "Dickens", "Shakespeare"),
    (
        "The largest planet in the solar system is Mars.",
        "What is the largest planet in the solar system?",
        "Mars",
        "Jupiter",
    ),
    ("Water freezes at 40 degrees Celsius.", "At what temperature does water freeze, in degrees Celsius?", "40", "0"),
]


def encode(tokenizer, context: str, question: str):
    """Chat-formatted prompt (1, L) and the focus mask over the context sentence's tokens."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Context: {context}\nQuestion: {question} Answer briefly."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tokenizer(text, return_tensors="pt", return_offsets_mapping=True, add_special_tokens=False)
    start = text.index(context)
    end = start + len(context)
    offsets = enc.pop("offset_mapping")[0]
    focus = (offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
    return enc, focus.view(1, -1)


def random_like(projections: Projections, seed: int = 0) -> Projections:
    """Random orthogonal projections with the ranks of ``projections`` (per layer and kv head)."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer, stack in projections.pos.items():
        ranks = projections.meta["ranks"][str(layer)]
        d = stack.shape[-1]
        bases = [torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] for _ in ranks]
        pos[layer] = torch.stack([b[:, :k] @ b[:, :k].T for b, (k, _) in zip(bases, ranks)]).float()
        neg[layer] = torch.stack([b[:, d - r :] @ b[:, d - r :].T for b, (_, r) in zip(bases, ranks)]).float()
    return Projections(pos, neg, dict(projections.meta))


def answer(model, tokenizer, enc, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gains", default="0.8,2,4", help="g_pos values to try (g_neg = g_pos / 4)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--layers", default="-10:")
    parser.add_argument("--chat", action="store_true", help="build the projections from chat-formatted prompts")
    parser.add_argument(
        "--control-gain",
        type=float,
        default=2.0,
        help="also run random projections of the same ranks at this g_pos (a control: is it the learned subspace?); "
        "0 to skip",
    )
    args = parser.parse_args()
    tokenizer, model = load_smollm2()
    examples = [QAExample(c, q, a) for c, q, a in SYNTHETIC]
    start = time.perf_counter()
    projections = build_projections(model, tokenizer, examples, layers=args.layers, chat=args.chat)
    build_s = time.perf_counter() - start
    print(
        f"projections: {len(examples)} examples, {projections.meta['build']['tokens']} answer tokens, layers "
        f"{args.layers}, built in {build_s:.1f} s on {torch.get_num_threads()} CPU threads"
    )
    gains = [float(g) for g in args.gains.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        file = projections.save(Path(tmp) / "seka.safetensors")
        recipes = {f"SEKA g+={g:g}": seka_recipe(projections, file, g_pos=g, g_neg=g / 4) for g in gains}
        if args.control_gain:
            g = args.control_gain
            control = random_like(projections).save(Path(tmp) / "random.safetensors")
            recipes[f"random P g+={g:g}"] = seka_recipe(projections, control, g_pos=g, g_neg=g / 4)
        for context, question, new, old in CONFLICTS:
            enc, focus = encode(tokenizer, context, question)
            row = {
                "question": question,
                "context says": new,
                "known": old,
                "unsteered": answer(model, tokenizer, enc, args.max_new_tokens),
            }
            for label, recipe in recipes.items():
                with attnsteer.apply(model, recipe) as handle, handle.focus(focus):
                    row[label] = answer(model, tokenizer, enc, args.max_new_tokens)
            rows.append(row)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")
    print("\nfollows the context (names the context's answer and not the known one):")
    for c in columns[3:]:
        hits = sum(names(row[c], row["context says"]) and not names(row[c], row["known"]) for row in rows)
        print(f"  {c}: {hits}/{len(rows)}")


def names(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


if __name__ == "__main__":
    main()
