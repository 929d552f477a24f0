"""PQ: hand-computed cases, and random maps against a slow from-the-definition implementation that
follows panopticapi's pq_compute_single_core (one boolean mask per segment, loops over segment pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from mask2former.evaluation import EvaluationError, PanopticEvaluator

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 9, "name": "unused", "isthing": 0},
]


# ------------------------------------------------------------------ the definition, slowly


def reference_stats(images, categories):
    """{category_id: [tp, fp, fn, iou_sum]} from boolean masks, with panopticapi's rules."""
    stats = {c["id"]: [0, 0, 0, 0.0] for c in categories}
    for pred_map, pred_segments, gt_map, gt_segments in images:
        gt_by_id = {s["id"]: s for s in gt_segments}
        pred_by_id = {s["id"]: s for s in pred_segments}
        void = gt_map == 0
        pred_mask = {i: pred_map == i for i in pred_by_id}
        gt_mask = {i: gt_map == i for i in gt_by_id}
        matched_gt, matched_pred = set(), set()
        for g in sorted(gt_by_id):  # panopticapi visits pairs in (gt id, pred id) order
            for p in sorted(pred_by_id):
                if (
                    gt_by_id[g].get("iscrowd", 0)
                    or gt_by_id[g]["category_id"] != pred_by_id[p]["category_id"]
                ):
                    continue
                intersection = int((gt_mask[g] & pred_mask[p]).sum())
                if intersection == 0:
                    continue
                union = int(pred_mask[p].sum()) + int(gt_mask[g].sum()) - intersection
                union -= int((pred_mask[p] & void).sum())
                iou = intersection / union
                if iou > 0.5:
                    stats[gt_by_id[g]["category_id"]][0] += 1
                    stats[gt_by_id[g]["category_id"]][3] += iou
                    matched_gt.add(g)
                    matched_pred.add(p)
        crowd_of = {}
        for segment in gt_segments:
            if segment["id"] in matched_gt:
                continue
            if segment.get("iscrowd", 0):
                crowd_of[segment["category_id"]] = segment["id"]
                continue
            stats[segment["category_id"]][2] += 1
        for segment in pred_segments:
            if segment["id"] in matched_pred:
                continue
            mask = pred_mask[segment["id"]]
            ignored = int((mask & void).sum())
            if segment["category_id"] in crowd_of:
                ignored += int((mask & (gt_map == crowd_of[segment["category_id"]])).sum())
            if ignored / int(mask.sum()) > 0.5:
                continue
            stats[segment["category_id"]][1] += 1
    return stats


def reference_pq(stats, categories, isthing=None):
    pq, n = 0.0, 0
    for c in categories:
        if isthing is not None and bool(c["isthing"]) != isthing:
            continue
        tp, fp, fn, iou = stats[c["id"]]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
    return 100 * pq / n


# ------------------------------------------------------------------ random scenes


def random_scene(rng, h=24, w=32):
    """(pred_map, pred_segments, gt_map, gt_segments): rectangles, void, crowds, imperfect predictions."""
    gt = np.zeros((h, w), dtype=np.int32)
    for segment_id in rng.choice(np.arange(1, 500), size=rng.integers(1, 8), replace=False):
        r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
        gt[r : r + rng.integers(2, h), c : c + rng.integers(2, w)] = segment_id
    gt[rng.random((h, w)) < 0.05] = 0
    ids = [int(i) for i in np.unique(gt) if i]
    category_ids = [1, 2, 7]  # few categories: same-category crowds and overlaps are frequent
    gt_segments = [
        {"id": i, "category_id": int(rng.choice(category_ids)), "iscrowd": int(rng.random() < 0.2)}
        for i in ids
    ]
    # Prediction: the ground truth shifted a little, a few rectangles painted over, new ids, some relabelled.
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    for _ in range(rng.integers(0, 4)):
        r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
        pred[r : r + rng.integers(2, 12), c : c + rng.integers(2, 12)] = rng.integers(500, 600)
    category_of = {s["id"]: s["category_id"] for s in gt_segments}
    pred_ids = [int(i) for i in np.unique(pred) if i]
    renumber = dict(
        zip(pred_ids, rng.choice(np.arange(1, 5000), size=len(pred_ids), replace=False), strict=True)
    )
    pred = np.vectorize(lambda v: renumber.get(int(v), 0))(pred).astype(np.int32)
    pred_segments = []
    for old in pred_ids:
        category = category_of.get(old, 0) if rng.random() < 0.8 else 0
        pred_segments.append(
            {"id": int(renumber[old]), "category_id": category or int(rng.choice(category_ids))}
        )
    order = rng.permutation(len(pred_segments))
    return pred, [pred_segments[i] for i in order], gt, gt_segments


