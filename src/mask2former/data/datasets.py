"""Map-style datasets that turn COCO panoptic, COCO instance and semantic-folder annotations into
per-segment binary masks, the target format of Mask2Former's set prediction.

Every dataset returns items
  {"image": uint8 (3, H, W), "masks": bool (N, H, W), "labels": int64 (N,), "image_id", "file_name"}
with labels as contiguous class indices 0..K-1 in the order of the categories list (`.meta` maps them
back to names, thing flags and dataset category ids). An image without segments gives masks (0, H, W)
and labels (0,). `ground_truth(i)` returns the annotation in its original form for evaluation.

`transform(image, masks, labels)` works on numpy arrays (image (H, W, 3) uint8, masks (N, H, W) bool,
labels (N,) int64) and returns the same triple; the augmentations of `mask2former.data.augment` are such
callables. With `seed` given, each call also gets `rng=np.random.default_rng([seed, epoch, index])`, so
an item's augmentation depends only on (seed, epoch, index), not on worker count or order.
"""

from __future__ import annotations

import colorsys
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mask2former import collector, fileio, rle
from mask2former.data import coco_checks
from mask2former.data.catalog import DatasetMeta
from mask2former.data.image_io import IMAGE_EXTENSIONS, ImageReadError, load_image
from mask2former.fileio import read_panoptic_png

Transform = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message is one line naming the file."""


def _read_json(path: Path) -> dict:
    try:
        with collector.paused():  # COCO train's 10^6 annotations: no collections while they are parsed
            return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None


def _fallback_color(index: int) -> tuple[int, int, int]:
    """A distinct display colour per class index (golden-ratio hue steps) when a file gives none."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def meta_from_categories(categories: list[dict], name: str, default_thing: bool = True) -> DatasetMeta:
    """COCO "categories" list -> DatasetMeta with contiguous indices in list order."""
    return DatasetMeta(
        name=name,
        class_names=[str(c.get("name", c["id"])) for c in categories],
        thing_classes=[bool(c.get("isthing", default_thing)) for c in categories],
        category_ids=[int(c["id"]) for c in categories],
        colors=[tuple(c["color"]) if "color" in c else _fallback_color(i) for i, c in enumerate(categories)],
    )


class _MaskDataset(torch.utils.data.Dataset):
    """Shared item assembly: read, build masks, transform, convert to tensors."""

    meta: DatasetMeta

    def __init__(self, transform: Transform | None, seed: int | None):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the per-item augmentation streams (only matters with `seed`)."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, object, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image, masks, labels, image_id, file_name = self._load(index)
        if self.transform is not None:
            if self.seed is None:
                image, masks, labels = self.transform(image, masks, labels)
            else:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                image, masks, labels = self.transform(image, masks, labels, rng=rng)
        h, w = image.shape[:2]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool).reshape(-1, h, w)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "image_id": image_id,
            "file_name": file_name,
        }


