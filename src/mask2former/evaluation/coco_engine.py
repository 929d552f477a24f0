"""The COCOeval that computes mask AP: hotcoco (Rust, same numbers, ~25x faster) when it is installed, else
pycocotools, the reference.

Both engines take the same COCO instances dict and results and give the same `stats` (COCOeval.stats) and
`precision` array; tests/test_eval_engines.py holds hotcoco to pycocotools on every figure. Which one runs
is `engine="auto"` (hotcoco if it imports), or named. Input checking stays in instance.py: this module only
runs an engine on data that is already valid.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ENGINES = ("auto", "hotcoco", "pycocotools")


@dataclass
class CocoEvalOutput:
    """stats: (12,) COCOeval.stats; precision: (T, R, K, A, M) as COCOeval.eval["precision"]; category_ids:
    the K categories in that order; engine: the one that ran."""

    stats: np.ndarray
    precision: np.ndarray
    category_ids: list
    engine: str


def _import(engine: str):
    """(COCO, COCOeval, mask API) of `engine` ("hotcoco" or "pycocotools"); ImportError if not installed."""
    if engine == "hotcoco":
        import hotcoco

        return hotcoco.COCO, hotcoco.COCOeval, hotcoco.mask
    from pycocotools import mask as mask_api
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval, mask_api


def available(engine: str) -> bool:
    """Whether "hotcoco" or "pycocotools" imports."""
    try:
        _import(engine)
    except ImportError:
        return False
    return True


def resolve_engine(engine: str = "auto") -> str:
    """The engine that `engine` runs: "auto" is hotcoco if it imports, else pycocotools.

    ModuleNotFoundError with an install hint when neither (or the named one) is installed.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    for candidate in ("hotcoco", "pycocotools") if engine == "auto" else (engine,):
        if available(candidate):
            return candidate
    wanted = "pycocotools or hotcoco" if engine == "auto" else engine
    raise ModuleNotFoundError(
        f"mask AP needs {wanted}: pip install 'mask2former[eval]' (hotcoco, or pycocotools as the fallback)"
    )


def mask_api(engine: str = "auto"):
    """The engine's pycocotools.mask-compatible module (frPyObjects, merge, area, ...)."""
    return _import(resolve_engine(engine))[2]


def to_rle(mask_functions, segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE, as COCO.annToRLE."""
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_functions.merge(mask_functions.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_functions.frPyObjects(segmentation, height, width)
    return segmentation


def _quiet(verbose: bool):
    """COCO and COCOeval print progress on stdout; keep it only when verbose."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def prepared_ground_truth(gt: Mapping[str, Any], engine: str) -> dict:
    """A copy of gt that both engines read alike: annotations get "id", "iscrowd" 0 and their mask "area"
    when missing. Annotation dicts are copied (COCOeval writes into them); the caller's gt is untouched.
    hotcoco only reads them: where nothing is missing, it gets the caller's annotations as they are."""
    annotations = gt["annotations"]
    if engine == "hotcoco" and all(["id" in a and "iscrowd" in a and "area" in a for a in annotations]):
        return {**gt, "annotations": list(annotations)}
    sizes = {image["id"]: (int(image["height"]), int(image["width"])) for image in gt["images"]}
    annotations, functions = [], None
    for annotation_id, annotation in enumerate(gt["annotations"], start=1):
        annotation = dict(annotation)
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("id", annotation_id)
        if "area" not in annotation:
            functions = functions or mask_api(engine)
            rle = to_rle(functions, annotation["segmentation"], *sizes[annotation["image_id"]])
            annotation["area"] = float(functions.area(rle))
        annotations.append(annotation)
    return {**gt, "annotations": annotations}


def run_segm_eval(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[Hashable] | None = None,
    engine: str = "auto",
    verbose: bool = False,
) -> CocoEvalOutput:
    """COCOeval(iouType="segm") of `results` (non-empty, compressed RLE, no "bbox") against `gt` (as returned
    by prepared_ground_truth). image_ids: the images scored (default: all of gt's)."""
    engine = resolve_engine(engine)
    COCO, COCOeval, _ = _import(engine)
    with _quiet(verbose):
        if engine == "hotcoco":  # reads the dicts into Rust; leaves them alone
            coco_gt = COCO(dict(gt))
            coco_dt = coco_gt.load_res(list(results))
        else:
            coco_gt = COCO()
            coco_gt.dataset = dict(gt)
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, "segm")
        if image_ids is not None:
            params = evaluator.params
            params.imgIds = sorted(image_ids)
            evaluator.params = params  # hotcoco hands out a copy of its params
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return CocoEvalOutput(
        stats=np.asarray(evaluator.stats, dtype=np.float64),
        precision=np.asarray(evaluator.eval["precision"], dtype=np.float64),
        category_ids=list(evaluator.params.catIds),
        engine=engine,
    )
