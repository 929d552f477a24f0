"""The engine that computes PQ from COCO panoptic files: hotcoco (Rust, ~2.5x faster) when it is installed,
else our own (files.py: PanopticPairReader + PanopticEvaluator), "reference".

files.evaluate_panoptic_files checks both JSONs and finds every ground-truth image's prediction (by image_id,
else by PNG name) before either engine reads a PNG. hotcoco then gives {category id: (tp, fp, fn, IoU sum)},
which PanopticEvaluator.add_totals turns into the same compute() dict as our engine; the statistics are the
panopticapi rules' (TP/FP/FN identical, IoU sums added in another order: PQ equal to ~1e-13), held to them by
tests/test_eval_engines.py.

hotcoco checks the predictions as panopticapi does (every PNG id listed, every listed id in the PNG, known
categories, equal sizes) and follows panopticapi on the ground truth: a segment's area is the JSON's "area"
where given, a listed segment absent from the PNG is a false negative, an id in the PNG but not listed is
ignored. Our engine refuses a ground-truth JSON whose segments disagree with its PNG instead (a listed segment
absent from the PNG, an unlisted id, an "area" that is not the segment's pixel count), so where it gives
figures they are panopticapi's. Its errors become one-line EvaluationErrors naming the PNG, the JSON and the
image id.

Threads: hotcoco runs on rayon's global pool of RAYON_NUM_THREADS threads (default: every core), read once,
when a process first uses it; it has no other setting (`mask2former eval --workers` sets the variable).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mask2former.evaluation import EvaluationError, coco_engine

if TYPE_CHECKING:
    from mask2former.evaluation.files import PanopticImage

ENGINES = ("auto", "hotcoco", "reference")

_IMAGE_MESSAGE = re.compile(r"image (\d+): (.+)")  # how hotcoco names the image of a problem


def resolve_engine(engine: str = "auto") -> str:
    """The engine that `engine` runs: "auto" is hotcoco if it imports, else "reference" (ours).

    ValueError for an unknown name; ModuleNotFoundError with an install hint for "hotcoco" without it.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "reference":
        return engine
    if coco_engine.available("hotcoco"):
        return "hotcoco"
    if engine == "hotcoco":
        raise ModuleNotFoundError(
            "PQ through hotcoco needs hotcoco: pip install 'mask2former[eval]' (or use engine 'reference')"
        )
    return "reference"


def hotcoco_totals(
    images: Sequence[PanopticImage],
    categories: list[dict],
    pred_annotations: list[dict],
    paths: tuple[Path, Path, Path, Path],
) -> dict[int, tuple[int, int, int, float]]:
    """{category id: (tp, fp, fn, IoU sum)} of hotcoco over `images` (every ground-truth image with its
    prediction). paths: (pred_json, pred_dir, gt_json, gt_dir).

    The JSON files go to hotcoco by path when it pairs them as we did (integer image ids everywhere, every
    prediction found by its image_id): that is the fastest. Otherwise, or when hotcoco cannot parse a file,
    it gets the checked annotations and categories as dicts, image ids replaced by positions.
    """
    from hotcoco import panoptic

    pred_json, pred_dir, gt_json, gt_dir = paths
    if _paired_by_image_id(images, pred_annotations):
        try:
            return _run(panoptic, str(gt_json), str(pred_json), gt_dir, pred_dir)
        except (ValueError, OSError) as error:
            message = str(error)
            if str(gt_json) not in message and str(pred_json) not in message:  # not about the JSON files
                keys = {image.image_id: i for i, image in enumerate(images)}
                raise _named(error, images, keys, paths) from None
    gt = {
        "annotations": [{**image.gt, "image_id": i} for i, image in enumerate(images)],
        "categories": categories,
    }
    pred = {"annotations": [{**image.pred, "image_id": i} for i, image in enumerate(images)]}
    try:
        return _run(panoptic, gt, pred, gt_dir, pred_dir)
    except (ValueError, OSError) as error:
        raise _named(error, images, {i: i for i in range(len(images))}, paths) from None


def _paired_by_image_id(images: Sequence[PanopticImage], pred_annotations: list[dict]) -> bool:
    """Whether hotcoco, which reads every annotation's image_id as an unsigned integer and pairs by it, finds
    the predictions we found."""
    ids = [image.image_id for image in images] + [a.get("image_id") for a in pred_annotations]
    return all(type(i) is int and 0 <= i < 2**63 for i in ids) and all(
        image.pred.get("image_id") == image.image_id for image in images
    )


def _run(panoptic: Any, gt: Any, pred: Any, gt_dir: Path, pred_dir: Path) -> dict:
    evaluation = panoptic.PanopticEval(gt, pred, gt_folder=str(gt_dir), pred_folder=str(pred_dir))
    evaluation.evaluate()  # the PNGs, on rayon's threads; prints nothing (summarize() would)
    per_class = evaluation.results()["per_class"]
    return {int(c): (row["tp"], row["fp"], row["fn"], row["iou"]) for c, row in per_class.items()}


def _named(
    error: Exception, images: Sequence[PanopticImage], keys: dict, paths: tuple[Path, Path, Path, Path]
) -> EvaluationError:
    """hotcoco's error as one line naming the files: its "image N: ..." (N as hotcoco saw it, `keys` maps it
    to a position in images) names both PNGs, the prediction JSON and the image id; a PNG path it names
    gets its image id; a JSON it could not read is named as such."""
    pred_json, _, gt_json, _ = paths
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else type(error).__name__
    match = _IMAGE_MESSAGE.fullmatch(message)
    if match and int(match[1]) in keys:
        image = images[keys[int(match[1])]]
        return EvaluationError(
            f"{image.pred_png} (image_id {image.image_id}, segments_info in {pred_json.name}; "
            f"ground truth {image.gt_png}): {match[2]}"
        )
    for image in images:
        for png in (image.pred_png, image.gt_png):
            if str(png) in message:
                return EvaluationError(
                    f"{png} (image_id {image.image_id}): {message.replace(' ' + str(png), '')}"
                )
    for path, name in ((gt_json, "gt"), (pred_json, "pred")):
        if str(path) in message or message.startswith(name + " "):
            return EvaluationError(f"{path}: hotcoco cannot read it ({message})")
    return EvaluationError(f"{pred_json}: hotcoco: {message}")
