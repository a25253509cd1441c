#!/usr/bin/env bash
# On a lent GPU machine (the device tool): CUDA and Triton tests on that machine's torch, then the
# GPU kernel benchmark. Results and logs go to $OUT (default runs/gpu). Usage, from the repo root:
#   bash scripts/gpu_kernels.sh
# Takes about 3 minutes on one H100/H200 (tests ~1 min, benchmark with autotuning ~2 min).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/machine.txt"
SELACT_TRITON_AUTOTUNE=0 timeout 300 python -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py tests/test_triton.py tests/test_mgemm.py tests/test_convert.py \
  tests/test_attention.py 2>&1 | tail -n 40 | tee "$OUT/tests.log"
timeout 300 python -m selact bench kernels --device cuda --reps 100 --out "$OUT" 2>&1 \
  | tee "$OUT/bench.log"
