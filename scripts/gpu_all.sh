#!/usr/bin/env bash
# One lent GPU's whole session in one call (the device tool lends 15 minutes a task, start-up
# included): the CUDA/Triton tests and the kernel benchmark (scripts/gpu_kernels.sh), then the
# CIFAR-10 sweeps of ResNet-20, VGG-16 and the ViT in the time left (scripts/gpu_cifar10.sh, each
# sweep running its jobs in WORKERS processes after its dense model: default 2; with 4 per model,
# 12 processes on one H100 ran each job 3-5x slower than alone, for little more work done).
#
# Usage, from the repository root (PYTHONPATH=src; nothing is installed):
#   bash scripts/gpu_all.sh ARCHIVE [TOTAL_SECONDS]     (default 570: inside a 600-second call)
# Writes (8 files, the device's return limit):
#   $OUT/kernels/: kernels.log, <machine>-kernels.json (tables and plot: selact.bench.report
#     from the JSON);
#   $OUT/cifar10/: <model>.json, log.txt, summary.md, dense.tgz (see gpu_cifar10.sh).
set -uo pipefail
ARCHIVE=${1:?usage: bash scripts/gpu_all.sh ARCHIVE [TOTAL_SECONDS]}
TOTAL=${2:-570}
START=$(date +%s)
ROOT=${OUT:-runs/gpu-all}
OUT="$ROOT/kernels" TEST_SECONDS=${TEST_SECONDS:-90} BENCH_SECONDS=${BENCH_SECONDS:-200} \
  bash scripts/gpu_kernels.sh
rm -f "$ROOT"/kernels/*-kernels.md
LEFT=$(( TOTAL - $(date +%s) + START ))
echo "kernels done after $(( $(date +%s) - START ))s; CIFAR-10 gets ${LEFT}s"
OUT="$ROOT/cifar10" PLOT=0 bash scripts/gpu_cifar10.sh "$ARCHIVE" "$LEFT"
