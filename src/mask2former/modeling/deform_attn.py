"""Multi-scale deformable attention (Deformable DETR), as used by the Mask2Former pixel decoder.

`ms_deform_attn_reference` is the seed's formulation (one grid_sample per level, stack, weight, sum): it is
the ground truth every faster path is tested against. `ms_deform_attn` is what the module calls.
Spatial shapes are python ints (SymInts when traced), never a tensor, so dynamic-shape export works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Sequence[tuple[int, int]]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling (zero padding, align_corners=False) of every level, weighted and summed.

    value (B, S, M, D) with S = sum H_l * W_l (levels concatenated row-major), sampling_locations
    (B, Lq, M, L, P, 2) as (x, y) in [0, 1], attention_weights (B, Lq, M, L, P) -> (B, Lq, M * D).
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        value_l = (
            value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        )
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*M, D, Lq, L*P) weighted by (B*M, 1, Lq, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    output = (stacked * weights).sum(-1).view(batch, heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The path MSDeformAttn uses; same contract as `ms_deform_attn_reference`."""
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples P points per level and head around its reference.

    Parameter names and initialisation follow the official module (keys sampling_offsets, attention_weights,
    value_proj, output_proj).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h starts looking along direction 2*pi*h/heads, point p at distance p+1 (in level pixels).
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """query (B, Lq, C), reference_points (B, Lq, L, 2) as (x, y) in [0, 1], input_flatten (B, S, C),
        spatial_shapes [(H_l, W_l)] -> (B, Lq, C)."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(batch, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Offsets are in pixels of each level: divide by that level's (W, H).
        normalizer = torch.tensor(
            [[float(w), float(h)] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
        )
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
        output = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
