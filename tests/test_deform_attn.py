"""Multi-scale deformable attention: the grid_sample reference against a pure-python bilinear loop, the
gather path against the reference (forward, backward, gradcheck), the module's official init, and the
export-time dispatch that keeps level sizes in the traced graph."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mask2former.modeling import deform_attn, deform_attn_fast
from mask2former.modeling.deform_attn import (
    MSDeformAttn,
    bilinear_corners,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_reference,
)
from mask2former.modeling.kernels import use_kernels

SHAPES = [(3, 5), (4, 2), (6, 7)]  # odd, non-square levels


def random_inputs(shapes, batch=2, queries=7, heads=2, head_dim=3, points=3, dtype=torch.float32, seed=0):
    """value (B, S, M, D), locations (B, Lq, M, L, P, 2) reaching ~15% outside [0, 1], softmaxed weights."""
    gen = torch.Generator().manual_seed(seed)
    tokens, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.3 - 0.15
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, locations, weights


def python_bilinear(grid, height, width, x, y):
    """Sample grid[i][j] (a list of rows of D-lists) at normalised (x, y), straight from the definition:
    align_corners=False puts pixel j's centre at (j + 0.5) / W, and pixels outside the map read as 0."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = [0.0] * len(grid[0][0])
    for j, wx in ((x0, x0 + 1 - px), (x0 + 1, px - x0)):
        for i, wy in ((y0, y0 + 1 - py), (y0 + 1, py - y0)):
            if 0 <= i < height and 0 <= j < width:
                out = [o + wx * wy * v for o, v in zip(out, grid[i][j], strict=True)]
    return out


def python_attention(value, shapes, locations, weights, b, q, m):
    """One output vector (D,) of the deformable attention, by nested python loops."""
    head_dim = value.shape[-1]
    out = [0.0] * head_dim
    start = 0
    for level, (height, width) in enumerate(shapes):
        tokens = value[b, start : start + height * width, m].tolist()
        grid = [tokens[i * width : (i + 1) * width] for i in range(height)]
        for p in range(locations.shape[4]):
            x, y = locations[b, q, m, level, p].tolist()
            sample = python_bilinear(grid, height, width, x, y)
            a = weights[b, q, m, level, p].item()
            out = [o + a * s for o, s in zip(out, sample, strict=True)]
        start += height * width
    return out


def test_reference_matches_python_bilinear_loop_including_borders():
    value, locations, weights = random_inputs(SHAPES, dtype=torch.float64)
    # Samples that must read zero padding or sit exactly on edges / pixel centres.
    locations[0, 0, 0, :, 0] = torch.tensor([-0.05, 0.5], dtype=torch.float64)  # left of the map
    locations[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0], dtype=torch.float64)  # bottom-right outer corner
    locations[0, 0, 0, :, 2] = torch.tensor([0.1, 0.5], dtype=torch.float64)  # pixel 0 centre for W=5
    locations[1, 3, 1, :, 0] = torch.tensor([1.2, -0.1], dtype=torch.float64)  # wholly outside: zero
    output = ms_deform_attn_reference(value, SHAPES, locations, weights).view(2, 7, 2, 3)
    for b, q, m in [(0, 0, 0), (0, 0, 1), (1, 3, 1), (1, 6, 0), (0, 4, 1)]:
        expected = torch.tensor(
            python_attention(value, SHAPES, locations, weights, b, q, m), dtype=torch.float64
        )
        torch.testing.assert_close(output[b, q, m], expected, rtol=0, atol=1e-12)


def test_python_loop_reads_zero_outside_the_map():
    grid = [[[1.0]] * 4 for _ in range(3)]  # constant 1 map, H=3, W=4
    assert python_bilinear(grid, 3, 4, 0.5, 0.5) == pytest.approx([1.0])
    assert python_bilinear(grid, 3, 4, 0.0, 0.5) == pytest.approx([0.5])  # half of the left neighbours exist
    assert python_bilinear(grid, 3, 4, 1.5, 0.5) == pytest.approx([0.0])


