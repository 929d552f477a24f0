"""Backbones returning {"res2": (B, C, H/4, W/4), ..., "res5": (B, C, H/32, W/32)} with detectron2's names.

Each backbone has `out_channels` and `out_strides` dicts keyed like its outputs. Sizes of the official
variants are one table in config.py (`resnet_backbone`, `swin_backbone`); `modeling.build.build_backbone`
builds one from its BackboneConfig.
"""

from mask2former.modeling.backbone.resnet import ResNet
from mask2former.modeling.backbone.swin import SwinTransformer

__all__ = ["ResNet", "SwinTransformer"]
