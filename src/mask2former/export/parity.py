"""Parity of an exported graph with the eager model on a real image.

Both run on the same pre-processed tensor (pre-processed as the graph's config says: deploy resize at the
traced size for a fixed graph, the official resize for a dynamic one). Reported: max / mean absolute
difference of class logits and mask logits, and the share of pixels whose post-processed panoptic and
semantic labels agree (what a user of the results sees).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mask2former.config import ModelConfig
from mask2former.data.image_io import load_image
from mask2former.inference.postprocess import PostprocessSettings, postprocess
from mask2former.inference.preprocess import preprocess_for
from mask2former.results import PanopticResult

Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]
EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.jpg"


def panoptic_agreement(reference: PanopticResult, candidate: PanopticResult) -> float:
    """Share of pixels with the same category and the same segment in both id maps.

    Segment ids are numbered in query order, so one dropped segment renumbers the rest: each reference id
    is first mapped to the candidate id it overlaps most, and void (0) must match void.
    """
    ref_ids, cand_ids = reference.id_map.astype(np.int64), candidate.id_map.astype(np.int64)
    ref_cat = _category_map(reference)
    cand_cat = _category_map(candidate)
    pairs = ref_ids * (int(cand_ids.max()) + 1) + cand_ids
    values, counts = np.unique(pairs, return_counts=True)
    mapping: dict[int, tuple[int, int]] = {}  # reference id -> (candidate id, overlap)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        ref_id, cand_id = divmod(value, int(cand_ids.max()) + 1)
        if ref_id not in mapping or count > mapping[ref_id][1]:
            mapping[ref_id] = (cand_id, count)
    mapping[0] = (0, 0)
    lookup = np.zeros(int(ref_ids.max()) + 1, dtype=np.int64)
    for ref_id, (cand_id, _) in mapping.items():
        lookup[ref_id] = cand_id
    same = (lookup[ref_ids] == cand_ids) & (ref_cat == cand_cat)
    return float(same.mean())


def _category_map(result: PanopticResult) -> np.ndarray:
    """(H, W) contiguous category per pixel, -1 for void."""
    lookup = np.full(int(result.id_map.max()) + 1, -1, dtype=np.int64)
    for segment in result.segments:
        lookup[segment.id] = segment.category_id
    return lookup[result.id_map.astype(np.int64)]


def compare_outputs(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> dict:
    """Max and mean absolute differences of logits and masks (float32), plus the shapes compared."""
    report = {}
    for key, short in (("pred_logits", "logits"), ("pred_masks", "masks")):
        ref, cand = reference[key].float(), candidate[key].float()
        if ref.shape != cand.shape:
            raise ValueError(f"{key}: eager shape {tuple(ref.shape)} but graph shape {tuple(cand.shape)}")
        diff = (ref - cand).abs()
        report[f"max_abs_{short}"] = float(diff.max())
        report[f"mean_abs_{short}"] = float(diff.mean())
    # masked attention thresholds sigmoid(mask) at 0.5: the share of mask logits on the same side of 0
    same_side = (reference["pred_masks"] > 0) == (candidate["pred_masks"] > 0)
    report["mask_sign_agreement"] = float(same_side.float().mean())
    return report


def parity_report(
    eager: Runner, graph: Runner, config: ModelConfig, image: np.ndarray | str | Path | None = None
) -> dict:
    """Run both on `image` (default: the package's example photo) pre-processed by `config`.

    eager / graph: runners mapping (B, 3, H, W) float32 -> {"pred_logits", "pred_masks"}.
    """
    source = image if image is not None else EXAMPLE_IMAGE
    rgb = load_image(source) if not isinstance(source, np.ndarray) else source
    item = preprocess_for(config.input, rgb)
    with torch.inference_mode():
        reference = {k: v.float() for k, v in eager(item.tensor).items()}
    candidate = graph(item.tensor)
    report = {"image": str(source) if not isinstance(source, np.ndarray) else "array"}
    report["input_size"] = list(item.tensor.shape[-2:])
    report.update(compare_outputs(reference, candidate))
    agreement = {}
    for task in ("panoptic", "semantic"):
        if task == "panoptic" and not config.thing_classes:
            continue
        settings = PostprocessSettings.from_config(config, task)
        ref_result = postprocess(reference, 0, task, settings, item.geometry())
        cand_result = postprocess(candidate, 0, task, settings, item.geometry())
        if task == "panoptic":
            agreement[task] = panoptic_agreement(ref_result, cand_result)
            report["panoptic_segments"] = [len(ref_result.segments), len(cand_result.segments)]
        else:
            agreement[task] = float((ref_result.class_map == cand_result.class_map).mean())
    report.update({f"{task}_agreement": share for task, share in agreement.items()})
    return report


def format_report(report: dict) -> str:
    """One line per checked size: differences and label agreement."""
    height, width = report["input_size"]
    parts = [
        f"{height}x{width}",
        f"max|dlogits| {report['max_abs_logits']:.2e}",
        f"max|dmasks| {report['max_abs_masks']:.2e}",
        f"mask sign agreement {report['mask_sign_agreement']:.4%}",
    ]
    for task in ("panoptic", "semantic"):
        if f"{task}_agreement" in report:
            parts.append(f"{task} agreement {report[f'{task}_agreement']:.4%}")
    return ", ".join(parts)