@pytest.mark.parametrize("batch,seed", [(1, 1), (2, 2)])
def test_gather_path_equals_reference_forward_and_backward(batch, seed):
    value, locations, weights = random_inputs(SHAPES, batch=batch, queries=11, heads=4, head_dim=8, seed=seed)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    copies = [t.clone().requires_grad_() for t in (value, locations, weights)]
    reference = ms_deform_attn_reference(inputs[0], SHAPES, inputs[1], inputs[2])
    fast = ms_deform_attn_gather(copies[0], SHAPES, copies[1], copies[2])
    assert fast.shape == reference.shape == (batch, 11, 32)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed))
    expected = torch.autograd.grad(reference, inputs, upstream)
    got = torch.autograd.grad(fast, copies, upstream)
    for name, g, e in zip(("value", "locations", "weights"), got, expected, strict=True):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4, msg=name)


def test_non_finite_locations_do_not_index_out_of_range():
    value, locations, weights = random_inputs(SHAPES, heads=3)
    locations[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    locations[1, 2, 1, 1, 1] = torch.tensor([-float("inf"), 1e30])
    rows, _ = bilinear_corners(SHAPES, locations, weights, tokens=value.shape[1])
    assert rows.min() >= 0 and rows.max() < value.shape[0] * value.shape[1] * value.shape[2]
    got = ms_deform_attn_gather(value, SHAPES, locations, weights)
    expected = ms_deform_attn_reference(value, SHAPES, locations, weights)
    untouched = torch.ones(2, 7, 3, dtype=torch.bool)
    untouched[0, 0, 0] = untouched[1, 2, 1] = False
    torch.testing.assert_close(got.view(2, 7, 3, 3)[untouched], expected.view(2, 7, 3, 3)[untouched])


def test_module_path_is_the_fast_path_in_eager_cpu_float32():
    value, locations, weights = random_inputs(SHAPES)
    assert torch.equal(
        ms_deform_attn(value, SHAPES, locations, weights),
        deform_attn_fast.ms_deform_attn_fast(value, SHAPES, locations, weights),
    )


def test_gradcheck_of_the_gather_path_in_float64():
    shapes = [(2, 3), (3, 2)]
    value, locations, weights = random_inputs(
        shapes, batch=1, queries=3, heads=2, head_dim=2, points=2, dtype=torch.float64, seed=3
    )
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    function = lambda v, loc, w: ms_deform_attn_gather(v, shapes, loc, w)  # noqa: E731
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6)


def test_gather_path_in_half_precision_stays_close():
    # Coordinates are computed in float32 internally; only the value sum runs in the input dtype.
    value, locations, weights = random_inputs([(16, 24), (8, 12), (4, 6)], queries=20, seed=4)
    expected = ms_deform_attn_reference(value, [(16, 24), (8, 12), (4, 6)], locations, weights)
    got = ms_deform_attn_gather(
        value.bfloat16(), [(16, 24), (8, 12), (4, 6)], locations.bfloat16(), weights.bfloat16()
    )
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.1


def test_official_init():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, num_levels=3, num_heads=8, num_points=4)
    assert attn.sampling_offsets.weight.shape == (8 * 3 * 4 * 2, 64)
    assert attn.attention_weights.weight.shape == (8 * 3 * 4, 64)
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    # Head h points at angle 45 deg * h; the larger component is scaled to 1; point p is p + 1 steps out.
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]])
    steps = torch.arange(1, 5).view(1, 1, 4, 1)
    expected = directions.view(8, 1, 1, 2).float() * steps
    torch.testing.assert_close(
        attn.sampling_offsets.bias.view(8, 3, 4, 2), expected.expand(8, 3, 4, 2), rtol=0, atol=1e-5
    )
    bound = math.sqrt(6 / (64 + 64))  # xavier uniform
    for linear in (attn.value_proj, attn.output_proj):
        assert not linear.bias.any()
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3


