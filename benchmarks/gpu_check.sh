#!/usr/bin/env bash
# One prepared script for a lent GPU machine (about 4-6 minutes on an H200):
#   1. CUDA correctness: fused and foreach kernels against per-tensor eager, no host syncs
#      (tests/test_gpu.py);
#   2. the GPU benchmark at GPT-2-small shapes, written to $OUT (or ./gpu-results).
# The device image has torch and triton but cannot install packages: everything runs from the
# source tree with PYTHONPATH=src. Results go into docs/performance.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
timeout 300 python benchmarks/step_overhead.py --device cuda --repeats 20 \
  --json "$out/step_overhead_cuda.json" 2>&1 | tee "$out/step_overhead_cuda.txt"
