#!/usr/bin/env bash
# One prepared script for a lent GPU machine (about 3-6 minutes on an H200):
#   1. CUDA correctness: fused (Triton, torch.compile) and foreach kernels against per-tensor
#      eager, no host syncs (tests/test_gpu.py; a kernel falling back is a failure there);
#   2. the GPU benchmark at GPT-2-small shapes (124M parameters, 150 tensors, bf16 autocast),
#      the rows the issue's targets name, written to $OUT (or ./gpu-results).
# Each part runs even when the one before failed, under its own timeout, and writes its log as it
# goes, so a run cut short still returns what it did. The device image has torch and triton but
# cannot install packages: everything runs from the source tree with PYTHONPATH=src. Results go
# into docs/performance.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"
per_test=()
python -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
timeout 240 python -m pytest tests/test_gpu.py -q -rfEs -p no:cacheprovider "${per_test[@]}" \
  2>&1 | tee "$out/gpu-tests.txt" || status=1
rows="MetaOptimize(defaults)|defaults, per-tensor)|defaults, fused)|defaults, weight)"
rows+="|MetaOptimize(adamw, lion, scalar)|adamw, lion, scalar, fused)|fused compile)"
rows+="|MetaOptimize(adam, lion, scalar)|MetaOptimize(rmsprop, lion, scalar)"
rows+="|lion, lion, scalar, fused)|adamw, lion, weight, foreach)|adamw, adam, tensor, foreach)"
timeout 240 python benchmarks/step_overhead.py --device cuda --repeats 20 --only "$rows" \
  --json "$out/step_overhead_cuda.json" 2>&1 | tee "$out/step_overhead_cuda.txt" || status=1
exit "$status"
