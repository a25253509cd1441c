"""Evaluation metrics: VOC detection mAP (the devkit's protocol) and COCO-style mAP."""

from selact.metrics.coco import coco_map
from selact.metrics.voc_map import VOCMeanAP, VOCResult, average_precision, voc_map

__all__ = ["VOCMeanAP", "VOCResult", "average_precision", "coco_map", "voc_map"]
