"""An independent, brute-force implementation of the VOC detection AP, for the tests only.

Written from the devkit's description (VOCevaldet.m, VOCap.m) with plain Python floats and
loops, sharing no code with :mod:`selact.metrics.voc_map`: IoU by hand, a stable sort by score,
and AP as the sum over true positives of (recall step) x (best precision at that recall or
beyond), which is the area under the monotone precision envelope computed another way.
"""

from __future__ import annotations

import math


def iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def class_ap(predictions, targets, cls, threshold=0.5, use_07=False) -> float:
    """AP of class ``cls``; ``predictions``/``targets`` are lists (one per image) of dicts of
    plain lists: boxes, scores, labels / boxes, labels, difficult."""
    gts = []
    npos = 0
    for t in targets:
        boxes = [
            list(map(float, b))
            for b, c in zip(t["boxes"], t["labels"], strict=True)
            if int(c) == cls
        ]
        hard = [bool(d) for d, c in zip(t["difficult"], t["labels"], strict=True) if int(c) == cls]
        gts.append({"boxes": boxes, "difficult": hard, "used": [False] * len(boxes)})
        npos += sum(1 for h in hard if not h)
    dets = []
    for image, p in enumerate(predictions):
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"], strict=True):
            if int(label) == cls:
                dets.append((float(score), image, list(map(float, box))))
    if npos == 0:
        return math.nan
    dets = sorted(dets, key=lambda d: -d[0])  # Python's sort is stable: ties keep input order
    outcome = []  # "tp", "fp" or "skip" per ranked detection
    for _, image, box in dets:
        g = gts[image]
        best, best_j = -1.0, -1
        for j, gt in enumerate(g["boxes"]):
            o = iou(box, gt)
            if o > best:
                best, best_j = o, j
        if best_j >= 0 and best >= threshold:
            if g["difficult"][best_j]:
                outcome.append("skip")
            elif not g["used"][best_j]:
                g["used"][best_j] = True
                outcome.append("tp")
            else:
                outcome.append("fp")
        else:
            outcome.append("fp")
    tp = fp = 0
    points = []  # (recall, precision) after each counted detection
    for o in outcome:
        if o == "skip":
            continue
        tp += o == "tp"
        fp += o == "fp"
        points.append((tp / npos, tp / (tp + fp), o == "tp"))
    if use_07:
        total = 0.0
        for k in range(11):
            t = k * 0.1
            total += max([p for r, p, _ in points if r >= t], default=0.0)
        return total / 11
    ap = 0.0
    for i, (_, _, is_tp) in enumerate(points):
        if is_tp:
            ap += (1.0 / npos) * max(p for _, p, _ in points[i:])
    return ap


def mean_ap(predictions, targets, num_classes, threshold=0.5, use_07=False):
    """(mAP over classes with positives, per-class APs)."""
    aps = [class_ap(predictions, targets, c, threshold, use_07) for c in range(num_classes)]
    valid = [a for a in aps if not math.isnan(a)]
    return (sum(valid) / len(valid) if valid else math.nan), aps


def to_lists(predictions, targets):
    """Tensors to plain lists, so the reference never touches torch."""
    preds = [{k: p[k].tolist() for k in ("boxes", "scores", "labels")} for p in predictions]
    truth = []
    for t in targets:
        d = t.get("difficult")
        truth.append(
            {
                "boxes": t["boxes"].tolist(),
                "labels": t["labels"].tolist(),
                "difficult": d.tolist() if d is not None else [False] * len(t["labels"]),
            }
        )
    return preds, truth