def evaluate(images, categories=CATEGORIES):
    evaluator = PanopticEvaluator(categories)
    for image in images:
        evaluator.update(*image)
    return evaluator


def test_random_scenes_agree_with_the_definition():
    rng = np.random.default_rng(0)
    images = [random_scene(rng) for _ in range(60)]
    evaluator = evaluate(images)
    stats = reference_stats(images, CATEGORIES)
    for i, category in enumerate(CATEGORIES):
        tp, fp, fn, iou = stats[category["id"]]
        assert (evaluator.tp[i], evaluator.fp[i], evaluator.fn[i]) == (tp, fp, fn), category
        assert evaluator.iou[i] == pytest.approx(iou, rel=1e-12)
    # The scenes must exercise every rule, or the agreement above proves little.
    assert evaluator.tp.sum() > 20 and evaluator.fp.sum() > 20 and evaluator.fn.sum() > 20
    metrics = evaluator.compute()
    assert metrics["PQ"] == pytest.approx(reference_pq(stats, CATEGORIES), rel=1e-12)
    assert metrics["PQ_th"] == pytest.approx(reference_pq(stats, CATEGORIES, True), rel=1e-12)
    assert metrics["PQ_st"] == pytest.approx(reference_pq(stats, CATEGORIES, False), rel=1e-12)
    assert metrics["n"] == 3  # "unused" never appears and is not averaged


def test_crowd_and_void_rules_are_exercised_by_the_random_scenes():
    # Without the VOID / crowd exemption the reference counts more false positives: the rule matters here.
    rng = np.random.default_rng(0)
    images = [random_scene(rng) for _ in range(60)]
    no_crowd = [(p, ps, g, [{**s, "iscrowd": 0} for s in gs]) for p, ps, g, gs in images]
    assert evaluate(no_crowd).fn.sum() > evaluate(images).fn.sum()


def test_merge_of_two_shards_equals_one_pass():
    rng = np.random.default_rng(1)
    images = [random_scene(rng) for _ in range(20)]
    whole = evaluate(images)
    first, second = evaluate(images[:7]), evaluate(images[7:])
    first.merge(second)
    for name in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(getattr(first, name), getattr(whole, name))
    np.testing.assert_allclose(first.iou, whole.iou, rtol=1e-12)
    assert first.images == 20
    assert first.compute()["PQ"] == pytest.approx(whole.compute()["PQ"], rel=1e-12)


def test_totals_of_another_engine_give_the_same_compute():
    rng = np.random.default_rng(3)
    images = [random_scene(rng) for _ in range(10)]
    whole = evaluate(images)
    totals = {
        int(c): (whole.tp[i], whole.fp[i], whole.fn[i], whole.iou[i])
        for i, c in enumerate(whole.category_ids)
        if c != 9  # a category left out adds nothing
    }
    other = PanopticEvaluator(CATEGORIES)
    other.add_totals(totals, images=10)
    assert repr(other.compute()) == repr(whole.compute())  # repr: NaN == NaN
    with pytest.raises(ValueError, match="category id 5 is not one"):
        other.add_totals({5: (1, 0, 0, 1.0)}, images=1)


def test_ids_beyond_int32_give_the_same_result():
    rng = np.random.default_rng(2)
    images = [random_scene(rng) for _ in range(10)]
    big = []
    for pred, pred_segments, gt, gt_segments in images:
        shift = 1 << 40  # far beyond 24-bit PNG ids and int32
        pred = np.where(pred > 0, pred.astype(np.int64) + shift, 0)
        big.append((pred, [{**s, "id": s["id"] + shift} for s in pred_segments], gt, gt_segments))
    small, large = evaluate(images), evaluate(big)
    np.testing.assert_array_equal(small.tp, large.tp)
    np.testing.assert_array_equal(small.fp, large.fp)
    np.testing.assert_array_equal(small.iou, large.iou)


# ------------------------------------------------------------------ by hand


def two_segment_scene(thing_columns):
    """10x10: a 4x5 person (rows 2-5, columns 2-6) on sky; the prediction's person at thing_columns."""
    gt = np.full((10, 10), 20, dtype=np.int32)
    gt[2:6, 2:7] = 10
    pred = np.full((10, 10), 3, dtype=np.int32)
    pred[2:6, thing_columns] = 4
    gt_segments = [{"id": 10, "category_id": 1}, {"id": 20, "category_id": 7}]
    pred_segments = [{"id": 4, "category_id": 1}, {"id": 3, "category_id": 7}]
    return pred, pred_segments, gt, gt_segments


