#!/usr/bin/env bash
# The prepared GPU check: one H100/H200, no network, under 8 minutes, everything in one folder.
#
#   bash benchmarks/gpu_check.sh                  # OUT=evals/gpu_check/<GPU name>
#   DRY_RUN=1 bash benchmarks/gpu_check.sh        # CPU, tiny sizes, about a minute: the script's plumbing
#   VLLM_WHEEL=/path/to/vllm-*.whl bash benchmarks/gpu_check.sh   # also step e (vLLM)
#
# Steps, in order of importance; each runs under `timeout` (its default limit in seconds below, each
# overridable: T_TESTS, T_SELFCHECK, T_METHODS, T_SELFCHECK_TESTS, T_SPEED_LLAVA, T_SPEED_LONG, T_VLLM),
# a failure does not stop the others, and a step gets at most what is left of BUDGET (seconds, default
# 460) when it starts (none gets less than 15 s: then it is skipped). The limits are estimates (cold
# Triton cache: the first use of each kernel variant compiles it, about a second each); the
# steps share the on-disk Triton cache, so later steps mostly reuse the kernels earlier ones compiled.
#   gpu-tests (130)       the GPU-marked tests (pytest -m gpu), compiled kernels, ATTNSTEER_TRITON_STRICT=1
#                         -> gpu_tests.xml (junit), gpu-tests.log (per test, kept when a timeout cuts it)
#   selfcheck (80)        the kernels' self-check (docs/kernels.md#the-self-check) for both rule kinds,
#                         fp16 / bf16 / fp32, head dims 64 and 128 -> selfcheck/selfcheck.{json,md}
#   methods (80)          every registered method against the reference backend in bf16 on LLaVA-1.5-7B
#                         and Llama-2-7B shapes (4 layers, random weights), backends auto and chunked
#                         -> methods/methods.{json,md}
#   selfcheck-tests (40)  tests/test_selfcheck.py on CUDA (injected wrong / failing kernels, compiled)
#                         -> selfcheck_tests.xml
#   speed-llava (60)      the speed goals (decode >= 0.95x and prefill >= 0.85x the unsteered model, peak
#                         memory <= 1.1x) on LLaVA-1.5-7B (32 layers, random weights), batch 1, 576 + 64
#                         tokens, 32 new tokens, ACT / softplus / VAR timing recipes, backend auto -> speed/
#   speed-4096 (50)       Llama-2-7B at 4096 prompt tokens, softplus and ACT, auto vs reference (the >= 3x
#                         goal) -> speed/
#   vllm (60)             with VLLM_WHEEL: the wheel installed --no-deps into a venv beside torch, then
#                         tests/test_vllm.py -> vllm_tests.xml; without: "skipped: no vLLM wheel"
# summary.md lists each step's status, time and outputs (and the test counts of each junit file).
# benchmarks/gpu_speed.sh is the full speed run (30-45 minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=${PY:-python}
DRY_RUN=${DRY_RUN:-0}
BUDGET=${BUDGET:-460}
START=$(date +%s)

if [[ $DRY_RUN == 1 ]]; then
  GPU=cpu-dry-run
  OUT=${OUT:-${TMPDIR:-/tmp}/attnsteer-gpu-check-dry-run}
  export TRITON_INTERPRET=1 # the kernels in Triton's CPU interpreter (before anything defines them)
else
  if ! GPU=$($PY -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null); then
    echo "no CUDA device visible to $PY. Fix: run on the GPU machine, or DRY_RUN=1 for the CPU dry run" >&2
    exit 2
  fi
  OUT=${OUT:-evals/gpu_check/$GPU}
  unset TRITON_INTERPRET
fi
mkdir -p "$OUT"
SUMMARY_ROWS="$OUT/.steps.tsv"
: >"$SUMMARY_ROWS"

