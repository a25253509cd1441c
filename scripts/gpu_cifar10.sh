#!/usr/bin/env bash
# CIFAR-10 (JPEG copy) at full scale on a lent GPU machine (the device tool): dense training,
# budget searches, evaluation without fine-tuning and mask-aware fine-tuning, for ResNet-20,
# VGG-16 and the ViT at once (three `selact sweep` processes share the GPU: each alone leaves it
# mostly idle, waiting on Python), all inside one time budget.
#
# Usage, from the repository root (PYTHONPATH=src; nothing is installed):
#   bash scripts/gpu_cifar10.sh ARCHIVE [BUDGET_SECONDS]
#     ARCHIVE: cifar10-jpeg.tar.gz (or any layout `selact.data.load_cifar10` reads)
#     BUDGET_SECONDS: wall time for the whole script (default 420), the final report included.
# Environment: OUT (default runs/gpu-cifar10): where results and the log go;
#   MODELS (default "resnet20 vgg16 vit"); SWEEP_ARGS: extra `selact sweep` options (a CPU dry
#   run: MODELS=small_cnn SWEEP_ARGS="--smoke --device cpu"); SELACT_COMMIT (else
#   .device/commit, else git): recorded in every row; DENSE_DIR: a folder holding
#   <model>/dense/model.safetensors (the layout of dense.tgz below) from an earlier run, reused
#   instead of training (more time for fine-tuning); DONE_DIR: a folder of an earlier run's
#   <model>.json rows (of those dense checkpoints): the jobs they hold are skipped (--done-rows);
#   WORKERS (default 2), or WORKERS_<model>: processes per sweep (--workers); SWEEP_ARGS_<model>:
#   that sweep's own extra options (e.g. SWEEP_ARGS_vit="--strategy sapi", SWEEP_ARGS_resnet20=
#   "--finetune-epochs 20"); PLOT=0: no PNG (saves one returned file); SPLIT_BIG=1: dense
#   checkpoints over 12 MB come back too, as dense-<model>.tar.part-aa, -ab, ... of 15 MB
#   (VGG-16: 4 parts; unpack with `cat dense-vgg16.tar.part-* | tar x`).
#
# Writes to $OUT (at most 7 files): <model>.json per model (the sweep rows, rewritten after every
# result, so a run stopped at its limit keeps what it finished), log.txt (every process's log,
# lines prefixed by model), summary.md (tables and frontier), cifar10.png (accuracy against
# executed MACs), and dense.tgz: the dense checkpoints under 12 MB with their sidecars
# (<model>/dense/model.safetensors for ResNet-20 and the ViT; VGG-16's 59 MB does not fit the
# return limits). Other checkpoints stay on the machine (their SHA-256 is in the rows).
#
# Inside each sweep, jobs run in priority order (selact.experiments.sweep.plan): dense training
# stretched over a share of the budget (--dense-share), then the searches, evaluations and
# fine-tuning runs that fit in what is left; a job that would not finish is skipped.
set -uo pipefail
ARCHIVE=${1:?usage: bash scripts/gpu_cifar10.sh ARCHIVE [BUDGET_SECONDS]}
BUDGET=${2:-420}
OUT=${OUT:-runs/gpu-cifar10}
MODELS=${MODELS:-"resnet20 vgg16 vit"}
SWEEP_ARGS=${SWEEP_ARGS:-}
START=$(date +%s)
export PYTHONPATH=src PYTHONUNBUFFERED=1 COLUMNS=200 OMP_NUM_THREADS=2
export SELACT_CACHE=${SELACT_CACHE:-/tmp/selact-cache}
if [ -z "${SELACT_COMMIT:-}" ]; then
  SELACT_COMMIT=$(cat .device/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export SELACT_COMMIT
RUNS=${RUNS:-/tmp/selact-runs}
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/log.txt"
elapsed() { echo $(( $(date +%s) - START )); }

{
  echo "start $(date -u +%FT%TZ), budget ${BUDGET}s, commit $SELACT_COMMIT, models: $MODELS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  # Decode the JPEGs once (about 10 s), so the sweeps below all read the tensor cache.
  python -c "
from selact.data import load_cifar10
for split in ('train', 'test'):
    images, _ = load_cifar10('$ARCHIVE', split)
    print(split, tuple(images.shape))
"
  echo "data ready after $(elapsed)s"
} >> "$LOG" 2>&1

# dense share of each sweep's budget (SHARE_<model> overrides): VGG-16 and the ViT need longer
# dense schedules for their baselines; ResNet-20's claims need more fine-tuning.
share() {
  local s="SHARE_$1"
  if [ -n "${!s:-}" ]; then echo "${!s}"; return; fi
  case $1 in resnet20) echo 0.45;; vgg16) echo 0.55;; vit) echo 0.6;; *) echo 0.45;; esac
}

