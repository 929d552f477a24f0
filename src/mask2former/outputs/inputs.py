"""The images of a `predict` run: their output names and the COCO image and category ids files carry.

Image ids are integers, so COCO tools (pycocotools `loadRes`, panopticapi, CVAT, FiftyOne) read the files
as they are. When the inputs belong to a COCO dataset (a ground-truth JSON is given, or the input is a
dataset folder) every image takes the ground truth's own id, found by file name, and classes take the
ground truth's category ids, found by class name; otherwise images are numbered 1..N in input order and
classes keep the model's category ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mask2former.data.catalog import DatasetMeta
from mask2former.data.image_io import ImageReadError, list_images

PathLike = str | os.PathLike


class InputError(ValueError):
    """Inputs or ground truth that cannot be used; one line naming the file (starts with the parameter)."""


@dataclass(frozen=True)
class InputImage:
    """One image of a run. Outputs are named by `stem`; `file_name` and `image_id` go into the JSON files."""

    index: int  # position in the run (shards and the journal are keyed by it)
    path: Path
    stem: str
    file_name: str
    image_id: int


@dataclass(frozen=True)
class GroundTruth:
    """The COCO JSON (panoptic or instances) the inputs belong to."""

    path: Path
    image_ids: dict[str, int]  # base file name -> image id
    categories: list[dict]


def read_ground_truth(path: PathLike) -> GroundTruth:
    """Images and categories of a COCO panoptic or instances JSON (InputError naming `gt_json`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"gt_json {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"gt_json {path}: not a readable JSON file ({error})") from None
    images, categories = (data.get(k) if isinstance(data, dict) else None for k in ("images", "categories"))
    if not isinstance(images, list) or not isinstance(categories, list):
        raise InputError(f"gt_json {path}: needs 'images' and 'categories' lists (COCO format)")
    image_ids: dict[str, int] = {}
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or "file_name" not in image:
            raise InputError(f"gt_json {path}: every image needs an integer 'id' and a 'file_name'")
        name = Path(str(image["file_name"])).name
        if name in image_ids:
            raise InputError(f"gt_json {path}: two images are named {name}")
        image_ids[name] = image["id"]
    for category in categories:
        if (
            not isinstance(category, dict)
            or not isinstance(category.get("id"), int)
            or "name" not in category
        ):
            raise InputError(f"gt_json {path}: every category needs an integer 'id' and a 'name'")
    return GroundTruth(path, image_ids, categories)


def _dataset_in(folder: Path):
    """The COCO dataset (or images/ + labels/ folder) a folder without images of its own holds, or None."""
    from mask2former.data.datasets import DatasetError, open_dataset

    if any(list_images_quietly(folder)):
        return None
    try:
        return open_dataset(folder)
    except (DatasetError, KeyError, IndexError, TypeError):
        return None


def list_images_quietly(folder: Path) -> list[Path]:
    try:
        return list_images([str(folder)])
    except ImageReadError:
        return []


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


def plan_inputs(
    inputs: Sequence[str], gt_json: PathLike | None = None
) -> tuple[list[InputImage], GroundTruth | None]:
    """Expand `inputs` (files, folders, globs, or one dataset folder) into the run's images with their ids.

    A folder that has no images of its own but is a dataset (`mask2former synth`'s output, a COCO folder
    with annotations/*.json) stands for the dataset's images, with its JSON as the ground truth.
    """
    folders = [Path(item) for item in inputs if Path(item).is_dir()]
    datasets = [(folder, _dataset_in(folder)) for folder in folders]
    datasets = [(folder, data) for folder, data in datasets if data is not None]
    gt = read_ground_truth(gt_json) if gt_json is not None else None
    if datasets:
        folder, dataset = datasets[0]
        if len(inputs) > 1:
            raise InputError(f"inputs: the dataset folder {folder} must be the only input")
        if hasattr(dataset, "json_path"):  # COCO: its images in the JSON's order, its ids
            paths = [Path(dataset.image_dir) / image["file_name"] for image in dataset.images]
            gt = gt or read_ground_truth(dataset.json_path)
        else:  # images/ + labels/: no ids of its own
            paths = list(dataset.image_paths)
    else:
        try:
            paths = list_images(list(inputs))
        except (ImageReadError, ValueError, FileNotFoundError) as error:
            raise InputError(f"inputs: {error}") from None
    if not paths:
        raise InputError(f"inputs: no images found in {' '.join(map(str, inputs))}")
    images = []
    for index, (path, stem) in enumerate(zip(paths, _unique_stems(paths), strict=True)):
        if gt is None:
            image_id = index + 1
        elif path.name in gt.image_ids:
            image_id = gt.image_ids[path.name]
        else:
            raise InputError(f"gt_json {gt.path}: has no image named {path.name} ({path})")
        images.append(InputImage(index, path, stem, path.name, image_id))
    return images, gt


def output_categories(meta: DatasetMeta, gt: GroundTruth | None, needed: Sequence[bool]) -> list[dict | None]:
    """Per model class, the COCO category written to files: {"id", "name", "isthing", "color"}.

    Without ground truth: the model's own ids. With it: the ground-truth category of the same name;
    `needed[k]` says whether the task can output class k, and a needed class the ground truth lacks is an
    InputError (a class it cannot output may be missing: its entry is None).
    """
    by_name = {str(c["name"]): c for c in gt.categories} if gt is not None else {}
    categories: list[dict | None] = []
    for k, name in enumerate(meta.class_names):
        entry = {
            "id": int(meta.category_ids[k]),
            "name": name,
            "isthing": int(meta.thing_classes[k]),
            "color": list(meta.colors[k]) if meta.colors else None,
        }
        if gt is not None:
            if name not in by_name:
                if needed[k]:
                    raise InputError(
                        f"gt_json {gt.path}: has no category named {name!r} (the model's class {k}); "
                        "the model's classes must be the dataset's"
                    )
                categories.append(None)
                continue
            entry["id"] = int(by_name[name]["id"])
        categories.append(entry)
    return categories


def digest(images: Sequence[InputImage]) -> str:
    """A fingerprint of the run's image list (paths, names and ids): a resumed run must have the same."""
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.path.resolve()}\t{image.stem}\t{image.file_name}\t{image.image_id}\n".encode())
    return h.hexdigest()
