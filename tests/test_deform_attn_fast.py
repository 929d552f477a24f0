"""The fast deformable-attention path against the grid_sample reference: forward, analytic backward
(float32 within 1e-4, float64 gradcheck), zero padding at every border, chunking, odd shapes, and the
dispatch that chooses it in eager CPU float32/float64 only."""

from __future__ import annotations

import pytest
import torch

from mask2former.modeling import deform_attn, deform_attn_fast
from mask2former.modeling.deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from mask2former.modeling.deform_attn_fast import ms_deform_attn_fast
from mask2former.modeling.kernels import use_kernels

SHAPES = [(3, 5), (4, 2), (6, 7)]  # odd, non-square levels


def random_inputs(
    shapes, batch=2, queries=7, heads=2, head_dim=3, points=3, dtype=torch.float32, seed=0, spread=1.6
):
    """value (B, S, M, D), locations (B, Lq, M, L, P, 2) reaching outside [0, 1], softmaxed weights."""
    gen = torch.Generator().manual_seed(seed)
    tokens, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype)
    locations = locations * spread - (spread - 1) / 2
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, locations, weights


def forward_and_grads(fn, shapes, inputs, upstream):
    leaves = [t.clone().requires_grad_() for t in inputs]
    output = fn(leaves[0], shapes, leaves[1], leaves[2])
    return output, torch.autograd.grad(output, leaves, upstream)


@pytest.mark.parametrize(
    "shapes,batch,heads,head_dim,points",
    [(SHAPES, 2, 4, 8, 3), ([(1, 1), (2, 9)], 1, 1, 1, 1), ([(8, 8)], 3, 2, 4, 4)],
)
def test_fast_path_equals_reference_forward_and_backward(shapes, batch, heads, head_dim, points):
    inputs = random_inputs(shapes, batch=batch, queries=11, heads=heads, head_dim=head_dim, points=points)
    upstream = torch.randn(batch, 11, heads * head_dim, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = forward_and_grads(ms_deform_attn_reference, shapes, inputs, upstream)
    got, got_grads = forward_and_grads(ms_deform_attn_fast, shapes, inputs, upstream)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for name, g, e in zip(("value", "locations", "weights"), got_grads, expected_grads, strict=True):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4, msg=name)


def test_borders_and_far_outside_read_zero_padding():
    value, locations, weights = random_inputs(SHAPES, dtype=torch.float64)
    # Outer corners, exact pixel centres, half a pixel outside, far outside (no corner inside).
    special = [
        [0.0, 0.0],
        [1.0, 1.0],
        [0.1, 1 / 6],
        [-0.1, 0.5],
        [1.1, 0.5],
        [0.5, -3.0],
        [9.0, 9.0],
        [-1e9, 2],
    ]
    for i, point in enumerate(special):
        locations[0, i % 7, i % 2, :, i % 3] = torch.tensor(point, dtype=torch.float64)
    torch.testing.assert_close(
        ms_deform_attn_fast(value, SHAPES, locations, weights),
        ms_deform_attn_reference(value, SHAPES, locations, weights),
        rtol=0,
        atol=1e-12,
    )


