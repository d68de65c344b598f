#!/usr/bin/env bash
# Runs the Megatron-Core adapter tests (test_megatron.py, test_megatron_zero_compute.py, test_flex_indices.py) against the newest megatron-core 0.19.x for real.
#
# megatron-core 0.17+ needs Python >= 3.12, and torch for Python 3.12 comes from the registry as a CUDA build
# (several GB, it runs on the CPU), so this is NOT part of the default CI run (.ci/run keeps 0.16.1 on Python 3.11).
#
#   bash scripts/megatron_latest.sh                       # make/update the venv, run every Megatron test
#   bash scripts/megatron_latest.sh -k ep2 -x             # extra arguments go to pytest
#   PY312=/path/to/python3.12 MCORE_VERSION=0.19.2 MCORE_VENV=/tmp/venv bash scripts/megatron_latest.sh
#
# The venv lives outside the repository (default ~/.cache/moe_train/venv-mcore312) and is reused on the next run;
# moe_train is installed into it in editable mode (no dependencies pulled by it), so edits are tested at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PY312="${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}"
MCORE_VERSION="${MCORE_VERSION:-0.19.*}"   # newest 0.19.x
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"  # the torch CI uses on Python 3.11
VENV="${MCORE_VENV:-$HOME/.cache/moe_train/venv-mcore312}"

if [ ! -x "$PY312" ]; then
  echo "error: no Python 3.12 at PY312=$PY312 (set PY312 to a python3.12 binary)" >&2
  exit 2
fi
"$PY312" - <<'EOF'
import sys
if sys.version_info < (3, 12):
    sys.exit(f"error: megatron-core 0.17+ needs Python >= 3.12, PY312 is {sys.version.split()[0]}")
EOF

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY312" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip install -q --upgrade pip
# torch first and pinned, so megatron-core's own requirement cannot pick another build.
pip install -q "torch==$TORCH_VERSION"
pip install -q "megatron-core==$MCORE_VERSION" "torch==$TORCH_VERSION" pytest pyyaml "safetensors>=0.4" numpy
pip install -q --no-deps -e .

python - <<'EOF'
import sys, torch
from importlib.metadata import version
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  megatron-core {version('megatron-core')}")
EOF
python -m pytest -q tests/test_megatron.py tests/test_megatron_zero_compute.py tests/test_flex_indices.py "$@"
