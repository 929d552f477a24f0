"""Panoptic quality (PQ = SQ x RQ) with the rules of panopticapi's pq_compute, without its per-segment loops.

Rules (panopticapi/evaluation.py, pq_compute_single_core):
- a ground-truth and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels that fall on VOID (id 0) ground truth; matches are unique at IoU > 0.5;
- ground-truth crowd segments never match and are never false negatives;
- an unmatched predicted segment is not a false positive when more than half of it lies on VOID plus the
  crowd region of its own category (the last crowd segment of that category in segments_info);
- PQ, SQ, RQ are averaged over the categories with tp + fp + fn > 0 (all, things, stuff).

Per image, a few whole-array passes cut the raster into runs of one (ground truth, prediction) id pair,
and one np.bincount over the runs gives every intersection at once: no loop over segments or pixels, and
the pixel work does not grow with the number of segments.
Statistics are kept per category (tp, fp, fn, IoU sum), so shards evaluated apart merge exactly (counts)
or up to float rounding of the IoU sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mask2former.evaluation import EvaluationError

if TYPE_CHECKING:
    from mask2former.results import PanopticResult


def _field(segment: Any, key: str, default: Any = None) -> Any:
    """A segment is a COCO segments_info dict or an object with the same attributes (PanopticSegment)."""
    if isinstance(segment, Mapping):
        return segment.get(key, default)
    return getattr(segment, key, default)


def _segment_fields(segments: Sequence[Any], where: str) -> tuple[list, list, list]:
    """(ids, category ids, crowd flags) of segments_info dicts or of PanopticSegment-like objects."""
    try:  # the common case, COCO dicts, without a Python call per field
        return (
            [s["id"] for s in segments],
            [s["category_id"] for s in segments],
            [s.get("iscrowd", 0) for s in segments],
        )
    except (TypeError, KeyError, AttributeError):
        pass
    for i, segment in enumerate(segments):
        if _field(segment, "id") is None or _field(segment, "category_id") is None:
            raise EvaluationError(f"{where}: segment {i} of segments_info has no 'id' or no 'category_id'")
    return (
        [_field(s, "id") for s in segments],
        [_field(s, "category_id") for s in segments],
        [_field(s, "iscrowd", 0) for s in segments],
    )


def _check_areas(segments: Sequence[Any], sorted_ids: np.ndarray, pixels: np.ndarray, where: str) -> None:
    """Each segment whose segments_info entry gives an 'area' must cover that many pixels of the map
    (pixels (S,) in sorted_ids order): panopticapi scores ground truth with the JSON's areas, this code with
    the map's, so a disagreement would give other figures."""
    for segment in segments:
        area = _field(segment, "area")
        if area is None:
            continue
        segment_id = _field(segment, "id")
        counted = int(pixels[np.searchsorted(sorted_ids, segment_id)])
        if area != counted:
            raise EvaluationError(
                f"{where}: segment id {segment_id} has area {area} in segments_info but covers {counted} "
                "pixels of the id map"
            )


