"""vLLM (CPU) throughput unsteered vs steered, each engine in a fresh child process, one after the
other on the same machine: prefill + decode wall time of a batch of prompts and decode tokens/s.

python benchmarks/vllm_speed.py MODEL_DIR [--recipe R ...] [--prompts 8] [--prompt-len 128] [--max-tokens 32]
(run with the vLLM environment's python, e.g. .venv-vllm/bin/python; no recipe = unsteered only)
Writes one JSON line per engine (recipe, seconds, tokens/s, machine) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def child(args) -> None:
    from vllm import LLM, SamplingParams

    extra = {"attnsteer": {"recipe": args.recipe}} if args.recipe else None
    whole = {"enable_chunked_prefill": False, "enable_prefix_caching": False} if args.whole_prompts else {}
    llm = LLM(model=args.model, dtype=args.dtype, gpu_memory_utilization=0.1, enforce_eager=True,
              max_model_len=args.prompt_len + args.max_tokens + 8, **({"additional_config": extra} if extra else {}),
              **whole)  # fmt: skip
    tokenizer = llm.get_tokenizer()
    words = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()
    prompts = []
    for i in range(args.prompts):
        text = " ".join(words[(i + j) % len(words)] for j in range(args.prompt_len))
        prompts.append({"prompt_token_ids": tokenizer(text)["input_ids"][: args.prompt_len]})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    prefill_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, prefill_only, use_tqdm=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    decode_tokens = args.prompts * (args.max_tokens - 1)
    print(json.dumps({
        "recipe": args.recipe or "none", "prompts": args.prompts, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "prefill_s": round(prefill, 4), "generate_s": round(total, 4),
        "decode_tokens_per_s": round(decode_tokens / max(total - prefill, 1e-9), 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "dtype": args.dtype,
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--recipe", action="append", default=[], help="recipe to time (repeatable)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--whole-prompts", action="store_true", help="no chunked prefill / prefix caching (ACT)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.recipe = args.recipe[0] if args.recipe else None
        return child(args)
    for recipe in [None, *args.recipe]:
        cmd = [sys.executable, __file__, args.model, "--child", "--prompts", str(args.prompts), "--prompt-len",
               str(args.prompt_len), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]  # fmt: skip
        cmd += (["--recipe", recipe] if recipe else []) + (["--whole-prompts"] if args.whole_prompts else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            sys.exit(f"engine for recipe {recipe or 'none'} failed:\n{(out.stdout + out.stderr)[-3000:]}")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
