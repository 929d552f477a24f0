"""Write predictions to a folder: overlay pictures plus the standard formats of each task."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mask2former import limits
from mask2former.config import ModelConfig
from mask2former.data.catalog import DatasetMeta
from mask2former.formats import (
    instances_to_coco,
    write_json,
    write_panoptic,
    write_panoptic_json,
    write_semantic_png,
)
from mask2former.inference.predictor import Prediction
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
    """Writes one prediction at a time; `finish()` writes the files that cover all images."""

    def __init__(self, out_dir: Path, config: ModelConfig, task: str, pictures: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta_from_config(config)
        self.task = task
        self.pictures = pictures
        self.panoptic_annotations: list[dict] = []
        self.instance_results: list[dict] = []
        self.images: list[dict] = []

    def write(self, stem: str, file_name: str, prediction: Prediction) -> Path:
        """Write the picture and per-image files of one prediction; returns the picture's path."""
        result, image, meta = prediction.result, prediction.image, self.meta
        if self.task == "semantic":
            (self.out_dir / "semantic").mkdir(exist_ok=True)
            main = self.out_dir / "semantic" / f"{stem}.png"
            write_semantic_png(main, result.class_map, meta.category_ids)
        elif self.task == "panoptic":
            (self.out_dir / "panoptic").mkdir(exist_ok=True)
            main = self.out_dir / "panoptic" / f"{stem}.png"
            # COCO panoptic: the annotation names the PNG; the "images" entry names the photo
            annotation = write_panoptic(main, None, result, image_id=stem, category_ids=meta.category_ids)
            self.panoptic_annotations.append(annotation)
            height, width = image.shape[:2]
            self.images.append({"id": stem, "file_name": file_name, "height": height, "width": width})
        else:
            self.instance_results.extend(
                instances_to_coco(result, image_id=stem, category_ids=meta.category_ids)
            )
            main = self.out_dir / "instances.json"
        if not self.pictures:
            return main
        picture_path = self.out_dir / f"{stem}.{self.task}.png"
        save_image(draw_prediction(prediction, meta), picture_path)
        return picture_path

    def summary(self, prediction: Prediction) -> str:
        """'3 segments: 2 cat, sky' style one-line description of a result."""
        names = self.meta.class_names
        result = prediction.result
        if self.task == "semantic":
            classes = [int(c) for c in sorted(set(result.class_map.ravel().tolist()))]
            return f"{len(classes)} classes: " + ", ".join(names[c] for c in classes)
        if self.task == "panoptic":
            labels = [names[s.category_id] for s in result.segments]
        else:
            labels = [names[int(c)] for c in result.classes]
        counts = Counter(labels)
        kind = "segments" if self.task == "panoptic" else "instances"
        listed = ", ".join(f"{n} {name}" if n > 1 else name for name, n in counts.most_common())
        return f"{len(labels)} {kind}" + (f": {listed}" if listed else "")

    def finish(self) -> None:
        """Write the whole-folder files: panoptic.json (COCO panoptic) or instances.json (COCO results)."""
        meta = self.meta
        if self.task == "panoptic":
            categories = [
                {"id": cid, "name": name, "isthing": int(thing), "color": list(color) if color else None}
                for cid, name, thing, color in zip(
                    meta.category_ids,
                    meta.class_names,
                    meta.thing_classes,
                    meta.colors or [None] * len(meta.class_names),
                    strict=True,
                )
            ]
            write_panoptic_json(
                self.out_dir / "panoptic.json", self.panoptic_annotations, categories, images=self.images
            )
        elif self.task == "instance":
            write_json(self.out_dir / "instances.json", self.instance_results)