def official_locations(reference_points, offsets, shapes):
    """Official formula: reference + offset / stack([W, H]) with the sizes as a tensor."""
    sizes = torch.tensor(shapes, dtype=torch.float32)
    normalizer = torch.stack([sizes[:, 1], sizes[:, 0]], -1)
    return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def test_module_forward_matches_the_definition():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2)
    with torch.no_grad():  # non-trivial offsets and attention
        attn.sampling_offsets.weight.normal_(0, 0.3)
        attn.attention_weights.weight.normal_(0, 0.3)
    tokens = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, tokens, 16)
    query = torch.randn(2, 5, 16)
    reference_points = torch.rand(2, 5, 3, 2)
    got = attn(query, reference_points, src, SHAPES)
    # Independent recomputation from the submodules and the official location formula.
    value = attn.value_proj(src).view(2, tokens, 4, 4)
    offsets = attn.sampling_offsets(query).view(2, 5, 4, 3, 2, 2)
    weights = attn.attention_weights(query).view(2, 5, 4, 6).softmax(-1).view(2, 5, 4, 3, 2)
    locations = official_locations(reference_points, offsets, SHAPES)
    expected = attn.output_proj(ms_deform_attn_reference(value, SHAPES, locations, weights))
    assert got.shape == (2, 5, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_init_attention_is_uniform_over_levels_and_points():
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2)
    weights = attn.attention_weights(torch.randn(1, 3, 16)).view(1, 3, 4, 6).softmax(-1)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))


class _Wrapper(torch.nn.Module):
    """Traceable wrapper: the level sizes come from the input maps' shapes, as in the pixel decoder."""

    def __init__(self):
        super().__init__()
        self.attn = MSDeformAttn(d_model=8, num_levels=2, num_heads=2, num_points=2)

    def forward(self, coarse, fine):
        shapes = [(coarse.shape[2], coarse.shape[3]), (fine.shape[2], fine.shape[3])]
        src = torch.cat([coarse.flatten(2).transpose(1, 2), fine.flatten(2).transpose(1, 2)], 1)
        ref = torch.full(src.shape[:2] + (2, 2), 0.5, dtype=src.dtype)
        return self.attn(src, ref, src, shapes)


def test_traced_graph_uses_grid_sample_and_keeps_sizes_dynamic():
    torch.manual_seed(0)
    model = _Wrapper().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(1, 8, 2, 3), torch.randn(1, 8, 4, 6)))
    graph = str(traced.inlined_graph)
    assert graph.count("aten::grid_sampler") == 2 and "embedding_bag" not in graph
    # Another size: a baked level size would misplace every sampling location.
    coarse, fine = torch.randn(1, 8, 3, 5), torch.randn(1, 8, 5, 9)
    torch.testing.assert_close(traced(coarse, fine), model(coarse, fine), rtol=0, atol=1e-5)


def test_dispatch_follows_export_state(monkeypatch):
    calls = []

    def recorder(name):
        return lambda *args: calls.append((name, args[0].dtype)) or torch.zeros(())

    monkeypatch.setattr(deform_attn, "ms_deform_attn_reference", recorder("ref"))
    monkeypatch.setattr(deform_attn, "ms_deform_attn_gather", recorder("gather"))
    monkeypatch.setattr(deform_attn_fast, "ms_deform_attn_fast", recorder("fast"))
    value, locations, weights = random_inputs(SHAPES)
    deform_attn.ms_deform_attn(value, SHAPES, locations, weights)
    # Half precision on CPU: the float32 fast kernel on up-cast inputs, unless the gather path is asked for.
    assert deform_attn.ms_deform_attn(value.bfloat16(), SHAPES, locations, weights).dtype == torch.bfloat16
    with use_kernels(deform_attn="gather"):
        deform_attn.ms_deform_attn(value.half(), SHAPES, locations.half(), weights.half())
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    deform_attn.ms_deform_attn(value, SHAPES, locations, weights)
    f32 = torch.float32
    assert calls == [("fast", f32), ("fast", f32), ("gather", torch.float16), ("ref", f32)]
