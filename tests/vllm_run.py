"""Child process of tests/test_vllm.py: greedy generation with vLLM (CPU), as JSON.

python tests/vllm_run.py --model DIR --out FILE [--recipe R] [--max-tokens N] [--focus JSON]
    [--recipes JSON] [--prefix-caching on|off] [--tp N] [--whole-prompts]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--focus", help="JSON list, per prompt: [[start, end], ...] focus spans or null")
    parser.add_argument("--recipes", help="JSON list, per prompt: a recipe of its own (path) or null")
    parser.add_argument("--prefix-caching", choices=("on", "off"), help="override vLLM's default")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--whole-prompts", action="store_true", help="no chunked prefill, no prefix caching")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm_fixtures import PROMPTS

    section = {"recipe": args.recipe} if args.recipe else {}
    if args.recipes:
        section["per_request_recipes"] = True
    extra = {"attnsteer": section} if section else None
    options = {"enable_chunked_prefill": False, "enable_prefix_caching": False} if args.whole_prompts else {}
    if args.prefix_caching:
        options["enable_prefix_caching"] = args.prefix_caching == "on"
    llm = LLM(
        model=args.model,
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        tensor_parallel_size=args.tp,
        **({"additional_config": extra} if extra else {}),
        **options,
    )
    focus = json.loads(args.focus) if args.focus else [None] * len(PROMPTS)
    recipes = json.loads(args.recipes) if args.recipes else [None] * len(PROMPTS)

    def params(i):
        mine = {k: v for k, v in (("focus", focus[i]), ("recipe", recipes[i])) if v is not None}
        extra = {"extra_args": {"attnsteer": mine}} if mine else {}
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True, **extra)

    def run(indices):
        outputs = llm.generate([PROMPTS[i] for i in indices], [params(i) for i in indices], use_tqdm=False)
        return [
            {
                "prompt_ids": list(o.prompt_token_ids),
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            }
            for o in outputs
        ]

    result = {"batch": run(range(len(PROMPTS))), "alone": [run([i])[0] for i in range(len(PROMPTS))]}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
