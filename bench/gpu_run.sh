#!/usr/bin/env bash
# The prepared one-call run of bench/gpu.py on a lent GPU machine (no network; torch >= 2.11,
# transformers >= 5.17 already installed there). Correctness checks first, then every table
# with every lever, within BUDGET seconds (default 400; the call itself needs about a minute
# more to start and to finish the measurement in flight). Output: $OUT/gpu.txt and $OUT/gpu.json.
#
#     bash bench/gpu_run.sh            # e.g. through the device tool with timeout_s 560
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/tvkd-gpu}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
"$PY" bench/gpu.py --budget-s "${BUDGET:-400}" "$@" 2>&1 | tee "$OUT/gpu.txt"
exit "${PIPESTATUS[0]}"
