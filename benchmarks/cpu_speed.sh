#!/usr/bin/env bash
# CPU speed runs, all through `attnsteer eval speed` (results land in evals/speed/cpu/).
#
#   bash benchmarks/cpu_speed.sh                 # every step below
#   STEP=smollm2 bash benchmarks/cpu_speed.sh    # one step: smollm2 | smollm2-long | smollm2-var | llava
#
# smollm2: the embedded SmolLM2-135M-Instruct (real weights) at prompt lengths 512 and 2048:
#   unsteered SDPA vs act-default and softplus-reweight on the backend `attnsteer.apply` picks on
#   CPU (flash: PyTorch's flash kernel + corrections) and on the generic chunked backend
#   (chunked); peak memory also in a fresh process per (length, configuration). (Earlier releases
#   called these fused-pytorch and fused-chunked; the harness still accepts those names.)
# smollm2-long: the same recipes at 8176 prompt tokens (+ 4 new: within SmolLM2's 8192
#   max_position_embeddings), one repeat without warm-up, fresh-process memory: the memory goal at
#   ~8192 tokens (takes ~10 minutes on 2 cores).
# smollm2-var: VAR on SmolLM2 with the first 576 prompt tokens marked as the image (handle.focus),
#   2048 tokens: recipes/timing/var-timing.yaml (tau 3: most tokens are sinks) and
#   recipes/timing/var-paper-smollm2.yaml (the paper's tau 20: a handful of sinks per layer).
# llava: LLaVA-1.5-7B's language model at real shapes, 4 of its 32 layers, random weights, 576 image
#   placeholders + 64 text tokens, with the timing recipes (random weights have no sinks for the
#   papers' thresholds).
# Set REFERENCE=1 to add the float32 eager reference backend (slow; needs ~10-22 GiB at 8192 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-evals/speed/cpu}
STEP=${STEP:-all}
BACKENDS=flash,chunked
[[ ${REFERENCE:-0} == 1 ]] && BACKENDS=$BACKENDS,reference
run() { echo "+ $*" >&2; "$@"; }
speed() { run "$PY" -m attnsteer.cli eval speed --output_path "$OUT" "$@"; }

if [[ $STEP == all || $STEP == smollm2 ]]; then
  speed --model smollm2 --recipe act-default --recipe softplus-reweight --prompt-len 512,2048 \
    --new-tokens 32 --backends "$BACKENDS" --repeats 3 --memory fresh-process --label cpu_smollm2
  # softplus alone at 2048, after the decode rows were trimmed (the run above predates that)
  speed --model smollm2 --recipe softplus-reweight --prompt-len 2048 --new-tokens 32 --backends flash \
    --repeats 3 --label cpu_smollm2_softplus_n2048
fi
if [[ $STEP == all || $STEP == smollm2-long ]]; then
  speed --model smollm2 --recipe act-default --recipe softplus-reweight --prompt-len 8176 \
    --new-tokens 4 --backends flash --repeats 1 --warmup 0 --memory fresh-process --label cpu_smollm2
fi
if [[ $STEP == all || $STEP == smollm2-var ]]; then
  speed --model smollm2 --recipe recipes/timing/var-timing.yaml --image-tokens 576 --prompt-len 2048 \
    --new-tokens 32 --backends "$BACKENDS" --repeats 3 --label cpu_smollm2_var
  speed --model smollm2 --recipe recipes/timing/var-paper-smollm2.yaml --image-tokens 576 --prompt-len 2048 \
    --new-tokens 32 --backends flash --repeats 3 --label cpu_smollm2_var_paper
fi
if [[ $STEP == all || $STEP == llava ]]; then
  speed --model llava-1.5-7b --random-weights --override num_hidden_layers=4 \
    --recipe act-default --recipe recipes/timing/act-timing.yaml --recipe softplus-reweight \
    --recipe recipes/timing/var-timing.yaml --recipe recipes/timing/vhr-timing.yaml \
    --batch_size 1 --new-tokens 32 --dtype float32 --backends "$BACKENDS" --repeats 2
fi
