"""The official optimiser: AdamW with parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.InstanceNorm2d,
)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float
) -> list[dict]:
    """One group per parameter with the official rules.

    lr x backbone_multiplier under `backbone`; weight decay 0 on every norm layer, on nn.Embedding weights
    (query_feat, query_embed, the decoder's level_embed) and on Swin's relative_position_bias_table. The
    pixel decoder's level_embed is a plain Parameter and keeps its decay, as in the official code.
    """
    groups: list[dict] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group_lr = lr * backbone_multiplier if module_name.startswith("backbone") else lr
            no_decay = (
                isinstance(module, NORM_TYPES)
                or isinstance(module, nn.Embedding)
                or "relative_position_bias_table" in name
            )
            groups.append(
                {
                    "params": [param],
                    "lr": group_lr,
                    "initial_lr": group_lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{module_name}.{name}" if module_name else name,
                }
            )
    return groups


def build_optimizer(
    model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05, backbone_multiplier: float = 0.1
) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, lr, weight_decay, backbone_multiplier), lr=lr, weight_decay=weight_decay
    )


def lr_factor(
    step: int,
    max_iters: int,
    schedule: str = "poly",
    power: float = 0.9,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 1.0,
) -> float:
    """Multiplier of the base learning rate at `step` (0-based): poly or step schedule, linear warm-up."""
    if schedule == "poly":
        factor = (1.0 - min(step, max_iters) / max_iters) ** power
    elif schedule == "step":
        factor = gamma ** sum(step >= m for m in milestones)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, max_iters) / max_iters))
    else:
        raise ValueError(f"unknown schedule {schedule!r} (poly, step or cosine)")
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
