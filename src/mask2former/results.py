"""Result types of inference, one per task, in original-image coordinates with contiguous class indices.

Everything above the model (post-processing, writers, pictures, evaluation, the server) speaks these types.
Index K of the logits is "no object"; classes are 0..K-1, mapped to dataset ids only when files are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SemanticResult:
    class_map: np.ndarray  # (H, W) int32 contiguous class index per pixel
    scores: torch.Tensor  # (K, H, W) float32 per-class score (sum over queries of p(c|q) * sigmoid(mask))


@dataclass
class PanopticSegment:
    id: int  # value of the segment in PanopticResult.id_map (>= 1)
    category_id: int  # contiguous class index
    isthing: bool
    score: float  # class probability of the (first) query that made the segment
    area: int  # pixels in id_map


@dataclass
class PanopticResult:
    id_map: np.ndarray  # (H, W) int32, 0 = void
    segments: list[PanopticSegment]


@dataclass
class InstanceResult:
    masks: np.ndarray  # (N, H, W) bool
    classes: np.ndarray  # (N,) int64 contiguous class index
    scores: np.ndarray  # (N,) float32, sorted in decreasing order
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels, exclusive max (x2 = last column + 1); zeros if empty


Result = SemanticResult | PanopticResult | InstanceResult
