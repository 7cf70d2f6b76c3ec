#!/usr/bin/env bash
# Issue 4's GPU speed goals, on one H100/H200 (random weights, real 7B shapes, bf16).
#
#   bash benchmarks/gpu_speed.sh            # everything below (about 30-45 min on an H100)
#   STEP=llava-b1 bash benchmarks/gpu_speed.sh   # one step: tests | llava-b1 | llava-b8 | llama-4096
#
# Goals (issue 4): decode tokens/s >= 0.95x and prefill >= 0.85x the unsteered model, peak memory
# <= 1.1x, and >= 3x faster than the `reference` (eager) path at 4096 tokens. Each command writes
# CSV / JSON / Markdown / PNG under $OUT (one stem per setting; the Markdown lists every goal as
# met / NOT met with the measured number).
#
# Backends per recipe: triton (the Triton kernels, forced), chunked (the plain PyTorch chunked
# backend, forced) and reference. `auto` (the default of attnsteer.apply) runs each call on the
# triton backend on CUDA when it can and on chunked otherwise (attnsteer/attention/router.py; each
# run's paths and fallbacks are in the results); add `auto` to BACKENDS to time it under that
# name. (Earlier releases called these fused-triton and fused-pytorch; both names are accepted.)
# Recipes: recipes/timing/act-timing.yaml (act-mtbench's setting -- prompt and decode rows, so
# the split-K decode kernel runs -- with a sink threshold that finds sinks on random weights; the
# paper thresholds find none there), softplus-reweight (every layer, prefill + decode); with image
# placeholders also var-timing.yaml (VAR with a sink threshold that fires on random weights) and
# vhr-timing.yaml (VHR: the model's own attention + head scaling, and the text-only stream at
# prefill). The harness marks the placeholders with handle.focus and reports the rows each recipe
# steered (a recipe that steers nothing is flagged in the Markdown).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
OUT=${OUT:-evals/speed/$GPU}
BACKENDS=${BACKENDS:-triton,chunked,reference}
RECIPES=(--recipe recipes/timing/act-timing.yaml --recipe softplus-reweight)
VLM_RECIPES=("${RECIPES[@]}" --recipe recipes/timing/var-timing.yaml --recipe recipes/timing/vhr-timing.yaml)
REPEATS=${REPEATS:-3}
STEP=${STEP:-all}
mkdir -p "$OUT"

run() { echo "+ $*" >&2; "$@"; }

if [[ $STEP == all || $STEP == tests ]]; then
  # 0. the kernels against the float32 reference on real sizes (bf16/fp16, flash-attention's rule),
  #    compiled (no interpreter; with CUDA the small odd-shape tests run compiled too), and the speed
  #    harness's own tests
  run env -u TRITON_INTERPRET ATTNSTEER_TRITON_STRICT=1 $PY -m pytest -q -rs tests/test_kernels.py tests/test_speed.py \
    2>&1 | tee "$OUT/pytest_kernels.log" || echo "kernel tests FAILED: see $OUT/pytest_kernels.log" >&2
fi

if [[ $STEP == all || $STEP == llava-b1 ]]; then
  # 1. LLaVA-1.5-7B's language model: 576 image-placeholder + 64 text tokens, 128 new tokens, batch 1
  run $PY -m attnsteer.cli eval speed --model llava-1.5-7b --random-weights "${VLM_RECIPES[@]}" \
    --batch_size 1 --prompt-len 640 --image-tokens 576 --new-tokens 128 --dtype bfloat16 \
    --backends "$BACKENDS" --repeats "$REPEATS" --output_path "$OUT"
fi

if [[ $STEP == all || $STEP == llava-b8 ]]; then
  # 2. the same at batch 8
  run $PY -m attnsteer.cli eval speed --model llava-1.5-7b --random-weights "${VLM_RECIPES[@]}" \
    --batch_size 8 --prompt-len 640 --image-tokens 576 --new-tokens 128 --dtype bfloat16 \
    --backends "$BACKENDS" --repeats "$REPEATS" --output_path "$OUT"
fi

if [[ $STEP == all || $STEP == llama-4096 ]]; then
  # 3. Llama-2-7B at 4096-token prompts (the >= 3x-vs-reference goal); 4096 + 128 positions need a
  #    larger max_position_embeddings (random weights: RoPE beyond 4096 costs nothing extra)
  run $PY -m attnsteer.cli eval speed --model llama-2-7b --random-weights "${RECIPES[@]}" \
    --batch_size 1 --prompt-len 4096 --new-tokens 128 --dtype bfloat16 \
    --override max_position_embeddings=4352 \
    --backends "$BACKENDS" --repeats "$REPEATS" --output_path "$OUT"
fi

echo "results in $OUT" >&2
