"""VOC mAP: hand-worked cases, agreement with the brute-force reference, COCO mAP beside it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from selact.metrics import VOCMeanAP, average_precision, coco_map, voc_map
from tests import voc_reference

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _pred(boxes, scores, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.int64) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32), "labels": labels}


def _truth(boxes, labels=None, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes,
        "labels": torch.zeros(n, dtype=torch.int64) if labels is None else torch.tensor(labels),
        "difficult": torch.zeros(n, dtype=torch.bool)
        if difficult is None
        else torch.tensor(difficult, dtype=torch.bool),
    }


A, B = [0, 0, 10, 10], [20, 20, 30, 30]
NOWHERE = [50, 50, 60, 60]


def _both(preds, truth, num_classes=1, use_07=False):
    ours = voc_map(preds, truth, num_classes, use_07_metric=use_07)
    ref, _ = voc_reference.mean_ap(
        *voc_reference.to_lists(preds, truth), num_classes, use_07=use_07
    )
    return ours.map, ref


def test_tp_fp_tp_worked_by_hand():
    # Ranked: TP (A), FP, TP (B); 2 positives. Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # All-point AP: envelope 1 on (0, 1/2], 2/3 on (1/2, 1] -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # 11-point: t = 0 .. 0.5 (6 points) -> 1, t = 0.6 .. 1 (5 points) -> 2/3: (6 + 10/3) / 11.
    preds = [_pred([A, NOWHERE, B], [0.9, 0.8, 0.7])]
    truth = [_truth([A, B])]
    ours, ref = _both(preds, truth)
    assert ours == pytest.approx(5 / 6, abs=1e-12) and ref == pytest.approx(5 / 6, abs=1e-12)
    ours07, ref07 = _both(preds, truth, use_07=True)
    assert ours07 == pytest.approx(28 / 33, abs=1e-12) and ref07 == pytest.approx(28 / 33)


def test_duplicate_detection_is_a_false_positive():
    # TP then a duplicate on the same box: precision 1, 1/2 at recall 1, 1 -> AP 1 (the FP
    # comes after full recall); swapped scores would not matter either: the first match wins.
    preds = [_pred([A, A], [0.9, 0.8])]
    assert voc_map(preds, [_truth([A])], 1).map == pytest.approx(1.0)
    # a duplicate ranked above the only other TP: TP, FP, TP -> 5/6 as above
    preds = [_pred([A, A, B], [0.9, 0.8, 0.7])]
    assert voc_map(preds, [_truth([A, B])], 1).map == pytest.approx(5 / 6)


def test_difficult_boxes_neither_count_nor_penalise():
    # A is difficult: a detection on it is ignored even when ranked first, and A is not a
    # positive: one TP on B at rank 2 gives precision 1, recall 1 -> AP 1.
    truth = [_truth([A, B], difficult=[True, False])]
    preds = [_pred([A, B, NOWHERE], [0.95, 0.9, 0.5])]
    ours, ref = _both(preds, truth)
    assert ours == pytest.approx(1.0) and ref == pytest.approx(1.0)
    # found nothing but the difficult box: recall 0 -> AP 0
    assert voc_map([_pred([A], [0.9])], truth, 1).map == 0.0
    # a class whose only boxes are difficult has no AP and is left out of the mean
    result = voc_map([_pred([A], [0.9], [1])], [_truth([A, B], [1, 0], [True, False])], 2)
    assert math.isnan(result.ap[1]) and result.ap[0] == 0.0 and result.map == 0.0


def test_iou_threshold_is_inclusive():
    # IoU of [0,0,10,5] with A is 50/100 = 0.5 exactly: a TP (the devkit's ovmax >= 0.5).
    assert voc_map([_pred([[0, 0, 10, 5]], [0.9])], [_truth([A])], 1).map == 1.0
    assert voc_map([_pred([[0, 0, 10, 4.9]], [0.9])], [_truth([A])], 1).map == 0.0


def test_detection_goes_to_its_best_box_even_if_taken():
    a, b2 = [0, 0, 10, 10], [0, 0, 10, 11]
    d = [0, 0, 10, 6]  # IoU with a: 60/100 = 0.6; with b2: 60/110 = 0.545
    # first detection takes a (exact), second (d) best-matches a, already taken -> FP, although
    # it overlaps b2 by more than 0.5. Ranked TP, FP on 2 positives: AP = 1/2 * 1 = 1/2.
    preds = [_pred([a, d], [0.9, 0.8])]
    ours, ref = _both(preds, [_truth([a, b2])])
    assert ours == pytest.approx(0.5) and ref == pytest.approx(0.5)


def test_ranking_is_global_across_images():
    # image 0 holds A, image 1 holds B. Ranked: FP (image 1), TP (A), TP (B): precision
    # 0, 1/2, 2/3 at recall 0, 1/2, 1 -> envelope 2/3 everywhere -> AP 2/3.
    preds = [_pred([A], [0.8]), _pred([NOWHERE, B], [0.9, 0.7])]
    truth = [_truth([A]), _truth([B])]
    ours, ref = _both(preds, truth)
    assert ours == pytest.approx(2 / 3) and ref == pytest.approx(2 / 3)


def test_mean_over_classes_and_empty_cases():
    # class 0 coco (AP 1), class 1 missed (AP 0): mAP 1/2
    preds = [_pred([A], [0.9], [0])]
    truth = [_truth([A, B], [0, 1])]
    result = voc_map(preds, truth, 2)
    assert result.ap == [1.0, 0.0] and result.map == 0.5 and result.num_positives == [1, 1]
    assert voc_map([_pred([], [])], [_truth([A])], 1).map == 0.0
    with pytest.raises(ValueError, match="predictions for"):
        voc_map([], [_truth([A])], 1)


def test_average_precision_direct():
    recall = torch.tensor([0.5, 0.5, 1.0])
    precision = torch.tensor([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision) == pytest.approx(5 / 6)
    assert average_precision(recall, precision, use_07_metric=True) == pytest.approx(28 / 33)


def _random_case(generator, images=40, classes=4, extra=6):
    """Truth boxes, jittered copies of them (some twice) and random boxes, with random scores."""
    preds, truth = [], []
    for _ in range(images):
        n = int(torch.randint(0, 5, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 80
        wh = 5 + torch.rand(n, 2, generator=generator) * 40
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, classes, (n,), generator=generator)
        difficult = torch.rand(n, generator=generator) < 0.2
        truth.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        copies = boxes.repeat(2, 1)[: n + n // 2]
        jitter = copies + torch.randn(copies.shape, generator=generator) * 4
        m = int(torch.randint(0, extra, (1,), generator=generator))
        rxy = torch.rand(m, 2, generator=generator) * 80
        random_boxes = torch.cat([rxy, rxy + 5 + torch.rand(m, 2, generator=generator) * 40], 1)
        det_labels = torch.cat([labels.repeat(2)[: len(copies)], torch.randint(0, classes, (m,))])
        flip = torch.rand(len(det_labels), generator=generator) < 0.1  # some wrong classes
        det_labels = torch.where(flip, (det_labels + 1) % classes, det_labels)
        det_boxes = torch.cat([jitter, random_boxes])
        preds.append(
            {
                "boxes": det_boxes,
                "scores": torch.rand(len(det_boxes), generator=generator),
                "labels": det_labels,
            }
        )
    return preds, truth


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("use_07", [False, True])
def test_agrees_with_brute_force_on_random_cases(seed, use_07):
    preds, truth = _random_case(torch.Generator().manual_seed(seed))
    ours = voc_map(preds, truth, 4, use_07_metric=use_07)
    ref_map, ref_aps = voc_reference.mean_ap(
        *voc_reference.to_lists(preds, truth), 4, use_07=use_07
    )
    assert ours.map == pytest.approx(ref_map, abs=1e-9)
    for a, b in zip(ours.ap, ref_aps, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_accumulator_equals_one_call():
    preds, truth = _random_case(torch.Generator().manual_seed(7))
    metric = VOCMeanAP(4)
    for i in range(0, len(preds), 16):
        metric.update(preds[i : i + 16], truth[i : i + 16])
    assert metric.compute().map == voc_map(preds, truth, 4).map


def test_coco_map_is_reported():
    preds = [_pred([A, NOWHERE, B], [0.9, 0.8, 0.7])]
    coco = coco_map(preds, [_truth([A, B])])
    assert set(coco) == {"map", "map_50", "map_75"}
    # COCO's 101 recall points: precision 1 at recall 0 .. 0.5 (51 points), 2/3 above (50)
    assert coco["map_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_agrees_on_real_val_truth(tmp_path, monkeypatch):
    """The val split's real boxes, with jittered copies and random false positives."""
    from selact.data.voc import CLASSES, VOCDataset

    monkeypatch.setenv("SELACT_CACHE", os.environ.get("SELACT_CACHE", str(tmp_path)))
    truth = VOCDataset(SHARED_DATA, "val").targets()
    g = torch.Generator().manual_seed(0)
    preds = []
    for t in truth:
        boxes = t["boxes"] + torch.randn(t["boxes"].shape, generator=g) * 6
        labels = torch.where(torch.rand(len(boxes), generator=g) < 0.1, 0, t["labels"])
        preds.append(
            {"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": labels}
        )
    ours = voc_map(preds, truth, len(CLASSES))
    ref, _ = voc_reference.mean_ap(*voc_reference.to_lists(preds, truth), len(CLASSES))
    assert 0.05 < ours.map < 0.95 and abs(ours.map - ref) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(
    "SELACT_VOC_PREDICTIONS" not in os.environ,
    reason="set SELACT_VOC_PREDICTIONS to a predictions file written by `selact eval --task voc`",
)
def test_agrees_on_saved_real_predictions():
    """A trained detector's val predictions, as saved by the VOC task's evaluation."""
    blob = torch.load(os.environ["SELACT_VOC_PREDICTIONS"], weights_only=True)
    preds, truth = blob["predictions"], blob["targets"]
    num_classes = len(blob["classes"])
    for use_07 in (False, True):
        ours = voc_map(preds, truth, num_classes, use_07_metric=use_07)
        ref, _ = voc_reference.mean_ap(
            *voc_reference.to_lists(preds, truth), num_classes, use_07=use_07
        )
        assert abs(ours.map - ref) < 1e-6, (use_07, ours.map, ref)
