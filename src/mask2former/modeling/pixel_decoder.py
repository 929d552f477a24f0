"""The MSDeformAttn pixel decoder: deformable-attention encoder over 1/32, 1/16, 1/8, one FPN step to 1/4.

Key names match the official `sem_seg_head.pixel_decoder.*` so detectron2 checkpoints load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.deform_attn import MSDeformAttn
from mask2former.modeling.layers import Conv2d, PositionEmbeddingSine, c2_xavier_fill, group_norm


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then FFN, each with residual + LayerNorm."""

    def __init__(
        self, d_model: int = 256, ffn_dim: int = 1024, n_levels: int = 3, n_heads: int = 8, n_points: int = 4
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2) -> (B, S, C)."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class MSDeformAttnEncoder(nn.Module):
    """The encoder stack plus the learned level embedding (keys `level_embed`, `encoder.layers.{i}`)."""

    def __init__(
        self, d_model: int, ffn_dim: int, num_layers: int, n_levels: int, n_heads: int, n_points: int
    ):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, ffn_dim, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)


def reference_points(
    spatial_shapes: list[tuple[int, int]], batch: int, n_levels: int, device: torch.device
) -> torch.Tensor:
    """Pixel centres ((j + 0.5) / W, (i + 0.5) / H) of every level -> (B, S, n_levels, 2).

    Valid ratios are all 1 (no padding mask), so every level sees the same normalised point.
    """
    points = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    flat = torch.cat(points, 0)  # (S, 2)
    return flat[None, :, None, :].expand(batch, -1, n_levels, -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> (mask_features at 1/4, [1/32, 1/16, 1/8] multi-scale features).

    in_channels: channels of res2..res5 (strides 4, 8, 16, 32). The deformable encoder runs on
    `transformer_in_features`; lower levels are reached by FPN steps (one, for res2, by default).
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
        strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self.in_features = sorted(in_channels, key=lambda name: strides[name])
        self.transformer_in_features = sorted(transformer_in_features, key=lambda name: strides[name])
        self.num_levels = len(self.transformer_in_features)
        # Projections are listed from the coarsest level (res5) down, as in the official module.
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), group_norm(conv_dim, num_groups)
            )
            for name in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnEncoder(
            conv_dim, ffn_dim, num_encoder_layers, self.num_levels, num_heads, num_points
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        # FPN steps for the levels finer than the encoder's (res2 only when common_stride is 4).
        min_stride = strides[self.transformer_in_features[0]]
        self.fpn_features = [
            name for name in self.in_features if strides[name] < min_stride and strides[name] >= common_stride
        ]
        for index, name in enumerate(reversed(self.fpn_features), start=1):
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

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features {"res2": (B, C2, H/4, W/4), ..., "res5"} -> (mask_features (B, mask_dim, H/4, W/4),
        [(B, conv_dim, H/32, W/32), (B, conv_dim, H/16, W/16), (B, conv_dim, H/8, W/8)])."""
        # The deformable part runs in float32 even under autocast, as the official code does.
        with torch.autocast(device_type=next(iter(features.values())).device.type, enabled=False):
            levels = [
                proj(features[name].float())
                for proj, name in zip(self.input_proj, reversed(self.transformer_in_features), strict=True)
            ]
            batch = levels[0].shape[0]
            spatial_shapes = [(level.shape[2], level.shape[3]) for level in levels]
            src = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], 1)
            pos = torch.cat(
                [
                    (self.pe_layer(level) + self.transformer.level_embed[index].view(1, -1, 1, 1))
                    .flatten(2)
                    .transpose(1, 2)
                    for index, level in enumerate(levels)
                ],
                1,
            )
            refs = reference_points(spatial_shapes, batch, self.num_levels, src.device)
            memory = src
            for layer in self.transformer.encoder.layers:
                memory = layer(memory, pos, refs, spatial_shapes)
            outputs = []
            for chunk, (height, width) in zip(
                memory.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes, strict=True
            ):
                outputs.append(chunk.transpose(1, 2).reshape(batch, -1, height, width))
            for index, name in enumerate(reversed(self.fpn_features), start=1):
                lateral = getattr(self, f"adapter_{index}")(features[name].float())
                upsampled = F.interpolate(
                    outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
                outputs.append(getattr(self, f"layer_{index}")(lateral + upsampled))
            return self.mask_features(outputs[-1]), outputs[: self.num_levels]
