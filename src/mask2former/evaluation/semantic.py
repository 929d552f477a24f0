"""Semantic segmentation metrics from one confusion matrix, as detectron2's SemSegEvaluator computes them.

mIoU, fwIoU (IoU weighted by the ground-truth pixel share), pACC (pixel accuracy) and mACC (mean per-class
accuracy), all in percent. A class with no ground-truth pixel has no accuracy and no IoU (NaN) and is left
out of every mean, even when it was predicted: detectron2 uses `gt pixels > 0` as the validity test.

Pixels whose ground truth is the ignore label are not counted at all. A predicted ignore label (a pixel
the prediction leaves unlabelled) counts as a miss for the ground-truth class; detectron2 never sees one
because its predictions are an argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mask2former.evaluation import EvaluationError


def _check_labels(labels: np.ndarray, num_classes: int, ignore_label: int, what: str) -> None:
    """Raise EvaluationError naming the first value that is neither a class nor the ignore label."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_label)
    if bad.any():
        value = int(labels[bad].flat[0])
        raise EvaluationError(
            f"{what}: label {value} is neither a class (0..{num_classes - 1}) "
            f"nor the ignore label {ignore_label}"
        )


class SemanticEvaluator:
    """Accumulates a (K+1, K+1) confusion matrix over images.

    confusion[p, g] counts pixels predicted as class p with ground truth g; row K holds pixels the
    prediction left as the ignore label, column K pixels whose ground truth is the ignore label.
    """

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is also a class index (num_classes {num_classes})")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
        self.images = 0

    def _indices(self, labels: np.ndarray, what: str) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise EvaluationError(f"{what}: labels must be integers, got dtype {labels.dtype}")
        _check_labels(labels, self.num_classes, self.ignore_label, what)
        labels = labels.astype(np.int64, copy=False)
        return np.where(labels == self.ignore_label, self.num_classes, labels)

    def update(
        self, pred: np.ndarray, gt: np.ndarray, where: tuple[str, str] = ("prediction", "ground truth")
    ) -> None:
        """Add one image. pred, gt: (H, W) integer class maps (values 0..K-1 or the ignore label).

        where: names of the prediction and the ground truth in error messages (file names, say).
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        for labels, name in ((pred, where[0]), (gt, where[1])):
            if labels.ndim != 2:
                raise EvaluationError(f"{name}: expected an (H, W) label map, got shape {labels.shape}")
        if pred.shape != gt.shape:
            raise EvaluationError(f"{where[0]}: shape {pred.shape} differs from {where[1]} shape {gt.shape}")
        n = self.num_classes + 1
        index = self._indices(pred, where[0]).ravel() * n + self._indices(gt, where[1]).ravel()
        self.confusion += np.bincount(index, minlength=n * n).reshape(n, n)
        self.images += 1

    def merge(self, other: SemanticEvaluator) -> None:
        """Add the counts of an evaluator that saw other images (another process or shard)."""
        if (other.num_classes, other.ignore_label) != (self.num_classes, self.ignore_label):
            raise ValueError("cannot merge evaluators with different num_classes or ignore_label")
        self.confusion += other.confusion
        self.images += other.images

    def compute(self) -> dict:
        """{"mIoU", "fwIoU", "pACC", "mACC": percent, "images": int,
        "per_class": {"<index>": {"name", "IoU", "ACC"}}}; NaN for classes absent from the ground truth."""
        k = self.num_classes
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)[:k]
        gt_pixels = conf[:, :k].sum(axis=0)  # includes pixels the prediction left unlabelled
        pred_pixels = conf[:k, :k].sum(axis=1)  # predictions on ignored ground truth do not count
        valid = gt_pixels > 0
        union = gt_pixels + pred_pixels - tp
        acc = np.full(k, np.nan)
        iou = np.full(k, np.nan)
        acc[valid] = tp[valid] / gt_pixels[valid]
        iou[valid] = tp[valid] / union[valid]  # union >= gt pixels > 0
        total = gt_pixels.sum()
        weights = gt_pixels / max(total, 1.0)
        if total == 0:
            summary = dict.fromkeys(("mIoU", "fwIoU", "pACC", "mACC"), float("nan"))
        else:
            summary = {
                "mIoU": 100 * float(iou[valid].mean()),
                "fwIoU": 100 * float(np.sum(iou[valid] * weights[valid])),
                "pACC": 100 * float(tp.sum() / total),
                "mACC": 100 * float(acc[valid].mean()),
            }
        per_class = {
            str(c): {"name": self.class_names[c], "IoU": 100 * float(iou[c]), "ACC": 100 * float(acc[c])}
            for c in range(k)
        }
        return {**summary, "images": self.images, "per_class": per_class}
