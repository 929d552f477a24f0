"""`Prediction`: one image's typed result with the image and the class names, and what users do with it.

    prediction = predictor("photo.jpg")          # or predictor.predict_batch([...])[0]
    prediction.class_names                        # ["person", "bicycle", ...] (contiguous index -> name)
    prediction.labels                             # the name of each segment / instance / class present
    prediction.id_map, prediction.segments        # the result's own fields (here a PanopticResult)
    prediction.plot()                             # (H', W', 3) uint8 RGB overlay, as `predict` draws it
    prediction.save("out.png")                    # the overlay; "out.json" writes to_json() instead
    prediction.masks_rle()                        # COCO compressed RLE, one per segment / instance / class
    prediction.to_coco(image_id=7)                # COCO annotations (RLE segmentation, bbox xywh, score)
    prediction.to_json(rle=True)                  # a JSON document of the whole result

Category ids in COCO output are the dataset's ids (the model config's `category_ids`) when it has them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mask2former import rle as rle_codec
from mask2former.data.catalog import DatasetMeta
from mask2former.results import InstanceResult, PanopticResult, Result, SemanticResult

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(repr=False)
class Prediction:
    """One image's result with the RGB image it was computed on (for pictures and writers).

    Attributes of the result (id_map, segments, class_map, scores, masks, classes, boxes) read through, so
    a Prediction can stand where the bare result was used.
    """

    image: np.ndarray  # (H, W, 3) uint8 RGB, EXIF-oriented
    result: Result
    task: str
    meta: DatasetMeta | None = None  # class names, thing flags, category ids, colours of the model

    def __getattr__(self, name: str):
        # Only reached for names the Prediction lacks: the result's fields (id_map, masks, ...).
        if name.startswith("__") or name in ("image", "result", "task", "meta"):
            raise AttributeError(name)
        return getattr(self.result, name)

    def __repr__(self) -> str:
        height, width = self.image.shape[:2]
        return f"Prediction({self.task}, {width}x{height}, {self.summary()})"

    # ------------------------------------------------------------------------------------------------
    # Names

    @property
    def class_names(self) -> list[str]:
        """Name of each contiguous class index (generic "class k" without metadata)."""
        if self.meta is not None:
            return list(self.meta.class_names)
        count = _class_count(self.result)
        return [f"class {k}" for k in range(count)]

    def class_indices(self) -> list[int]:
        """Contiguous class index of each segment (panoptic), instance, or class present (semantic)."""
        result = self.result
        if isinstance(result, PanopticResult):
            return [int(s.category_id) for s in result.segments]
        if isinstance(result, InstanceResult):
            return [int(c) for c in np.asarray(result.classes).reshape(-1)]
        return [int(c) for c in np.unique(result.class_map) if 0 <= c < _class_count(result)]

    @property
    def labels(self) -> list[str]:
        """Class name of each segment / instance / class present, in the order of `masks_rle()`."""
        names = self.class_names
        return [names[k] if 0 <= k < len(names) else f"class {k}" for k in self.class_indices()]

    def category_id(self, class_index: int) -> int:
        """The dataset category id of a contiguous class index (the index itself without metadata)."""
        if self.meta is not None and 0 <= class_index < len(self.meta.category_ids):
            return int(self.meta.category_ids[class_index])
        return int(class_index)

    def summary(self) -> str:
        """'3 segments: 2 circle, sky' style one-line description."""
        counts = Counter(self.labels)
        listed = ", ".join(f"{n} {name}" if n > 1 else name for name, n in counts.most_common())
        kind = {"panoptic": "segments", "instance": "instances", "semantic": "classes"}[self.task]
        return f"{len(self.labels)} {kind}" + (f": {listed}" if listed else "")

    # ------------------------------------------------------------------------------------------------
    # Masks

    def masks_array(self) -> np.ndarray:
        """(N, H, W) bool, one mask per entry of `labels` (for instance results: the result's masks)."""
        result = self.result
        if isinstance(result, InstanceResult):
            return np.asarray(result.masks, dtype=bool)
        if isinstance(result, PanopticResult):
            ids = np.array([s.id for s in result.segments], dtype=np.int64)
            return np.asarray(result.id_map)[None] == ids[:, None, None]
        classes = np.array(self.class_indices(), dtype=np.int64)
        return np.asarray(result.class_map)[None] == classes[:, None, None]

    def masks_rle(self) -> list[dict]:
        """COCO compressed RLE {"size": [H, W], "counts": str} per entry of `labels` (pycocotools decodes
        them with mask.decode)."""
        return rle_codec.encode(self.masks_array())

    # ------------------------------------------------------------------------------------------------
    # Files and documents

    def plot(self) -> np.ndarray:
        """The overlay picture as `mask2former predict` draws it: (H', W', 3) uint8 RGB. Images smaller
        than writers.MIN_PICTURE_SIDE are enlarged by an integer factor first so labels stay legible."""
        from mask2former.writers import draw_prediction

        return np.asarray(draw_prediction(self, self.meta))

    def save(self, path: str | Path) -> Path:
        """Write the overlay picture (.png, .jpg, ...) or the JSON document (.json); returns the path."""
        from mask2former.fileio import write_json
        from mask2former.visualize import save_image

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            return write_json(path, self.to_dict(rle=True))
        if suffix not in PICTURE_SUFFIXES:
            known = ", ".join(PICTURE_SUFFIXES)
            raise ValueError(f"path {path}: unknown suffix; use .json or one of {known}")
        return save_image(self.plot(), path)

    def to_coco(self, image_id: int = 0) -> list[dict]:
        """COCO annotations, one per entry of `labels`: {"image_id", "category_id", "segmentation" (RLE),
        "bbox" [x, y, w, h], "area", "score" (panoptic / instance), "iscrowd": 0}. Instance results are
        COCO results that pycocotools' loadRes reads; semantic ones are COCO-Stuff style (one per class)."""
        rles = self.masks_rle()
        boxes = rle_codec.to_bbox(rles) if rles else np.zeros((0, 4))
        areas = rle_codec.area(rles) if rles else np.zeros(0)
        scores = self._scores()
        out = []
        for i, class_index in enumerate(self.class_indices()):
            entry = {
                "image_id": image_id,
                "category_id": self.category_id(class_index),
                "segmentation": rles[i],
                "bbox": [float(v) for v in boxes[i]],
                "area": int(areas[i]),
                "iscrowd": 0,
            }
            if scores is not None:
                entry["score"] = float(scores[i])
            out.append(entry)
        return out

    def to_dict(self, rle: bool = False) -> dict:
        """A JSON-ready document: task, image size, class names, and per segment / instance / class its
        label, contiguous class index, category id, score, area and box; masks as RLE when `rle`."""
        height, width = self.image.shape[:2]
        entries = []
        coco = self.to_coco()
        for label, annotation, class_index in zip(self.labels, coco, self.class_indices(), strict=True):
            entry = {"label": label, "class_index": class_index, "category_id": annotation["category_id"]}
            if "score" in annotation:
                entry["score"] = annotation["score"]
            entry |= {"area": annotation["area"], "bbox": annotation["bbox"]}
            if rle:
                entry["mask"] = annotation["segmentation"]
            entries.append(entry)
        if isinstance(self.result, PanopticResult):
            for entry, segment in zip(entries, self.result.segments, strict=True):
                entry |= {"id": int(segment.id), "isthing": bool(segment.isthing)}
        key = {"panoptic": "segments", "instance": "instances", "semantic": "classes"}[self.task]
        return {
            "task": self.task,
            "height": int(height),
            "width": int(width),
            "class_names": self.class_names,
            key: entries,
        }

    def to_json(self, rle: bool = False, indent: int | None = None) -> str:
        """`to_dict(rle)` as a JSON string."""
        return json.dumps(self.to_dict(rle=rle), indent=indent)

    def _scores(self) -> np.ndarray | None:
        result = self.result
        if isinstance(result, InstanceResult):
            return np.asarray(result.scores, dtype=np.float64).reshape(-1)
        if isinstance(result, PanopticResult):
            return np.array([s.score for s in result.segments], dtype=np.float64)
        return None


def _class_count(result: Result) -> int:
    if isinstance(result, SemanticResult):
        return int(result.scores.shape[0])
    if isinstance(result, PanopticResult):
        return max((int(s.category_id) + 1 for s in result.segments), default=0)
    return int(np.asarray(result.classes).max()) + 1 if len(result.classes) else 0
