"""Write predictions to a folder: overlay pictures plus the standard formats of each task."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mask2former import limits, rle
from mask2former.config import ModelConfig
from mask2former.data.catalog import DatasetMeta
from mask2former.fileio import write_json
from mask2former.formats import instances_to_coco, write_panoptic, write_panoptic_json, write_semantic_png
from mask2former.inference.predictor import Prediction
from mask2former.outputs.inputs import InputImage
from mask2former.results import InstanceResult
from mask2former.visualize import draw_instances, draw_panoptic, draw_semantic, save_image


def meta_from_config(config: ModelConfig) -> DatasetMeta:
    """The dataset metadata (names, thing flags, ids, colours) a model config carries."""
    return DatasetMeta(
        name=config.dataset,
        class_names=list(config.class_names),
        thing_classes=list(config.thing_classes),
        category_ids=list(config.category_ids) or list(range(config.num_classes)),
        colors=[tuple(c) for c in config.colors],
    )


# Pictures of small images are enlarged (by an integer factor, nearest neighbour) so labels stay legible.
MIN_PICTURE_SIDE = 256


def draw_prediction(prediction: Prediction, meta: DatasetMeta):
    """The overlay picture (PIL image) of one prediction; small images are enlarged first."""
    image, result = prediction.image, prediction.result
    factor = -(-MIN_PICTURE_SIDE // max(1, min(image.shape[:2])))
    # ... but never past limits.PICTURE_SIDE on the long side (a 30x40000 strip stays as it is).
    factor = min(factor, max(1, limits.PICTURE_SIDE.value() // max(image.shape[:2])))
    if factor > 1:
        image = image.repeat(factor, 0).repeat(factor, 1)
    enlarge = (lambda a: a.repeat(factor, -2).repeat(factor, -1)) if factor > 1 else (lambda a: a)  # noqa: E731
    if prediction.task == "semantic":
        return draw_semantic(image, enlarge(result.class_map), meta)
    if prediction.task == "panoptic":
        return draw_panoptic(image, enlarge(result.id_map), result.segments, meta)
    return draw_instances(
        image, enlarge(result.masks), result.classes, result.scores, result.boxes * factor, meta
    )


class PredictionWriter:
    """Writes one image's files at a time, returning its record; `merge(records)` writes the folder's files.

    Layout in `out_dir` (image STEM):
      STEM.<task>.png            overlay picture (unless pictures=False)
      semantic/STEM.png          contiguous class index 0..K-1 per pixel (the model's classes, 255 free for
                                 "ignore"); semantic.json names the classes and their dataset ids
      panoptic/STEM.png          COCO panoptic PNG; panoptic.json: COCO panoptic (images, annotations,
                                 categories)
      instances.json             COCO results list (loadRes / COCOeval); coco_dataset.json: a COCO dataset
                                 (images, categories, annotations with RLE masks and scores) for import tools
    `categories[k]`: the COCO category of model class k (`outputs.inputs.output_categories`), None for a
    class the files have no id for (its instances are left out).
    """

    def __init__(
        self,
        out_dir: Path,
        config: ModelConfig,
        task: str,
        categories: Sequence[dict | None] | None = None,
        pictures: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.meta = meta_from_config(config)
        self.task = task
        self.pictures = pictures
        self.categories = list(categories) if categories is not None else default_categories(self.meta)

    def write(self, image: InputImage, prediction: Prediction) -> dict:
        """Write the per-image files of one prediction; returns its record (JSON-ready)."""
        result, meta = prediction.result, self.meta
        height, width = prediction.image.shape[:2]
        entry = {"id": image.image_id, "file_name": image.file_name, "height": height, "width": width}
        record: dict = {"index": image.index, "stem": image.stem, "image": entry, "files": []}
        if self.task == "semantic":
            (self.out_dir / "semantic").mkdir(exist_ok=True)
            write_semantic_png(self.out_dir / "semantic" / f"{image.stem}.png", result.class_map)
            record["files"].append(f"semantic/{image.stem}.png")
        elif self.task == "panoptic":
            (self.out_dir / "panoptic").mkdir(exist_ok=True)
            png = self.out_dir / "panoptic" / f"{image.stem}.png"
            annotation = write_panoptic(png, None, result, image.image_id, category_ids=self._ids())
            record["segments_info"] = annotation["segments_info"]
            record["files"].append(f"panoptic/{png.name}")
        else:
            keep = np.array([self.categories[int(c)] is not None for c in result.classes], dtype=bool)
            kept = InstanceResult(
                result.masks[keep], result.classes[keep], result.scores[keep], result.boxes[keep]
            )
            results = instances_to_coco(kept, image.image_id, self._ids())
            for item in results:
                item["area"] = int(rle.area(item["segmentation"])[0])
            record["results"] = results
        if self.pictures:
            picture = f"{image.stem}.{self.task}.png"
            save_image(draw_prediction(prediction, meta), self.out_dir / picture)
            record["files"].append(picture)
        return record

    def _ids(self) -> list[int]:
        """Dataset id per model class (-1 for a class without one: its results never reach the files)."""
        return [c["id"] if c is not None else -1 for c in self.categories]

    def merge(self, records: Iterable[dict]) -> list[Path]:
        """Write the whole-folder files from image records (in index order), each atomically."""
        records = sorted(records, key=lambda r: r["index"])
        images = [r["image"] for r in records]
        categories = [c for c in self.categories if c is not None]
        if self.task == "panoptic":
            annotations = [
                {
                    "image_id": r["image"]["id"],
                    "file_name": f"{r['stem']}.png",
                    "segments_info": r["segments_info"],
                }
                for r in records
            ]
            return [
                write_panoptic_json(self.out_dir / "panoptic.json", annotations, categories, images=images)
            ]
        if self.task == "semantic":
            classes = [
                {"index": k, **c} if c is not None else {"index": k, "name": name}
                for k, (c, name) in enumerate(zip(self.categories, self.meta.class_names, strict=True))
            ]
            document = {
                "label_convention": SEMANTIC_CONVENTION,
                "classes": classes,
                "images": [{**r["image"], "label_file": f"semantic/{r['stem']}.png"} for r in records],
            }
            return [write_json(self.out_dir / "semantic.json", document)]
        results = [{k: v for k, v in item.items() if k != "area"} for r in records for item in r["results"]]
        annotations = [
            {**item, "id": n, "iscrowd": 0}
            for n, item in enumerate((item for r in records for item in r["results"]), start=1)
        ]
        dataset = {"images": images, "categories": categories, "annotations": annotations}
        return [
            write_json(self.out_dir / "instances.json", results),
            write_json(self.out_dir / "coco_dataset.json", dataset),
        ]


SEMANTIC_CONVENTION = (
    "contiguous class index 0..K-1 of the model's classes per pixel (detectron2 sem_seg); 255 = ignore"
)
WHOLE_FOLDER_FILES = {
    "panoptic": ("panoptic.json",),
    "semantic": ("semantic.json",),
    "instance": ("instances.json", "coco_dataset.json"),
}


def default_categories(meta: DatasetMeta) -> list[dict]:
    """The model's own COCO categories (no ground truth): its category ids, names, thing flags, colours."""
    return [
        {"id": int(cid), "name": name, "isthing": int(thing), "color": list(color) if color else None}
        for cid, name, thing, color in zip(
            meta.category_ids,
            meta.class_names,
            meta.thing_classes,
            meta.colors or [None] * len(meta.class_names),
            strict=True,
        )
    ]