def _check_coco(data: object, path: Path, panoptic: bool) -> None:
    """The format checks of coco_checks (unique ids, known categories, valid sizes and segmentations)."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO JSON object")
    try:
        sizes = coco_checks.check_images(data.get("images"), path, sizes_required=False)
        category_ids = coco_checks.check_categories(data.get("categories"), path)
        if panoptic:
            coco_checks.check_panoptic_annotations(data.get("annotations"), path, category_ids)
        else:
            coco_checks.check_instance_annotations(data.get("annotations", []), path, sizes, category_ids)
    except coco_checks.CocoFormatError as error:
        raise DatasetError(str(error)) from None


def _load_checked(path: Path) -> np.ndarray:
    try:
        return load_image(path)
    except ImageReadError as error:
        raise DatasetError(str(error)) from None


def _check_size(path: Path, label: np.ndarray, image: np.ndarray) -> None:
    if label.shape[:2] != image.shape[:2]:
        raise DatasetError(
            f"{path}: annotation is {label.shape[1]}x{label.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]} (WxH)"
        )


class CocoPanopticDataset(_MaskDataset):
    """COCO panoptic: images + panoptic.json + a folder of id PNGs. One mask per non-crowd segment.

    Crowd segments give no mask (their pixels belong to no target, as in the official mapper).
    """

    def __init__(
        self,
        image_dir: str | Path,
        panoptic_json: str | Path,
        panoptic_dir: str | Path,
        transform: Transform | None = None,
        seed: int | None = None,
        name: str | None = None,
    ):
        super().__init__(transform, seed)
        self.image_dir, self.panoptic_dir = Path(image_dir), Path(panoptic_dir)
        self.json_path = Path(panoptic_json)
        data = _read_json(self.json_path)
        _check_coco(data, self.json_path, panoptic=True)
        try:
            self.meta = meta_from_categories(data["categories"], name or self.json_path.stem)
            by_image = {a["image_id"]: a for a in data["annotations"]}
            self.images = list(data["images"])
        except (KeyError, TypeError) as error:
            raise DatasetError(f"{self.json_path}: not a COCO panoptic file (missing {error})") from None
        self.annotations = [by_image.get(img["id"], {"segments_info": []}) for img in self.images]
        self._index_of = {cid: k for k, cid in enumerate(self.meta.category_ids)}

    def __len__(self) -> int:
        return len(self.images)

    def _id_map(self, index: int, image: np.ndarray | None) -> np.ndarray:
        annotation = self.annotations[index]
        if "file_name" not in annotation:  # an image the json gives no annotation for: all void
            shape = (
                image.shape[:2]
                if image is not None
                else (self.images[index]["height"], self.images[index]["width"])
            )
            return np.zeros(shape, dtype=np.int64)
        path = self.panoptic_dir / annotation["file_name"]
        if not path.exists():
            raise DatasetError(f"{path}: panoptic PNG not found")
        try:
            id_map = read_panoptic_png(path).astype(np.int64)
        except fileio.PngError as error:
            raise DatasetError(str(error)) from None
        if image is not None:
            _check_size(path, id_map, image)
        return id_map

    def _class_of(self, segment: dict) -> int:
        try:
            return self._index_of[int(segment["category_id"])]
        except KeyError:
            raise DatasetError(
                f"{self.json_path}: segment {segment.get('id')} has category_id {segment['category_id']} "
                "which is not in categories"
            ) from None

    def _load(self, index: int):
        info = self.images[index]
        image = _load_checked(self.image_dir / info["file_name"])
        id_map = self._id_map(index, image)
        segments = [s for s in self.annotations[index]["segments_info"] if not s.get("iscrowd", 0)]
        masks = np.zeros((len(segments), *id_map.shape), dtype=bool)
        for k, segment in enumerate(segments):
            masks[k] = id_map == segment["id"]
        labels = np.array([self._class_of(s) for s in segments], dtype=np.int64)
        return image, masks, labels, info["id"], info["file_name"]

    def ground_truth(self, index: int) -> dict:
        """{"id_map": (H, W) int64 segment ids (0 = void), "segments_info": the json's list (dataset
        category ids, crowd flags), "image_id", "file_name"}."""
        return {
            "id_map": self._id_map(index, None),
            "segments_info": list(self.annotations[index]["segments_info"]),
            "image_id": self.images[index]["id"],
            "file_name": self.images[index]["file_name"],
        }

    def semantic_ground_truth(self, index: int) -> np.ndarray:
        """(H, W) int64 contiguous class per pixel from the panoptic annotation (crowd included), 255 void."""
        truth = self.ground_truth(index)
        sem = np.full(truth["id_map"].shape, self.meta.ignore_label, dtype=np.int64)
        for segment in truth["segments_info"]:
            sem[truth["id_map"] == segment["id"]] = self._class_of(segment)
        return sem


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] (union of parts) -> (H, W) bool, rasterised with PIL."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:  # fewer than 3 points encloses nothing
            draw.polygon([float(v) for v in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def _segmentation_to_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        mask = rle.decode(segmentation)[0]
        if mask.shape != (height, width):
            raise DatasetError(
                f"{where}: RLE size {list(mask.shape)} differs from the image's {[height, width]}"
            )
        return mask
    raise DatasetError(f"{where}: segmentation is neither polygons nor RLE")


class CocoInstanceDataset(_MaskDataset):
    """COCO instances json (polygons or RLE). Crowd annotations are skipped, as in the official training."""

    def __init__(
        self,
        image_dir: str | Path,
        instances_json: str | Path,
        transform: Transform | None = None,
        seed: int | None = None,
        name: str | None = None,
    ):
        super().__init__(transform, seed)
        self.image_dir = Path(image_dir)
        self.json_path = Path(instances_json)
        data = _read_json(self.json_path)
        _check_coco(data, self.json_path, panoptic=False)
        try:
            self.meta = meta_from_categories(data["categories"], name or self.json_path.stem)
            self.images = list(data["images"])
            per_image: dict = defaultdict(list)
            for annotation in data.get("annotations", []):
                per_image[annotation["image_id"]].append(annotation)
        except (KeyError, TypeError) as error:
            raise DatasetError(f"{self.json_path}: not a COCO instances file (missing {error})") from None
        self.annotations = [per_image.get(img["id"], []) for img in self.images]
        self._index_of = {cid: k for k, cid in enumerate(self.meta.category_ids)}

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int):
        info = self.images[index]
        image = _load_checked(self.image_dir / info["file_name"])
        h, w = image.shape[:2]
        masks, labels = [], []
        for annotation in self.annotations[index]:
            if annotation.get("iscrowd", 0):
                continue
            where = f"{self.json_path} annotation {annotation.get('id')}"
            if annotation["category_id"] not in self._index_of:
                raise DatasetError(f"{where}: category_id {annotation['category_id']} is not in categories")
            mask = _segmentation_to_mask(annotation["segmentation"], h, w, where)
            if mask.any():  # a degenerate polygon gives nothing to learn from
                masks.append(mask)
                labels.append(self._index_of[annotation["category_id"]])
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        return image, stacked, np.array(labels, dtype=np.int64), info["id"], info["file_name"]

    def ground_truth(self, index: int) -> dict:
        """{"annotations": the json's annotations of the image (dataset category ids), "image_id",
        "file_name", "height", "width"}."""
        info = self.images[index]
        return {
            "annotations": list(self.annotations[index]),
            "image_id": info["id"],
            "file_name": info["file_name"],
            "height": info.get("height"),
            "width": info.get("width"),
        }


def read_label_png(path: Path) -> np.ndarray:
    """Single-channel (or palette) label PNG -> (H, W) int64 values."""
    try:
        return fileio.read_label_png(path).astype(np.int64)
    except fileio.PngError as error:
        raise DatasetError(str(error)) from None


class SemanticFolderDataset(_MaskDataset):
    """ADE20K-style folders: image_dir/STEM.(jpg|png...) + label_dir/STEM.png of class values.

    Label values are contiguous class indices (detectron2's sem_seg convention; ADE20K's original 1..150
    needs the usual minus-one conversion first); `ignore_label` pixels belong to no mask. Each class
    present gives one mask. Without `meta`, names come from classes.txt beside image_dir (one per line)
    when it exists, else "class_0".. with K = the largest value seen + 1.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        ignore_label: int = 255,
        meta: DatasetMeta | None = None,
        transform: Transform | None = None,
        seed: int | None = None,
    ):
        super().__init__(transform, seed)
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.ignore_label = ignore_label
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found")
        self.image_paths = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.label_paths = [self.label_dir / f"{p.stem}.png" for p in self.image_paths]
        missing = [p for p in self.label_paths if not p.exists()]
        if missing:
            raise DatasetError(f"{missing[0]}: label file not found ({len(missing)} images have no label)")
        self.meta = meta if meta is not None else self._scan_meta()

    def _scan_meta(self) -> DatasetMeta:
        top = -1
        for path in self.label_paths:
            values = np.unique(read_label_png(path))
            values = values[values != self.ignore_label]
            if values.size:
                top = max(top, int(values.max()))
        count = top + 1
        names = [f"class_{k}" for k in range(count)]
        names_file = self.image_dir.parent / "classes.txt"  # optional: one class name per line, index order
        if names_file.is_file():
            listed = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            if len(listed) < count:
                raise DatasetError(f"{names_file}: names {len(listed)} classes but the labels use {count}")
            names, count = listed, len(listed)
        return DatasetMeta(
            name=self.image_dir.parent.name or "semantic",
            class_names=names,
            thing_classes=[False] * count,
            category_ids=list(range(count)),
            colors=[_fallback_color(k) for k in range(count)],
            ignore_label=self.ignore_label,
        )

    def __len__(self) -> int:
        return len(self.image_paths)

    def _load(self, index: int):
        image = _load_checked(self.image_paths[index])
        label = self.ground_truth(index)
        _check_size(self.label_paths[index], label, image)
        classes = np.unique(label)
        classes = classes[classes != self.ignore_label]
        if classes.size and (classes.min() < 0 or classes.max() >= self.meta.num_classes):
            raise DatasetError(
                f"{self.label_paths[index]}: class value {int(classes.max())} is not below "
                f"the {self.meta.num_classes} classes (use {self.ignore_label} for ignore)"
            )
        masks = label[None] == classes[:, None, None]
        path = self.image_paths[index]
        return image, masks, classes.astype(np.int64), path.stem, path.name

    def ground_truth(self, index: int) -> np.ndarray:
        """(H, W) int64 class indices, `ignore_label` where ignored."""
        return read_label_png(self.label_paths[index])


