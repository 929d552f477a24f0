"""PQ speed: PanopticEvaluator (runs + one bincount per image) against two loop implementations.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pq.py [--images 500] [--height 480] [--width 640]

- "per-segment masks": the straightforward way, one boolean mask per segment and a count per
  same-category (ground truth, prediction) pair;
- "panopticapi": the algorithm of panopticapi's pq_compute_single_core (np.unique over a combined
  gt * 2^24 + pred label, then Python loops over the pairs), ground-truth areas from the annotations.
Both follow panopticapi's rules. Each synthetic pair (stuff regions, ~20 things, VOID strips, crowd
regions, a shifted and relabelled prediction, ids spread over the 24-bit PNG range) is made outside the
timed part; every implementation gets the same in-memory maps (no PNG decoding). Every statistic must be
identical, the IoU sums bit for bit.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from mask2former.evaluation import PanopticEvaluator

OFFSET = 1 << 24
CATEGORIES = [{"id": i, "name": f"c{i}", "isthing": int(i <= 8)} for i in range(1, 17)]  # 8 things, 8 stuff


def synthetic_pair(rng: np.random.Generator, height: int, width: int):
    """(pred_ids, pred_segments, gt_ids, gt_segments) with COCO-style segments_info (gt with areas)."""
    # Stuff: a coarse grid of stuff categories, upsampled; each (cell category) region one segment.
    grid = rng.integers(9, 17, size=(4, 5))
    stuff = np.repeat(np.repeat(grid, -(-height // 4), axis=0), -(-width // 5), axis=1)[:height, :width]
    category_map = stuff.copy()
    instance_map = np.zeros((height, width), dtype=np.int64)
    rows, cols = np.ogrid[:height, :width]
    for k in range(1, int(rng.integers(12, 28))):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(8, height // 4), rng.integers(8, width // 4)
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        category_map[inside] = rng.integers(1, 9)
        instance_map[inside] = k
    gt = _to_ids(rng, category_map, instance_map)
    gt[:, : int(rng.integers(0, 12))] = 0  # VOID strips at the border and across the image
    gt[int(rng.integers(0, height - 6)) :][:5] = 0
    gt_segments = _segments(rng, gt, category_map, crowd_probability=0.05)

    # Prediction: shifted, a few things dropped into VOID, some relabelled, some extra blobs.
    shift = (int(rng.integers(-6, 7)), int(rng.integers(-6, 7)))
    pred_category = np.roll(category_map, shift, axis=(0, 1))
    pred_instance = np.roll(instance_map, shift, axis=(0, 1))
    for _ in range(int(rng.integers(0, 4))):
        r, c = rng.integers(0, height - 40), rng.integers(0, width - 40)
        pred_category[r : r + 40, c : c + 40] = rng.integers(1, 9)
        pred_instance[r : r + 40, c : c + 40] = 1000 + r
    flip = rng.random(17) < 0.1  # some categories predicted as another one
    pred_category = np.where(flip[pred_category], rng.integers(1, 17), pred_category)
    pred = _to_ids(rng, pred_category, pred_instance)
    dropped = rng.choice(np.unique(pred), size=2, replace=False)
    pred[np.isin(pred, dropped)] = 0
    pred_segments = [
        {k: v for k, v in s.items() if k in ("id", "category_id")}
        for s in _segments(rng, pred, pred_category, crowd_probability=0.0)
    ]
    return pred, pred_segments, gt, gt_segments


def _to_ids(rng, category_map, instance_map):
    """Random 24-bit ids, one per (category, instance) pair, as a converted COCO PNG would have."""
    key = category_map.astype(np.int64) * 100000 + instance_map
    unique, inverse = np.unique(key, return_inverse=True)
    ids = rng.choice(np.arange(1, OFFSET), size=unique.size, replace=False)
    return ids[inverse].reshape(key.shape).astype(np.int32)


def _segments(rng, ids, category_map, crowd_probability):
    present, first, counts = np.unique(ids, return_index=True, return_counts=True)
    flat_categories = category_map.ravel()
    return [
        {
            "id": int(i),
            "category_id": int(flat_categories[f]),
            "area": int(n),
            "iscrowd": int(flat_categories[f] <= 8 and rng.random() < crowd_probability),
        }
        for i, f, n in zip(present, first, counts, strict=True)
        if i != 0
    ]


def pq_stats_panopticapi(pairs, stats):
    """panopticapi's pq_compute_single_core on in-memory maps; adds to stats {category: [tp, fp, fn, iou]}."""
    for pan_pred, pred_segments, pan_gt, gt_segments in pairs:
        gt_segms = {s["id"]: s for s in gt_segments}
        pred_segms = {s["id"]: dict(s) for s in pred_segments}
        labels, counts = np.unique(pan_pred, return_counts=True)
        for label, count in zip(labels, counts, strict=True):
            if label != 0:
                pred_segms[label]["area"] = count
        pairs_hist = np.unique(
            pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64), return_counts=True
        )
        gt_pred_map = {
            (int(label // OFFSET), int(label % OFFSET)): n for label, n in zip(*pairs_hist, strict=True)
        }
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - gt_pred_map.get((0, pred_label), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                stats[gt_segms[gt_label]["category_id"]][0] += 1
                stats[gt_segms[gt_label]["category_id"]][3] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_of = {}
        for gt_label, info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd_of[info["category_id"]] = gt_label
                continue
            stats[info["category_id"]][2] += 1
        for pred_label, info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            ignored = gt_pred_map.get((0, pred_label), 0)
            if info["category_id"] in crowd_of:
                ignored += gt_pred_map.get((crowd_of[info["category_id"]], pred_label), 0)
            if ignored / info["area"] > 0.5:
                continue
            stats[info["category_id"]][1] += 1
    return stats


def pq_stats_masks(pairs, stats):
    """The same rules from one boolean mask per segment, adding to stats {category_id: [tp, fp, fn, iou]}."""
    for pan_pred, pred_segments, pan_gt, gt_segments in pairs:
        void = pan_gt == 0
        pred_masks = {s["id"]: pan_pred == s["id"] for s in pred_segments}
        pred_area = {i: int(np.count_nonzero(m)) for i, m in pred_masks.items()}
        pred_void = {i: int(np.count_nonzero(m & void)) for i, m in pred_masks.items()}
        gt_masks = {s["id"]: pan_gt == s["id"] for s in gt_segments}
        matched = set()
        for gt_segment in sorted(gt_segments, key=lambda s: s["id"]):  # panopticapi's pair order
            if gt_segment["iscrowd"]:
                continue
            gt_mask = gt_masks[gt_segment["id"]]
            for pred_segment in sorted(pred_segments, key=lambda s: s["id"]):
                if pred_segment["category_id"] != gt_segment["category_id"]:
                    continue
                intersection = int(np.count_nonzero(gt_mask & pred_masks[pred_segment["id"]]))
                union = (
                    pred_area[pred_segment["id"]]
                    + int(np.count_nonzero(gt_mask))
                    - intersection
                    - pred_void[pred_segment["id"]]
                )
                if intersection and intersection / union > 0.5:
                    stats[gt_segment["category_id"]][0] += 1
                    stats[gt_segment["category_id"]][3] += intersection / union
                    matched.update({("gt", gt_segment["id"]), ("pred", pred_segment["id"])})
        crowd_of = {}
        for segment in gt_segments:
            if ("gt", segment["id"]) in matched:
                continue
            if segment["iscrowd"]:
                crowd_of[segment["category_id"]] = segment["id"]
            else:
                stats[segment["category_id"]][2] += 1
        for segment in pred_segments:
            if ("pred", segment["id"]) in matched:
                continue
            ignored = pred_void[segment["id"]]
            if segment["category_id"] in crowd_of:
                crowd = gt_masks[crowd_of[segment["category_id"]]]
                ignored += int(np.count_nonzero(pred_masks[segment["id"]] & crowd))
            if ignored / pred_area[segment["id"]] <= 0.5:
                stats[segment["category_id"]][1] += 1
    return stats


def touch(pair) -> None:
    """Read both maps so every implementation starts with them in cache, whichever runs first."""
    int(pair[0].sum()) + int(pair[2].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    evaluator = PanopticEvaluator(CATEGORIES)
    references = {"per-segment masks": pq_stats_masks, "panopticapi": pq_stats_panopticapi}
    stats = {name: defaultdict(lambda: [0, 0, 0, 0.0]) for name in references}
    seconds = dict.fromkeys(["ours", *references], 0.0)
    segments = 0
    for _ in range(args.images):  # pairs made one at a time: 500 kept in memory would take ~1 GB
        pair = synthetic_pair(rng, args.height, args.width)
        segments += len(pair[1]) + len(pair[3])
        touch(pair)
        start = time.perf_counter()
        evaluator.update(*pair)
        seconds["ours"] += time.perf_counter() - start
        for name, reference in references.items():
            touch(pair)
            start = time.perf_counter()
            reference([pair], stats[name])
            seconds[name] += time.perf_counter() - start

    for name in references:
        for i, category in enumerate(CATEGORIES):
            tp, fp, fn, iou = stats[name][category["id"]]
            assert (evaluator.tp[i], evaluator.fp[i], evaluator.fn[i]) == (tp, fp, fn), (name, category)
            assert evaluator.iou[i] == iou, (name, category, evaluator.iou[i], iou)  # bit for bit
    metrics = evaluator.compute()
    print(
        f"{args.images} pairs {args.height}x{args.width}, {segments / args.images:.1f} segments per pair; "
        f"tp/fp/fn {evaluator.tp.sum()}/{evaluator.fp.sum()}/{evaluator.fn.sum()}"
    )
    print(
        f"PQ {metrics['PQ']:.3f}  PQ_th {metrics['PQ_th']:.3f}  PQ_st {metrics['PQ_st']:.3f} "
        "(statistics identical in all three)"
    )
    for name, total in seconds.items():
        label = "PanopticEvaluator" if name == "ours" else name
        ratio = "" if name == "ours" else f"  -> PanopticEvaluator is {total / seconds['ours']:.1f}x faster"
        print(f"{label:>18}: {total:6.2f} s ({1000 * total / args.images:5.1f} ms/image){ratio}")


if __name__ == "__main__":
    main()
