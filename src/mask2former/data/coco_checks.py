"""Validation of COCO-style JSON (images, panoptic and instance annotations, results) where it is read.

The scorers and datasets trust what these functions let through: ids that are unique scalars, sizes that
are positive integers, segmentations that are well-formed polygons or RLEs of the image's size, finite
scores. A file that breaks one of those rules gives a silently wrong number (a duplicate image id halves
PQ, a NaN score shifts AP) or makes the reference decoders hang, so it is refused here with
`CocoFormatError`: one line naming the file and the id.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np

from mask2former import limits, rle


class CocoFormatError(ValueError):
    """A COCO JSON that breaks the format (one line naming the file and the id)."""


def is_id(value: Any) -> bool:
    """An image / annotation / category id: an integer or a string (never a list, a float or a bool)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def unique(ids: Iterable[Any], path: Path, what: str) -> None:
    seen = set()
    for value in ids:
        if value in seen:
            raise CocoFormatError(f"{path}: {what} {value!r} appears twice")
        seen.add(value)


def check_images(images: Any, path: Path, sizes_required: bool = True) -> dict:
    """The "images" list -> {image id: (height, width) or None}; ids unique, sizes positive integers."""
    if not isinstance(images, list):
        raise CocoFormatError(f"{path}: 'images' must be a list")
    sizes: dict = {}
    for i, image in enumerate(images):
        if not isinstance(image, Mapping) or not is_id(image.get("id")):
            raise CocoFormatError(f"{path}: image {i} needs an 'id' that is an integer or a string")
        image_id = image["id"]
        if image_id in sizes:
            raise CocoFormatError(f"{path}: image id {image_id!r} appears twice in 'images'")
        if "file_name" in image and not isinstance(image["file_name"], str):
            raise CocoFormatError(f"{path}: image {image_id!r}: 'file_name' must be a string")
        height, width = image.get("height"), image.get("width")
        if height is None and width is None and not sizes_required:
            sizes[image_id] = None
            continue
        if not (is_int(height) and is_int(width) and height > 0 and width > 0):
            raise CocoFormatError(
                f"{path}: image {image_id!r}: height {height!r} and width {width!r} must be positive integers"
            )
        try:
            limits.IMAGE_PIXELS.check(int(height) * int(width), f"{path}: image {image_id!r}")
        except limits.LimitError as error:
            raise CocoFormatError(str(error)) from None
        sizes[image_id] = (int(height), int(width))
    return sizes


def check_categories(categories: Any, path: Path) -> set:
    """The "categories" list -> its ids (integers, unique)."""
    if not isinstance(categories, list) or not categories:
        raise CocoFormatError(f"{path}: no 'categories' list")
    ids = []
    for i, category in enumerate(categories):
        if not isinstance(category, Mapping) or not is_int(category.get("id")):
            raise CocoFormatError(f"{path}: category {i} needs an integer 'id'")
        ids.append(category["id"])
    unique(ids, path, "category id")
    return set(ids)


def check_panoptic_annotations(annotations: Any, path: Path, category_ids: set | None = None) -> None:
    """COCO panoptic "annotations": unique scalar image ids, a PNG name, segments with unique positive ids."""
    if not isinstance(annotations, list):
        raise CocoFormatError(f"{path}: no 'annotations' list (COCO panoptic format)")
    image_ids = []
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping):
            raise CocoFormatError(f"{path}: annotation {i} is not an object")
        if "image_id" in annotation:
            if not is_id(annotation["image_id"]):
                raise CocoFormatError(
                    f"{path}: annotation {i}: image_id {annotation['image_id']!r} is not an integer or string"
                )
            image_ids.append(annotation["image_id"])
        segments = annotation.get("segments_info")
        if not isinstance(annotation.get("file_name"), str) or not isinstance(segments, list):
            where = f"{path}: image_id {annotation.get('image_id', i)!r}"
            if not isinstance(annotation.get("file_name"), str):
                raise CocoFormatError(f"{where}: the annotation needs a 'file_name' string")
            raise CocoFormatError(f"{where}: the annotation needs a 'segments_info' list")
        if not _plain_segments(segments, category_ids):
            where = f"{path}: image_id {annotation.get('image_id', i)!r}"
            for segment in segments:
                _check_segment(segment, where, category_ids)
        segment_ids = [s["id"] for s in segments]
        if len(set(segment_ids)) != len(segment_ids):  # the loop names the first repeated id
            unique(segment_ids, path, f"image_id {annotation.get('image_id', i)!r}: segment id")
    unique(image_ids, path, "image_id")


def _plain_segments(segments: list, category_ids: set | None) -> bool:
    """Whether every segment passes _check_segment as a plain JSON dict does: the common case, tested
    without a call per segment (a file of COCO val's size has ~100k); the others get _check_segment's
    message."""
    try:
        return all(
            [
                type(s) is dict
                and type(s["id"]) is int
                and s["id"] > 0
                and type(s["category_id"]) is int
                and (category_ids is None or s["category_id"] in category_ids)
                and s.get("iscrowd", 0) in (0, 1)
                for s in segments
            ]
        )
    except KeyError:
        return False


