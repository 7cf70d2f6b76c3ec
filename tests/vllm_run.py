"""Child process of tests/test_vllm.py: greedy generation with vLLM (CPU), as JSON.

python tests/vllm_run.py --model DIR --out FILE [--recipe R] [--max-tokens N] [--focus JSON]
    [--recipes JSON] [--prefix-caching on|off] [--tp N] [--whole-prompts] [--images] [--compiled]
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
    parser.add_argument("--images", action="store_true", help="IMAGE_PROMPTS with their images (a VLM)")
    parser.add_argument("--compiled", action="store_true", help="without enforce_eager")
    parser.add_argument("--kv-blocks", type=int, help="a KV cache of this many 32-token blocks (forces preemption)")
    parser.add_argument("--bad-extra", action="append", default=[],
                        help='JSON extra_args["attnsteer"] of a request sent first (repeatable); its error is kept')  # fmt: skip
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm_fixtures import IMAGE_PROMPTS, PROMPTS, make_image

    section = {"recipe": args.recipe} if args.recipe else {}
    if args.recipes:
        section["per_request_recipes"] = True
    extra = {"attnsteer": section} if section else None
    options = {"enable_chunked_prefill": False, "enable_prefix_caching": False} if args.whole_prompts else {}
    if args.prefix_caching:
        options["enable_prefix_caching"] = args.prefix_caching == "on"
    if args.kv_blocks:  # too small for every request at once: vLLM preempts one and recomputes it later
        options.update(block_size=32, num_gpu_blocks_override=args.kv_blocks, disable_log_stats=False)
    llm = LLM(
        model=args.model,
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=not args.compiled,
        max_model_len=64 if args.kv_blocks else 256,
        max_num_seqs=8,
        tensor_parallel_size=args.tp,
        **({"additional_config": extra} if extra else {}),
        **({"limit_mm_per_prompt": {"image": 1}} if args.images else {}),
        **options,
    )
    if args.images:
        prompts = [
            {"prompt": text, "multi_modal_data": {"image": make_image(seed)}} if seed is not None else text
            for text, seed in IMAGE_PROMPTS
        ]
    else:
        prompts = PROMPTS
    focus = json.loads(args.focus) if args.focus else [None] * len(PROMPTS)
    recipes = json.loads(args.recipes) if args.recipes else [None] * len(PROMPTS)

    def params(i):
        mine = {k: v for k, v in (("focus", focus[i]), ("recipe", recipes[i])) if v is not None}
        extra = {"extra_args": {"attnsteer": mine}} if mine else {}
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True, **extra)

    def run(indices):
        outputs = llm.generate([prompts[i] for i in indices], [params(i) for i in indices], use_tqdm=False)
        return [
            {
                "prompt_ids": list(o.prompt_token_ids),
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            }
            for o in outputs
        ]

    from attnsteer.vllm import recipe_info

    errors = []
    for bad in args.bad_extra:  # refused at admission; the engine keeps serving
        try:
            llm.generate(prompts[0], SamplingParams(max_tokens=2, extra_args={"attnsteer": json.loads(bad)}))
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - the test reads its type and message
            errors.append(f"{type(error).__name__}: {error}")
    result = {"batch": run(range(len(prompts))), "alone": [run([i])[0] for i in range(len(prompts))]}
    result["bad_request_errors"] = errors
    if args.kv_blocks:
        result["preemptions"] = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    result["recipe_info"] = recipe_info(llm)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
