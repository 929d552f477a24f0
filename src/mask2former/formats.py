"""Standard output formats: semantic PNGs, COCO panoptic PNG + JSON, COCO instance results.

Every writer is atomic (`fileio.atomic_write`): a crash or an error never leaves a half-written file
behind, and readers of a folder see either the old file or the new one.

Class indices in results are contiguous (0..K-1); `category_ids[c]` gives the dataset id written to files
(identity when None). The panoptic PNG encodes a segment id as RGB with id = R + 256 G + 256^2 B
(panopticapi's id2rgb / rgb2id).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mask2former import rle
from mask2former.fileio import id2rgb, write_json, write_png
from mask2former.results import InstanceResult, PanopticResult

PathLike = str | os.PathLike


# ---------------------------------------------------------------- semantic


def _category_lookup(category_ids: Sequence[int] | None, classes: np.ndarray, argument: str) -> np.ndarray:
    """Contiguous class indices -> dataset ids (identity without category_ids), checking the range."""
    classes = np.asarray(classes, dtype=np.int64)  # an empty list would be float64, not an index array
    if category_ids is None:
        return classes.astype(np.int64)
    lookup = np.asarray(category_ids, dtype=np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= lookup.size):
        raise ValueError(
            f"{argument}: class index {int(classes.max())} has no entry in category_ids ({lookup.size} ids)"
        )
    return lookup[classes]


def write_semantic_png(
    path: PathLike, class_map: np.ndarray, category_ids: Sequence[int] | None = None
) -> Path:
    """class_map (H, W) int -> single-channel PNG of class indices (or category_ids[class] when given).

    uint8 while every value is <= 255, else uint16. With contiguous classes 0..254 the value 255 stays free
    for "ignore", the convention of ADE20K / Cityscapes label PNGs.
    """
    values = _category_lookup(category_ids, class_map, "class_map")
    if values.ndim != 2:
        raise ValueError(f"class_map: expected (H, W), got shape {values.shape}")
    if values.size and values.min() < 0:
        raise ValueError(f"{path}: negative class value {int(values.min())} cannot be stored in a PNG")
    top = int(values.max()) if values.size else 0
    if top > 65535:
        raise ValueError(f"{path}: class value {top} does not fit in a 16-bit PNG")
    return write_png(path, values.astype(np.uint8 if top <= 255 else np.uint16))


def _segments_info(
    id_map: np.ndarray, result: PanopticResult, category_ids: Sequence[int] | None
) -> list[dict]:
    """COCO segments_info of the segments present in id_map (an absent one would break pq_compute)."""
    areas = np.bincount(id_map.ravel(), minlength=max((s.id for s in result.segments), default=0) + 1)
    boxes = ndimage.find_objects(id_map)  # boxes[i] = (row slice, col slice) of id i + 1, None if absent
    categories = _category_lookup(category_ids, [s.category_id for s in result.segments], "result.segments")
    info = []
    for segment, category in zip(result.segments, categories, strict=True):
        if segment.id < 1 or areas[segment.id] == 0:
            continue
        rows, cols = boxes[segment.id - 1]
        info.append(
            {
                "id": int(segment.id),
                "category_id": int(category),
                "iscrowd": 0,
                "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                "area": int(areas[segment.id]),
            }
        )
    return info


def write_panoptic(
    png_path: PathLike,
    json_path: PathLike | None,
    result: PanopticResult,
    image_id: Any,
    file_name: str | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict:
    """Write the COCO panoptic PNG of result (and its annotation as JSON when json_path is given).

    Returns the COCO panoptic annotation {"image_id", "file_name", "segments_info": [{"id", "category_id",
    "iscrowd", "bbox" (x, y, w, h), "area"}]}; file_name defaults to the PNG's name.
    """
    id_map = np.asarray(result.id_map)
    if id_map.ndim != 2 or (id_map.size and id_map.min() < 0) or (id_map.size and id_map.max() >= 256**3):
        raise ValueError(f"{png_path}: id_map must be (H, W) with ids in 0..16777215")
    id_map = id_map.astype(np.int32, copy=False)
    annotation = {
        "image_id": image_id,
        "file_name": file_name if file_name is not None else Path(png_path).name,
        "segments_info": _segments_info(id_map, result, category_ids),
    }
    write_png(png_path, id2rgb(id_map))
    if json_path is not None:
        write_json(json_path, annotation)
    return annotation


def write_panoptic_json(
    path: PathLike, annotations: list[dict], categories: list[dict], images: list[dict] | None = None
) -> Path:
    """COCO panoptic JSON of a folder of predictions: {"annotations", "categories"} (+ "images" if given)."""
    obj: dict[str, Any] = {"annotations": annotations, "categories": categories}
    if images is not None:
        obj["images"] = images
    return write_json(path, obj)


# ---------------------------------------------------------------- instances


def instances_to_coco(
    result: InstanceResult, image_id: Any, category_ids: Sequence[int] | None = None
) -> list[dict]:
    """InstanceResult -> COCO results [{"image_id", "category_id", "segmentation" (RLE, str counts),
    "score", "bbox" (x, y, w, h)}], one per instance, ready for COCOeval (loadRes) or write_json."""
    rles = rle.encode(np.asarray(result.masks, dtype=bool))
    boxes = rle.to_bbox(rles) if rles else np.zeros((0, 4))  # as COCO derives boxes from segmentations
    categories = _category_lookup(category_ids, result.classes, "result.classes")
    return [
        {
            "image_id": image_id,
            "category_id": int(category),
            "segmentation": segmentation,
            "score": float(score),
            "bbox": [float(v) for v in box],
        }
        for segmentation, category, score, box in zip(rles, categories, result.scores, boxes, strict=True)
    ]
