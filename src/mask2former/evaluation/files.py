"""Score prediction files that already exist (no model): COCO panoptic, semantic label PNGs, COCO results.

Every problem with a file is an EvaluationError whose one-line message names the file and the image or
segment id. The rules are the reference tools' (see panoptic.py, semantic.py, instance.py). PQ runs on
hotcoco when it is installed (panoptic_engine.py), else on our own engine ("reference": the PNG pairs read
on worker threads into PanopticEvaluator); every check that needs no PNG (both JSONs, duplicate ids, each
image's prediction) is ours, before either engine starts. Our engine adds one strictness: a ground-truth
JSON that disagrees with its PNG (a listed segment absent from it, an id in it not listed, an "area" that is
not the segment's pixel count) is an error, where panopticapi, and hotcoco with it, would count a false
negative, ignore the id or score with the JSON's area.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mask2former import collector, fileio
from mask2former.data import coco_checks
from mask2former.evaluation import EvaluationError, panoptic_engine
from mask2former.evaluation.instance import InstanceEvaluator
from mask2former.evaluation.panoptic import PanopticEvaluator
from mask2former.evaluation.panoptic_pairs import PanopticPairReader
from mask2former.evaluation.parallel import ordered_map
from mask2former.evaluation.semantic import SemanticEvaluator

PathLike = str | os.PathLike


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file, collector.paused():  # no cycles among parsed objects
            return json.load(file)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"{path}: cannot read ({error})") from None


def _open_png(path: Path, panoptic: bool) -> np.ndarray:
    try:
        # A panoptic PNG stores ids as colours; a label PNG (L, P, I;16) stores the labels themselves.
        return fileio.read_png(path, mode="RGB" if panoptic else None)
    except fileio.PngError as error:
        raise EvaluationError(str(error)) from None


def read_panoptic_ids(path: PathLike) -> np.ndarray:
    """COCO panoptic PNG -> (H, W) int32 segment ids, id = R + 256 G + 256^2 B (0 = VOID)."""
    rgb = fileio.decode_rgb8_png(Path(path))  # the common 8-bit RGB file, fast when imagecodecs is there
    return fileio.rgb2id(rgb if rgb is not None else _open_png(Path(path), panoptic=True))


def read_labels(path: PathLike) -> np.ndarray:
    """Single-channel label PNG (8 or 16 bit, or palette indices) -> (H, W) int array."""
    labels = _open_png(Path(path), panoptic=False)
    if labels.ndim != 2:
        raise EvaluationError(f"{path}: expected a single-channel label PNG, got shape {labels.shape}")
    return labels


def _annotations(obj: Any, path: Path) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        raise EvaluationError(f"{path}: no 'annotations' list (COCO panoptic format)")
    for i, annotation in enumerate(obj["annotations"]):
        if (
            not isinstance(annotation, dict)
            or "file_name" not in annotation
            or not isinstance(annotation.get("segments_info"), list)
        ):
            raise EvaluationError(f"{path}: annotation {i} needs 'file_name' and a 'segments_info' list")
    return obj["annotations"]


def _index_predictions(annotations: list[dict], path: Path) -> tuple[dict, dict]:
    """Predictions by image_id and by PNG stem (for predictions written without image ids)."""
    by_id: dict = {}
    by_stem: dict = {}
    for annotation in annotations:
        if "image_id" in annotation:
            if annotation["image_id"] in by_id:
                raise EvaluationError(
                    f"{path}: image_id {annotation['image_id']} appears twice in annotations"
                )
            by_id[annotation["image_id"]] = annotation
        by_stem[Path(annotation["file_name"]).stem] = annotation
    return by_id, by_stem


def _check_panoptic_files(gt: Any, gt_json: Path, predictions: Any, pred_json: Path) -> None:
    """The format checks of data.coco_checks on both JSONs, as EvaluationErrors (one line, file and id)."""
    try:
        category_ids = coco_checks.check_categories(gt.get("categories"), gt_json)
        if "images" in gt:
            coco_checks.check_images(gt["images"], gt_json, sizes_required=False)
        coco_checks.check_panoptic_annotations(gt.get("annotations"), gt_json, category_ids)
        names = [Path(a["file_name"]).name for a in gt["annotations"]]
        coco_checks.unique(names, gt_json, "file_name")
        if not isinstance(predictions, dict):
            raise coco_checks.CocoFormatError(f"{pred_json}: expected a COCO panoptic object")
        coco_checks.check_panoptic_annotations(predictions.get("annotations"), pred_json)
    except coco_checks.CocoFormatError as error:
        raise EvaluationError(str(error)) from None


@dataclass
class PanopticImage:
    """One ground-truth image and its prediction: COCO panoptic annotations and the paths of their PNGs."""

    image_id: Any
    gt: dict
    pred: dict
    gt_png: Path
    pred_png: Path


def evaluate_panoptic_files(
    pred_json: PathLike,
    pred_dir: PathLike,
    gt_json: PathLike,
    gt_dir: PathLike,
    progress: bool = False,
    workers: int | None = None,
    engine: str = "auto",
) -> dict:
    """PQ of COCO panoptic predictions (JSON + PNG folder) against COCO panoptic ground truth.

    Images are the ground truth's annotations; each finds its prediction by image_id, else by PNG name.
    Categories are the ground truth's. engine (panoptic_engine.py): "auto" (hotcoco if installed, else
    ours), "hotcoco" or "reference" (ours, which also refuses a ground-truth JSON that disagrees with its
    PNGs; hotcoco follows panopticapi there). Under "auto", files hotcoco refuses go to ours, which scores
    them or names the problem. workers: our engine's threads reading and comparing PNGs (default: the cores,
    at most 8; any number gives the same figures); hotcoco's are RAYON_NUM_THREADS. progress: a bar for
    our engine. Returns PanopticEvaluator.compute()'s dict.
    """
    chosen = panoptic_engine.resolve_engine(engine)
    pred_json, pred_dir, gt_json, gt_dir = Path(pred_json), Path(pred_dir), Path(gt_json), Path(gt_dir)
    gt = read_json(gt_json)
    gt_annotations = _annotations(gt, gt_json)
    if not isinstance(gt.get("categories"), list) or not gt["categories"]:
        raise EvaluationError(f"{gt_json}: no 'categories' list")
    predictions = read_json(pred_json)
    _check_panoptic_files(gt, gt_json, predictions, pred_json)
    pred_annotations = _annotations(predictions, pred_json)
    by_id, by_stem = _index_predictions(pred_annotations, pred_json)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: no such folder")
    try:
        evaluator = PanopticEvaluator(gt["categories"])
    except (KeyError, TypeError, ValueError) as error:
        raise EvaluationError(f"{gt_json}: bad 'categories' ({error})") from None
    images = [
        _panoptic_image(annotation, by_id, by_stem, pred_json, pred_dir, gt_json, gt_dir)
        for annotation in gt_annotations
    ]
    if chosen == "hotcoco" and images:
        paths = (pred_json, pred_dir, gt_json, gt_dir)
        try:
            totals = panoptic_engine.hotcoco_totals(images, gt["categories"], pred_annotations, paths)
        except EvaluationError:
            if engine != "auto":
                raise
        else:
            evaluator.add_totals(totals, len(images))
            return evaluator.compute()
    _add_panoptic_images(evaluator, images, pred_json, gt_json, progress, workers)
    return evaluator.compute()


def _add_panoptic_images(
    evaluator: PanopticEvaluator,
    images: list[PanopticImage],
    pred_json: Path,
    gt_json: Path,
    progress: bool,
    workers: int | None,
) -> None:
    """Our engine: PNG pairs read and compared on `workers` threads, added to evaluator in image order."""
    reader = PanopticPairReader()

    def statistics(image: PanopticImage):
        # Runs on a worker thread; a problem surfaces when its image's turn comes, so in image order.
        where = (
            f"{image.pred_png} (image_id {image.image_id}, segments_info in {pred_json.name})",
            f"{image.gt_png} (image_id {image.image_id}, segments_info in {gt_json.name})",
        )
        gt_ids, pred_ids, pixels = reader.read(image.pred_png, image.gt_png, where)
        return evaluator.pair_statistics(
            gt_ids,
            pred_ids,
            pixels,
            image.pred["segments_info"],
            image.gt["segments_info"],
            strict=True,
            where=where,
        )

    with tqdm(total=len(images), desc="panoptic", unit="image", disable=not progress) as bar:
        for image_statistics in ordered_map(statistics, images, workers):
            evaluator.add_image(image_statistics)  # in image order, on this thread
            bar.update()


def _panoptic_image(
    gt_annotation: dict,
    by_id: dict,
    by_stem: dict,
    pred_json: Path,
    pred_dir: Path,
    gt_json: Path,
    gt_dir: Path,
) -> PanopticImage:
    """A ground-truth image with its prediction (by image_id, else by PNG name); none is an error."""
    image_id = gt_annotation.get("image_id")
    pred_annotation = by_id.get(image_id) or by_stem.get(Path(gt_annotation["file_name"]).stem)
    if pred_annotation is None:
        raise EvaluationError(
            f"{pred_json}: no prediction for image_id {image_id} ({gt_annotation['file_name']} in {gt_json})"
        )
    return PanopticImage(
        image_id,
        gt_annotation,
        pred_annotation,
        gt_dir / gt_annotation["file_name"],
        pred_dir / pred_annotation["file_name"],
    )


def evaluate_semantic_files(
    pred_dir: PathLike,
    gt_dir: PathLike,
    num_classes: int,
    ignore_label: int = 255,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> dict:
    """mIoU & co. of label PNGs in pred_dir against the label PNGs of the same names in gt_dir.

    Labels are class indices 0..num_classes-1 or ignore_label. workers: threads reading the PNGs (default:
    the cores, at most 8). Returns SemanticEvaluator.compute()'s dict.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: no such folder")
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise EvaluationError(f"{gt_dir}: no .png label files")
    evaluator = SemanticEvaluator(num_classes, ignore_label, class_names)

    def read(gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise EvaluationError(f"{pred_path}: no such file (the prediction for {gt_path})")
        return read_labels(pred_path), read_labels(gt_path)

    with tqdm(total=len(gt_files), desc="semantic", unit="image", disable=not progress) as bar:
        for gt_path, (pred_labels, gt_labels) in zip(
            gt_files, ordered_map(read, gt_files, workers), strict=True
        ):
            evaluator.update(pred_labels, gt_labels, where=(str(pred_dir / gt_path.name), str(gt_path)))
            bar.update()
    warnings = _check_label_agreement(evaluator, pred_dir, gt_dir)
    return {**evaluator.compute(), **({"warnings": warnings} if warnings else {})}


def _check_label_agreement(evaluator: SemanticEvaluator, pred_dir: Path, gt_dir: Path) -> list[str]:
    """Refuse files where no scored pixel agrees, and warn where relabelling would make most pixels agree:
    that is two label conventions (dataset category ids vs contiguous indices, ADE20K's 1..150 vs
    0..149), not a model, and mIoU 0.00 would hide it. Returns the warnings."""
    k = evaluator.num_classes
    confusion = evaluator.confusion[:k, :k]
    total = int(confusion.sum())
    if total == 0:
        return []
    predicted = [int(c) for c in (confusion.sum(1) > 0).nonzero()[0]]
    truth = [int(c) for c in (confusion.sum(0) > 0).nonzero()[0]]
    convention = (
        "both must use one label convention, contiguous class indices 0..N-1 as `mask2former predict` writes"
    )
    if confusion.trace() == 0:
        raise EvaluationError(
            f"{pred_dir}: no pixel agrees with {gt_dir} (predicted labels {_few(predicted)}, ground truth "
            f"{_few(truth)}): {convention}"
        )
    best = int(confusion.max(1).sum())  # pixels right if each predicted label were renamed to its best match
    if best >= 0.9 * total and confusion.trace() <= 0.5 * best:
        pairs = [(int(p), int(confusion[p].argmax())) for p in predicted if confusion[p].argmax() != p]
        shown = ", ".join(f"{p}->{g}" for p, g in pairs[:6])
        return [f"{pred_dir}: the labels look renamed against {gt_dir} ({shown}): {convention}"]
    return []


def _few(values: list[int]) -> str:
    return "{" + ", ".join(map(str, values[:8])) + (", ...}" if len(values) > 8 else "}")


def evaluate_instance_files(
    pred_json: PathLike, gt_json: PathLike, verbose: bool = False, engine: str = "auto"
) -> dict:
    """COCO mask AP of a COCO results JSON against a COCO instances JSON (InstanceEvaluator.compute()).

    engine: the COCOeval that runs, "auto" (hotcoco if installed, else pycocotools), "hotcoco" or
    "pycocotools"; the figures are the same."""
    with collector.paused():  # the checks and the engine's copies: 10^5 results make millions of objects
        return _instance_files(Path(pred_json), Path(gt_json), verbose, engine)


def _instance_files(pred_json: Path, gt_json: Path, verbose: bool, engine: str) -> dict:
    gt = read_json(gt_json)
    if not isinstance(gt, dict):
        raise EvaluationError(f"{gt_json}: expected a COCO instances object")
    results = read_json(pred_json)
    try:
        sizes = coco_checks.check_images(gt.get("images"), gt_json)
        category_ids = coco_checks.check_categories(gt.get("categories"), gt_json)
        coco_checks.check_instance_annotations(gt.get("annotations"), gt_json, sizes, category_ids)
        coco_checks.check_results(results, pred_json, sizes, category_ids)
    except coco_checks.CocoFormatError as error:
        raise EvaluationError(str(error)) from None
    try:
        evaluator = InstanceEvaluator(gt, verbose=verbose, engine=engine)
    except EvaluationError as error:
        raise EvaluationError(f"{gt_json}: {error}") from None
    try:
        evaluator.update_coco(results)
    except EvaluationError as error:
        raise EvaluationError(f"{pred_json}: {error}") from None
    return evaluator.compute()
