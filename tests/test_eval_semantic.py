"""mIoU & co.: hand-computed cases, detectron2's validity rule, and random maps against per-class masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mask2former.evaluation import EvaluationError, SemanticEvaluator


def reference(pairs, num_classes, ignore):
    """detectron2's SemSegEvaluator formulas, from one boolean mask per class and image."""
    tp = np.zeros(num_classes)
    gt_pixels = np.zeros(num_classes)
    pred_pixels = np.zeros(num_classes)
    for pred, gt in pairs:
        scored = gt != ignore
        for c in range(num_classes):
            tp[c] += np.sum((pred == c) & (gt == c))
            gt_pixels[c] += np.sum(gt == c)
            pred_pixels[c] += np.sum((pred == c) & scored)
    iou, acc = {}, {}
    for c in range(num_classes):
        if gt_pixels[c] > 0:  # detectron2: a class absent from the ground truth is not scored
            acc[c] = tp[c] / gt_pixels[c]
            iou[c] = tp[c] / (gt_pixels[c] + pred_pixels[c] - tp[c])
    total = gt_pixels.sum()
    return {
        "mIoU": 100 * sum(iou.values()) / len(iou),
        "fwIoU": 100 * sum(iou[c] * gt_pixels[c] / total for c in iou),
        "pACC": 100 * tp.sum() / total,
        "mACC": 100 * sum(acc.values()) / len(acc),
        "IoU": {c: 100 * iou[c] for c in iou},
    }


def random_pairs(rng, n, num_classes, ignore, shape=(20, 30)):
    pairs = []
    for _ in range(n):
        gt = rng.integers(0, num_classes - 1, size=shape)  # the last class never in the ground truth
        gt[rng.random(shape) < 0.1] = ignore
        pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes, size=shape))
        pred = np.where(pred == ignore, 0, pred)
        pairs.append((pred.astype(np.uint8), gt.astype(np.uint8)))
    return pairs


def test_random_maps_agree_with_the_definition():
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 12, num_classes=6, ignore=255)
    evaluator = SemanticEvaluator(6)
    for pred, gt in pairs:
        evaluator.update(pred, gt)
    metrics, expected = evaluator.compute(), reference(pairs, 6, 255)
    for key in ("mIoU", "fwIoU", "pACC", "mACC"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12), key
    for c in range(5):
        assert metrics["per_class"][str(c)]["IoU"] == pytest.approx(expected["IoU"][c], rel=1e-12)
    # Class 5 is predicted but never in the ground truth: NaN and left out of the means (detectron2).
    assert math.isnan(metrics["per_class"]["5"]["IoU"]) and math.isnan(metrics["per_class"]["5"]["ACC"])
    assert metrics["images"] == 12


def test_hand_computed_example():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    metrics = SemanticEvaluator(3, class_names=["a", "b", "c"]).compute()
    assert math.isnan(metrics["mIoU"])  # nothing seen yet
    evaluator = SemanticEvaluator(3, class_names=["a", "b", "c"])
    evaluator.update(pred, gt)
    metrics = evaluator.compute()
    # Class 0: tp 3, gt 4, pred 3 -> IoU 3/4, acc 3/4. Class 1: tp 2, gt 3, pred 3 -> IoU 2/4, acc 2/3.
    # Class 2: no ground truth (the pixel on 255 does not count) -> excluded.
    assert metrics["mIoU"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    assert metrics["fwIoU"] == pytest.approx(100 * (3 / 4 * 4 / 7 + 2 / 4 * 3 / 7))
    assert metrics["pACC"] == pytest.approx(100 * 5 / 7)
    assert metrics["mACC"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
    assert metrics["per_class"]["1"]["name"] == "b"
    assert math.isnan(metrics["per_class"]["2"]["IoU"])


def test_a_predicted_ignore_label_is_a_miss():
    gt = np.array([[0, 0, 1, 1]])
    evaluator = SemanticEvaluator(2)
    evaluator.update(np.array([[0, 255, 1, 1]]), gt)
    metrics = evaluator.compute()
    assert metrics["pACC"] == 75.0
    assert metrics["per_class"]["0"]["IoU"] == 50.0  # tp 1, gt 2, pred 1


def test_merge_of_two_shards_equals_one_pass():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng, 8, num_classes=4, ignore=255)
    whole, first, second = SemanticEvaluator(4), SemanticEvaluator(4), SemanticEvaluator(4)
    for i, (pred, gt) in enumerate(pairs):
        whole.update(pred, gt)
        (first if i < 3 else second).update(pred, gt)
    first.merge(second)
    np.testing.assert_array_equal(first.confusion, whole.confusion)
    assert json.dumps(first.compute()) == json.dumps(whole.compute())  # NaN-tolerant equality


def test_labels_outside_the_classes_raise_naming_the_value():
    evaluator = SemanticEvaluator(3, ignore_label=255)
    with pytest.raises(EvaluationError, match=r"^P.png: label 3 is neither a class \(0..2\) nor the ignore"):
        evaluator.update(np.array([[0, 3]]), np.array([[0, 1]]), where=("P.png", "G.png"))
    with pytest.raises(EvaluationError, match="^G.png: label 254"):
        evaluator.update(np.array([[0, 1]]), np.array([[254, 1]]), where=("P.png", "G.png"))
    with pytest.raises(EvaluationError, match="differs"):
        evaluator.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="ignore_label 1 is also a class"):
        SemanticEvaluator(3, ignore_label=1)
    assert evaluator.confusion.sum() == 0  # failed updates add nothing
