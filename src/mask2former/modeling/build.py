"""Wire a Mask2Former from a ModelConfig with plain function calls (no registry)."""

from __future__ import annotations

from torch import nn

from mask2former.config import BackboneConfig, ModelConfig
from mask2former.modeling.backbone.resnet import ResNet
from mask2former.modeling.backbone.swin import SwinTransformer
from mask2former.modeling.mask2former import Mask2Former
from mask2former.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder


def build_backbone(config: BackboneConfig) -> nn.Module:
    """A backbone returning {"res2".."res5"} features at strides 4..32, with `out_channels`."""
    if config.kind == "resnet":
        return ResNet(
            layers=tuple(config.layers),
            stem_channels=config.stem_channels,
            res2_channels=config.res2_channels,
        )
    if config.kind == "swin":
        return SwinTransformer(
            embed_dim=config.embed_dim,
            depths=tuple(config.depths),
            num_heads=tuple(config.num_heads),
            window_size=config.window_size,
            drop_path_rate=config.drop_path_rate,
            pretrain_img_size=config.pretrain_img_size,
        )
    raise ValueError(f"unknown backbone kind {config.kind!r} (expected 'resnet' or 'swin')")


def build_model(config: ModelConfig) -> Mask2Former:
    """Backbone -> MSDeformAttn pixel decoder -> masked-attention decoder, randomly initialised."""
    backbone = build_backbone(config.backbone)
    pd = config.pixel_decoder
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=dict(backbone.out_channels),
        conv_dim=pd.conv_dim,
        mask_dim=pd.mask_dim,
        num_encoder_layers=pd.num_encoder_layers,
        num_heads=pd.num_heads,
        num_points=pd.num_points,
        ffn_dim=pd.ffn_dim,
        num_groups=pd.num_groups,
    )
    dec = config.decoder
    predictor = MultiScaleMaskedTransformerDecoder(
        in_channels=pd.conv_dim,
        num_classes=config.num_classes,
        hidden_dim=dec.hidden_dim,
        num_queries=dec.num_queries,
        num_heads=dec.num_heads,
        dim_feedforward=dec.dim_feedforward,
        dec_layers=dec.dec_layers,
        mask_dim=pd.mask_dim,
    )
    return Mask2Former(backbone, pixel_decoder, predictor, size_divisibility=config.input.size_divisibility)
