"""Backbones returning {"res2": (B, C, H/4, W/4), ..., "res5": (B, C, H/32, W/32)} with detectron2's names.

Each backbone has `out_channels` and `out_strides` dicts keyed like its outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mask2former.modeling.backbone.resnet import ResNet, resnet50, resnet101
from mask2former.modeling.backbone.swin import SwinTransformer, swin_base, swin_large, swin_small, swin_tiny

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "swin_tiny": swin_tiny,
    "swin_small": swin_small,
    "swin_base": swin_base,
    "swin_large": swin_large,
}


def build_backbone(name: str, **kwargs) -> ResNet | SwinTransformer:
    """Build a backbone preset by name, e.g. build_backbone("swin_tiny", drop_path_rate=0.0)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](**kwargs)


__all__ = [
    "BACKBONES",
    "ResNet",
    "SwinTransformer",
    "build_backbone",
    "resnet50",
    "resnet101",
    "swin_base",
    "swin_large",
    "swin_small",
    "swin_tiny",
]
