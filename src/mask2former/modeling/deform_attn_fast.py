"""A fast CPU path for multi-scale deformable attention: weighted corner gathers with an analytic backward.

Same contract and result as `deform_attn.ms_deform_attn_reference` (bilinear, zero padding,
align_corners=False), computed with a few fused library kernels instead of grid_sample per level:

- The value maps are copied once into a zero-bordered table (1 pixel left/top, 2 right/bottom), so the four
  bilinear corners of a sample are table rows `top_left + {0, 1, Wp, Wp + 1}` (times the head count) and
  corners outside the map read zeros without any mask. Locations are clamped to [-1, size] in pixels, where
  all four corners are padding: grid_sample gives the same zero value and zero location gradient there.
- Forward: bilinear weight times attention weight gives one weight per corner, and one weighted
  `embedding_bag` sums the L*P*4 corners of every (query, head) without materialising them.
- Backward (`_MSDeformAttnFunction.backward`): the attention and location gradients follow from the dot
  products c_k = <dOut, V[corner k]> (attention: sum_k bilinear_k * c_k; location: the derivative of the
  bilinear weights). The value gradient is the transposed product: samples sorted by top-left row form one
  bag per table row, an `embedding_bag` over dOut per corner kind sums what lands on each top-left row, and
  the four sums are shifted onto their corners. No scatter-add, and only one sort key per sample.

Float32 and float64 (for gradcheck). `deform_attn.ms_deform_attn` sends other dtypes, devices and
tracing/export to the grid_sample reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SpatialShapes = Sequence[tuple[int, int]]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# Samples (query * head * level * point) per chunk: bounds the index/weight buffers (~50 bytes a sample)
# however large the image, while keeping chunks big enough that per-chunk passes over the whole value
# table (the value gradient's bag sums) stay cheap. A 1024x1024 image (21504 queries * 96) is one chunk.
SAMPLES_PER_CHUNK = 1 << 21

# Samples per chunk of the inference sampler (`sample_from_projection`): its ~20 elementwise passes then work
# on ~256 KiB tensors that stay in cache (15% faster on R50's encoder at 800x1088 than one chunk per image);
# still 32768 elements per thread for two intra-op threads.
INFERENCE_SAMPLES_PER_CHUNK = 1 << 16

# Corner rows gathered at once for the backward's dot products (16384 rows of D=32 floats = 2 MB, in cache).
DOT_ROWS = 1 << 14

# Zero border of the padded table: a clamped location lies in [-1, size] pixels, so its top-left corner is in
# [-1, size] and its bottom-right one in [0, size + 1].
PAD_BEFORE, PAD_AFTER = 1, 2


class _Layout:
    """Where every image, head, level and corner lives in the padded value table, seen as rows.

    The table is head-major, (B, M, Sp, D): level l occupies the (H+3, W+3) block starting at token
    `starts[l]`, and the row of (b, m, token) is (b * M + m) * Sp + token. Head-major puts a sample's left and
    right corners in adjacent rows, so one overlapping (R-1, 2D) view of the table yields both at once.
    Per-sample constants are materialised over (M, L, P) so that elementwise ops on (queries, M, L, P)
    tensors broadcast over the leading axis only (vectorised loops).
    """

    def __init__(
        self, spatial_shapes: SpatialShapes, batch: int, heads: int, points: int, like: torch.Tensor
    ):
        self.shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        self.padded = [(h + PAD_BEFORE + PAD_AFTER, w + PAD_BEFORE + PAD_AFTER) for h, w in self.shapes]
        self.starts = [0]
        for hp, wp in self.padded:
            self.starts.append(self.starts[-1] + hp * wp)
        self.tokens = self.starts.pop()  # Sp
        self.batch, self.heads = batch, heads
        self.rows = batch * heads * self.tokens
        # int32 halves the index traffic; int64 only for tables beyond 2**31 rows.
        self.index_dtype = torch.int32 if self.rows < 2**31 else torch.int64
        levels, device, index = len(self.shapes), like.device, self.index_dtype
        shape = (heads, levels, points)

        def per_sample(values: list, dtype: torch.dtype) -> torch.Tensor:  # (L, ...) -> (M, L, P, ...)
            table = torch.tensor(values, device=device, dtype=dtype)
            table = table.view(1, levels, 1, *table.shape[1:])
            return table.expand(*shape, *table.shape[3:]).contiguous()

        self.size = per_sample([[w, h] for h, w in self.shapes], like.dtype)  # (M, L, P, 2) as (x, y)
        self.plane_size = self.size.permute(3, 0, 1, 2).contiguous()  # (2, M, L, P): width, height planes
        self.lowest = like.new_tensor(-1.0)
        widths = [wp for _, wp in self.padded]
        self.row_stride = per_sample(widths, index)  # rows per padded image row
        origin = [start + PAD_BEFORE * wp + PAD_BEFORE for start, wp in zip(self.starts, widths, strict=True)]
        head = torch.arange(heads, device=device, dtype=index).view(heads, 1, 1) * self.tokens
        self.origin = per_sample(origin, index) + head  # row of pixel (0, 0) of each level and head
        # Row offsets of the corners top-left, top-right, bottom-left, bottom-right: (4, M, L, P), and of the
        # (left, right) pairs of the upper and lower rows: (2, M, L, P).
        shifts = per_sample([[0, 1, wp, wp + 1] for wp in widths], index).permute(3, 0, 1, 2)
        self.bag_corner_shift = shifts.transpose(0, 1).contiguous()  # (M, 4, L, P)
        self.pair_shift = shifts[0::2].contiguous()
        # The same corner offsets per level as python ints, for the value gradient's shifted adds.
        self.level_corner_shift = [[0] * levels, [1] * levels, widths, [wp + 1 for wp in widths]]

    def padded_table(self, value: torch.Tensor) -> torch.Tensor:
        """value (B, S, M, D) -> zero-bordered head-major table (B*M*Sp, D)."""
        batch, _, heads, head_dim = value.shape
        table = value.new_zeros(batch, heads, self.tokens, head_dim)
        levels = value.split([h * w for h, w in self.shapes], 1)
        for (h, w), block, level in zip(self.shapes, self.level_blocks(table), levels, strict=True):
            block[:, :, PAD_BEFORE : PAD_BEFORE + h, PAD_BEFORE : PAD_BEFORE + w] = level.view(
                batch, h, w, heads, head_dim
            ).permute(0, 3, 1, 2, 4)
        return table.view(-1, head_dim)

    def unpad(self, table: torch.Tensor) -> torch.Tensor:
        """Head-major padded table (B*M*Sp, D) -> (B, S, M, D), the layout of value."""
        head_dim = table.shape[-1]
        blocks = self.level_blocks(table.view(self.batch, self.heads, self.tokens, head_dim))
        return torch.cat(
            [
                block[:, :, PAD_BEFORE : PAD_BEFORE + h, PAD_BEFORE : PAD_BEFORE + w]
                .permute(0, 2, 3, 1, 4)
                .reshape(self.batch, h * w, self.heads, head_dim)
                for block, (h, w) in zip(blocks, self.shapes, strict=True)
            ],
            1,
        )

    def level_blocks(self, table: torch.Tensor) -> list[torch.Tensor]:
        """(B, M, Sp, D) padded table -> per level views (B, M, H+3, W+3, D)."""
        batch, heads, _, head_dim = table.shape
        return [
            table[:, :, start : start + hp * wp].view(batch, heads, hp, wp, head_dim)
            for (hp, wp), start in zip(self.padded, self.starts, strict=True)
        ]

    def pixels(self, locations: torch.Tensor) -> torch.Tensor:
        """Locations (q, M, L, P, 2) in [0, 1] -> pixel coordinates, align_corners=False: location 0 is
        the outer edge of pixel 0, whose centre is at 0.5 / size."""
        return locations * self.size - 0.5

    def corners(self, pixels: torch.Tensor, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel coordinates (q, M, L, P, 2) -> (top-left table rows (q, M, L, P) int,
        fractions (q, M, L, P, 2) as (fx, fy) in [0, 1])."""
        # A NaN location would give a garbage integer row: send it to -1 (padding) first.
        clamped = torch.clamp(torch.nan_to_num(pixels, nan=-1.0), min=self.lowest, max=self.size)
        corner = clamped.floor()
        fraction = clamped - corner
        return self.table_rows(corner[..., 0], corner[..., 1], batch_index), fraction

    def table_rows(self, x: torch.Tensor, y: torch.Tensor, batch_index: int) -> torch.Tensor:
        """Integral top-left pixels x, y (q, M, L, P) (float, as floor gives them) -> their table rows
        (q, M, L, P) in the index dtype."""
        rows = y.to(self.index_dtype) * self.row_stride
        rows += x.to(self.index_dtype)
        rows += self.origin
        rows += batch_index * self.heads * self.tokens
        return rows

    def pixel_gradient_scale(self, pixels: torch.Tensor) -> torch.Tensor:
        """d pixel / d location (q, M, L, P, 2): the size where the location was not clamped, else 0."""
        inside = (pixels >= -1) & (pixels <= self.size)
        return torch.where(inside, self.size, 0.0)


