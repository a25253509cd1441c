#!/bin/bash
# Element-masked convolutions on this CPU (docs/kernels.md, "Element masks on convolutions"): the
# kernel at ResNet-20's and the targets' shapes, then the two fine-tuned frontier models end to
# end at their searched per-layer densities (ResNet-20 SAPI 1/3, VGG-16 SAPI 1/4), and the
# channel-masked copies at density 0.35 in the same session for comparison (the frontier models
# also with counting and finiteness checks on: --counting), and the frontier
# models layer by layer (scripts/element_layers.py, one thread). Run it on an idle machine; it
# writes under results/bench/element/ (OUT to change).
set -euo pipefail
OUT=${OUT:-results/bench/element}
DENSITIES=results/bench/element
selact bench kernels --op conv2d --granularity element --reps 200 --out "$OUT/kernels"
selact bench model --model resnet20 --conv-granularity element --reps 100 --counting \
  --densities "$DENSITIES/resnet20-sapi-1of3-densities.json" --out "$OUT/resnet20"
selact bench model --model vgg16 --conv-granularity element --reps 100 --counting \
  --densities "$DENSITIES/vgg16-sapi-1of4-densities.json" --out "$OUT/vgg16"
selact bench model --model resnet20 --model vgg16 --batch 1 --reps 100 --out "$OUT/channel"
MACHINE=$(python -c "from selact.bench.report import machine; print(machine())")
python scripts/element_layers.py --model resnet20 \
  --densities "$DENSITIES/resnet20-sapi-1of3-densities.json" --out "$OUT/layers/$MACHINE-resnet20.json"
python scripts/element_layers.py --model vgg16 \
  --densities "$DENSITIES/vgg16-sapi-1of4-densities.json" --out "$OUT/layers/$MACHINE-vgg16.json"
