"""Synthetic evaluation inputs for bench_eval.py: COCO panoptic PNG + JSON pairs and COCO instance results.

Everything is made from a seed, so every implementation scores the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mask2former import rle
from mask2former.fileio import id2rgb

INSTANCE_CATEGORIES = [{"id": i, "name": f"c{i}"} for i in range(1, 11)]


def write_panoptic_files(root: Path, pairs: int, height: int, width: int, seed: int = 0) -> dict:
    """root/{gt,pred}/NNNNNN.png + root/{gt,pred}.json from bench_pq.synthetic_pair; returns the paths."""
    from bench_pq import CATEGORIES, synthetic_pair

    rng = np.random.default_rng(seed)
    paths = {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }
    paths["gt_dir"].mkdir(parents=True, exist_ok=True)
    paths["pred_dir"].mkdir(parents=True, exist_ok=True)
    images, gt_annotations, pred_annotations = [], [], []
    for i in range(pairs):
        pred, pred_segments, gt, gt_segments = synthetic_pair(rng, height, width)
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(gt)).save(paths["gt_dir"] / name)
        Image.fromarray(id2rgb(pred)).save(paths["pred_dir"] / name)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": height, "width": width})
        gt_annotations.append({"image_id": i, "file_name": name, "segments_info": gt_segments})
        pred_annotations.append({"image_id": i, "file_name": name, "segments_info": pred_segments})
    for key, listed in (("gt_json", gt_annotations), ("pred_json", pred_annotations)):
        with open(paths[key], "w") as file:
            json.dump({"images": images, "annotations": listed, "categories": CATEGORIES}, file)
    return paths


def _ellipse(rows, cols, rng, height, width) -> np.ndarray:
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(4, height / 4), rng.uniform(4, width / 4)
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1


def instance_data(
    images: int, height: int, width: int, gt_per_image: int = 10, dets_per_image: int = 30, seed: int = 0
) -> tuple[dict, list[dict]]:
    """(COCO instances dict, COCO results with RLE masks): ~gt_per_image masks per image over 10 categories,
    5% crowd; detections are shifted, grown or relabelled copies of the ground truth plus false positives."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:height, :width]
    gt = {"images": [], "annotations": [], "categories": INSTANCE_CATEGORIES}
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "height": height, "width": width})
        n_gt = int(rng.integers(gt_per_image // 2, gt_per_image * 3 // 2 + 1))
        masks = np.stack([_ellipse(rows, cols, rng, height, width) for _ in range(n_gt)])
        categories = rng.integers(1, 11, size=n_gt)
        for mask, category, encoded in zip(masks, categories, rle.encode(masks), strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "segmentation": encoded,
                    "area": float(mask.sum()),
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
        n_dets = int(rng.integers(dets_per_image // 2, dets_per_image * 3 // 2 + 1))
        detections, det_categories = [], []
        for _ in range(n_dets):
            if rng.random() < 0.7:
                k = int(rng.integers(0, n_gt))
                shift = rng.integers(-12, 13, size=2)
                detections.append(np.roll(masks[k], tuple(shift), axis=(0, 1)))
                det_categories.append(int(categories[k]) if rng.random() < 0.85 else int(rng.integers(1, 11)))
            else:
                detections.append(_ellipse(rows, cols, rng, height, width))
                det_categories.append(int(rng.integers(1, 11)))
        for encoded, category in zip(rle.encode(np.stack(detections)), det_categories, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": encoded,
                    "score": round(float(rng.random()), 6),
                }
            )
    return gt, results
