#!/usr/bin/env bash
# On a lent GPU machine (the device tool): CUDA and Triton tests on that machine's torch, then the
# GPU kernel benchmark. Writes to $OUT (default runs/gpu): kernels.log (machine, tests, tables)
# and <machine>-kernels.json/.md (the PNG is left out: the device returns 8 files; `selact bench
# plot` redraws it from the JSON). Usage, from the repo root: bash scripts/gpu_kernels.sh
# About 3 minutes on one H100/H200 (the CUDA and Triton tests, then the benchmark with tuning).
# The other test files hold no CUDA cases (and would build the CPU extension first).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
LOG="$OUT/kernels.log"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: the benchmark only
    SELACT_TRITON_AUTOTUNE=0 timeout ${TEST_SECONDS:-240} python -m pytest -q -p no:cacheprovider \
      tests/test_cuda.py tests/test_triton.py 2>&1 | tail -n 25
  fi
  OPS=()
  for OP in ${BENCH_OPS:-}; do OPS+=(--op "$OP"); done  # BENCH_OPS="linear": only those ops
  timeout ${BENCH_SECONDS:-300} python -m selact -v bench kernels --device cuda --reps 100 \
    "${OPS[@]}" --out "$OUT" 2>&1
} >> "$LOG" 2>&1
rm -f "$OUT"/*-kernels.png
tail -n 3 "$LOG"
