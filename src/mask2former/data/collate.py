"""Batch dataset items for training: normalise, pad to a common size, keep targets per image.

Sampling is not done here: the trainer uses torch's DistributedSampler (or a plain shuffling sampler on
one process); items are deterministic per (seed, epoch, index) through the dataset's `seed`.
"""

from __future__ import annotations

import torch

from mask2former.config import PIXEL_MEAN, PIXEL_STD


def _round_up(value: int, multiple: int) -> int:
    return value if multiple <= 1 else (value + multiple - 1) // multiple * multiple


def collate(items: list[dict], size_divisibility: int = 32) -> dict:
    """Dataset items -> one batch.

    Returns {"images": float32 (B, 3, Hp, Wp) normalised with PIXEL_MEAN / PIXEL_STD, then padded
    bottom/right with zeros (as the official ImageList) to the largest H, W rounded up to a multiple of
    size_divisibility; "targets": per image {"labels": int64 (N,), "masks": bool (N, Hp, Wp), zero in the
    padding}; "image_sizes": [(h, w)] of the valid region; "image_ids"; "file_names"}.
    """
    if not items:
        raise ValueError("collate: empty list of items")
    heights = [int(item["image"].shape[-2]) for item in items]
    widths = [int(item["image"].shape[-1]) for item in items]
    padded_h = _round_up(max(heights), size_divisibility)
    padded_w = _round_up(max(widths), size_divisibility)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    images = torch.zeros((len(items), 3, padded_h, padded_w), dtype=torch.float32)
    targets = []
    for b, item in enumerate(items):
        h, w = heights[b], widths[b]
        images[b, :, :h, :w] = (item["image"].float() - mean) / std
        masks = torch.zeros((item["masks"].shape[0], padded_h, padded_w), dtype=torch.bool)
        masks[:, :h, :w] = item["masks"]
        targets.append({"labels": item["labels"].to(torch.int64), "masks": masks})
    return {
        "images": images,
        "targets": targets,
        "image_sizes": list(zip(heights, widths, strict=True)),
        "image_ids": [item.get("image_id") for item in items],
        "file_names": [item.get("file_name") for item in items],
    }