LEFT=$(( BUDGET - $(elapsed) - 25 ))  # 25 s kept for the report
PIDS=()
for MODEL in $MODELS; do
  DENSE=()
  if [ -n "${DENSE_DIR:-}" ] && [ -f "$DENSE_DIR/$MODEL/dense/model.safetensors" ]; then
    DENSE=(--dense-checkpoint "$DENSE_DIR/$MODEL/dense/model.safetensors")
    if [ -n "${DONE_DIR:-}" ] && [ -f "$DONE_DIR/$MODEL.json" ]; then
      DENSE+=(--done-rows "$DONE_DIR/$MODEL.json")
    fi
  fi
  W="WORKERS_$MODEL"
  W=${!W:-${WORKERS:-2}}
  A="SWEEP_ARGS_$MODEL"
  # Process start-up (imports, tensors to the GPU) takes about 10 s of the sweep's time; 30 s
  # are kept for its last evaluations and the merge of its workers' rows.
  timeout -k 5 "$LEFT" python -m selact -v sweep --task cifar10 --model "$MODEL" \
    --data "$ARCHIVE" --time-budget $(( LEFT - 30 )) --dense-share "$(share "$MODEL")" \
    --out "$OUT/$MODEL.json" --run-dir "$RUNS/$MODEL" --no-resume --workers "$W" "${DENSE[@]}" \
    $SWEEP_ARGS ${!A:-} \
    > >(sed -u "s/^/[$MODEL] /" >> "$LOG") 2>&1 &
  PIDS+=($!)
done
for PID in "${PIDS[@]}"; do
  wait "$PID"; echo "sweep process $PID exited with $? after $(elapsed)s" >> "$LOG"
done
# A sweep stopped before merging its workers' rows leaves <model>.shard*.json: merge them here.
for MODEL in $MODELS; do
  python -c "from selact.experiments.sweep import merge_shard_files as m; m('$OUT/$MODEL.json')" \
    >> "$LOG" 2>&1 || echo "could not merge $OUT/$MODEL.shard*.json" >> "$LOG"
done

# The dense checkpoints that fit the return limit (16 MiB a file) come back as one archive.
FILES=()
for MODEL in $MODELS; do
  D="$MODEL/dense"
  [ -f "$RUNS/$D/model.safetensors" ] || continue
  if [ "$(stat -c %s "$RUNS/$D/model.safetensors")" -lt 12000000 ]; then
    FILES+=("$D/model.safetensors" "$D/model.json")
  elif [ "${SPLIT_BIG:-0}" = 1 ]; then
    tar cf - -C "$RUNS" "$D/model.safetensors" "$D/model.json" \
      | split -b 15M - "$OUT/dense-$MODEL.tar.part-" \
      || echo "could not archive $D" >> "$LOG"
  fi
done
if [ ${#FILES[@]} -gt 0 ]; then
  tar czf "$OUT/dense.tgz" -C "$RUNS" "${FILES[@]}" >> "$LOG" 2>&1 \
    || echo "could not archive the dense checkpoints" >> "$LOG"
fi

JSONS=$(ls "$OUT"/*.json 2>/dev/null)
if [ -n "$JSONS" ]; then
  PNG=()
  [ "${PLOT:-1}" = 1 ] && PNG=(--png "$OUT/cifar10.png")
  timeout 60 python -m selact report $JSONS --md "$OUT/summary.md" "${PNG[@]}" \
    >> "$LOG" 2>&1 || echo "report failed (rerun: selact report $OUT/*.json)" >> "$LOG"
fi
echo "done after $(elapsed)s" >> "$LOG"
tail -n 5 "$LOG"
