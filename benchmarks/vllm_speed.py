"""vLLM (CPU) throughput unsteered vs steered, each engine in a fresh child process, one after the
other on the same machine: prefill + decode wall time of a batch of prompts and decode tokens/s.

python benchmarks/vllm_speed.py MODEL_DIR [--recipe R ...] [--prompts 8] [--prompt-len 128] [--max-tokens 32]
    [--repeats 5]
(run with the vLLM environment's python, e.g. .venv-vllm/bin/python; no recipe = unsteered only)
Writes one JSON line per engine (recipe and hash, commit, median seconds, decode tokens/s, machine)
to stdout. Decode time is the median full run minus the median prefill-only run (prefix caching off).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def child(args) -> None:
    from vllm import LLM, SamplingParams

    extra = {"attnsteer": {"recipe": args.recipe}} if args.recipe else None
    # prefix caching off: the timed runs repeat the same prompts, which it would serve from the cache
    whole = {"enable_chunked_prefill": False} if args.whole_prompts else {}
    llm = LLM(model=args.model, dtype=args.dtype, gpu_memory_utilization=0.1, enforce_eager=True,
              max_model_len=args.prompt_len + args.max_tokens + 8, **({"additional_config": extra} if extra else {}),
              enable_prefix_caching=False, **whole)  # fmt: skip
    tokenizer = llm.get_tokenizer()
    words = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()
    prompts = []
    for i in range(args.prompts):
        text = " ".join(words[(i + j) % len(words)] for j in range(args.prompt_len))
        prompts.append({"prompt_token_ids": tokenizer(text)["input_ids"][: args.prompt_len]})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    prefill_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefills, totals = [], []
    for _ in range(args.repeats):  # medians: the machine is shared and noisy
        start = time.perf_counter()
        llm.generate(prompts, prefill_only, use_tqdm=False)
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        totals.append(time.perf_counter() - start)
    prefill, total = statistics.median(prefills), statistics.median(totals)
    decode_tokens = args.prompts * (args.max_tokens - 1)
    recipe = None
    if args.recipe:
        from attnsteer import load_recipe

        recipe = load_recipe(args.recipe)
    print(json.dumps({
        "recipe": recipe.name if recipe else "none", "recipe_hash": recipe.hash if recipe else None,
        "commit": _commit(), "prompts": args.prompts, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "repeats": args.repeats, "prefill_s": round(prefill, 4), "generate_s": round(total, 4),
        "decode_tokens_per_s": round(decode_tokens / max(total - prefill, 1e-9), 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "dtype": args.dtype,
    }), flush=True)  # fmt: skip


def _commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.abspath(__file__)))  # fmt: skip
    return out.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--recipe", action="append", default=[], help="recipe to time (repeatable)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (medians are reported)")
    parser.add_argument("--whole-prompts", action="store_true", help="no chunked prefill / prefix caching (ACT)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.recipe = args.recipe[0] if args.recipe else None
        return child(args)
    for recipe in [None, *args.recipe]:
        cmd = [sys.executable, __file__, args.model, "--child", "--prompts", str(args.prompts), "--prompt-len",
               str(args.prompt_len), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
               "--repeats", str(args.repeats)]  # fmt: skip
        cmd += (["--recipe", recipe] if recipe else []) + (["--whole-prompts"] if args.whole_prompts else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            sys.exit(f"engine for recipe {recipe or 'none'} failed:\n{(out.stdout + out.stderr)[-3000:]}")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
