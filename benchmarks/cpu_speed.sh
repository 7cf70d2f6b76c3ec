#!/usr/bin/env bash
# CPU speed runs, all through `attnsteer eval speed` (results land in evals/speed/cpu/).
#
#   bash benchmarks/cpu_speed.sh                 # both steps below
#   STEP=smollm2 bash benchmarks/cpu_speed.sh    # one step: smollm2 | llava
#
# smollm2: the embedded SmolLM2-135M-Instruct (real weights) at prompt lengths 512, 2048 and 8160
#   (max_position_embeddings minus the new tokens), unsteered SDPA vs act-default and
#   softplus-reweight on the PyTorch fused path and the float32 reference; peak memory also in a
#   fresh process per (length, configuration). The reference needs ~10-22 GiB at 8160 tokens: set
#   LENGTHS=512,2048 on smaller machines.
# llava: LLaVA-1.5-7B's language model at real shapes, 4 of its 32 layers, random weights, 576 image
#   placeholders + 64 text tokens, with the timing recipes (random weights have no sinks for the
#   papers' thresholds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-evals/speed/cpu}
STEP=${STEP:-all}
LENGTHS=${LENGTHS:-512,2048,8160}
run() { echo "+ $*" >&2; "$@"; }

if [[ $STEP == all || $STEP == smollm2 ]]; then
  run "$PY" -m attnsteer.evals.speed --model smollm2 --recipe act-default --recipe softplus-reweight \
    --prompt-len "$LENGTHS" --new-tokens 32 --backends fused-pytorch,reference --repeats 3 \
    --memory fresh-process --output_path "$OUT" --label cpu_smollm2
fi
if [[ $STEP == all || $STEP == llava ]]; then
  run "$PY" -m attnsteer.evals.speed --model llava-1.5-7b --random-weights --override num_hidden_layers=4 \
    --recipe act-default --recipe recipes/timing/act-timing.yaml --recipe softplus-reweight \
    --recipe recipes/timing/var-timing.yaml --recipe recipes/timing/vhr-timing.yaml \
    --batch_size 1 --new-tokens 32 --dtype float32 --backends fused-pytorch,reference --repeats 2 \
    --output_path "$OUT"
fi
