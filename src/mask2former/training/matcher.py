"""Hungarian matching of predictions to ground-truth segments (paper section 3.3, DETR's bipartite matching).

Per image, the cost of pairing query q with target segment n is

    C[q, n] = cost_class * (-p_q(c_n)) + cost_mask * BCE(m_q, t_n) + cost_dice * Dice(m_q, t_n)

where p_q is the softmax over K+1 classes and the two mask terms are averaged over `num_points` points drawn
uniformly at random, the same points for every query and every target of that image (so no mask is ever
upsampled to the target size). The assignment minimising the summed cost is scipy's linear_sum_assignment.

Randomness. A target dict may carry `"point_seed"` (an int): the points of that image are then drawn from a
torch.Generator seeded with (point_seed, stream, layer), a pure function of the image and the decoder layer,
so one process with batch 2B and two DDP processes with batch B draw the same points for the same image.
Without a seed the points come from the `generator` argument, or from torch's global generator when that
is None too (the official behaviour).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mask2former.training.distributed import is_distributed

# Streams of the per-image generator: matching and the loss's importance sampling must not share points.
MATCHER_STREAM = 0
LOSS_STREAM = 1


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `input` (N, C, H, W) at `coords` (N, P, 2), (x, y) in [0, 1] -> (N, C, P).

    (0, 0) is the top-left corner of the top-left pixel, so pixel (i, j) has its centre at
    ((j + 0.5) / W, (i + 0.5) / H); outside the pixel centres values fade to the zero padding
    (grid_sample, align_corners=False), as detectron2's point_sample.
    """
    grid = (2.0 * coords.to(input.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2)
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def point_generator(seed: int, stream: int, layer: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device` determined by (seed, stream, layer) only."""
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, stream, layer]
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


def image_generator(
    target: dict, stream: int, layer: int, device: torch.device, fallback: torch.Generator | None
) -> torch.Generator | None:
    """The generator for one image: derived from its `point_seed` when present, else `fallback`."""
    seed = target.get("point_seed")
    if seed is None:
        return fallback
    return point_generator(int(seed), stream, layer, device)


def random_point_coords(
    num_masks: int, num_points: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform random points (num_masks, num_points, 2), (x, y) in [0, 1)."""
    return torch.rand(num_masks, num_points, 2, device=device, generator=generator)


def batch_target_size(targets: list[dict]) -> tuple[int, int]:
    """The largest (Hp, Wp) of the batch's target masks: the padded image size they all share."""
    return max(t["masks"].shape[-2] for t in targets), max(t["masks"].shape[-1] for t in targets)


def pad_target_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad target masks (N, h, w) at the bottom/right to `size`, so [0, 1] coordinates mean the
    same place in every image of the batch (the official code pads targets to the batch size too)."""
    pad_h, pad_w = size[0] - masks.shape[-2], size[1] - masks.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return masks
    return F.pad(masks, (0, pad_w, 0, pad_h))


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid binary cross-entropy of every prediction (Q, P) against every target (N, P) -> (Q, N).

    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), so the Q x N table is two matrix products
    instead of a (Q, N, P) tensor.
    """
    positive = F.softplus(-inputs)
    negative = F.softplus(inputs)
    return (positive @ targets.T + negative @ (1 - targets).T) / inputs.shape[1]


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2|m t| + 1) / (|m| + |t| + 1) of every prediction (Q, P) vs every target (N, P).

    Returns (Q, N).
    """
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher:
    """One-to-one assignment of Q queries to the N_i target segments of each image.

    Unmatched queries (Q - N_i of them when Q >= N_i) are supervised as no-object by the criterion.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ):
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0; make one > 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        target_masks: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The matching cost of one image, float32 (Q, N).

        logits (Q, K+1), masks (Q, H, W) mask logits, labels (N,) int64, target_masks (N, Hp, Wp) float,
        all on one device.
        """
        # fp16 logits would saturate softplus and the dice sums; the official code disables autocast too.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = logits.float().softmax(-1)
            # -p(class) rather than the NLL: bounded, so it cannot swamp the mask terms.
            cost_class = -probs[:, labels]

            coords = random_point_coords(1, self.num_points, masks.device, generator)
            # Masks as channels of a single image: one grid for all of them, the same points for all.
            point_logits = point_sample(masks.float()[None], coords)[0]  # (Q, P)
            point_targets = point_sample(target_masks[None], coords)[0]  # (N, P)
            cost_mask = batch_sigmoid_ce_cost(point_logits, point_targets)
            cost_dice = batch_dice_cost(point_logits, point_targets)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def __call__(
        self, outputs: dict, targets: list[dict], layer: int = 0, generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match one decoder layer's predictions to the targets.

        outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4)}.
        targets: B dicts {"labels": (N_i,) int64, "masks": (N_i, Hp, Wp), optional "point_seed": int}.
        layer: which decoder prediction this is (seeds differ per layer, as fresh draws do officially).
        Returns B pairs (pred_idx, tgt_idx), int64 CPU tensors of length min(Q, N_i), pred_idx ascending.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        size = batch_target_size(targets)
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if len(labels) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            image_gen = image_generator(target, MATCHER_STREAM, layer, pred_masks.device, generator)
            target_masks = target["masks"].to(device=pred_masks.device, dtype=torch.float32)
            cost = self.cost_matrix(
                pred_logits[b],
                pred_masks[b],
                labels.to(pred_logits.device),
                pad_target_masks(target_masks, size),
                image_gen,
            ).cpu()
            if not torch.isfinite(cost).all():
                if not is_distributed():
                    raise FloatingPointError(
                        f"HungarianMatcher: the matching cost of image {b} has NaN/inf: the predictions "
                        "diverged (lower the learning rate or check the inputs)"
                    )
                # Raising on this rank alone would leave the others waiting in the next all_reduce: match
                # on a finite stand-in; the non-finite loss then stops every rank together.
                cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64))
            )
        return indices

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )
