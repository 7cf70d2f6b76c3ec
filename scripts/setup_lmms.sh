#!/usr/bin/env bash
# Create .venv-lmms: attnsteer (editable, the "lmms" extra: its lmms-eval model plugin, entry point
# lmms_eval.models -> attnsteer) next to lmms-eval 0.7.x, for tests/test_lmms_eval_plugin.py.
# torch is pinned to the CPU wheel (unpinned, lmms-eval's requirements pull torch 2.14 + CUDA); the
# torchvision build it brings does not load against the CPU torch and nothing here needs it.
# lmms-eval 0.7.3 imports filelock._api (gone in filelock 4) and its llava_hf model imports decord.
# Usage: bash scripts/setup_lmms.sh   (PYTHON=python3.11 VENV=.venv-lmms to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-lmms}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[lmms]" "lmms-eval==0.7.3" "torch==2.13.0" "transformers>=5.25,<5.26" \
    "filelock<4" decord "pytest>=8"
python -m pip uninstall -q -y torchvision || true
python -c "import attnsteer, lmms_eval.models as m, transformers; m.get_model('attnsteer'); from importlib.metadata import version; print(f'attnsteer {attnsteer.__version__} + lmms-eval {version(\"lmms-eval\")}, transformers {transformers.__version__}: --model attnsteer registered')"