def _check_segment(segment: Any, where: str, category_ids: set | None) -> None:
    if not isinstance(segment, Mapping) or not is_int(segment.get("id")) or segment["id"] <= 0:
        raise CocoFormatError(f"{where}: every segment needs a positive integer 'id'")
    if not is_int(segment.get("category_id")):
        raise CocoFormatError(f"{where}: segment {segment['id']}: 'category_id' must be an integer")
    if category_ids is not None and segment["category_id"] not in category_ids:
        raise CocoFormatError(
            f"{where}: segment {segment['id']}: category_id {segment['category_id']} is not in categories"
        )
    if segment.get("iscrowd", 0) not in (0, 1):
        raise CocoFormatError(f"{where}: segment {segment['id']}: 'iscrowd' must be 0 or 1")


def check_segmentation(segmentation: Any, size: tuple[int, int] | None, where: str) -> None:
    """Polygons [[x0, y0, x1, y1, ...], ...] (finite, even length >= 6) or an RLE of the image's size."""
    if isinstance(segmentation, Mapping):
        try:
            rle.check(dict(segmentation), size)
        except ValueError as error:
            raise CocoFormatError(f"{where}: {error}") from None
        return
    if not isinstance(segmentation, list) or not segmentation:
        raise CocoFormatError(
            f"{where}: 'segmentation' must be an RLE {{size, counts}} or a list of polygons"
        )
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            length = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
            raise CocoFormatError(
                f"{where}: a polygon must list x, y pairs of at least 3 points (got {length} values)"
            )
        if not all(is_number(v) and math.isfinite(v) for v in polygon):
            raise CocoFormatError(f"{where}: polygon coordinates must be finite numbers")


def check_instance_annotations(
    annotations: Any, path: Path, sizes: Mapping, category_ids: set, required: bool = True
) -> None:
    """COCO instances "annotations": unique ids, known images and categories, valid segmentations."""
    if annotations is None and not required:
        return
    if not isinstance(annotations, list):
        raise CocoFormatError(f"{path}: no 'annotations' list (COCO instances format)")
    if _plain_instance_annotations(annotations, sizes, category_ids):
        return
    ids = []
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping):
            raise CocoFormatError(f"{path}: annotation {i} is not an object")
        if "id" in annotation:
            if not is_id(annotation["id"]):
                raise CocoFormatError(f"{path}: annotation {i}: id {annotation['id']!r} is not an integer")
            ids.append(annotation["id"])
        where = f"{path}: annotation {annotation.get('id', i)!r}"
        image_id = annotation.get("image_id")
        if not is_id(image_id) or image_id not in sizes:  # sizes[id] is None when images give none
            raise CocoFormatError(f"{where}: image_id {image_id!r} is not in images")
        if annotation.get("category_id") not in category_ids or not is_int(annotation.get("category_id")):
            raise CocoFormatError(
                f"{where}: category_id {annotation.get('category_id')!r} is not in categories"
            )
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise CocoFormatError(f"{where}: 'iscrowd' must be 0 or 1")
        if "area" in annotation and not (is_number(annotation["area"]) and math.isfinite(annotation["area"])):
            raise CocoFormatError(f"{where}: 'area' must be a finite number")
        check_segmentation(annotation.get("segmentation"), sizes[image_id], where)
    unique(ids, path, "annotation id")


def check_results(results: Any, path: Path, sizes: Mapping, category_ids: set) -> None:
    """COCO results [{"image_id", "category_id", "segmentation", "score"}]: known ids, finite scores."""
    if not isinstance(results, list):
        raise CocoFormatError(f"{path}: expected a list of COCO results")
    if _plain_results(results, sizes, category_ids):
        return
    for i, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise CocoFormatError(f"{path}: result {i} is not an object")
        image_id = result.get("image_id")
        if not is_id(image_id):
            raise CocoFormatError(f"{path}: result {i}: image_id {image_id!r} is not an integer or string")
        if image_id not in sizes:
            raise CocoFormatError(
                f"{path}: result {i}: image_id {image_id!r} is not in the ground truth images"
            )
        where = f"{path}: result {i} (image_id {image_id!r})"
        if not is_int(result.get("category_id")) or result["category_id"] not in category_ids:
            raise CocoFormatError(f"{where}: category_id {result.get('category_id')!r} is unknown")
        score = result.get("score")
        if not is_number(score) or not math.isfinite(score):
            raise CocoFormatError(f"{where}: score {score!r} must be a finite number")
        check_segmentation(result.get("segmentation"), sizes[image_id], where)


# Whole-list versions of the checks above for the common case (plain JSON dicts, compressed RLEs of the
# image's size, flat polygons): the same verdict in map/set and numpy passes, where the loops cost ~50 us per
# mask (a COCO-val results file holds ~10^5). Each returns False when anything needs a closer look; the loop
# then names the first problem (or accepts what only the loop's rules allow, such as tuple sizes).


def plain_fields(items: Any, keys: tuple[str, ...]) -> list[list] | None:
    """[[item[key] for item in items] for key in keys] when items is a non-empty list of plain dicts that all
    have those keys, in map passes; else None."""
    if not isinstance(items, list) or not items or set(map(type, items)) != {dict}:
        return None
    try:
        return [list(map(operator.itemgetter(key), items)) for key in keys]
    except KeyError:
        return None


def _plain_results(results: list, sizes: Mapping, category_ids: set) -> bool:
    fields = plain_fields(results, ("image_id", "category_id", "score", "segmentation"))
    if fields is None:
        return False
    image_ids, categories, scores, segmentations = fields
    if not (set(map(type, image_ids)) <= {int, str} and set(image_ids) <= sizes.keys()):
        return False
    if set(map(type, categories)) != {int} or not set(categories) <= category_ids:
        return False
    if not (set(map(type, scores)) <= {int, float} and _finite(scores)):
        return False
    return _plain_rles(segmentations, image_ids, sizes)


def _plain_instance_annotations(annotations: list, sizes: Mapping, category_ids: set) -> bool:
    fields = plain_fields(annotations, ("image_id", "category_id", "segmentation"))
    if fields is None:
        return False
    image_ids, categories, segmentations = fields
    ids = [a["id"] for a in annotations if "id" in a]
    if not set(map(type, ids)) <= {int, str} or len(set(ids)) != len(ids):
        return False
    if not (set(map(type, image_ids)) <= {int, str} and set(image_ids) <= sizes.keys()):
        return False
    if set(map(type, categories)) != {int} or not set(categories) <= category_ids:
        return False
    crowd = list(map(dict.get, annotations, repeat("iscrowd"), repeat(0)))
    if not set(map(type, crowd)) <= {int, bool, float} or not set(crowd) <= {0, 1}:  # as `in (0, 1)`
        return False
    areas = [a["area"] for a in annotations if "area" in a]
    if not (set(map(type, areas)) <= {int, float} and _finite(areas)):
        return False
    polygons = [(s, i) for s, i in zip(segmentations, image_ids, strict=True) if type(s) is list]
    masks = [(s, i) for s, i in zip(segmentations, image_ids, strict=True) if type(s) is not list]
    if not _plain_polygons([s for s, _ in polygons]):
        return False
    compressed = [(s, i) for s, i in masks if type(s) is dict and type(s.get("counts")) is str]
    for segmentation, image_id in masks:  # uncompressed RLEs (crowds) and the rest: one at a time
        if not (type(segmentation) is dict and type(segmentation.get("counts")) is str):
            try:
                check_segmentation(segmentation, sizes[image_id], "")
            except CocoFormatError:
                return False
    return _plain_rles([s for s, _ in compressed], [i for _, i in compressed], sizes)


def _finite(values: list) -> bool:
    try:
        return bool(np.isfinite(np.array(values, dtype=np.float64)).all())
    except OverflowError:  # an integer beyond float range
        return False


def _plain_polygons(segmentations: list[list]) -> bool:
    """Every segmentation a non-empty list of polygons of an even number (>= 6) of finite numbers."""
    if not all(segmentations):
        return False
    polygons = list(chain.from_iterable(segmentations))
    if polygons and set(map(type, polygons)) != {list}:
        return False
    lengths = np.fromiter(map(len, polygons), dtype=np.int64, count=len(polygons))
    if ((lengths < 6) | (lengths % 2 == 1)).any():
        return False
    coordinates = list(chain.from_iterable(polygons))
    return set(map(type, coordinates)) <= {int, float} and _finite(coordinates)


def _plain_rles(segmentations: list, image_ids: list, sizes: Mapping) -> bool:
    """Every segmentation a dict whose "size" is its image's [height, width] (integers) and whose "counts"
    string is a valid compressed RLE of that many pixels (rle.strings_valid, on the cores)."""
    if not segmentations:
        return True
    if set(map(type, segmentations)) != {dict}:
        return False
    counts = list(map(dict.get, segmentations, repeat("counts")))
    if set(map(type, counts)) != {str}:
        return False
    if any(size is None for size in sizes.values()):
        return False
    expected = {image_id: [int(h), int(w)] for image_id, (h, w) in sizes.items()}
    given = list(map(dict.get, segmentations, repeat("size")))
    if not all(map(operator.eq, given, map(expected.__getitem__, image_ids))):
        return False
    if set(map(type, chain.from_iterable(given))) != {int}:  # not 480.0, which equals 480
        return False
    pixels = {image_id: h * w for image_id, (h, w) in expected.items()}
    from mask2former.evaluation.parallel import default_workers

    return rle.strings_valid(
        counts,
        np.fromiter(map(pixels.__getitem__, image_ids), dtype=np.int64, count=len(image_ids)),
        workers=default_workers(),
    )
