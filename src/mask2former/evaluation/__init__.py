"""Evaluation that agrees with the reference tools: mIoU (detectron2's SemSegEvaluator), PQ (panopticapi's
pq_compute; from files, computed by hotcoco when installed: panoptic_engine.py) and mask AP (pycocotools'
COCOeval, computed by hotcoco when installed: coco_engine.py).

Every evaluator is an accumulator: `update(...)` per image, `merge(other)` to combine shards evaluated in
other processes, `compute() -> dict` of metrics in percent. `files` scores prediction files on disk, on
worker threads (`parallel.py`).
"""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad prediction or ground truth (a file, an id, a label): the message is one line naming it."""


# The submodules raise EvaluationError, so they are imported after it exists.
from mask2former.evaluation.instance import InstanceEvaluator  # noqa: E402
from mask2former.evaluation.panoptic import PanopticEvaluator  # noqa: E402
from mask2former.evaluation.semantic import SemanticEvaluator  # noqa: E402

__all__ = ["EvaluationError", "InstanceEvaluator", "PanopticEvaluator", "SemanticEvaluator"]