# step NAME SECONDS OUTPUTS COMMAND...: run COMMAND under timeout (at most what is left of BUDGET),
# its stdout + stderr in $OUT/NAME.log; one summary row.
step() {
  local name=$1 limit=$2 outputs=$3
  shift 3
  local now left status rc t0 t1
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped: out of time (budget ${BUDGET} s)" 0 "$outputs" >>"$SUMMARY_ROWS"
    echo "== $name: skipped (out of time)" >&2
    return 0
  fi
  echo "== $name (at most ${limit} s): $*" >&2
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((t1 - t0))" "$outputs" >>"$SUMMARY_ROWS"
  echo "== $name: $status ($((t1 - t0)) s)" >&2
}

skip() { printf '%s\t%s\t0\t%s\n' "$1" "$2" "" >>"$SUMMARY_ROWS"; echo "== $1: $2" >&2; }

if [[ $DRY_RUN == 1 ]]; then
  GPU_TESTS=(tests/test_kernels.py)
  SELFCHECK_TEST_ARGS=(-k "dtype_rule or random_stream")
  SELFCHECK_ARGS=(--head-dims 16 --dtypes "float32,bfloat16" --device cpu)
  METHODS_ARGS=(--models llama-tiny --prompt-len 24 --focus-len 6 --decode 1 --backends auto --device cpu)
  LLAVA_ARGS=(--model llama-tiny --image-tokens 8 --prompt-len 24 --new-tokens 2 --dtype float32 --device cpu
    --repeats 1 --warmup 0)
  LONG_ARGS=(--model llama-tiny --prompt-len 32 --new-tokens 2 --dtype float32 --device cpu --repeats 1 --warmup 0)
  LLAVA_RECIPES=(--recipe recipes/timing/var-timing.yaml)
  LONG_RECIPES=(--recipe softplus-reweight)
else
  GPU_TESTS=(tests/)
  SELFCHECK_TEST_ARGS=(-k "not the_kernels_pass") # the selfcheck step covers those at real head dims
  SELFCHECK_ARGS=(--head-dims "64,128" --dtypes "float16,bfloat16,float32")
  METHODS_ARGS=(--models "llava-1.5-7b,llama-2-7b" --layers 4 --dtype bfloat16 --backends "auto,chunked")
  LLAVA_ARGS=(--model llava-1.5-7b --batch_size 1 --prompt-len 640 --image-tokens 576 --new-tokens 32
    --dtype bfloat16 --repeats 2 --warmup 1)
  LONG_ARGS=(--model llama-2-7b --prompt-len 4096 --new-tokens 16 --dtype bfloat16
    --override max_position_embeddings=4352 --repeats 1 --warmup 1)
  LLAVA_RECIPES=(--recipe recipes/timing/act-timing.yaml --recipe softplus-reweight --recipe recipes/timing/var-timing.yaml)
  LONG_RECIPES=(--recipe softplus-reweight --recipe recipes/timing/act-timing.yaml)
fi

# a. the GPU-marked tests, compiled kernels, a kernel failure raises instead of falling back
step gpu-tests "${T_TESTS:-130}" gpu_tests.xml \
  env ATTNSTEER_TRITON_STRICT=1 "$PY" -m pytest -v -rs -p no:cacheprovider --continue-on-collection-errors -m gpu "${GPU_TESTS[@]}" \
  --junitxml="$OUT/gpu_tests.xml"

# b. the self-check matrix
step selfcheck "${T_SELFCHECK:-80}" selfcheck/selfcheck.md \
  "$PY" benchmarks/selfcheck.py --out "$OUT/selfcheck" "${SELFCHECK_ARGS[@]}"

# c. every method against the reference, bf16, 7B shapes, a few layers
step methods "${T_METHODS:-80}" methods/methods.md \
  "$PY" benchmarks/methods_check.py --out "$OUT/methods" "${METHODS_ARGS[@]}"

# a (2). the self-check's own tests on CUDA: injected wrong numbers, compile and launch errors
step selfcheck-tests "${T_SELFCHECK_TESTS:-40}" selfcheck_tests.xml \
  "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_selfcheck.py "${SELFCHECK_TEST_ARGS[@]}" \
  --junitxml="$OUT/selfcheck_tests.xml"

