#!/usr/bin/env bash
# Dense CIFAR-10 baselines on a lent GPU, one model at a time. Side by side with each other and
# with the sweeps' fine-tuning (scripts/gpu_cifar10.sh) the dense trainings got 87-167 of their
# 200 epochs; alone on the GPU a job ran about 5x faster (docs/results.md, "The H100 runs 2 and
# 3"). Each model runs `selact sweep --dense-share 1.0 --max-finetunes 0` over its share of the
# time: the recipe's schedule (200 epochs) stretched over at most that time, then the dense and
# zero-skipping rows, then whatever evaluations still fit.
#
# Usage, from the repository root (PYTHONPATH=src; nothing is installed):
#   bash scripts/gpu_dense.sh ARCHIVE [TOTAL_SECONDS]     (default 560: inside a 600-second call)
# Environment: OUT (default runs/gpu-dense); MODELS (default "resnet20 vgg16 vit"); SHARE_<model>:
#   its share of the time (defaults: ResNet-20 0.22, VGG-16 0.28, ViT 0.5: what 200 epochs of
#   each took alone on an H100, 2026-11-27, start-up and evaluations included); SWEEP_ARGS:
#   extra `selact sweep` options (a CPU dry run: MODELS=small_cnn SWEEP_ARGS="--smoke --device
#   cpu"); RETURN_MODELS (default: MODELS; empty: none): the models whose checkpoints come back
#   (the device returns 64 MiB in all: VGG-16's 59 MB leaves little room for anything else).
# Time: each model gets its share of the time left when it starts, among the models still to run
#   (time a model leaves unused goes to the next ones).
# Writes to $OUT (at most 8 files, the device's return limit): rows.json (every model's rows),
#   summary.md, log.txt, and dense.tar.part-aa, -ab, ...: the dense checkpoints with their
#   sidecars (<model>/dense/model.safetensors, model.json; a model stopped before its end gives its
#   best weights so far, best.safetensors and best.json) in parts of 15 MB (VGG-16 alone is
#   59 MB); unpack with `cat dense.tar.part-* | tar x`. Reuse them with
#   `DENSE_DIR=<unpacked folder> bash scripts/gpu_cifar10.sh ...`.
set -uo pipefail
ARCHIVE=${1:?usage: bash scripts/gpu_dense.sh ARCHIVE [TOTAL_SECONDS]}
TOTAL=${2:-560}
OUT=${OUT:-runs/gpu-dense}
MODELS=${MODELS:-"resnet20 vgg16 vit"}
START=$(date +%s)
export PYTHONPATH=src PYTHONUNBUFFERED=1 COLUMNS=200 OMP_NUM_THREADS=4
export SELACT_CACHE=${SELACT_CACHE:-/tmp/selact-cache}
if [ -z "${SELACT_COMMIT:-}" ]; then
  SELACT_COMMIT=$(cat .device/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export SELACT_COMMIT
RUNS=${RUNS:-/tmp/selact-dense}
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/log.txt"
elapsed() { echo $(( $(date +%s) - START )); }
share() {
  local s="SHARE_$1"
  if [ -n "${!s:-}" ]; then echo "${!s}"; return; fi
  case $1 in resnet20) echo 0.22;; vgg16) echo 0.28;; vit) echo 0.5;; *) echo 0.3;; esac
}

{
  echo "start $(date -u +%FT%TZ), ${TOTAL}s, commit $SELACT_COMMIT, models: $MODELS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python -c "
from selact.data import load_cifar10
for split in ('train', 'test'):
    print(split, tuple(load_cifar10('$ARCHIVE', split)[0].shape))
"
  echo "data ready after $(elapsed)s"
} >> "$LOG" 2>&1

KEEP=40  # seconds kept at the end: merging the rows, the report, the archive
TO_RUN=($MODELS)
for MODEL in $MODELS; do
  TO_RUN=("${TO_RUN[@]:1}")
  SHARES=$(share "$MODEL")
  for LATER in "${TO_RUN[@]}"; do SHARES="$SHARES, $(share "$LATER")"; done
  LEFT=$(( TOTAL - $(elapsed) - KEEP ))
  BUDGET=$(python -c "shares = [$SHARES]; print(int($LEFT * shares[0] / sum(shares)))")
  if [ "$BUDGET" -lt 30 ]; then
    echo "$MODEL: skipped, ${LEFT}s left" >> "$LOG"
    continue
  fi
  # 15 s of the budget go to start-up (imports, data to the GPU) and the last evaluations.
  timeout -k 5 "$BUDGET" python -m selact -v sweep --task cifar10 --model "$MODEL" \
    --data "$ARCHIVE" --time-budget $(( BUDGET - 15 )) --dense-share 1.0 --max-finetunes 0 \
    --out "$RUNS/$MODEL.json" --run-dir "$RUNS/$MODEL" --no-resume ${SWEEP_ARGS:-} \
    > >(sed -u "s/^/[$MODEL] /" >> "$LOG") 2>&1
  echo "$MODEL: exit $? after $(elapsed)s" >> "$LOG"
done

python - "$OUT/rows.json" "$RUNS" $MODELS >> "$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
out, runs, models = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
rows = []
for model in models:
    path = runs / f"{model}.json"
    if path.is_file():
        rows += json.loads(path.read_text())
Path(out).write_text(json.dumps(rows, indent=1) + "\n")
print(f"{len(rows)} rows -> {out}")
EOF
timeout 30 python -m selact report "$OUT/rows.json" --md "$OUT/summary.md" >> "$LOG" 2>&1 \
  || echo "report failed (rerun: selact report $OUT/rows.json)" >> "$LOG"
FILES=()
for MODEL in ${RETURN_MODELS-$MODELS}; do
  if [ -f "$RUNS/$MODEL/dense/model.safetensors" ]; then
    FILES+=("$MODEL/dense/model.safetensors" "$MODEL/dense/model.json")
  elif [ -f "$RUNS/$MODEL/dense/best.safetensors" ]; then  # stopped before its end: keep_best's
    FILES+=("$MODEL/dense/best.safetensors" "$MODEL/dense/best.json")
    echo "$MODEL: no final model; returning its best weights so far (best.json)" >> "$LOG"
  fi
done
if [ ${#FILES[@]} -gt 0 ]; then
  tar cf - -C "$RUNS" "${FILES[@]}" | split -b 15M - "$OUT/dense.tar.part-" \
    || echo "could not archive the dense checkpoints" >> "$LOG"
fi
echo "done after $(elapsed)s" >> "$LOG"
tail -n 4 "$LOG"
