"""The training loss (paper section 3.3): classification + point-sampled mask losses, with deep supervision.

For each decoder prediction (the final one and the 9 auxiliary ones, each with its own Hungarian matching):
- loss_ce: cross-entropy over K+1 classes; unmatched queries target no-object, whose weight is eos_coef;
- loss_mask, loss_dice: sigmoid BCE (mean over points) and dice, summed over matched masks, on `num_points`
  points per mask chosen by PointRend's importance sampling instead of the full-resolution mask: this is
  what cuts training memory ~3x (paper: 18 GB -> 6 GB).
Mask losses are divided by num_masks, the number of target segments in the global batch (mean over DDP
workers, at least 1). Auxiliary keys carry the suffix `_0` .. `_8`.

Distributed equivalence. Per-image point seeds (see matcher.py) make the sampled points independent of
how the batch is split. The class loss is the official weighted mean sum(w * nll) / sum(w), but the
denominator sum(w) is the global one (mean over workers, like num_masks): with one worker this is exactly
F.cross_entropy(weight=empty_weight); with several, averaging the workers' gradients gives the gradient of
the whole batch, which a per-worker denominator (the official code) does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.training import distributed as dist_utils
from mask2former.training.matcher import (
    LOSS_STREAM,
    HungarianMatcher,
    batch_target_size,
    image_generator,
    pad_target_masks,
    point_sample,
    random_point_coords,
)

DEFAULT_WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


@torch.no_grad()
def uncertain_point_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points for mask logits (M, 1, H, W) -> (M, num_points, 2), (x, y) in [0, 1].

    Draw oversample_ratio * P uniform points, keep the importance_sample_ratio * P most uncertain
    (uncertainty -|logit| of the bilinearly sampled logit: near the predicted boundary) and add uniform
    random points for the rest, so regions far from the boundary are still supervised.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1]")
    num_masks, device = mask_logits.shape[0], mask_logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = random_point_coords(num_masks, num_candidates, device, generator)
    # Uncertainty of the interpolated logit, not interpolated uncertainty: between logits -1 and +1 the
    # boundary (logit 0) is the most uncertain place, which interpolating -|logit| would miss.
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # (M, 3P)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    uniform = random_point_coords(num_masks, num_points - num_uncertain, device, generator)
    return torch.cat([chosen, uniform], dim=1)


def sigmoid_ce_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """BCE of (M, P) logits vs labels, mean over points, sum over masks, / num_masks."""
    loss = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice 1 - (2|m t| + 1) / (|m| + |t| + 1) of (M, P) logits vs labels, summed over masks, / num_masks."""
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over DDP workers (identity in a single process)."""
    if not dist_utils.is_distributed():
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / dist_utils.world_size()


class SetCriterion(nn.Module):
    """Mask2Former's loss: `forward` returns the unweighted losses, `total_loss` their weighted sum."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: dict[str, float] | None = None,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(num_points=num_points)
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        # Named as the official buffer so `criterion.empty_weight` in released checkpoints is recognisable.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # -- the three losses of one decoder prediction ----------------------------------------------------
    def loss_labels(
        self,
        pred_logits: torch.Tensor,
        targets: list[dict],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        class_weight_total: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted cross-entropy of pred_logits (B, Q, K+1); unmatched queries target class K (no-object)."""
        logits = pred_logits.float()
        device = logits.device
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices, strict=True)):
            labels = target["labels"].to(device)
            target_classes[b, pred_idx.to(device)] = labels[tgt_idx.to(device)]
        weight = self.empty_weight.to(logits.dtype)
        loss_sum = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight, reduction="sum")
        return loss_sum / class_weight_total

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        targets: list[dict],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
        layer: int,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """Point-sampled BCE and dice of the matched pairs; pred_masks (B, Q, H/4, W/4) mask logits."""
        size = batch_target_size(targets)
        point_logits, point_labels = [], []
        for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices, strict=True)):
            if len(pred_idx) == 0:
                continue
            # float32 so fp16 predictions are sampled at exact coordinates (autocast does so officially)
            masks = pred_masks[b, pred_idx.to(pred_masks.device)][:, None].float()  # (M, 1, H/4, W/4)
            image_gen = image_generator(target, LOSS_STREAM, layer, masks.device, generator)
            coords = uncertain_point_coords(
                masks.detach(),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                image_gen,
            )
            with torch.no_grad():
                # Each target is sampled at the points of its prediction: no (M, Hp, Wp) copy of the
                # targets (float32 targets are used in place; bool ones are converted once).
                target_masks = pad_target_masks(
                    target["masks"].to(device=masks.device, dtype=torch.float32), size
                )
                tgt_idx = tgt_idx.to(masks.device)
                target_coords = coords.new_zeros(len(target_masks), *coords.shape[1:])
                target_coords[tgt_idx] = coords
                labels = point_sample(target_masks[:, None], target_coords)[tgt_idx, 0]  # (M, P)
            point_logits.append(point_sample(masks, coords)[:, 0])
            point_labels.append(labels)
        if not point_logits:
            # No target in the batch: a zero that still depends on the masks, so DDP sees every mask
            # parameter used (its gradient is zero rather than missing).
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        point_logits, point_labels = torch.cat(point_logits), torch.cat(point_labels)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    # -- all decoder predictions -------------------------------------------------------------------------
    def normalizers(self, outputs: dict, targets: list[dict]) -> tuple[float, torch.Tensor]:
        """(num_masks, class_weight_total), each the mean over workers of the local value.

        num_masks = target segments in the batch, at least 1. class_weight_total = the sum of cross-entropy
        weights over all B*Q queries; every layer matches min(Q, N_i) queries per image to real classes
        (weight 1), so it is the same for every layer and one all_reduce serves all ten.
        """
        batch, queries = outputs["pred_logits"].shape[:2]
        device = outputs["pred_logits"].device
        num_targets = sum(len(t["labels"]) for t in targets)
        matched = sum(min(queries, len(t["labels"])) for t in targets)
        no_object = batch * queries - matched
        local = torch.tensor(
            [num_targets, matched + no_object * self.eos_coef], dtype=torch.float32, device=device
        )
        num_masks, class_weight_total = global_mean(local)
        return max(float(num_masks), 1.0), class_weight_total

    def forward(
        self, outputs: dict, targets: list[dict], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted losses of the final prediction and of every auxiliary one.

        outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), optional "aux_outputs": list of
        dicts with the same two keys}. targets: B dicts {"labels": (N_i,) int64, "masks": (N_i, Hp, Wp) float
        or bool, zero-padded to the padded image size, optional "point_seed": int}; N_i may be 0.
        Returns {"loss_ce", "loss_mask", "loss_dice"} and the same with suffix `_i` for aux output i.
        """
        aux_outputs = outputs.get("aux_outputs", [])
        num_masks, class_weight_total = self.normalizers(outputs, targets)
        # Seeds are per decoder prediction: aux i is prediction i, the final one comes last.
        layers = [(outputs, len(aux_outputs), "")] + [(aux, i, f"_{i}") for i, aux in enumerate(aux_outputs)]
        losses = {}
        for layer_outputs, layer, suffix in layers:
            indices = self.matcher(layer_outputs, targets, layer=layer, generator=generator)
            layer_losses = {
                "loss_ce": self.loss_labels(
                    layer_outputs["pred_logits"], targets, indices, class_weight_total
                )
            }
            layer_losses.update(
                self.loss_masks(layer_outputs["pred_masks"], targets, indices, num_masks, layer, generator)
            )
            losses.update({key + suffix: value for key, value in layer_losses.items()})
        return losses

    def weight_of(self, key: str) -> float:
        """The weight of a loss key; `loss_ce_3` falls back to the weight of `loss_ce`."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        base, _, index = key.rpartition("_")
        if index.isdigit() and base in self.weight_dict:
            return self.weight_dict[base]
        raise KeyError(f"SetCriterion: no weight for loss {key!r}; add it (or its base name) to weight_dict")

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: sum of weight * loss over every key of `forward`'s result."""
        return sum(self.weight_of(key) * value for key, value in losses.items())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, matcher={self.matcher!r}, weight_dict={self.weight_dict}, "
            f"eos_coef={self.eos_coef}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )
