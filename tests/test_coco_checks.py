"""data/coco_checks.py: the whole-list checks give the per-item loops' verdicts (and the loops name the file,
the id and the problem)."""

import copy
from pathlib import Path

import numpy as np
import pytest

from mask2former import rle
from mask2former.data import coco_checks

PATH = Path("results.json")
SIZES = {1: (6, 5), 2: (4, 7), "a": (3, 3)}
CATEGORIES = {1, 2, 5}


def _results() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for image_id, (h, w) in SIZES.items():
        for category in (1, 5):
            counts = rle.encode(rng.random((h, w)) < 0.4)[0]["counts"]
            out.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": {"size": [h, w], "counts": counts},
                    "score": float(rng.random()),
                }
            )
    return out


def _annotations() -> list[dict]:
    annotations = [{**r, "id": i + 1, "iscrowd": 0, "area": 3.0} for i, r in enumerate(_results())]
    for a in annotations:
        a.pop("score")
    annotations[0]["segmentation"] = [[0, 0, 4, 0, 4, 3.5], [1, 1, 2, 1, 2, 2]]  # polygons
    annotations[1] |= {"iscrowd": 1, "segmentation": {"size": [6, 5], "counts": [3, 27]}}  # uncompressed
    return annotations


def _counts(index: int, value) -> callable:
    return lambda items: items[index]["segmentation"].update(counts=value)


RESULT_BREAKS = {
    "unknown image": (lambda r: r[2].update(image_id=9), "result 2: image_id 9 is not in the ground truth"),
    "bool category": (lambda r: r[0].update(category_id=True), "category_id True is unknown"),
    "unknown category": (lambda r: r[3].update(category_id=3), "category_id 3 is unknown"),
    "nan score": (lambda r: r[1].update(score=float("nan")), "score nan must be a finite number"),
    "string score": (lambda r: r[1].update(score="0.5"), "score '0.5' must be a finite number"),
    "short counts": (_counts(4, "1"), "RLE counts sum to 1"),
    "truncated counts": (_counts(4, "1P"), "truncated"),
    "bad character": (_counts(5, "1~"), "outside the compressed alphabet"),
    "over 32 bits": (_counts(0, "ooooooo1"), "more than 32 bits"),
    "wrong size": (lambda r: r[0]["segmentation"].update(size=[5, 6]), "differs from the image's"),
    "float size": (lambda r: r[0]["segmentation"].update(size=[6.0, 5]), "is not [height, width]"),
    "no score": (lambda r: r[0].pop("score"), "score None must be a finite number"),
    "not a dict": (lambda r: r.__setitem__(2, [1]), "result 2 is not an object"),
}


def test_plain_results_pass_both_ways():
    results = _results()
    assert coco_checks._plain_results(results, SIZES, CATEGORIES)
    coco_checks.check_results(results, PATH, SIZES, CATEGORIES)
    # what only the loop allows (a tuple size) is accepted by it, not by the whole-list pass
    results[0]["segmentation"]["size"] = (6, 5)
    assert not coco_checks._plain_results(results, SIZES, CATEGORIES)
    coco_checks.check_results(results, PATH, SIZES, CATEGORIES)


ANNOTATION_BREAKS = {
    "duplicate id": (lambda a: a[3].update(id=1), "annotation id 1 appears twice"),
    "crowd 2": (lambda a: a[2].update(iscrowd=2), "'iscrowd' must be 0 or 1"),
    "crowd as a list": (lambda a: a[2].update(iscrowd=[1]), "'iscrowd' must be 0 or 1"),
    "infinite area": (lambda a: a[2].update(area=float("inf")), "'area' must be a finite number"),
    "odd polygon": (lambda a: a[0]["segmentation"][1].pop(), "a polygon must list x, y pairs"),
    "nan polygon": (lambda a: a[0]["segmentation"][0].__setitem__(2, float("nan")), "finite numbers"),
    "empty polygons": (lambda a: a[0].update(segmentation=[]), "'segmentation' must be an RLE"),
    "short uncompressed": (lambda a: a[1]["segmentation"].update(counts=[3, 2]), "RLE counts sum to 5"),
    "short compressed": (_counts(2, "1"), "RLE counts sum to 1"),
    "unknown image": (lambda a: a[4].update(image_id=0), "image_id 0 is not in images"),
}


def test_plain_annotations_pass_both_ways():
    annotations = _annotations()
    assert coco_checks._plain_instance_annotations(annotations, SIZES, CATEGORIES)
    coco_checks.check_instance_annotations(annotations, PATH, SIZES, CATEGORIES)


CHECKS = {
    "results": (_results, RESULT_BREAKS, coco_checks._plain_results, coco_checks.check_results),
    "annotations": (
        _annotations,
        ANNOTATION_BREAKS,
        coco_checks._plain_instance_annotations,
        coco_checks.check_instance_annotations,
    ),
}


@pytest.mark.parametrize(
    ("kind", "case"), [(kind, case) for kind, check in CHECKS.items() for case in check[1]]
)
def test_broken_items_fail_the_whole_list_pass_and_the_loop_names_them(kind, case):
    make, breaks, plain, check = CHECKS[kind]
    items = copy.deepcopy(make())
    breaking, message = breaks[case]
    breaking(items)
    assert not plain(items, SIZES, CATEGORIES)
    with pytest.raises(coco_checks.CocoFormatError, match="results.json: ") as caught:
        check(items, PATH, SIZES, CATEGORIES)
    assert message in str(caught.value)
