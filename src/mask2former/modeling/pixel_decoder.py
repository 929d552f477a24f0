"""The MSDeformAttn pixel decoder: a deformable-attention encoder over 1/32, 1/16, 1/8, FPN steps to 1/4.

Module names match the official `sem_seg_head.pixel_decoder.*` so detectron2 checkpoints load by name:
`input_proj.{i}.{0,1}`, `transformer.level_embed`, `transformer.encoder.layers.{i}.*`, `mask_features`,
`adapter_{i}`, `layer_{i}`. Everything is computed from tensor shapes in-graph (no .item(), no float64),
so the decoder exports with dynamic height and width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.deform_attn import MSDeformAttn, SpatialShapes
from mask2former.modeling.layers import (
    Conv2d,
    PositionEmbeddingSine,
    c2_xavier_fill,
    group_norm,
    linear_add,
    linear_relu,
)

# The transformer decoder always reads three scales (official maskformer_num_feature_levels).
NUM_MULTI_SCALE_FEATURES = 3


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then FFN, each with residual + LayerNorm."""

    def __init__(
        self,
        d_model: int = 256,
        ffn_dim: int = 1024,
        num_levels: int = 3,
        num_heads: int = 8,
        num_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2) -> (B, S, C)."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(linear_add(self.linear2, linear_relu(self.linear1, src), src))


class MSDeformAttnEncoder(nn.Module):
    """A stack of encoder layers (key `layers.{i}`)."""

    def __init__(self, num_layers: int, **layer_args: int):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnEncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2) -> (B, S, C)."""
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


def encoder_reference_points(spatial_shapes: SpatialShapes, batch: int, device: torch.device) -> torch.Tensor:
    """Pixel centres ((j + 0.5) / W_l, (i + 0.5) / H_l) of every level, as (x, y) -> (B, S, L, 2).

    No padding mask (valid ratios all 1), so a token looks at the same normalised point on every level.
    Float32 and built from the sizes alone, so an export computes it in-graph for any input size.
    """
    centres = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack((grid_x.flatten(), grid_y.flatten()), -1))
    points = torch.cat(centres, 0)  # (S, 2)
    return points[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the projected levels, adds level embeddings to their positions and runs the encoder.

    Keys `level_embed` (num_levels, d_model) and `encoder.layers.{i}`; initialised as the official module.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        ffn_dim: int = 1024,
        num_levels: int = 3,
        num_points: int = 4,
    ):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers,
            d_model=d_model,
            ffn_dim=ffn_dim,
            num_levels=num_levels,
            num_heads=num_heads,
            num_points=num_points,
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        # The attention's own init (offset ring, zero attention logits) overrides the blanket xavier.
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self, levels: list[torch.Tensor], pos_embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """levels, pos_embeds: L maps (B, C, H_l, W_l) -> (memory (B, S, C), spatial_shapes [(H_l, W_l)])."""
        spatial_shapes = [(level.shape[2], level.shape[3]) for level in levels]
        src = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], 1)
        pos = torch.cat(
            [
                pos_embed.flatten(2).transpose(1, 2) + self.level_embed[index].view(1, 1, -1)
                for index, pos_embed in enumerate(pos_embeds)
            ],
            1,
        )
        reference_points = encoder_reference_points(spatial_shapes, src.shape[0], src.device)
        return self.encoder(src, pos, reference_points, spatial_shapes), spatial_shapes


def in_layout_of(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) copied into the memory format of `like` (channels-last or contiguous), standard strides.

    The encoder's output maps are views of its (B, S, C) memory, whose batch stride is S * C: upsampling
    such a view takes PyTorch's generic strided loop (~8x slower at 1/8 of 800x1088) and returns another
    layout than the lateral map it is added to. A copy of the small 1/8 map costs far less than that.
    """
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def feature_stride(name: str) -> int:
    """Stride of a backbone feature named resN: 2**N (res2 -> 4, ..., res5 -> 32)."""
    if not (name.startswith("res") and name[3:].isdigit()):
        raise ValueError(f"pixel decoder: feature name {name!r} must look like 'res2'..'res5'")
    return 2 ** int(name[3:])


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> (mask_features at 1/4, [1/32, 1/16, 1/8] multi-scale features).

    in_channels: channels of the backbone features res2..res5 (strides 4..32). The deformable encoder runs
    on `transformer_in_features`; the finer features down to `common_stride` are reached by FPN steps
    (`adapter_{i}` lateral 1x1, `layer_{i}` 3x3, i = 1 for the finest: res2 by default).
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        num_groups: int = 32,
        transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5"),
        common_stride: int = 4,
    ):
        super().__init__()
        self.in_features = sorted(in_channels, key=feature_stride)
        self.transformer_in_features = sorted(transformer_in_features, key=feature_stride)
        num_levels = len(self.transformer_in_features)
        # Projections run from the coarsest level (res5) down, as in the official module.
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), group_norm(conv_dim, num_groups)
            )
            for name in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            ffn_dim=ffn_dim,
            num_levels=num_levels,
            num_points=num_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        # One FPN step per octave between the finest encoder level and common_stride, finest first.
        finest_stride = feature_stride(self.transformer_in_features[0])
        num_fpn_levels = int(math.log2(finest_stride) - math.log2(common_stride))
        self.fpn_features = self.in_features[:num_fpn_levels]
        for index, name in enumerate(self.fpn_features, start=1):
            lateral = Conv2d(
                in_channels[name], conv_dim, kernel_size=1, bias=False, norm=group_norm(conv_dim, num_groups)
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=False,
                norm=group_norm(conv_dim, num_groups),
                activation=F.relu,
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{index}", lateral)
            self.add_module(f"layer_{index}", output)

    def level_dtype(self) -> torch.dtype:
        """The dtype the decoder computes in: that of its weights."""
        return self.transformer.level_embed.dtype

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)} ->
        (mask_features (B, mask_dim, H/4, W/4), [(B, conv_dim, H/32, W/32), (B, conv_dim, H/16, W/16),
         (B, conv_dim, H/8, W/8)]) in the dtype of the decoder's weights."""
        device_type = next(iter(features.values())).device.type
        # Under autocast the decoder keeps its own (float32) weights' precision, as the official decoder;
        # a model converted to bf16/fp16 runs it in that dtype (the deformable sampling keeps its
        # coordinates in float32 whatever the dtype: deform_attn.ms_deform_attn_gather).
        dtype = self.level_dtype()
        with torch.autocast(device_type=device_type, enabled=False):
            levels = [
                proj(features[name].to(dtype))
                for proj, name in zip(self.input_proj, reversed(self.transformer_in_features), strict=True)
            ]
            memory, spatial_shapes = self.transformer(levels, [self.pe_layer(level) for level in levels])
            batch = memory.shape[0]
            outputs = [
                chunk.transpose(1, 2).reshape(batch, -1, height, width)
                for chunk, (height, width) in zip(
                    memory.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes, strict=True
                )
            ]
            # Top-down: upsample the finest map so far onto the next finer backbone feature.
            for index in reversed(range(1, len(self.fpn_features) + 1)):
                lateral = getattr(self, f"adapter_{index}")(features[self.fpn_features[index - 1]].to(dtype))
                upsampled = F.interpolate(
                    in_layout_of(outputs[-1], lateral),
                    size=lateral.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
                outputs.append(getattr(self, f"layer_{index}")(lateral + upsampled))
            return self.mask_features(outputs[-1]), outputs[:NUM_MULTI_SCALE_FEATURES]