# d. the speed goals (a subset of benchmarks/gpu_speed.sh that fits the budget)
step speed-llava "${T_SPEED_LLAVA:-60}" speed/ \
  "$PY" -m attnsteer.cli eval speed --random-weights "${LLAVA_ARGS[@]}" --backends auto "${LLAVA_RECIPES[@]}" \
  --output_path "$OUT/speed" --no-plot
step speed-4096 "${T_SPEED_LONG:-50}" speed/ \
  "$PY" -m attnsteer.cli eval speed --random-weights "${LONG_ARGS[@]}" --backends auto,reference "${LONG_RECIPES[@]}" \
  --output_path "$OUT/speed" --no-plot

# e. vLLM, when a wheel was carried to the machine (no network: --no-deps, beside the installed torch)
if [[ -n ${VLLM_WHEEL:-} && -f ${VLLM_WHEEL:-} ]]; then
  VENV=${VLLM_VENV:-${TMPDIR:-/tmp}/attnsteer-gpu-check-vllm}
  vllm_step() {
    "$PY" -m venv --system-site-packages "$VENV" &&
      "$VENV/bin/python" -m pip install -q --no-deps --no-index "$VLLM_WHEEL" &&
      "$VENV/bin/python" -m pytest -v -rs -p no:cacheprovider tests/test_vllm.py --junitxml="$OUT/vllm_tests.xml"
  }
  export -f vllm_step
  export PY VENV VLLM_WHEEL OUT
  step vllm "${T_VLLM:-60}" vllm_tests.xml bash -c vllm_step
elif [[ -n ${VLLM_WHEEL:-} ]]; then
  skip vllm "skipped: VLLM_WHEEL=$VLLM_WHEEL is not a file"
else
  skip vllm "skipped: no vLLM wheel (set VLLM_WHEEL=/path/to/vllm.whl)"
fi

# the summary
TOTAL=$(($(date +%s) - START))
"$PY" - "$OUT" "$GPU" "$TOTAL" "$BUDGET" "$DRY_RUN" <<'EOF'
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, gpu, total, budget, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"


def versions() -> str:
    found = []
    for name in ("torch", "triton", "transformers", "accelerate", "yaml", "pytest", "hypothesis", "vllm"):
        try:
            found.append(f"{name} {__import__(name).__version__}")
        except Exception:
            found.append(f"{name} -")
    return ", ".join(found)


def junit(name: str) -> str:
    path = out / name
    if not path.is_file():
        return ""
    try:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    except Exception as exc:  # a truncated file after a timeout
        return f"unreadable ({type(exc).__name__})"


try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "?"
lines = [
    f"# GPU check on {gpu}" + (" (CPU dry run: tiny sizes, plumbing only)" if dry else ""),
    "",
    f"- {total} s in all (budget {budget} s for the steps); commit {commit}; python {platform.python_version()}",
    f"- {versions()}",
    "",
    "| step | status | seconds | outputs | tests |",
    "|---|---|---:|---|---|",
]
for row in (out / ".steps.tsv").read_text().splitlines():
    name, status, seconds, outputs = (row.split("\t") + [""] * 4)[:4]
    tests = junit(outputs) if outputs.endswith(".xml") else ""
    log = f"{name}.log" if (out / f"{name}.log").is_file() else ""
    shown = ", ".join(x for x in (outputs, log) if x)
    lines.append(f"| {name} | {status} | {seconds} | {shown} | {tests} |")
for title, path in (("Self-check", "selfcheck/selfcheck.md"), ("Methods", "methods/methods.md")):
    if (out / path).is_file():
        body = [line for line in (out / path).read_text().splitlines() if not line.startswith("# ")]
        lines += ["", f"## {title} ({path})", *body]
speed = sorted((out / "speed").glob("*.md")) if (out / "speed").is_dir() else []
if speed:
    lines += ["", "## Speed goals (speed/)"]
for path in speed:
    text = path.read_text().splitlines()
    goals = [line for line in text if line.startswith("- ") and (" met" in line or "NOT met" in line)]
    lines += ["", f"{text[0].lstrip('# ')} ({path.name}):", *goals]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -f "$SUMMARY_ROWS"
echo "everything is in $OUT" >&2