def test_perfect_prediction_is_100():
    pred, pred_segments, gt, gt_segments = two_segment_scene(slice(2, 7))
    metrics = evaluate([(gt.copy(), gt_segments, gt, gt_segments)]).compute()
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert metrics[key] == 100.0, key
    assert (metrics["n"], metrics["n_th"], metrics["n_st"]) == (2, 1, 1)
    assert metrics["per_class"]["9"] == {
        "name": "unused",
        "isthing": False,
        "PQ": 0.0,
        "SQ": 0.0,
        "RQ": 0.0,
        "TP": 0,
        "FP": 0,
        "FN": 0,
    }


def test_person_shifted_by_one_column():
    # Person: intersection 4x4 = 16, union 20 + 20 - 16 = 24, IoU 2/3. Sky: each 80 pixels, intersection
    # 100 - 24 = 76, union 84, IoU 19/21. Both match: PQ = (2/3 + 19/21) / 2 = 33/42.
    metrics = evaluate([two_segment_scene(slice(3, 8))]).compute()
    assert metrics["PQ_th"] == pytest.approx(100 * 2 / 3)
    assert metrics["PQ_st"] == pytest.approx(100 * 19 / 21)
    assert metrics["PQ"] == pytest.approx(100 * 33 / 42)
    assert metrics["SQ"] == pytest.approx(100 * 33 / 42)
    assert metrics["RQ"] == 100.0


def test_person_shifted_too_far_is_a_false_positive_and_a_false_negative():
    # Shifted by 3 columns: IoU 8 / 32; the sky still matches (IoU 68 / 92 > 0.5).
    metrics = evaluate([two_segment_scene(slice(5, 10))]).compute()
    person = metrics["per_class"]["1"]
    assert (person["TP"], person["FP"], person["FN"], person["PQ"]) == (0, 1, 1, 0.0)
    assert metrics["PQ_st"] == pytest.approx(100 * 68 / 92)
    assert metrics["PQ"] == pytest.approx(100 * 68 / 92 / 2)


def test_iou_of_exactly_one_half_does_not_match():
    gt = np.zeros((10, 10), dtype=np.int32)
    gt[0:4, 0:5] = 1  # 20 pixels
    pred = np.zeros((10, 10), dtype=np.int32)
    pred[0:2, 0:5] = 1  # 10 pixels inside: IoU 10 / 20
    segments = [{"id": 1, "category_id": 2}]
    person = evaluate([(pred, segments, gt, segments)]).compute()["per_class"]["2"]
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 1)


def test_void_pixels_leave_the_union_and_mostly_void_predictions_are_not_false_positives():
    gt = np.zeros((10, 10), dtype=np.int32)  # VOID except one 4x5 car
    gt[0:4, 0:5] = 5
    pred = np.zeros((10, 10), dtype=np.int32)
    pred[0:4, 0:8] = 1  # the car plus 12 VOID pixels: IoU 20 / (32 + 20 - 20 - 12) = 1
    pred[6:8, 0:5] = 2  # 10 pixels, all VOID: ignored
    pred[8, 0:4] = 3  # 4 pixels on VOID ...
    pred[9, 0:4] = 3  # ... and 4 on the sky: exactly half VOID, so a false positive
    gt[9, :] = 6
    gt_segments = [{"id": 5, "category_id": 2}, {"id": 6, "category_id": 7}]
    pred_segments = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 1}]
    metrics = evaluate([(pred, pred_segments, gt, gt_segments)]).compute()
    car, person, sky = (metrics["per_class"][k] for k in ("2", "1", "7"))
    assert (car["TP"], car["FP"], car["FN"], car["SQ"]) == (1, 0, 0, 100.0)
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 0)
    assert (sky["TP"], sky["FP"], sky["FN"]) == (0, 0, 1)


def test_crowd_regions_are_neither_matched_nor_missed_and_excuse_their_own_category():
    gt = np.full((10, 10), 9, dtype=np.int32)  # sky
    gt[0:5, 0:5] = 8  # person crowd, 25 pixels
    pred = np.full((10, 10), 9, dtype=np.int32)
    pred[0:5, 0:5] = 1  # a person exactly on the crowd: not a match, not a false positive
    pred[5:7, 0:5] = 2  # a car ...
    pred[0:2, 5:10] = 2  # ... (one segment) off the crowd entirely: a false positive
    pred[7:10, 7:10] = 3  # a person on the sky only: a false positive
    gt_segments = [{"id": 8, "category_id": 1, "iscrowd": 1}, {"id": 9, "category_id": 7}]
    pred_segments = [
        {"id": 1, "category_id": 1},
        {"id": 2, "category_id": 2},
        {"id": 3, "category_id": 1},
        {"id": 9, "category_id": 7},
    ]
    metrics = evaluate([(pred, pred_segments, gt, gt_segments)]).compute()
    person, car, sky = (metrics["per_class"][k] for k in ("1", "2", "7"))
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 0)
    assert (car["TP"], car["FP"], car["FN"]) == (0, 1, 0)
    assert sky["TP"] == 1
    # The same person segment labelled "car" lies on another category's crowd: now a false positive.
    pred_segments[0] = {"id": 1, "category_id": 2}
    car = evaluate([(pred, pred_segments, gt, gt_segments)]).compute()["per_class"]["2"]
    assert car["FP"] == 2


