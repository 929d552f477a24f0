"""A Prediction -> what /predict answers: JSON with COCO RLE masks, the overlay PNG, a panoptic/semantic PNG.

With a score threshold of 0 nothing is filtered and every output equals what `mask2former predict` writes
for the same image (its panoptic PNG, semantic PNG, overlay picture, COCO instance results). A positive
threshold drops segments scoring below it first; their pixels become void / unlabelled.
"""

from __future__ import annotations

import base64
import dataclasses

import numpy as np
import torch

from mask2former.data.catalog import DatasetMeta
from mask2former.fileio import encode_png, id2rgb
from mask2former.inference.predictor import Prediction
from mask2former.results import InstanceResult, PanopticResult, SemanticResult
from mask2former.writers import draw_prediction

OUTPUTS = ("json", "overlay", "panoptic_png", "semantic_png")
UNLABELLED = -1  # semantic pixels of a class dropped by the threshold (drawn unpainted, 255 in the PNG)


def semantic_class_scores(result: SemanticResult) -> dict[int, float]:
    """{class index: mean of its score map over the pixels it wins} for the classes present.

    The score of a pixel is sum over queries of p(class) x sigmoid(mask), so it may exceed 1 where queries
    overlap.
    """
    class_map = torch.as_tensor(np.asarray(result.class_map), dtype=torch.int64)
    winning = torch.as_tensor(result.scores).gather(0, class_map.clamp(min=0)[None])[0]  # (H, W)
    valid = class_map >= 0
    classes = class_map[valid]
    sums = torch.bincount(classes, weights=winning[valid].double())
    counts = torch.bincount(classes)
    return {int(c): float(sums[c] / counts[c]) for c in torch.nonzero(counts).flatten().tolist()}


def apply_threshold(prediction: Prediction, threshold: float) -> Prediction:
    """A new Prediction without the segments scoring below threshold (the same object when threshold <= 0)."""
    if threshold <= 0:
        return prediction
    result = prediction.result
    if isinstance(result, PanopticResult):
        kept = [s for s in result.segments if s.score >= threshold]
        dropped = [s.id for s in result.segments if s.score < threshold]
        id_map = np.where(np.isin(result.id_map, dropped), 0, result.id_map).astype(result.id_map.dtype)
        result = PanopticResult(id_map=id_map, segments=kept)
    elif isinstance(result, InstanceResult):
        keep = np.asarray(result.scores) >= threshold
        result = InstanceResult(
            masks=result.masks[keep],
            classes=result.classes[keep],
            scores=result.scores[keep],
            boxes=result.boxes[keep],
        )
    else:
        low = [c for c, score in semantic_class_scores(result).items() if score < threshold]
        class_map = np.where(np.isin(result.class_map, low), UNLABELLED, result.class_map).astype(np.int32)
        result = SemanticResult(class_map=class_map, scores=result.scores)
    return dataclasses.replace(prediction, result=result)


def segments_json(prediction: Prediction, meta: DatasetMeta) -> list[dict]:
    """One dict per segment: id, class_id (contiguous), category_id (dataset id), class_name, isthing, score,
    area, bbox [x, y, w, h] and mask (COCO RLE, {"size": [H, W], "counts": str}). Masks, boxes and areas are
    Prediction.to_coco's; ids are the panoptic segment ids, 1..N for instances, class index + 1 for the
    classes of a semantic map (scored by semantic_class_scores)."""
    result = prediction.result
    classes = prediction.class_indices()
    annotations = prediction.to_coco()
    if isinstance(result, PanopticResult):
        ids = [int(segment.id) for segment in result.segments]
    elif isinstance(result, InstanceResult):
        ids = list(range(1, len(classes) + 1))
    else:
        class_scores = semantic_class_scores(result)
        ids = [class_id + 1 for class_id in classes]
        annotations = [{**a, "score": class_scores[c]} for a, c in zip(annotations, classes, strict=True)]
    return [
        _segment(meta, segment_id, class_id, a["score"], a["area"], a["bbox"], a["segmentation"])
        for segment_id, class_id, a in zip(ids, classes, annotations, strict=True)
    ]


def _segment(
    meta: DatasetMeta, segment_id: int, class_id: int, score: float, area: int, bbox: list, mask: dict
) -> dict:
    counts = mask["counts"]
    return {
        "id": int(segment_id),
        "class_id": class_id,
        "category_id": int(meta.category_ids[class_id]),
        "class_name": meta.class_names[class_id],
        "isthing": bool(meta.thing_classes[class_id]),
        "color": list(meta.colors[class_id]) if meta.colors else None,
        "score": float(score),
        "area": area,
        "bbox": bbox,
        "mask": {
            "size": list(mask["size"]),
            "counts": counts.decode() if isinstance(counts, bytes) else counts,
        },
    }


def prediction_json(
    prediction: Prediction, meta: DatasetMeta, model_name: str, threshold: float, overlay: bool = False
) -> dict:
    """The JSON answer of /predict (the prediction already thresholded); `overlay` adds the picture as a
    data: URL under "overlay_png"."""
    height, width = prediction.image.shape[:2]
    document = {
        "model": model_name,
        "task": prediction.task,
        "width": int(width),
        "height": int(height),
        "score_threshold": threshold,
        "segments": segments_json(prediction, meta),
    }
    if overlay:
        document["overlay_png"] = (
            "data:image/png;base64," + base64.b64encode(overlay_png(prediction, meta)).decode()
        )
    return document


def overlay_png(prediction: Prediction, meta: DatasetMeta) -> bytes:
    """The overlay picture `predict` saves as STEM.<task>.png, as PNG bytes."""
    return encode_png(draw_prediction(prediction, meta))


def panoptic_png(result: PanopticResult) -> bytes:
    """COCO panoptic PNG (id = R + 256 G + 256^2 B) of the segment ids."""
    return encode_png(id2rgb(np.asarray(result.id_map)))


def semantic_png(result: SemanticResult, meta: DatasetMeta) -> bytes:
    """Label PNG of contiguous class indices 0..K-1, as `mask2former predict` writes them (255 where
    unlabelled), uint16 when a class index is over 255."""
    class_map = np.asarray(result.class_map)
    values = np.where(class_map >= 0, class_map, meta.ignore_label)
    return encode_png(values.astype(np.uint8 if values.max(initial=0) <= 255 else np.uint16))
