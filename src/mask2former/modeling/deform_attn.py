"""Multi-scale deformable attention (Deformable DETR), as used by the Mask2Former pixel decoder.

Each query samples, for every head and level, P points around its reference point and returns the
attention-weighted sum of the bilinearly interpolated values (zero padding, align_corners=False).

- `ms_deform_attn_reference`: the seed's formulation (one grid_sample per level, stack, weight, sum). It is
  the ground truth every faster path is tested against; leave it as it is.
- `ms_deform_attn_gather`: a fast forward for any dtype and device. The four bilinear corners of every
  sample become flat row indices into the value table, the bilinear and attention weights fold into one
  weight per corner, and a single weighted `embedding_bag` sums them without materialising the
  (Lq, L*P*4, D) samples.
- `deform_attn_fast.ms_deform_attn_fast`: the same gathers with an analytic backward, for eager CPU
  float32/float64 (training and inference).
- `ms_deform_attn`: what MSDeformAttn calls. By default it takes `ms_deform_attn_fast` in eager CPU
  float32/float64 (and for CPU bf16/fp16 on up-cast inputs), `ms_deform_attn_gather` on other devices, and
  the reference while tracing or exporting, because GridSample is one native ONNX op per level while
  embedding_bag has no ONNX counterpart. `modeling.kernels.use_kernels(deform_attn=...)` overrides the choice.

Spatial shapes are python ints (SymInts or traced sizes when exporting), never a tensor, and are only used
in arithmetic, so a dynamic-shape export computes every level size in-graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.kernels import current_kernels

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


def _axis_corners(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (...) along one axis -> weights (..., 2) and indices (..., 2) of the two neighbours.

    A neighbour outside [0, size - 1] gets weight 0 (zero padding) and a clamped, valid index. Only `coord`
    carries gradient (floor is piecewise constant), which gives grid_sample's location gradients.
    """
    lower = coord.detach().floor()
    frac = coord - lower
    lower_inside = (lower >= 0) & (lower <= size - 1)
    upper_inside = (lower >= -1) & (lower <= size - 2)
    weights = torch.stack(((1 - frac) * lower_inside, frac * upper_inside), -1)
    # nan_to_num: a NaN location (diverged training) must not become an out-of-range index.
    index = torch.stack((lower, lower + 1), -1).nan_to_num_(0.0).clamp_(0, size - 1).long()
    return weights, index


