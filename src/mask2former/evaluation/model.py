"""Run a Predictor over a dataset and score it, on one process or sharded over a torchrun group.

Rank r evaluates images r, r + N, r + 2N, ...; the accumulators' statistics (confusion matrix, per-category
TP/FP/FN/IoU sums, instance results) are gathered on rank 0 and merged, so the numbers equal one process's.
On every rank a scoring thread reads the ground truth and scores image i while the model runs image i + 1
(torch and numpy release the GIL), in order, so the figures are the same as scoring after each image.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from mask2former import rle
from mask2former.evaluation import EvaluationError
from mask2former.evaluation.instance import InstanceEvaluator
from mask2former.evaluation.panoptic import PanopticEvaluator
from mask2former.evaluation.parallel import BackgroundScorer
from mask2former.evaluation.semantic import SemanticEvaluator


def _instance_ground_truth(dataset, indices: range | list[int]) -> dict:
    """COCO instances dict for the whole dataset (image id = dataset index).

    A COCO instance dataset contributes its own annotations (crowds included); a panoptic dataset its
    thing segments, with crowd flags, as detectron2 derives instance ground truth from panoptic.
    """
    meta = dataset.meta
    images, annotations = [], []
    for index in indices:
        truth = dataset.ground_truth(index)
        if "annotations" in truth:  # COCO instances
            height, width = truth["height"], truth["width"]
            if height is None or width is None:
                height, width = dataset[index]["image"].shape[-2:]
            for ann in truth["annotations"]:
                annotations.append({**ann, "image_id": index, "id": len(annotations) + 1})
        elif "id_map" in truth:  # COCO panoptic
            id_map = truth["id_map"]
            height, width = id_map.shape
            things = {cid for cid, thing in zip(meta.category_ids, meta.thing_classes, strict=True) if thing}
            for segment in truth["segments_info"]:
                if segment["category_id"] not in things:
                    continue
                mask = id_map == segment["id"]
                if not mask.any():
                    continue
                encoded = rle.encode(mask)[0]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index,
                        "category_id": segment["category_id"],
                        "segmentation": encoded,
                        "area": int(mask.sum()),
                        "iscrowd": int(segment.get("iscrowd", 0)),
                        "bbox": [float(v) for v in rle.to_bbox([encoded])[0]],
                    }
                )
        else:
            raise EvaluationError("instance evaluation needs a COCO instance or COCO panoptic dataset")
        images.append({"id": index, "height": int(height), "width": int(width)})
    categories = [
        {"id": cid, "name": name, "isthing": int(thing)}
        for cid, name, thing in zip(meta.category_ids, meta.class_names, meta.thing_classes, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _semantic_truth(dataset, index: int) -> np.ndarray:
    if hasattr(dataset, "semantic_ground_truth"):
        return dataset.semantic_ground_truth(index)
    truth = dataset.ground_truth(index)
    if isinstance(truth, np.ndarray):
        return truth
    raise EvaluationError("semantic evaluation needs a semantic or COCO panoptic dataset")


def _check_classes(predictor, dataset) -> None:
    model_names, data_names = list(predictor.config.class_names), list(dataset.meta.class_names)
    if model_names != data_names:
        raise EvaluationError(
            f"the model's {len(model_names)} classes differ from the dataset's {len(data_names)} "
            f"(first model class {model_names[:1]}, first dataset class {data_names[:1]})"
        )


def evaluate_predictor(
    predictor,
    dataset,
    task: str,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    overlap: bool = True,
) -> dict | None:
    """Metrics of `predictor` on `dataset` for `task` (rank 0 returns them; other ranks return None).

    overlap: score on a background thread while the model runs the next image (False: score in turn).
    """
    from tqdm import tqdm

    _check_classes(predictor, dataset)
    meta = dataset.meta
    total = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, total, world_size))
    if task == "semantic":
        evaluator: Any = SemanticEvaluator(meta.num_classes, meta.ignore_label, meta.class_names)
    elif task == "panoptic":
        if not hasattr(dataset, "ground_truth") or "id_map" not in dataset.ground_truth(0):
            raise EvaluationError("panoptic evaluation needs a COCO panoptic dataset (panoptic.json + PNGs)")
        evaluator = PanopticEvaluator(
            [
                {"id": cid, "name": name, "isthing": int(thing)}
                for cid, name, thing in zip(
                    meta.category_ids, meta.class_names, meta.thing_classes, strict=True
                )
            ]
        )
    elif task == "instance":
        evaluator = InstanceEvaluator(_instance_ground_truth(dataset, range(total)))
    else:
        raise ValueError(f"unknown task {task!r}")

    def score(item: tuple) -> None:
        index, file_name, result = item
        where = (f"prediction for {file_name}", f"ground truth of {file_name}")
        if task == "semantic":
            evaluator.update(result.class_map, _semantic_truth(dataset, index), where=where)
        elif task == "panoptic":
            truth = dataset.ground_truth(index)
            evaluator.update_result(result, truth["id_map"], truth["segments_info"], meta.category_ids)
        else:
            evaluator.update(index, result, meta.category_ids)

    scorer = BackgroundScorer(score) if overlap else None
    try:
        for index in tqdm(mine, disable=not progress or rank != 0, unit="img", file=sys.stderr):
            item = dataset[index]
            image = item["image"].permute(1, 2, 0).numpy()
            # the official unthresholded list
            scored = (index, item["file_name"], predictor.predict(image, task, score_threshold=0.0))
            if scorer is not None:
                scorer.put(scored)
            else:
                score(scored)
        if scorer is not None:
            scorer.finish()
    finally:
        if scorer is not None:
            scorer.close()
    if world_size > 1:
        import torch.distributed as dist

        shards: list = [None] * world_size
        dist.all_gather_object(shards, evaluator)
        if rank != 0:
            return None
        evaluator = shards[0]
        for other in shards[1:]:
            evaluator.merge(other)
    if task == "instance":
        return evaluator.compute(image_ids=list(range(total)))
    return evaluator.compute()


def open_evaluation_dataset(data: str, task: str):
    """The dataset folder `data` opened for scoring `task` (ValueError naming `data` if it is none)."""
    from mask2former.data.datasets import DatasetError, open_dataset

    try:
        return open_dataset(data, task="semantic" if task == "semantic" else None)
    except (DatasetError, FileNotFoundError, ValueError) as error:
        raise ValueError(f"data {data}: {error}") from None


def evaluate_model(
    predictor,
    data,
    task: str,
    limit: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    log=print,
    name: str | None = None,
) -> dict | None:
    """Run `predictor` (a `mask2former.load(...)` Predictor) over `data` (a dataset folder, or one opened by
    `open_evaluation_dataset`, then `name` says what it is in the log line) and score it for `task`;
    returns the same dict as the file evaluation.

    Under torchrun the images are sharded over the processes and the statistics merged on rank 0, which
    returns the metrics; the other ranks return None. Errors (ValueError / EvaluationError) name `data`.
    """
    from mask2former.training import distributed

    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit}: must be at least 1")
    if isinstance(data, (str, os.PathLike)):
        dataset, name = open_evaluation_dataset(data, task), name or str(data)
    else:
        dataset, name = data, name or type(data).__name__
    rank, world_size = distributed.init_from_environment(device)
    if rank == 0:
        state = "trained" if predictor.trained else "RANDOMLY INITIALISED"
        inp = predictor.config.input
        scale = (
            f"short edge {inp.short_edge}" if inp.mode == "official" else "x".join(map(str, inp.size or ()))
        )
        log(f"evaluating {predictor.config.name} ({state}, {predictor.source}, {scale}) on {name} ({task})")
    try:
        return evaluate_predictor(predictor, dataset, task, limit, rank, world_size, progress)
    finally:
        distributed.cleanup()