def test_no_thing_category_gives_nan_things():
    categories = [{"id": 1, "name": "sky", "isthing": 0}]
    gt = np.ones((4, 4), dtype=np.int32)
    segments = [{"id": 1, "category_id": 1}]
    metrics = evaluate([(gt, segments, gt, segments)], categories).compute()
    assert metrics["PQ"] == 100.0 and metrics["n_th"] == 0 and np.isnan(metrics["PQ_th"])


def test_update_result_maps_contiguous_classes_to_category_ids():
    from mask2former.results import PanopticResult, PanopticSegment

    pred, _, gt, gt_segments = two_segment_scene(slice(2, 7))
    result = PanopticResult(
        pred, [PanopticSegment(4, 0, True, 0.9, 20), PanopticSegment(3, 2, False, 0.9, 80)]
    )
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update_result(result, gt, gt_segments, category_ids=[1, 2, 7, 9])
    assert evaluator.compute()["PQ"] == 100.0


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "pred_segments, pattern",
    [
        ([{"id": 4, "category_id": 1}], "segment id 3 is in the id map but not in segments_info"),
        ([{"id": 4, "category_id": 1}, {"id": 3, "category_id": 99}], "segment id 3 has category_id 99"),
        (
            [{"id": 4, "category_id": 1}, {"id": 3, "category_id": 7}, {"id": 4, "category_id": 7}],
            "segment id 4 appears twice",
        ),
        (
            [{"id": 4, "category_id": 1}, {"id": 3, "category_id": 7}, {"id": 0, "category_id": 7}],
            "segment id 0 in segments_info",
        ),
    ],
)
def test_bad_prediction_segments_raise_one_line_errors(pred_segments, pattern):
    pred, _, gt, gt_segments = two_segment_scene(slice(2, 7))
    with pytest.raises(EvaluationError, match=pattern) as error:
        PanopticEvaluator(CATEGORIES).update(pred, pred_segments, gt, gt_segments, where=("P.png", "G.png"))
    assert str(error.value).startswith("P.png: ") and "\n" not in str(error.value)


def test_strict_mode_rejects_a_segment_absent_from_its_map():
    pred, pred_segments, gt, gt_segments = two_segment_scene(slice(2, 7))
    pred_segments = [*pred_segments, {"id": 77, "category_id": 2}]
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(pred, pred_segments, gt, gt_segments)  # tolerated by default: it has no pixel
    assert evaluator.compute()["PQ"] == 100.0
    with pytest.raises(
        EvaluationError, match="P.png: segment id 77 is in segments_info but not in the id map"
    ):
        evaluator.update(pred, pred_segments, gt, gt_segments, strict=True, where=("P.png", "G.png"))


def test_shape_mismatch_raises():
    with pytest.raises(EvaluationError, match="differs"):
        PanopticEvaluator(CATEGORIES).update(np.zeros((4, 4), int), [], np.zeros((4, 5), int), [])


def test_only_the_last_crowd_segment_of_a_category_excuses_predictions_as_in_panopticapi():
    gt = np.full((10, 10), 9, dtype=np.int32)
    gt[0:4, 0:4] = 5  # person crowd, listed first
    gt[6:10, 6:10] = 6  # person crowd, listed last: the one panopticapi keeps
    pred = np.where(gt == 6, 9, gt)  # a person on the first crowd only
    pred_segments = [{"id": 5, "category_id": 1}, {"id": 9, "category_id": 7}]
    gt_segments = [
        {"id": 5, "category_id": 1, "iscrowd": 1},
        {"id": 6, "category_id": 1, "iscrowd": 1},
        {"id": 9, "category_id": 7},
    ]
    person = evaluate([(pred, pred_segments, gt, gt_segments)]).compute()["per_class"]["1"]
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 0)  # the prediction on crowd 5 counts
    reference = reference_stats([(pred, pred_segments, gt, gt_segments)], CATEGORIES)
    assert reference[1][:3] == [0, 1, 0]