def bilinear_corners(
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four bilinear corners of every sample as rows of the value table, each with one weight.

    sampling_locations (B, Lq, M, L, P, 2) as (x, y), attention_weights (B, Lq, M, L, P), tokens S ->
    rows (B, Lq, M, L*P*4) int64 into value (B, S, M, D) viewed as a (B*S*M, D) table, and
    weights (B, Lq, M, L*P*4) = bilinear weight * attention weight (0 for corners outside the map).
    """
    batch, _, heads = sampling_locations.shape[:3]
    device = sampling_locations.device
    # Pixel coordinates need float32 at least: in half precision x * W loses the sub-pixel fraction.
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    locations = sampling_locations.to(dtype)
    attention = attention_weights.to(dtype)
    # Row of (b, s, m) in the table is (b*S + s)*M + m; the level's token is s = start + y*W + x.
    first_row = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1) * (tokens * heads)
    first_row = first_row + torch.arange(heads, device=device).view(1, 1, heads, 1, 1)
    rows, weights = [], []
    start = 0
    # One pass per level with its sizes as scalars: cheaper than broadcasting (L, 2) size tensors.
    for level, (height, width) in enumerate(spatial_shapes):
        # align_corners=False: location 0 is the outer edge of pixel 0, whose centre is at 0.5 / W.
        x_weights, x_index = _axis_corners(locations[:, :, :, level, :, 0] * width - 0.5, width)
        y_weights, y_index = _axis_corners(locations[:, :, :, level, :, 1] * height - 0.5, height)
        y_weights = y_weights * attention[:, :, :, level, :, None]
        y_rows = y_index * (width * heads) + (first_row + start * heads)
        # (B, Lq, M, P, 2 rows, 2 columns) -> (B, Lq, M, P*4)
        rows.append((y_rows[..., :, None] + (x_index * heads)[..., None, :]).flatten(-3))
        weights.append((y_weights[..., :, None] * x_weights[..., None, :]).flatten(-3))
        start = start + height * width
    return torch.cat(rows, -1), torch.cat(weights, -1)


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract and result as `ms_deform_attn_reference`, as one weighted gather-and-sum.

    value (B, S, M, D), sampling_locations (B, Lq, M, L, P, 2), attention_weights (B, Lq, M, L, P)
    -> (B, Lq, M * D). Differentiable in value, locations and weights through autograd.
    """
    batch, tokens, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    rows, weights = bilinear_corners(spatial_shapes, sampling_locations, attention_weights, tokens)
    # Each (b, q, m) is one bag of L*P*4 weighted rows; embedding_bag sums them without materialising them.
    bags = batch * num_queries * heads
    output = F.embedding_bag(
        rows.reshape(bags, -1),
        value.reshape(batch * tokens * heads, head_dim),
        mode="sum",
        per_sample_weights=weights.to(value.dtype).reshape(bags, -1),
    )
    return output.view(batch, num_queries, heads * head_dim)


def _exporting() -> bool:
    """True while tracing, scripting or exporting, where the graph must keep the reference's GridSample."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or (is_exporting is not None and is_exporting())
    )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The path MSDeformAttn uses; same contract as `ms_deform_attn_reference`.

    value (B, S, M, D), sampling_locations (B, Lq, M, L, P, 2), attention_weights (B, Lq, M, L, P)
    -> (B, Lq, M * D).
    """
    kernel = current_kernels().deform_attn
    # torch.compile traces the reference too: one grid_sample per level instead of python-level chunk loops.
    if kernel == "reference" or _exporting() or torch.compiler.is_compiling():
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    # Imported here so this module's header stays independent of the fast path's module.
    from mask2former.modeling import deform_attn_fast

    # Eager CPU float32/float64: corner gathers with an analytic backward (~5x the reference forward+backward,
    # bench/bench_deform_attn.py). Other dtypes and devices keep the gather path.
    if kernel != "gather" and value.device.type == "cpu":
        fast = deform_attn_fast.ms_deform_attn_fast
        if value.dtype in deform_attn_fast.SUPPORTED_DTYPES:
            return fast(value, spatial_shapes, sampling_locations, attention_weights)
        # bf16 / fp16: the sampling is memory-bound, so the float32 fast kernel on up-cast inputs beats the
        # gather path's half-precision elementwise work (2.3x on R50's levels at 800x1088, 2 threads).
        if value.dtype in (torch.bfloat16, torch.float16):
            out = fast(value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float())
            return out.to(value.dtype)
    return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)


def offset_grid(num_heads: int, num_levels: int, num_points: int) -> torch.Tensor:
    """Initial sampling offsets (num_heads, num_levels, num_points, 2), in pixels of each level.

    Head h looks along the angle 2*pi*h/num_heads, the direction scaled so its larger component is 1
    (a ring of 8 neighbours for 8 heads); point p sits p + 1 steps along it, on every level alike.
    """
    angles = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    directions = torch.stack((angles.cos(), angles.sin()), -1)
    directions = directions / directions.abs().amax(-1, keepdim=True)
    distance = torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, num_points, 1)
    return directions.view(num_heads, 1, 1, 2) * distance.expand(1, num_levels, num_points, 1)


def locations_from_offsets(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: SpatialShapes
) -> torch.Tensor:
    """reference_points (B, Lq, L, 2) + offsets (B, Lq, M, L, P, 2) in pixels of each level
    -> locations (B, Lq, M, L, P, 2) normalised to [0, 1] by that level's (W, H).

    Divides by the sizes themselves rather than a tensor built with float(size): an exporter traces the
    sizes, and float() would bake the traced ones into a dynamic graph as constants.
    """
    per_level = []
    for level, (height, width) in enumerate(spatial_shapes):
        offset = offsets[:, :, :, level]  # (B, Lq, M, P, 2)
        scaled = torch.stack((offset[..., 0] / width, offset[..., 1] / height), -1)
        per_level.append(reference_points[:, :, None, level, None, :] + scaled)
    return torch.stack(per_level, dim=3)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples P points per level and head around its reference.

    Parameter names and initialisation follow the official module (keys sampling_offsets, attention_weights,
    value_proj, output_proj).
    """

    def __init__(self, d_model: int = 256, num_levels: int = 3, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} must be divisible by num_heads {num_heads}")
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: offsets start on a fixed per-head ring, attention starts uniform."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        self.sampling_offsets.bias.copy_(
            offset_grid(self.num_heads, self.num_levels, self.num_points).flatten()
        )
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
        spatial_shapes [(H_l, W_l)] with S = sum H_l * W_l -> (B, Lq, C)."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(input_flatten).view(batch, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        locations = locations_from_offsets(reference_points, offsets, spatial_shapes)
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
