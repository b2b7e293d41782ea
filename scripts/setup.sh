#!/usr/bin/env bash
# Set up a virtual environment with trl-flower and its pinned dependencies (CPU).
#   bash scripts/setup.sh                 -> .venv with the trl 1.16 lock (constraints/trl116.txt)
#   bash scripts/setup.sh .venv112 trl112 -> .venv112 with trl 1.12.0 (the compatibility job, has PPO)
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
LOCK="${2:-trl116}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and alone: on CPU-only machines `pip install torch==2.13.0` takes the local CPU build; letting
# another package pull torch in could select a multi-GB CUDA build instead.
"${PIP[@]}" install "torch==2.13.0"
# deepspeed (in [test], for the distributed group) is an sdist that imports torch to build: build it against the CPU
# torch above (no build isolation, which would fetch another torch; no ops compiled ahead of time) before [test]
# asks for it (--no-build-isolation builds with the venv's own setuptools, installed first).
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  "${PIP[@]}" install -c "constraints/$LOCK.txt" "setuptools>=77"
  DS_BUILD_OPS=0 "${PIP[@]}" install -c "constraints/$LOCK.txt" --no-build-isolation deepspeed
fi
"${PIP[@]}" install -c "constraints/$LOCK.txt" -e ".[test]"
if [ "$LOCK" = "trl112" ]; then
  "${PIP[@]}" install -c "constraints/$LOCK.txt" "trl==1.12.0" requests
fi
"$VENV/bin/python" -c "import torch, transformers, trl, trl_flower; print('trl-flower', trl_flower.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
