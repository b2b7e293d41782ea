#!/usr/bin/env bash
# The distributed test group (tests/test_distributed.py: DDP and DeepSpeed ZeRO-3 with 2 CPU processes vs 1 process,
# trie validity per process, ZeRO-3 checkpoint -> DPO; tests/test_distributed_evaluate.py: `trl-flower evaluate`
# on 2 processes = 1 process). CI runs it as
#   bash scripts/run_distributed_tests.sh .venv
# Installs deepspeed into the venv if missing (CPU build, no ops compiled ahead of time). The first launch JIT-compiles
# DeepSpeed's shm comm op (~50 s alone, ~110 s inside a 2-process launch on 2 cores); cache $TORCH_EXTENSIONS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation deepspeed==0.19.8
fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trl-flower/torch_extensions}"
export TRL_FLOWER_DATA="${TRL_FLOWER_DATA:-$(cd .. && pwd)/shared/data}"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"   # ninja (a deepspeed dependency) for the JIT compile
start=$(date +%s)
"$PY" -m pytest tests/test_distributed.py tests/test_distributed_evaluate.py -m distributed -p no:cacheprovider "${@:2}"
echo "distributed tests took $(( $(date +%s) - start )) s (TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR)"
