"""Child process of tests/test_vllm.py: greedy generation with vLLM (CPU), as JSON.

python tests/vllm_run.py --model DIR --out FILE [--recipe R] [--max-tokens N] [--focus JSON] [--tp N]
    [--whole-prompts]
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
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--whole-prompts", action="store_true", help="no chunked prefill, no prefix caching")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm_fixtures import PROMPTS

    extra = {"attnsteer": {"recipe": args.recipe}} if args.recipe else None
    llm = LLM(
        model=args.model,
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        tensor_parallel_size=args.tp,
        **({"additional_config": extra} if extra else {}),
        **({"enable_chunked_prefill": False, "enable_prefix_caching": False} if args.whole_prompts else {}),
    )
    focus = json.loads(args.focus) if args.focus else [None] * len(PROMPTS)

    def params(i):
        extra = {"extra_args": {"attnsteer": {"focus": focus[i]}}} if focus[i] is not None else {}
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