def corner_weights(fraction: torch.Tensor, attention: torch.Tensor, corner_dim: int) -> torch.Tensor:
    """Bilinear weight times attention weight of the corners (top-left, top-right, bottom-left,
    bottom-right): fraction (q, M, L, P, 2), attention (q, M, L, P) -> stacked along `corner_dim`."""
    fx, fy = fraction[..., 0], fraction[..., 1]
    lower = attention * fy  # weight of the lower row y0 + 1
    upper = attention - lower
    top_right, bottom_right = upper * fx, lower * fx
    return torch.stack((upper - top_right, top_right, lower - bottom_right, bottom_right), corner_dim)


def _sample_chunks(
    num_queries: int, samples_per_query: int, samples_per_chunk: int | None = None
) -> list[tuple[int, int]]:
    step = max(1, (samples_per_chunk or SAMPLES_PER_CHUNK) // samples_per_query)
    return [(start, min(start + step, num_queries)) for start in range(0, num_queries, step)]


class _MSDeformAttnFunction(torch.autograd.Function):
    """value (B, S, M, D), locations (B, Lq, M, L, P, 2), attention (B, Lq, M, L, P) -> (B, Lq, M*D)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, locations, attention):
        batch, _, heads, head_dim = value.shape
        _, num_queries, _, levels, points, _ = locations.shape
        layout = _Layout(spatial_shapes, batch, heads, points, value)
        table = layout.padded_table(value)
        corners_per_bag = levels * points * 4
        pieces = []  # (q * M, D) per image and chunk, in (b, q) order
        for b in range(batch):
            for start, stop in _sample_chunks(num_queries, heads * levels * points):
                rows, fraction = layout.corners(layout.pixels(locations[b, start:stop]), b)
                # Corner-major inside each (query, head) bag: (q, M, 4, L, P); the order in a bag is free.
                indices = rows.unsqueeze(2) + layout.bag_corner_shift
                weights = corner_weights(fraction, attention[b, start:stop], corner_dim=2)
                pieces.append(
                    F.embedding_bag(
                        indices.view(-1, corners_per_bag),
                        table,
                        mode="sum",
                        per_sample_weights=weights.view(-1, corners_per_bag),
                    )
                )
        ctx.layout = layout
        ctx.save_for_backward(table, locations, attention)
        # One image in one chunk (the usual inference case) needs no copy.
        output = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return output.view(batch, num_queries, heads * head_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        table, locations, attention = ctx.saved_tensors
        layout: _Layout = ctx.layout
        need_value, _, need_locations, need_attention = ctx.needs_input_grad
        batch, num_queries, heads, levels, points, _ = locations.shape
        head_dim = table.shape[-1]
        # (B, Lq, M, D): entry (b, q, m) is the gradient of that bag's output.
        grad_bags = grad_output.reshape(batch, num_queries, heads, head_dim).contiguous()
        grad_locations = torch.empty_like(locations) if need_locations else None
        grad_attention = torch.empty_like(attention) if need_attention else None
        grad_table = torch.zeros_like(table) if need_value else None
        for b in range(batch):
            for start, stop in _sample_chunks(num_queries, heads * levels * points):
                pixels = layout.pixels(locations[b, start:stop])
                rows, fraction = layout.corners(pixels, b)
                chunk_attention = attention[b, start:stop]
                chunk_grad = grad_bags[b, start:stop]
                if need_locations or need_attention:
                    dots = _corner_dots(chunk_grad, table, rows, layout)
                    _location_and_attention_grads(
                        dots, fraction, chunk_attention, pixels, layout,
                        None if grad_locations is None else grad_locations[b, start:stop],
                        None if grad_attention is None else grad_attention[b, start:stop],
                    )  # fmt: skip
                if need_value:
                    weights = corner_weights(fraction, chunk_attention, corner_dim=0)
                    _accumulate_value_grad(grad_table, chunk_grad, rows, weights, layout)
        grad_value = layout.unpad(grad_table) if need_value else None
        return grad_value, None, grad_locations, grad_attention


def _corner_dots(
    grad_bags: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, layout: _Layout
) -> torch.Tensor:
    """c_k = <dOut of the (query, head), table row of corner k>: grad_bags (q, M, D), rows (q, M, L, P)
    -> (2, q, M, L, P, 2) indexed [upper/lower row, ..., left/right column].

    Left and right corners are adjacent rows of the head-major table, so an overlapping view with rows of
    2D gathers both with one index. A few queries at a time (about DOT_ROWS corner rows, a buffer that stays
    in cache) are gathered, multiplied in place and summed: 2-3x faster than embedding_bag's
    per-sample-weight backward, which calls BLAS once per corner.
    """
    queries, heads, levels, points = rows.shape
    head_dim = grad_bags.shape[-1]
    pairs = table.as_strided((table.shape[0] - 1, 2 * head_dim), (head_dim, 1))
    dots = grad_bags.new_empty(2, queries, heads, levels, points, 2)
    step = max(1, DOT_ROWS // (4 * heads * levels * points))
    for start in range(0, queries, step):
        stop = min(start + step, queries)
        indices = (rows[None, start:stop] + layout.pair_shift[:, None]).view(-1)
        values = pairs.index_select(0, indices).view(2, stop - start, heads, levels * points * 2, head_dim)
        values.mul_(grad_bags[None, start:stop, :, None, :])
        dots[:, start:stop] = values.sum(-1).view(2, stop - start, heads, levels, points, 2)
    return dots


def _location_and_attention_grads(
    dots: torch.Tensor,
    fraction: torch.Tensor,
    attention: torch.Tensor,
    pixels: torch.Tensor,
    layout: _Layout,
    grad_locations: torch.Tensor | None,
    grad_attention: torch.Tensor | None,
) -> None:
    """Chain rule through the corner weights a * wy * wx, written into the gradient slices.

    dots (2, q, M, L, P, 2), fraction and pixels (q, M, L, P, 2), attention (q, M, L, P).
    """
    (top_left, top_right), (bottom_left, bottom_right) = (row.unbind(-1) for row in dots.unbind(0))
    fx, fy = fraction[..., 0], fraction[..., 1]
    # <dOut, bilinear sample along the upper and the lower row>, and their x derivatives.
    dx_upper = top_right - top_left
    dx_lower = bottom_right - bottom_left
    upper = top_left + fx * dx_upper
    dy = bottom_left + fx * dx_lower - upper
    if grad_attention is not None:
        torch.add(upper, fy * dy, out=grad_attention)
    if grad_locations is not None:
        dx = dx_upper + fy * (dx_lower - dx_upper)
        grad = torch.stack((dx, dy), -1) * attention.unsqueeze(-1)
        torch.mul(grad, layout.pixel_gradient_scale(pixels), out=grad_locations)


def _accumulate_value_grad(
    grad_table: torch.Tensor,
    grad_bags: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    layout: _Layout,
) -> None:
    """grad_table (B*Sp*M, D) += corner weight * dOut of the bag, for every corner of every sample.

    grad_bags (q, M, D), rows (q, M, L, P), weights (4, q, M, L, P). Samples sorted by top-left row form one
    bag per table row; per corner kind, one weighted embedding_bag over dOut gives what lands on each
    top-left row, then moves to the row of that corner.
    """
    samples_per_bag = rows.shape[2] * rows.shape[3]
    flat_rows = rows.reshape(-1)
    order = torch.sort(flat_rows).indices
    counts = torch.bincount(flat_rows, minlength=layout.rows)
    offsets = counts.cumsum(0) - counts
    bag_of_sample = torch.div(order, samples_per_bag, rounding_mode="floor")
    sorted_weights = weights.view(4, -1).index_select(1, order)
    bag_table = grad_bags.reshape(-1, grad_bags.shape[-1])
    for kind in range(4):
        sums = F.embedding_bag(
            bag_of_sample, bag_table, offsets, mode="sum", per_sample_weights=sorted_weights[kind]
        )
        _add_shifted(grad_table, sums, layout.level_corner_shift[kind], layout)


def _add_shifted(grad_table: torch.Tensor, sums: torch.Tensor, shifts: list[int], layout: _Layout) -> None:
    """grad_table[row + shifts[l]] += sums[row] for the rows of every level l (shifts depend on its width).

    Every corner of a clamped sample lies inside its own level's padded block, so a shift inside the block
    never moves a contribution into another level, head or image.
    """
    grad = grad_table.view(layout.batch * layout.heads, layout.tokens, -1)
    sums = sums.view(layout.batch * layout.heads, layout.tokens, -1)
    for (hp, wp), start, shift in zip(layout.padded, layout.starts, shifts, strict=True):
        grad[:, start + shift : start + hp * wp] += sums[:, start : start + hp * wp - shift]


def ms_deform_attn_fast(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract and result as `ms_deform_attn_reference`, with an analytic backward.

    value (B, S, M, D) float32/float64, sampling_locations (B, Lq, M, L, P, 2) as (x, y) in [0, 1],
    attention_weights (B, Lq, M, L, P) -> (B, Lq, M * D) in value's dtype.
    """
    dtype = value.dtype
    return _MSDeformAttnFunction.apply(
        value.contiguous(),
        spatial_shapes,
        sampling_locations.to(dtype).contiguous(),
        attention_weights.to(dtype).contiguous(),
    )


def sample_from_projection(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    reference_points: torch.Tensor,
    projection: torch.Tensor,
    points: int,
) -> torch.Tensor:
    """Inference forward of deformable attention straight from the query's projections (no autograd).

    value (B, S, M, D) float32; reference_points (B, Lq, L, 2) as (x, y) in [0, 1]; projection (B, Lq, 3K)
    float32 with K = M * L * P, planar: the x offsets, the y offsets (in pixels of each level) and the
    attention logits, each in (head, level, point) order -> (B, Lq, M * D).

    Equals `ms_deform_attn_fast` on `deform_attn.locations_from_offsets(...)` and the softmax of the logits
    up to float rounding, in fewer passes: the pixel coordinate is ref * size - 0.5 + offset (no round trip
    through [0, 1]), the x and y planes are contiguous instead of interleaved pairs, and the softmax over the
    L * P logits of a head is written out (PyTorch's softmax is slow on a last dimension of 12).
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, levels, _ = reference_points.shape
    samples = heads * levels * points
    layout = _Layout(spatial_shapes, batch, heads, points, value)
    table = layout.padded_table(value)
    level_size = value.new_tensor([[w, h] for h, w in layout.shapes])  # (L, 2) as (x, y)
    # Every (query, head) bag's corner rows and weights, filled chunk by chunk, then one embedding_bag.
    indices = torch.empty(batch, num_queries, heads, 4, levels, points, dtype=layout.index_dtype)
    weights = value.new_empty(batch, num_queries, heads, 4, levels, points)
    for b in range(batch):
        for start, stop in _sample_chunks(num_queries, samples, INFERENCE_SAMPLES_PER_CHUNK):
            count = stop - start
            chunk = projection[b, start:stop]
            # Pixel coordinate of each level's reference point, repeated over the points: (q, 2, 1, L * P),
            # so the broadcast over heads adds runs of L * P (a (q, 1, L, 1) one is 2.5x slower).
            base = reference_points[b, start:stop] * level_size - 0.5  # (q, L, 2)
            base = base.transpose(1, 2).repeat_interleave(points, dim=2).unsqueeze(2)
            # x and y planes side by side: one pass of each op for both axes.
            xy = torch.add(chunk[:, : 2 * samples].view(count, 2, heads, levels * points), base)
            attention = _softmax_groups(chunk[:, 2 * samples :].view(count, heads, levels * points))
            rows = _rows_and_fractions(layout, xy.view(count, 2, heads, levels, points), b)
            torch.add(rows.unsqueeze(2), layout.bag_corner_shift, out=indices[b, start:stop])
            x, y = xy.view(count, 2, heads, levels, points).unbind(1)  # now the fractions
            _planar_corner_weights(
                x, y, attention.view(count, heads, levels, points), out=weights[b, start:stop]
            )
    corners_per_bag = levels * points * 4
    output = F.embedding_bag(
        indices.view(-1, corners_per_bag),
        table,
        mode="sum",
        per_sample_weights=weights.view(-1, corners_per_bag),
    )
    return output.view(batch, num_queries, heads * head_dim)


def _softmax_groups(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of logits (..., G) into a new tensor."""
    weights = logits.contiguous() if not logits.is_contiguous() else logits.clone()
    weights -= weights.amax(-1, keepdim=True)
    weights.exp_()
    return weights.div_(weights.sum(-1, keepdim=True))


def _rows_and_fractions(layout: _Layout, xy: torch.Tensor, batch_index: int) -> torch.Tensor:
    """Pixel coordinates xy (q, 2, M, L, P) as x and y planes, which this overwrites with their fractions
    in [0, 1] -> top-left table rows (q, M, L, P) in the layout's index dtype (as `_Layout.corners`)."""
    xy.nan_to_num_(nan=-1.0)  # a NaN would give a garbage row: send it to the padding
    xy.clamp_(min=layout.lowest, max=layout.plane_size)
    corner = xy.floor()
    xy.sub_(corner)
    return layout.table_rows(corner[:, 0], corner[:, 1], batch_index)


def _planar_corner_weights(
    fx: torch.Tensor, fy: torch.Tensor, attention: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Bilinear times attention weight of the four corners: fractions fx, fy and attention (q, M, L, P),
    which this overwrites -> out (q, M, 4, L, P) as top-left, top-right, bottom-left, bottom-right
    (`corner_weights`' order)."""
    weights = out
    lower = attention * fy  # weight of the lower row y0 + 1
    upper = attention.sub_(lower)
    torch.mul(upper, fx, out=weights[:, :, 1])
    torch.sub(upper, weights[:, :, 1], out=weights[:, :, 0])
    torch.mul(lower, fx, out=weights[:, :, 3])
    torch.sub(lower, weights[:, :, 3], out=weights[:, :, 2])
    return weights
