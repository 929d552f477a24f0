"""Train a backbone from scratch with BatchNorm, ship it with FrozenBatchNorm.

The official models fine-tune an ImageNet backbone whose BatchNorm layers are frozen (FrozenBatchNorm2d:
fixed statistics and affine). A backbone trained from scratch, like the bundled model's, needs live batch
statistics to train well, as detectron2's `RESNETS.NORM = "BN"` gives. In eval mode a BatchNorm2d computes
exactly what a FrozenBatchNorm2d with the same weight, bias, running_mean and running_var computes, and both
store those four tensors under the same keys, so the trained weights load into the unchanged (frozen)
architecture once BatchNorm's extra `num_batches_tracked` counters are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from mask2former.modeling.layers import FrozenBatchNorm2d

BACKBONE_NORMS = ("frozen", "bn")


def thaw_batchnorm(module: nn.Module) -> int:
    """Replace every FrozenBatchNorm2d under `module` by a trainable nn.BatchNorm2d holding the same
    statistics and affine (so eval-mode outputs are unchanged). Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, FrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.num_features, eps=child.eps).to(child.weight.device)
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
                norm.running_mean.copy_(child.running_mean)
                norm.running_var.copy_(child.running_var)
            setattr(module, name, norm)
            replaced += 1
        else:
            replaced += thaw_batchnorm(child)
    return replaced


def frozen_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a thawed model as the frozen architecture stores it (no num_batches_tracked)."""
    return {key: value for key, value in state.items() if not key.endswith(".num_batches_tracked")}