# ---------------------------------------------------------------- layout detection


def _image_dir_for(json_path: Path, root: Path, first_file: str | None) -> Path:
    """Where a COCO json's images live: images/, the split folder named in the json's name, or root."""
    split = json_path.stem.split("_", 1)[-1]  # panoptic_val2017 -> val2017
    candidates = [root / "images", root / split, root.parent / split, root / "images" / split, root]
    # The json's own PNG folder (panoptic.json -> panoptic/) holds annotations, never the images, even when
    # its names match: a missing first image must not make the id maps pass for photos.
    candidates = [folder for folder in candidates if folder != json_path.with_suffix("")]
    for folder in candidates:
        if folder.is_dir() and (first_file is None or (folder / first_file).exists()):
            return folder
    existing = [folder for folder in candidates if folder.is_dir() and folder != root]
    if existing:  # the first image is missing: loading it will name it
        return existing[0]
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"{json_path}: cannot find its images (looked in {looked})")


def _dataset_from_json(json_path: Path, root: Path, task: str | None, transform, seed) -> _MaskDataset:
    data = _read_json(json_path)
    annotations = data.get("annotations") or []
    first = data["images"][0]["file_name"] if data.get("images") else None
    image_dir = _image_dir_for(json_path, root, first)
    first_annotation = annotations[0] if annotations else {}
    is_panoptic = "segments_info" in first_annotation or json_path.stem.startswith("panoptic")
    if is_panoptic:
        if task == "semantic" and (root / "semantic").is_dir():
            meta = meta_from_categories(data["categories"], root.name)
            return SemanticFolderDataset(
                image_dir, root / "semantic", meta=meta, transform=transform, seed=seed
            )
        panoptic_dir = json_path.with_suffix("")
        if not panoptic_dir.is_dir():
            panoptic_dir = root / "panoptic"
        if not panoptic_dir.is_dir():
            raise DatasetError(
                f"{json_path}: no folder of panoptic PNGs next to it ({json_path.with_suffix('')})"
            )
        return CocoPanopticDataset(image_dir, json_path, panoptic_dir, transform=transform, seed=seed)
    return CocoInstanceDataset(image_dir, json_path, transform=transform, seed=seed)


def open_dataset(
    path: str | Path, task: str | None = None, transform: Transform | None = None, seed: int | None = None
) -> _MaskDataset:
    """Detect a dataset's layout and open it.

    Accepted: a COCO json file (panoptic or instances); a folder holding panoptic.json (our synthetic
    scenes; task="semantic" opens its semantic/ labels instead); a COCO folder with annotations/*.json
    (one, or the one matching `task`); a folder with images/ and labels/ (or semantic/) sub-folders.
    """
    path = Path(path)
    if path.is_file():
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        return _dataset_from_json(path, root, task, transform, seed)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    if (path / "panoptic.json").is_file():
        return _dataset_from_json(path / "panoptic.json", path, task, transform, seed)
    jsons = sorted((path / "annotations").glob("*.json")) if (path / "annotations").is_dir() else []
    jsons = jsons or sorted(path.glob("*.json"))
    if task is not None and len(jsons) > 1:
        wanted = "panoptic" if task in ("panoptic", "semantic") else "instances"
        jsons = [j for j in jsons if j.stem.startswith(wanted)] or jsons
    if len(jsons) == 1:
        return _dataset_from_json(jsons[0], path, task, transform, seed)
    if len(jsons) > 1:
        names = ", ".join(j.name for j in jsons)
        raise DatasetError(f"{path}: several annotation files ({names}); pass one of them")
    for labels in ("labels", "semantic", "annotations"):
        if (path / "images").is_dir() and (path / labels).is_dir():
            return SemanticFolderDataset(path / "images", path / labels, transform=transform, seed=seed)
    raise DatasetError(
        f"{path}: unknown dataset layout; expected panoptic.json, annotations/*.json, or images/ + labels/"
    )
