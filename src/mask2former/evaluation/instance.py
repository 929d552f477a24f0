"""COCO mask AP by COCOeval (iouType "segm"): hotcoco's when installed, else pycocotools', the reference
(coco_engine.py runs them; the same numbers either way).

Our masks become COCO compressed RLE with mask2former.rle (identical to pycocotools' encoding). As
detectron2's COCOEvaluator does, result boxes are dropped before loadRes: pycocotools would otherwise take
the box area for the small/medium/large split instead of the mask area.

The engine is imported on first use, so the rest of the package works without it.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from mask2former import collector, rle
from mask2former.data import coco_checks
from mask2former.evaluation import EvaluationError, coco_engine

if TYPE_CHECKING:
    from mask2former.results import InstanceResult

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def check_ground_truth(gt: Mapping[str, Any]) -> None:
    """Raise EvaluationError (one line) when gt is not a COCO instances dict COCOeval can use."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"ground truth has no '{key}' list (COCO instances format)")
    image_ids = set()
    for i, image in enumerate(gt["images"]):
        if not all(k in image for k in ("id", "height", "width")):
            raise EvaluationError(f"ground truth image {i} needs 'id', 'height' and 'width'")
        image_ids.add(image["id"])
    category_ids = {c.get("id") for c in gt["categories"]}
    annotations = gt["annotations"]
    try:  # the common case in whole-list passes (COCO val holds ~4 * 10^4 annotations)
        if {a["image_id"] for a in annotations} <= image_ids and {
            a["category_id"] for a in annotations
        } <= category_ids:
            if all(["segmentation" in a for a in annotations]):
                return
    except (KeyError, TypeError):  # a key missing, not a dict, an unhashable id: the loop names it
        pass
    for i, annotation in enumerate(annotations):
        if not all(k in annotation for k in ("image_id", "category_id", "segmentation")):
            raise EvaluationError(
                f"ground truth annotation {i} needs 'image_id', 'category_id' and 'segmentation'"
            )
        if annotation["image_id"] not in image_ids:
            raise EvaluationError(
                f"ground truth annotation {i}: image_id {annotation['image_id']} is not in images"
            )
        if annotation["category_id"] not in category_ids:
            raise EvaluationError(
                f"ground truth annotation {i}: category_id {annotation['category_id']} is not in categories"
            )