def test_non_finite_locations_stay_inside_the_table():
    # What a NaN or infinite location yields is undefined (grid_sample gives NaN); it must not index out of
    # the table nor touch other outputs.
    value, locations, weights = random_inputs(SHAPES, heads=3)
    locations[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    locations[1, 2, 1, 1, 1] = torch.tensor([-float("inf"), float("inf")])
    got = ms_deform_attn_fast(value, SHAPES, locations, weights)
    expected = ms_deform_attn_reference(value, SHAPES, locations, weights)
    untouched = torch.ones(2, 7, 3, dtype=torch.bool)
    untouched[0, 0, 0] = untouched[1, 2, 1] = False
    torch.testing.assert_close(got.view(2, 7, 3, 3)[untouched], expected.view(2, 7, 3, 3)[untouched])


def test_gradcheck_in_float64():
    shapes = [(2, 3), (3, 2)]
    # Wide spread: samples straddling every border and wholly outside. Random locations avoid the kinks of
    # bilinear interpolation (integer pixel coordinates), where no gradient exists.
    value, locations, weights = random_inputs(
        shapes, batch=2, queries=3, heads=2, head_dim=2, points=2, dtype=torch.float64, seed=3, spread=2.0
    )
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_fast(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("needed", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_gradients(needed):
    # The backward skips what autograd does not ask for: each gradient alone equals the reference's.
    inputs = random_inputs(SHAPES, dtype=torch.float64)

    def gradient(fn):
        leaves = [t.clone().requires_grad_(flag) for t, flag in zip(inputs, needed, strict=True)]
        output = fn(leaves[0], SHAPES, leaves[1], leaves[2])
        return torch.autograd.grad(output.sum(), [t for t in leaves if t.requires_grad])[0]

    torch.testing.assert_close(
        gradient(ms_deform_attn_fast), gradient(ms_deform_attn_reference), rtol=0, atol=1e-10
    )


def test_many_small_chunks_give_the_same_result(monkeypatch):
    inputs = random_inputs(SHAPES, batch=2, queries=13, heads=3, head_dim=4, points=2, dtype=torch.float64)
    upstream = torch.randn(2, 13, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole, whole_grads = forward_and_grads(ms_deform_attn_fast, SHAPES, inputs, upstream)
    # One query per chunk and one query per dot-product slice.
    monkeypatch.setattr(deform_attn_fast, "SAMPLES_PER_CHUNK", 1)
    monkeypatch.setattr(deform_attn_fast, "DOT_ROWS", 1)
    chunked, chunked_grads = forward_and_grads(ms_deform_attn_fast, SHAPES, inputs, upstream)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    for got, expected in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_module_forward_and_backward_match_reference(monkeypatch):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2)
    with torch.no_grad():  # offsets and attention away from the init ring
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.3)
    tokens = sum(h * w for h, w in SHAPES)
    src, query, reference_points = torch.randn(2, tokens, 16), torch.randn(2, 9, 16), torch.rand(2, 9, 3, 2)
    fast = attn(query, reference_points, src, SHAPES)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(attn.parameters()))
    with use_kernels(deform_attn="reference"):
        reference = attn(query, reference_points, src, SHAPES)
    reference_grads = torch.autograd.grad(reference.square().sum(), list(attn.parameters()))
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    for got, expected in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _record_dispatch(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name, module in (("reference", deform_attn), ("gather", deform_attn)):
        attr = f"ms_deform_attn_{name}"
        monkeypatch.setattr(module, attr, lambda *args, _name=name: calls.append(_name) or torch.zeros(()))
    monkeypatch.setattr(
        deform_attn_fast, "ms_deform_attn_fast", lambda *args: calls.append("fast") or torch.zeros(())
    )
    return calls


def test_dispatch_takes_the_fast_path_in_eager_cpu_float(monkeypatch):
    calls = _record_dispatch(monkeypatch)
    value, locations, weights = random_inputs(SHAPES)
    ms_deform_attn(value, SHAPES, locations, weights)
    ms_deform_attn(value.double(), SHAPES, locations.double(), weights.double())
    ms_deform_attn(value.bfloat16(), SHAPES, locations.bfloat16(), weights.bfloat16())  # up-cast to float32
    with use_kernels(deform_attn="gather"):
        ms_deform_attn(value, SHAPES, locations, weights)
    with use_kernels(deform_attn="reference"):
        ms_deform_attn(value, SHAPES, locations, weights)
    ms_deform_attn(value, SHAPES, locations, weights)  # the block ended: the default again
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ms_deform_attn(value, SHAPES, locations, weights)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    ms_deform_attn(value, SHAPES, locations, weights)
    assert calls == ["fast", "fast", "fast", "gather", "reference", "fast", "reference", "reference"]
