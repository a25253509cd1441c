"""Pascal VOC detection mAP at IoU 0.5, by the protocol of the VOC devkit (``VOCevaldet.m``).

Per class, the detections of every image are ranked by score (highest first; ties keep the
order in which they were given). Each detection is matched to the ground-truth box of its image
with the highest IoU, difficult boxes and already-matched ones included:

- IoU ``>= iou_threshold`` (0.5) with a difficult box: ignored, neither true nor false positive;
- IoU ``>= iou_threshold`` with a box not yet matched: a true positive, and the box is matched;
- otherwise (a low IoU, or a box already matched): a false positive.

Recall is over the non-difficult boxes of the class. AP is the area under the precision-recall
curve with precision made monotone (``max`` over higher recalls): every recall point counts
(VOC2010 and later, the default), or the mean of the interpolated precision at recall 0, 0.1,
..., 1 (VOC2007's 11-point AP, ``use_07_metric=True``). mAP is the mean over the classes that have
at least one non-difficult box; a class without any is reported as NaN and left out.

Boxes are continuous ``xyxy``; with VOC's 1-based inclusive corners converted as
``(xmin - 1, ymin - 1, xmax, ymax)`` (:mod:`selact.data.voc`) the plain IoU equals the devkit's
"+1" IoU on the original corners.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou

__all__ = ["VOCResult", "VOCMeanAP", "average_precision", "voc_map"]


@dataclasses.dataclass(frozen=True)
class VOCResult:
    """Per-class AP (NaN for a class without non-difficult boxes) and their mean."""

    map: float
    ap: list[float]
    num_positives: list[int]
    num_detections: list[int]

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        names = list(class_names) if class_names else [str(i) for i in range(len(self.ap))]
        return {
            "map": self.map,
            "ap": dict(zip(names, self.ap, strict=True)),
            "num_positives": dict(zip(names, self.num_positives, strict=True)),
        }


def average_precision(
    recall: torch.Tensor, precision: torch.Tensor, use_07_metric: bool = False
) -> float:
    """AP from a ranked list's recall and precision (both ``(D,)``, recall non-decreasing)."""
    recall, precision = recall.double(), precision.double()
    if use_07_metric:
        total = 0.0
        for k in range(11):  # t = k * 0.1 as the devkit's 0:0.1:1 (so t_3 = 0.30000000000000004)
            kept = precision[recall >= k * 0.1]
            total += float(kept.max()) if kept.numel() else 0.0
        return total / 11
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    mpre = mpre.flip(0).cummax(0).values.flip(0)  # precision envelope: max over higher recalls
    changed = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1)
    return float(((mrec[changed + 1] - mrec[changed]) * mpre[changed + 1]).sum())


def _class_ap(
    detections: list[tuple[torch.Tensor, torch.Tensor]],
    truths: list[tuple[torch.Tensor, torch.Tensor]],
    iou_threshold: float,
    use_07_metric: bool,
) -> tuple[float, int, int]:
    """AP of one class: per image (boxes, scores) of detections and (boxes, difficult) of truth."""
    num_positives = sum(int((~difficult).sum()) for _, difficult in truths)
    image_of = torch.cat(
        [torch.full((len(s),), i, dtype=torch.int64) for i, (_, s) in enumerate(detections)]
    )
    scores = torch.cat([s for _, s in detections]).double()
    if num_positives == 0:
        return float("nan"), 0, scores.numel()
    if scores.numel() == 0:
        return 0.0, num_positives, 0
    # per image: the best-overlapping truth of each detection, and that overlap
    best_iou = torch.zeros(scores.numel(), dtype=torch.float64)
    best_gt = torch.full((scores.numel(),), -1, dtype=torch.int64)
    offset = 0
    for (boxes, s), (gt_boxes, _) in zip(detections, truths, strict=True):
        if len(s) and len(gt_boxes):
            iou = box_iou(boxes.double(), gt_boxes.double())
            best_iou[offset : offset + len(s)], best_gt[offset : offset + len(s)] = iou.max(1)
        offset += len(s)
    order = torch.sort(scores, descending=True, stable=True).indices
    matched = [torch.zeros(len(gt), dtype=torch.bool) for gt, _ in truths]
    tp = torch.zeros(scores.numel(), dtype=torch.float64)
    fp = torch.zeros(scores.numel(), dtype=torch.float64)
    for rank, d in enumerate(order.tolist()):
        image, gt = int(image_of[d]), int(best_gt[d])
        if gt >= 0 and float(best_iou[d]) >= iou_threshold:
            if bool(truths[image][1][gt]):
                continue  # a difficult box: neither counted nor penalised
            if not matched[image][gt]:
                matched[image][gt] = True
                tp[rank] = 1
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = tp.cumsum(0), fp.cumsum(0)
    recall = tp / num_positives
    precision = tp / (tp + fp).clamp_min(1e-300)  # ignored leading detections have tp = fp = 0
    return average_precision(recall, precision, use_07_metric), num_positives, scores.numel()


def voc_map(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> VOCResult:
    """VOC mAP of ``predictions`` (per image: ``boxes`` (D, 4) xyxy, ``scores`` (D,),
    ``labels`` (D,)) against ``targets`` (per image: ``boxes`` (G, 4), ``labels`` (G,), optional
    ``difficult`` (G,) bool), both in the same image coordinates."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    aps, positives, counts = [], [], []
    preds = [{k: v.detach().cpu() for k, v in p.items()} for p in predictions]
    truth = []
    for t in targets:
        difficult = t.get("difficult")
        labels = t["labels"].cpu()
        if difficult is None:
            difficult = torch.zeros_like(labels, dtype=torch.bool)
        truth.append((t["boxes"].detach().cpu(), labels, difficult.cpu().bool()))
    for p in preds:
        if not len(p["boxes"]) == len(p["scores"]) == len(p["labels"]):
            raise ValueError("a prediction's boxes, scores and labels differ in length")
    for c in range(num_classes):
        dets = []
        for p in preds:
            keep = p["labels"] == c
            dets.append((p["boxes"][keep], p["scores"][keep]))
        gts = [(boxes[labels == c], difficult[labels == c]) for boxes, labels, difficult in truth]
        ap, n_pos, n_det = _class_ap(dets, gts, iou_threshold, use_07_metric)
        aps.append(ap)
        positives.append(n_pos)
        counts.append(n_det)
    valid = [ap for ap in aps if ap == ap]
    mean = sum(valid) / len(valid) if valid else float("nan")
    return VOCResult(map=mean, ap=aps, num_positives=positives, num_detections=counts)


class VOCMeanAP:
    """Accumulates predictions and targets batch by batch; :meth:`compute` gives the
    :class:`VOCResult` of :func:`voc_map`."""

    def __init__(
        self, num_classes: int, iou_threshold: float = 0.5, use_07_metric: bool = False
    ) -> None:
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.use_07_metric = use_07_metric
        self.predictions: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []

    def update(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
    ) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for p in predictions:
            self.predictions.append({k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")})
        for t in targets:
            self.targets.append(
                {k: t[k].detach().cpu() for k in ("boxes", "labels", "difficult") if k in t}
            )

    def compute(self) -> VOCResult:
        return voc_map(
            self.predictions,
            self.targets,
            self.num_classes,
            iou_threshold=self.iou_threshold,
            use_07_metric=self.use_07_metric,
        )
