"""COCO-style detection mAP (IoU 0.5:0.95, 101-point) from torchmetrics, reported beside VOC's.

VOC's difficult boxes are passed as COCO "crowd" regions (``iscrowd``), the nearest COCO notion
of a box that is neither required nor penalised; COCO's matching differs from VOC's in other
ways (101-point interpolation, area ranges), so its ``map_50`` is close to, not equal to, VOC
mAP@0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["coco_map"]


def coco_map(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, float]:
    """``{"map": ..., "map_50": ..., "map_75": ...}`` by torchmetrics' ``MeanAveragePrecision``."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    preds = [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions]
    truth = []
    for t in targets:
        labels = t["labels"].cpu()
        crowd = t.get("difficult")
        crowd = torch.zeros_like(labels) if crowd is None else crowd.cpu().long()
        truth.append({"boxes": t["boxes"].detach().cpu(), "labels": labels, "iscrowd": crowd})
    metric.update(preds, truth)
    result = metric.compute()
    return {key: float(result[key]) for key in ("map", "map_50", "map_75")}
