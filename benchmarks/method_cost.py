"""One method's CPU cost against the unsteered model: prefill and per-token decode on SmolLM2.

SmolLM2-135M-Instruct (embedded, real weights), one prompt of --prompt-len random token ids with a
focus span of --focus tokens (standing for an image's placeholders, marked with ``handle.focus``),
greedy decode of --new-tokens tokens with the KV cache. Each case is a method name and its recipe
(a JSON dict, a built-in name or a YAML path). Every steered run is paired with an unsteered run
in the same process, the order flipping every repeat; times are medians over --repeats pairs,
ratios the medians of the per-pair ratios (steered / unsteered: > 1 is slower). ``--clock cpu``
(default) times the process's CPU time, which other processes on a shared machine disturb far
less than wall time (use --threads 1 there: idle OpenMP threads spin); ``--clock wall`` the
elapsed time.

    python benchmarks/method_cost.py --case spin '{"interventions": [{"method": "spin", "params": {"rho": 0.8}}]}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import attnsteer
from attnsteer import compat
from attnsteer.models import load_smollm2

SPIN_POPE = {"interventions": [{"method": "spin", "layers": "all", "params": {"rho": 0.8, "eps": 0.1}}]}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def run_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of one prompt: prefill, then greedy steps."""
    with torch.inference_mode():
        start = clock()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = clock() - start
        cache = compat.output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        start = clock()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **compat.with_cache(model, cache))
            cache = compat.output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
        decode = (clock() - start) / new_tokens
    return prefill, decode


def steered_once(model, recipe, ids, focus, new_tokens) -> tuple[float, float]:
    with attnsteer.apply(model, recipe) as handle, handle.focus(focus):
        times = run_once(model, ids, new_tokens)
        if not any(s["fired"] for s in handle.stats()):
            raise SystemExit(f"recipe {recipe.name!r} changed nothing on this prompt: its cost would mean nothing")
    return times


def measure(model, recipe, ids, focus, new_tokens: int, repeats: int) -> dict:
    """Medians over ``repeats`` ABBA pairs of (steered, unsteered) runs, after one warm-up of each."""
    run_once(model, ids, new_tokens)
    steered_once(model, recipe, ids, focus, new_tokens)
    pairs = []
    for i in range(repeats):
        if i % 2:
            base = run_once(model, ids, new_tokens)
            steered = steered_once(model, recipe, ids, focus, new_tokens)
        else:
            steered = steered_once(model, recipe, ids, focus, new_tokens)
            base = run_once(model, ids, new_tokens)
        pairs.append((steered, base))
    med = statistics.median
    return {
        "prefill_ms": 1e3 * med(s[0] for s, _ in pairs),
        "prefill_ratio": med(s[0] / b[0] for s, b in pairs),
        "decode_ms": 1e3 * med(s[1] for s, _ in pairs),
        "decode_ratio": med(s[1] / b[1] for s, b in pairs),
        "base_prefill_ms": 1e3 * med(b[0] for _, b in pairs),
        "base_decode_ms": 1e3 * med(b[1] for _, b in pairs),
    }


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'method':<12} {'prefill_ms':>11} {'prefill_ratio':>14} {'decode_ms':>10} {'decode_ratio':>13}"]
    for name, r in rows.items():
        lines.append(
            f"{name:<12} {r['prefill_ms']:>11.1f} {r['prefill_ratio']:>14.3f} {r['decode_ms']:>10.2f} "
            f"{r['decode_ratio']:>13.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs=2, action="append", metavar=("METHOD", "RECIPE"), help="a label and its recipe")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--focus", type=int, default=576, help="focus-span tokens (from position 16)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time (default) or wall time")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    cases = args.case or [("spin", json.dumps(SPIN_POPE))]
    _, model = load_smollm2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g)
    focus = torch.zeros_like(ids, dtype=torch.bool)
    focus[:, 16 : 16 + args.focus] = True
    rows = {}
    for name, source in cases:
        recipe = attnsteer.load_recipe(json.loads(source) if source.lstrip().startswith("{") else source)
        rows[name] = measure(model, recipe, ids, focus, args.new_tokens, args.repeats)
    base = {k: statistics.median(r[f"base_{k}"] for r in rows.values()) for k in ("prefill_ms", "decode_ms")}
    print(f"SmolLM2-135M, CPU ({args.clock} time), {args.threads} threads, prompt {args.prompt_len} tokens (focus {args.focus}), "
          f"{args.new_tokens} decode steps, medians of {args.repeats} ABBA pairs; ratio = steered / unsteered")  # fmt: skip
    print(table({"unsteered": {**base, "prefill_ratio": 1.0, "decode_ratio": 1.0}, **rows}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "unsteered": base, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