class InstanceEvaluator:
    """Collects COCO results (one dict per instance) and scores them against a COCO instances dict.

    gt: {"images": [{"id", "height", "width"}], "annotations": [{"id", "image_id", "category_id",
    "segmentation" (polygons or RLE), "iscrowd", "area"}], "categories": [{"id", "name"}]}.

    engine: "auto" (hotcoco if installed, else pycocotools), "hotcoco" or "pycocotools".
    """

    def __init__(self, gt: Mapping[str, Any], verbose: bool = False, engine: str = "auto"):
        check_ground_truth(gt)
        if engine not in coco_engine.ENGINES:
            raise ValueError(f"engine {engine!r}: expected one of {', '.join(coco_engine.ENGINES)}")
        self.gt = gt
        self.verbose = verbose
        self.engine = engine
        self.sizes = {image["id"]: (int(image["height"]), int(image["width"])) for image in gt["images"]}
        self.category_ids = {c["id"] for c in gt["categories"]}
        self.results: list[dict] = []
        self.image_ids: set[Hashable] = set()  # images given to update / update_coco

    def update(
        self, image_id: Hashable, result: InstanceResult, category_ids: Sequence[int] | None = None
    ) -> None:
        """Add one image's InstanceResult (masks (N, H, W) bool, classes (N,), scores (N,)); category_ids[c]
        maps the contiguous class c to the ground truth's category id (identity when None)."""
        masks = np.asarray(result.masks, dtype=bool)
        classes = np.asarray(result.classes, dtype=np.int64)
        if category_ids is not None:
            classes = np.asarray(category_ids, dtype=np.int64)[classes]
        self.update_coco(
            [
                {"image_id": image_id, "category_id": int(c), "segmentation": segmentation, "score": float(s)}
                for segmentation, c, s in zip(rle.encode(masks), classes, result.scores, strict=True)
            ]
        )
        self.image_ids.add(image_id)

    def update_coco(self, results: Sequence[Mapping[str, Any]]) -> None:
        """Add COCO results [{"image_id", "category_id", "segmentation" (RLE or polygons), "score"}]."""
        checked = self._checked_in_bulk(results)
        if checked is None:
            checked = self._checked_one_by_one(results)  # names the first bad result
        self.results.extend(checked)
        self.image_ids.update(result["image_id"] for result in checked)

    def _checked_in_bulk(self, results: Sequence[Any]) -> list[dict] | None:
        """_checked_one_by_one's output for the common case (dicts with a compressed RLE of the image's size,
        known ids, int or float scores), checked in whole-list passes (a COCO-val results file holds ~10^5);
        None when any result needs the general path. Results already in that form (those four keys, float
        scores, a {size, counts} RLE) are kept as they are, not copied: the engines only read them."""
        # Whole-list checks through map/set (C loops): 10^5 results cost ~0.1 s in a Python generator.
        fields = coco_checks.plain_fields(list(results), ("image_id", "category_id", "score", "segmentation"))
        if fields is None:
            return None
        image_ids, category_ids, scores, segmentations = fields
        try:
            if not (set(image_ids) <= self.sizes.keys() and set(category_ids) <= self.category_ids):
                return None
        except TypeError:  # an unhashable id
            return None
        sizes = {image_id: [height, width] for image_id, (height, width) in self.sizes.items()}
        score_types = set(map(type, scores))
        if not score_types <= {float, int} or set(map(type, segmentations)) != {dict}:
            return None
        if set(map(type, map(dict.get, segmentations, repeat("counts")))) != {str}:
            return None
        given_sizes = list(map(dict.get, segmentations, repeat("size")))
        if not all(map(operator.eq, given_sizes, map(sizes.__getitem__, image_ids))):
            return None
        if (
            score_types == {float}
            and set(map(len, results)) == {4}
            and set(map(len, segmentations)) == {2}
            and set(map(type, chain.from_iterable(given_sizes))) == {int}  # not 480.0, which equals 480
        ):
            return list(results)
        # Two dicts per result (the size list is shared per image: nothing writes into it), built with the
        # cyclic garbage collector paused: 10^5 new containers would otherwise set it walking the heap.
        with collector.paused():
            return [
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": {"size": sizes[image_id], "counts": segmentation["counts"]},
                    "score": float(score),
                }
                for image_id, category_id, segmentation, score in zip(
                    image_ids, category_ids, segmentations, scores, strict=True
                )
            ]

    def _checked_one_by_one(self, results: Sequence[Any]) -> list[dict]:
        checked = []
        for i, result in enumerate(results):
            if type(result) is not dict and not isinstance(result, Mapping):  # the fast test first
                raise EvaluationError(
                    f"result {i} is not an object with image_id, category_id, segmentation, score"
                )
            image_id = result.get("image_id")
            if image_id not in self.sizes:
                raise EvaluationError(f"result {i}: image_id {image_id!r} is not in the ground truth images")
            if result.get("category_id") not in self.category_ids:
                raise EvaluationError(
                    f"result {i} (image_id {image_id}): category_id {result.get('category_id')!r} is unknown"
                )
            if not isinstance(result.get("score"), (int, float)):
                raise EvaluationError(f"result {i} (image_id {image_id}): 'score' must be a number")
            segmentation = self._as_rle(
                result.get("segmentation"), self.sizes[image_id], f"result {i}", self.engine
            )
            # A copy without "bbox": loadRes would otherwise use box areas for APs/APm/APl (as detectron2).
            checked.append(
                {
                    "image_id": image_id,
                    "category_id": result["category_id"],
                    "segmentation": segmentation,
                    "score": float(result["score"]),
                }
            )
        return checked

    @staticmethod
    def _as_rle(segmentation: Any, size: tuple[int, int], where: str, engine: str) -> dict:
        if (  # the common case, a compressed RLE from a JSON file, without the general checks' cost
            type(segmentation) is dict
            and type(segmentation.get("counts")) is str
            and segmentation.get("size") == [size[0], size[1]]
        ):
            return {"size": [size[0], size[1]], "counts": segmentation["counts"]}
        if isinstance(segmentation, Mapping) and "counts" in segmentation and "size" in segmentation:
            if [int(v) for v in segmentation["size"]] != list(size):
                raise EvaluationError(
                    f"{where}: mask size {list(segmentation['size'])} differs from the image's {list(size)}"
                )
            if isinstance(segmentation["counts"], list):  # uncompressed RLE: compress as loadRes expects
                return rle.encode(rle.decode(segmentation))[0]
            return dict(segmentation)
        if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation) and segmentation:
            merged = coco_engine.to_rle(coco_engine.mask_api(engine), segmentation, *size)
            counts = merged["counts"]
            return {
                "size": list(size),
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
        raise EvaluationError(
            f"{where}: 'segmentation' must be an RLE {{size, counts}} or a list of polygons"
        )

    def merge(self, other: InstanceEvaluator) -> None:
        """Add the results collected by another evaluator (another process or shard)."""
        self.results.extend(other.results)
        self.image_ids |= other.image_ids

    def compute(self, image_ids: Sequence[Hashable] | None = None) -> dict:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl": percent (NaN where COCOeval gives -1, or when there is
        no result at all), "images", "per_class": {"<category id>": {"name", "AP"}}}.

        image_ids: the images to score (default: every ground-truth image, as COCOeval does).
        """
        engine = coco_engine.resolve_engine(self.engine)
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.gt["categories"]}
        n_images = len(image_ids) if image_ids is not None else len(self.gt["images"])
        if not self.results:
            empty = dict.fromkeys(METRICS, float("nan"))
            per_class = {str(k): {"name": v, "AP": float("nan")} for k, v in names.items()}
            return {**empty, "images": n_images, "per_class": per_class}

        def evaluate(engine: str):
            ground_truth = coco_engine.prepared_ground_truth(self.gt, engine)
            return coco_engine.run_segm_eval(ground_truth, self.results, image_ids, engine, self.verbose)

        try:
            output = evaluate(engine)
        except (ValueError, TypeError, OverflowError):
            # hotcoco is stricter than COCO (e.g. image ids must be integers); auto then takes the reference.
            if self.engine != "auto" or engine != "hotcoco" or not coco_engine.available("pycocotools"):
                raise
            engine = "pycocotools"
            output = evaluate(engine)
        stats = output.stats
        out: dict[str, Any] = {
            m: 100 * float(stats[i]) if stats[i] >= 0 else float("nan") for i, m in enumerate(METRICS)
        }
        # precision: (IoU thresholds, recall points, categories, area ranges, max dets); area "all", 100 dets.
        per_class = {}
        for k, category_id in enumerate(output.category_ids):
            values = output.precision[:, :, k, 0, -1]
            values = values[values > -1]
            ap = 100 * float(values.mean()) if values.size else float("nan")
            per_class[str(category_id)] = {"name": names.get(category_id, str(category_id)), "AP": ap}
        return {**out, "images": n_images, "per_class": per_class}


def coco_mask_ap(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], verbose: bool = False, engine: str = "auto"
) -> dict:
    """Mask AP of COCO results against a COCO instances dict (see InstanceEvaluator.compute)."""
    evaluator = InstanceEvaluator(gt, verbose=verbose, engine=engine)
    evaluator.update_coco(results)
    return evaluator.compute()
