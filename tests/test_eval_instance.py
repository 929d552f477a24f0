"""Mask AP: our RLE is pycocotools' RLE, and our numbers are COCOeval's run directly on the same dicts."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys

import numpy as np
import pytest

from mask2former import rle
from mask2former.evaluation import EvaluationError, InstanceEvaluator
from mask2former.evaluation.instance import coco_mask_ap

mask_util = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 120, 128


def box_mask(r0, c0, r1, c1):
    mask = np.zeros((H, W), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def ground_truth():
    """Three images; polygons and RLE, small/medium-sized objects and one crowd region."""
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    annotations = []
    rng = np.random.default_rng(0)
    for image_id in (1, 2, 3):
        for k in range(4):
            low, high = ((4, 16), (36, 64), (97, 115))[(image_id + k) % 3]  # small, medium, large objects
            h, w = int(rng.integers(low, high)), int(rng.integers(low, high))
            r, c = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
            if k % 2:  # polygon
                segmentation = [[c, r, c + w, r, c + w, r + h, c, r + h]]
            else:
                segmentation = rle.encode(box_mask(r, c, r + h, c + w))[0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1 + k % 2,
                    "segmentation": segmentation,
                    "area": float(h * w),
                    "iscrowd": 0,
                    "bbox": [c, r, w, h],
                }
            )
    crowd = rle.encode(box_mask(30, 40, 46, 62))[0]
    crowd["counts"] = rle._string_to_counts(crowd["counts"]).tolist()  # uncompressed, as COCO crowds are
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 3,
            "category_id": 1,
            "segmentation": crowd,
            "area": 16 * 22.0,
            "iscrowd": 1,
            "bbox": [40, 30, 22, 16],
        }
    )
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def predictions(gt, seed=1):
    """Noisy copies of the ground truth (shifted, sometimes the wrong class) plus false positives."""
    rng = np.random.default_rng(seed)
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    results = []
    for annotation in gt["annotations"]:
        mask = coco.annToMask(annotation).astype(bool)
        mask = np.roll(mask, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        category = annotation["category_id"] if rng.random() < 0.8 else 3 - annotation["category_id"]
        results.append(
            {
                "image_id": annotation["image_id"],
                "category_id": category,
                "segmentation": rle.encode(mask)[0],
                "score": float(rng.random()),
            }
        )
    for image_id in (1, 2, 3):
        r, c = int(rng.integers(0, H - 10)), int(rng.integers(0, W - 10))
        results.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "score": float(rng.random()),
                "segmentation": rle.encode(box_mask(r, c, r + 8, c + 8))[0],
            }
        )
    return results


def cocoeval_directly(gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_rle_round_trip_matches_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((5, H, W)) < 0.3
    masks[0] = False
    masks[1] = True
    ours = rle.encode(masks)
    theirs = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in ours] == [t["counts"].decode("ascii") for t in theirs]
    np.testing.assert_array_equal(mask_util.decode(ours).transpose(2, 0, 1).astype(bool), masks)
    np.testing.assert_array_equal(rle.decode(ours), masks)


def test_ap_equals_cocoeval_on_the_same_dicts():
    gt, results = ground_truth(), predictions(ground_truth())
    stats = cocoeval_directly(gt, results)
    metrics = coco_mask_ap(gt, results)
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        if stats[i] < 0:
            assert math.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(100 * stats[i], abs=1e-12), key
    assert 0 < metrics["AP"] < 100 and metrics["AP50"] > metrics["AP75"]  # a non-trivial case
    assert not any(math.isnan(metrics[key]) for key in ("APs", "APm", "APl"))
    assert set(metrics["per_class"]) == {"1", "2"} and metrics["per_class"]["2"]["name"] == "dog"
    assert gt == ground_truth()  # COCOeval rewrites annotations in place: ours works on a copy


def test_result_boxes_are_ignored_as_in_detectron2():
    gt, results = ground_truth(), predictions(ground_truth())
    with_boxes = [{**r, "bbox": [0.0, 0.0, float(W), float(H)]} for r in results]  # every box "large"
    assert json.dumps(coco_mask_ap(gt, with_boxes)) == json.dumps(coco_mask_ap(gt, results))


def test_instance_results_and_merge_give_the_same_ap():
    from mask2former.results import InstanceResult

    gt, results = ground_truth(), predictions(ground_truth())
    shard_a, shard_b = InstanceEvaluator(gt), InstanceEvaluator(gt)
    for image_id in (1, 2, 3):
        mine = [r for r in results if r["image_id"] == image_id]
        result = InstanceResult(
            masks=rle.decode([r["segmentation"] for r in mine]),
            classes=np.array([r["category_id"] - 1 for r in mine]),
            scores=np.array([r["score"] for r in mine], dtype=np.float32),
            boxes=np.zeros((len(mine), 4), dtype=np.float32),
        )
        (shard_a if image_id < 3 else shard_b).update(image_id, result, category_ids=[1, 2])
    shard_a.merge(shard_b)
    float32_scores = [{**r, "score": float(np.float32(r["score"]))} for r in results]
    assert json.dumps(shard_a.compute()) == json.dumps(coco_mask_ap(gt, float32_scores))


def test_no_results_gives_nan_and_bad_results_raise():
    gt = ground_truth()
    assert math.isnan(coco_mask_ap(gt, [])["AP"])
    good = predictions(gt)[0]
    cases = [
        ({**good, "image_id": 99}, "result 0: image_id 99 is not in the ground truth images"),
        ({**good, "category_id": 7}, "result 0 \\(image_id 1\\): category_id 7 is unknown"),
        (
            {**good, "segmentation": rle.encode(np.zeros((4, 4), bool))[0]},
            "mask size \\[4, 4\\] differs from the image",
        ),
        ({**good, "score": "high"}, "'score' must be a number"),
    ]
    for result, pattern in cases:
        with pytest.raises(EvaluationError, match=pattern):
            coco_mask_ap(gt, [result])
    with pytest.raises(
        EvaluationError, match="ground truth annotation 0: category_id 5 is not in categories"
    ):
        coco_mask_ap({**gt, "annotations": [{**gt["annotations"][0], "category_id": 5}]}, [])


def test_missing_engines_are_a_one_line_hint(monkeypatch):
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask", "hotcoco"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'mask2former\[eval\]'"):
        coco_mask_ap(ground_truth(), [])