class _Segments:
    """One image's segments sorted by id: ids (S,), category indices (S,), crowd flags (S,)."""

    def __init__(self, segments: Sequence[Any], categories: _CategoryLookup, where: str):
        segment_ids, category_ids, crowd = _segment_fields(segments, where)
        try:
            ids = np.array(segment_ids, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise EvaluationError(f"{where}: segment ids must be integers") from None
        if ids.size and ids.min() <= 0:
            raise EvaluationError(f"{where}: segment id {int(ids.min())} in segments_info (ids must be >= 1)")
        category_index = categories.index(category_ids, ids, where)
        crowd = np.array(crowd, dtype=bool).reshape(-1)
        order = np.argsort(ids, kind="stable")
        self.ids, self.categories, self.crowd = ids[order], category_index[order], crowd[order]
        duplicate = np.flatnonzero(self.ids[1:] == self.ids[:-1])
        if duplicate.size:
            raise EvaluationError(
                f"{where}: segment id {int(self.ids[duplicate[0]])} appears twice in segments_info"
            )
        # panopticapi keeps one crowd segment per category in a dict filled in segments_info order, so the
        # last one wins; here, the sorted positions of the crowd segments in their original order.
        self.crowd_in_order = np.argsort(order)[crowd].tolist() if crowd.any() else []


class _CategoryLookup:
    """Category id -> position in the evaluator's category list, for whole arrays at once."""

    def __init__(self, category_ids: np.ndarray):
        self.order = np.argsort(category_ids)
        self.sorted = category_ids[self.order]

    def index(self, category_ids: list, segment_ids: np.ndarray, where: str) -> np.ndarray:
        """(S,) positions of category_ids; an id not in the list raises, naming its segment."""
        try:
            values = np.array(category_ids, dtype=np.int64).reshape(-1)
            position = np.minimum(np.searchsorted(self.sorted, values), self.sorted.size - 1)
            known = self.sorted[position] == values
        except (TypeError, ValueError, OverflowError):  # not integers: unknown as well
            position, known = None, np.zeros(len(category_ids), dtype=bool)
        if not known.all():
            i = int(np.argmin(known))
            raise EvaluationError(
                f"{where}: segment id {segment_ids[i]} has category_id {category_ids[i]}, "
                "unknown to the categories"
            )
        return self.order[position]


def _runs(gt_flat: np.ndarray, pred_flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of one (ground truth, prediction) id pair along the raster: (gt ids, pred ids, lengths).

    Segments are large regions, so an image has far fewer runs than pixels: three cheap passes over the
    pixels find the run starts, and everything after works on runs.
    """
    change = np.empty(gt_flat.size - 1, dtype=bool)
    scratch = np.empty(gt_flat.size - 1, dtype=bool)
    np.not_equal(gt_flat[1:], gt_flat[:-1], out=change)
    np.not_equal(pred_flat[1:], pred_flat[:-1], out=scratch)
    np.logical_or(change, scratch, out=change)
    starts = np.flatnonzero(change)
    starts += 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(starts, append=gt_flat.size)
    return gt_flat[starts], pred_flat[starts], lengths


def _compact(values: np.ndarray, ids: np.ndarray, where: str) -> np.ndarray:
    """Segment ids (R,) -> (R,) int64: 0 for VOID, k for ids[k - 1] (ids sorted, >= 1). Unknown ids raise."""
    with_void = np.concatenate(([0], ids))
    position = np.searchsorted(with_void, values)
    known = with_void[np.minimum(position, ids.size)] == values
    if not known.all():
        value = int(values[np.argmin(known)])
        problem = "negative" if value < 0 else "in the id map but not in segments_info"
        raise EvaluationError(f"{where}: segment id {value} is {problem}")
    return position


@dataclass
class ImageStatistics:
    """One image's overlaps, before they are added: hist (Sg + 1, Sp + 1) pixel counts of every (ground
    truth, prediction) segment pair, index 0 = VOID; the segments of both, sorted by id."""

    hist: np.ndarray
    gt: _Segments
    pred: _Segments


class PanopticEvaluator:
    """Accumulates panopticapi's per-category statistics over images.

    categories: [{"id", "name", "isthing"}] as in a COCO panoptic JSON; segment category_ids are these ids.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]):
        if not categories:
            raise ValueError("categories is empty")
        self.categories = [dict(c) for c in categories]
        self.category_ids = np.array([int(c["id"]) for c in categories], dtype=np.int64)
        self.isthing = np.array([bool(c.get("isthing", 0)) for c in categories], dtype=bool)
        if np.unique(self.category_ids).size != self.category_ids.size:
            raise ValueError("categories: the same id appears twice")
        self._lookup = _CategoryLookup(self.category_ids)
        k = len(categories)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.iou = np.zeros(k, dtype=np.float64)  # sum of the IoUs of the matched pairs
        self.images = 0

    def update(
        self,
        pred_ids: np.ndarray,
        pred_segments: Sequence[Any],
        gt_ids: np.ndarray,
        gt_segments: Sequence[Any],
        *,
        strict: bool = False,
        where: tuple[str, str] = ("prediction", "ground truth"),
    ) -> None:
        """Add one image.

        pred_ids, gt_ids: (H, W) integer segment ids, 0 = VOID. pred_segments, gt_segments: COCO
        segments_info dicts ({"id", "category_id", "iscrowd" (ground truth, default 0)}) or PanopticSegment.
        A segment absent from its map is ignored for predictions and a false negative for ground truth,
        as in panopticapi; strict=True rejects it instead (a JSON that disagrees with its PNG).
        where: names of the prediction and the ground truth in error messages.
        """
        self.add_image(
            self.image_statistics(pred_ids, pred_segments, gt_ids, gt_segments, strict=strict, where=where)
        )

    def image_statistics(
        self,
        pred_ids: np.ndarray,
        pred_segments: Sequence[Any],
        gt_ids: np.ndarray,
        gt_segments: Sequence[Any],
        *,
        strict: bool = False,
        where: tuple[str, str] = ("prediction", "ground truth"),
    ) -> ImageStatistics:
        """The pixel work of update (same arguments), without adding it: it only reads the categories, so
        threads may run it on several images at once; add_image then adds the results in image order (the
        IoU sums then equal one pass's bit for bit)."""
        pred_ids, gt_ids = np.asarray(pred_ids), np.asarray(gt_ids)
        for ids, name in ((pred_ids, where[0]), (gt_ids, where[1])):
            if ids.ndim != 2 or ids.dtype.kind not in "iu":
                raise EvaluationError(
                    f"{name}: expected an (H, W) integer id map, got {ids.dtype} {ids.shape}"
                )
        if pred_ids.shape != gt_ids.shape:
            raise EvaluationError(
                f"{where[0]}: id map shape {pred_ids.shape} differs from {where[1]} shape {gt_ids.shape}"
            )
        if gt_ids.size:
            gt_runs, pred_runs, lengths = _runs(gt_ids.ravel(), pred_ids.ravel())
        else:
            gt_runs = pred_runs = lengths = np.zeros(0, dtype=np.int64)
        return self.pair_statistics(
            gt_runs, pred_runs, lengths, pred_segments, gt_segments, strict=strict, where=where
        )

    def pair_statistics(
        self,
        gt_ids: np.ndarray,
        pred_ids: np.ndarray,
        pixels: np.ndarray,
        pred_segments: Sequence[Any],
        gt_segments: Sequence[Any],
        *,
        strict: bool = False,
        where: tuple[str, str] = ("prediction", "ground truth"),
    ) -> ImageStatistics:
        """image_statistics of an image given as pixel counts instead of maps: gt_ids, pred_ids, pixels
        (R,) say that `pixels[r]` pixels have ground-truth id gt_ids[r] and predicted id pred_ids[r]; a
        pair may repeat (runs of a raster). The other arguments are image_statistics'."""
        pred = _Segments(pred_segments, self._lookup, where[0])
        gt = _Segments(gt_segments, self._lookup, where[1])
        n_pred = pred.ids.size + 1
        # hist[g, p]: pixels of ground-truth segment g and predicted segment p (index 0 = VOID).
        hist = np.zeros((gt.ids.size + 1, n_pred), dtype=np.int64)
        if len(gt_ids):
            combined = _compact(gt_ids, gt.ids, where[1]) * n_pred + _compact(pred_ids, pred.ids, where[0])
            # float64 weights count exactly up to 2**53 pixels
            hist += (
                np.bincount(combined, weights=pixels, minlength=hist.size)
                .astype(np.int64)
                .reshape(hist.shape)
            )
        if strict:
            gt_area, pred_area = hist[1:].sum(axis=1), hist[:, 1:].sum(axis=0)
            for area, segments, name in ((pred_area, pred, where[0]), (gt_area, gt, where[1])):
                if (area == 0).any():
                    missing = int(segments.ids[np.argmax(area == 0)])
                    raise EvaluationError(
                        f"{name}: segment id {missing} is in segments_info but not in the id map"
                    )
            _check_areas(gt_segments, gt.ids, gt_area, where[1])
        return ImageStatistics(hist, gt, pred)

    def add_image(self, statistics: ImageStatistics) -> None:
        """Add one image's image_statistics (made with this evaluator's categories)."""
        hist = statistics.hist
        gt_area, pred_area = hist[1:].sum(axis=1), hist[:, 1:].sum(axis=0)
        self._accumulate(hist, statistics.gt, statistics.pred, gt_area, pred_area)
        self.images += 1

    def _accumulate(
        self, hist: np.ndarray, gt: _Segments, pred: _Segments, gt_area: np.ndarray, pred_area: np.ndarray
    ) -> None:
        intersection = hist[1:, 1:]  # (Sg, Sp)
        pred_void = hist[0, 1:]  # predicted pixels on VOID ground truth
        union = gt_area[:, None] + pred_area[None, :] - intersection - pred_void[None, :]
        candidate = (intersection > 0) & (gt.categories[:, None] == pred.categories[None, :])
        candidate &= ~gt.crowd[:, None]
        # IoU > 0.5 in integers (2 * intersection > union) decides exactly what the float test decides.
        g, p = np.nonzero(candidate & (2 * intersection > union))  # row-major: panopticapi's pair order
        np.add.at(self.tp, gt.categories[g], 1)
        np.add.at(self.iou, gt.categories[g], intersection[g, p] / union[g, p])

        unmatched_gt = np.ones(gt.ids.size, dtype=bool)
        unmatched_gt[g] = False
        np.add.at(self.fn, gt.categories[unmatched_gt & ~gt.crowd], 1)

        crowd_of_category = np.full(len(self.categories), -1, dtype=np.int64)
        for index in gt.crowd_in_order:
            crowd_of_category[gt.categories[index]] = index
        crowd = crowd_of_category[pred.categories]  # (Sp,) crowd segment of each prediction's category
        on_crowd = np.zeros(pred.ids.size, dtype=np.int64)
        has_crowd = np.flatnonzero(crowd >= 0)
        on_crowd[has_crowd] = intersection[crowd[has_crowd], has_crowd]
        unmatched_pred = np.ones(pred.ids.size, dtype=bool)
        unmatched_pred[p] = False
        # Segments absent from the map (area 0) do not exist for panopticapi, whose areas come from the PNG.
        false_positive = unmatched_pred & (pred_area > 0) & (2 * (pred_void + on_crowd) <= pred_area)
        np.add.at(self.fp, pred.categories[false_positive], 1)

    def update_result(
        self,
        result: PanopticResult,
        gt_ids: np.ndarray,
        gt_segments: Sequence[Any],
        category_ids: Sequence[int] | None = None,
    ) -> None:
        """Add a model's PanopticResult; category_ids[c] maps its contiguous class c to a category id."""
        segments = [
            {
                "id": s.id,
                "category_id": s.category_id if category_ids is None else category_ids[s.category_id],
            }
            for s in result.segments
        ]
        self.update(result.id_map, segments, gt_ids, gt_segments)

    def merge(self, other: PanopticEvaluator) -> None:
        """Add the statistics of an evaluator that saw other images (another process or shard)."""
        if not np.array_equal(other.category_ids, self.category_ids):
            raise ValueError("cannot merge panoptic evaluators with different categories")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.images += other.images

    def add_totals(self, totals: Mapping[int, Sequence], images: int) -> None:
        """Add statistics another engine computed over `images` images (hotcoco, panoptic_engine.py):
        {category id: (tp, fp, fn, IoU sum)}; a category left out adds nothing, an unknown one raises."""
        position = {int(category_id): i for i, category_id in enumerate(self.category_ids)}
        for category_id, (tp, fp, fn, iou) in totals.items():
            if int(category_id) not in position:
                raise ValueError(f"category id {category_id} is not one of the evaluator's categories")
            i = position[int(category_id)]
            self.tp[i] += int(tp)
            self.fp[i] += int(fp)
            self.fn[i] += int(fn)
            self.iou[i] += float(iou)
        self.images += images

    def compute(self) -> dict:
        """{"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st": percent, "n", "n_th",
        "n_st": categories averaged, "images", "per_class": {"<category id>": {"name", "isthing", "PQ", "SQ",
        "RQ", "TP", "FP", "FN"}}}. A group without any evaluated category gets NaN (panopticapi fails)."""
        per_class, pq, sq, rq = {}, [], [], []
        for i, category in enumerate(self.categories):
            tp, fp, fn, iou = int(self.tp[i]), int(self.fp[i]), int(self.fn[i]), float(self.iou[i])
            denominator = tp + 0.5 * fp + 0.5 * fn
            if tp + fp + fn == 0:
                values = (0.0, 0.0, 0.0)
            else:
                values = (iou / denominator, iou / tp if tp else 0.0, tp / denominator)
            pq.append(values[0])
            sq.append(values[1])
            rq.append(values[2])
            per_class[str(self.category_ids[i])] = {
                "name": category.get("name", str(self.category_ids[i])),
                "isthing": bool(self.isthing[i]),
                "PQ": 100 * values[0],
                "SQ": 100 * values[1],
                "RQ": 100 * values[2],
                "TP": tp,
                "FP": fp,
                "FN": fn,
            }
        evaluated = (self.tp + self.fp + self.fn) > 0
        out: dict[str, Any] = {}
        for suffix, group in (
            ("", evaluated),
            ("_th", evaluated & self.isthing),
            ("_st", evaluated & ~self.isthing),
        ):
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                out[name + suffix] = 100 * _mean_in_order(
                    [v for v, keep in zip(values, group, strict=True) if keep]
                )
            out["n" + suffix] = int(group.sum())
        out["images"] = self.images
        out["per_class"] = per_class
        return out


def _mean_in_order(values: list[float]) -> float:
    """Sum left to right, as panopticapi does, so the figures agree to the last bit."""
    if not values:
        return float("nan")
    total = 0.0
    for value in values:
        total += value
    return total / len(values)
