"""The inference-only rewrites of `inference.optimize` and the pixel decoder's layout fix: each equals the
plain computation up to float rounding, falls back where it does not apply, keeps keys and copies working.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mask2former import glibc
from mask2former.inference.optimize import (
    FastMSDeformAttn,
    OneDNNLinear,
    OneDNNMultiheadAttention,
    onednn_available,
    optimize_for_inference,
)
from mask2former.modeling import deform_attn_fast
from mask2former.modeling.deform_attn import MSDeformAttn, locations_from_offsets
from mask2former.modeling.kernels import use_kernels
from mask2former.modeling.layers import linear_add, linear_relu
from mask2former.modeling.pixel_decoder import in_layout_of
from mask2former.modeling.transformer_decoder import multi_head_attention

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN kernels")
SHAPES = [(3, 5), (4, 2), (6, 7)]  # odd, non-square levels


def projection_inputs(batch=2, queries=9, heads=2, head_dim=4, points=3, seed=0):
    """value (B, S, M, D), reference points (B, Lq, L, 2), offsets (B, Lq, M, L, P, 2) in pixels, some far
    outside, and logits (B, Lq, M, L*P)."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen)
    reference = torch.rand(batch, queries, levels, 2, generator=gen)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=gen) * 4
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen) * 3
    return value, reference, offsets, logits


def planar(offsets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, Lq, 3K): x offsets, y offsets, logits, each in (head, level, point) order."""
    batch, queries = offsets.shape[:2]
    return torch.cat(
        (
            offsets[..., 0].reshape(batch, queries, -1),
            offsets[..., 1].reshape(batch, queries, -1),
            logits.flatten(2),
        ),
        -1,
    )


def expected_sampling(value, reference, offsets, logits):
    batch, queries, heads, levels, points, _ = offsets.shape
    locations = locations_from_offsets(reference, offsets, SHAPES)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return deform_attn_fast.ms_deform_attn_fast(value, SHAPES, locations, weights)


@pytest.mark.parametrize("chunk", [None, 7])
def test_sampling_from_projection_equals_the_module_path(monkeypatch, chunk):
    if chunk is not None:  # several chunks per image
        monkeypatch.setattr(deform_attn_fast, "INFERENCE_SAMPLES_PER_CHUNK", chunk * 2 * 3 * 3)
    value, reference, offsets, logits = projection_inputs()
    got = deform_attn_fast.sample_from_projection(value, SHAPES, reference, planar(offsets, logits), 3)
    expected = expected_sampling(value, reference, offsets, logits)
    assert got.shape == expected.shape == (2, 9, 8)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_sampling_from_projection_sends_non_finite_offsets_to_the_padding():
    value, reference, offsets, logits = projection_inputs(batch=1)
    offsets[0, 0] = float("nan")
    offsets[0, 1] = float("inf")
    offsets[0, 2] = -float("inf")
    got = deform_attn_fast.sample_from_projection(value, SHAPES, reference, planar(offsets, logits), 3)
    assert torch.isfinite(got).all()
    assert (got[0, :3] == 0).all()  # every corner of those queries lies in the zero border
    torch.testing.assert_close(
        got[0, 3:], expected_sampling(value, reference, offsets, logits)[0, 3:], atol=1e-5, rtol=0
    )


def deform_module(seed=0) -> MSDeformAttn:
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=16, num_levels=3, num_heads=2, num_points=3)
    with torch.no_grad():  # away from the init's zero weights, so both projections matter
        for linear in (module.sampling_offsets, module.attention_weights):
            linear.weight.normal_(0, 0.3)
    return module


def module_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 5, 16, generator=gen)
    reference = torch.rand(2, 5, 3, 2, generator=gen)
    memory = torch.randn(2, tokens, 16, generator=gen)
    return query, reference, memory


def test_fast_deform_attn_module_equals_msdeformattn_and_keeps_keys():
    module = deform_module()
    keys = list(module.state_dict())
    inputs = module_inputs()
    with torch.no_grad():
        expected = module(inputs[0], inputs[1], inputs[2], SHAPES)
    fast = optimize_for_inference(copy.deepcopy(module))
    assert type(fast) is FastMSDeformAttn and list(fast.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs[0], inputs[1], inputs[2], SHAPES), expected, rtol=0, atol=1e-5)
        # Edited weights are merged again; copies merge their own.
        fast.sampling_offsets.weight.mul_(1.5)
        module.sampling_offsets.weight.mul_(1.5)
        expected = module(inputs[0], inputs[1], inputs[2], SHAPES)
        torch.testing.assert_close(fast(inputs[0], inputs[1], inputs[2], SHAPES), expected, rtol=0, atol=1e-5)
        twin = copy.deepcopy(fast)
        assert not any(key.startswith("_onednn") for key in vars(twin))
        torch.testing.assert_close(twin(inputs[0], inputs[1], inputs[2], SHAPES), expected, rtol=0, atol=1e-5)


def test_fast_deform_attn_module_falls_back_for_gradients_and_reference_kernels(monkeypatch):
    fast = optimize_for_inference(deform_module())
    calls = []
    original = deform_attn_fast.sample_from_projection
    monkeypatch.setattr(
        "mask2former.inference.optimize.sample_from_projection",
        lambda *args: calls.append(1) or original(*args),
    )
    query, reference, memory = module_inputs()
    fast(query, reference, memory, SHAPES).sum().backward()  # gradients: MSDeformAttn's own path
    assert fast.sampling_offsets.weight.grad is not None and not calls
    with torch.no_grad(), use_kernels(deform_attn="reference"):
        fast(query, reference, memory, SHAPES)
    assert not calls
    with torch.no_grad():
        fast(query, reference, memory, SHAPES)
    assert calls == [1]


@needs_onednn
def test_fused_linear_relu_and_residual_add_equal_the_plain_ops():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20)
    x, residual = torch.randn(3, 4, 12), torch.randn(3, 4, 20)
    with torch.no_grad():
        expected_relu = F.relu(linear(x))
        expected_add = residual + linear(x)
        optimize_for_inference(linear)
        assert type(linear) is OneDNNLinear
        torch.testing.assert_close(linear_relu(linear, x), expected_relu, rtol=0, atol=1e-5)
        torch.testing.assert_close(linear_add(linear, x, residual), expected_add, rtol=0, atol=1e-5)
        # A non-contiguous residual takes the plain sum.
        wide = torch.randn(3, 4, 40)[..., ::2]
        torch.testing.assert_close(linear_add(linear, x, wide), wide + linear(x), rtol=0, atol=1e-5)
    # With gradients: plain ops, gradients flow.
    linear_relu(linear, x).sum().backward()
    assert linear.weight.grad is not None


@needs_onednn
def test_onednn_multihead_attention_projects_like_nn_multiheadattention():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4)
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 11, 16)
    bias = torch.zeros(2, 1, 5, 11)
    bias[:, :, :, :3] = -1e4
    with torch.no_grad():
        expected = multi_head_attention(attention, query, memory, memory, bias)
        optimize_for_inference(attention)
        assert type(attention) is OneDNNMultiheadAttention and type(attention.out_proj) is OneDNNLinear
        torch.testing.assert_close(
            multi_head_attention(attention, query, memory, memory, bias), expected, rtol=0, atol=1e-5
        )
        attention.in_proj_weight.mul_(0.5)  # repacked after an edit
        with use_kernels(onednn=False):
            plain = multi_head_attention(attention, query, memory, memory, bias)
        torch.testing.assert_close(
            multi_head_attention(attention, query, memory, memory, bias), plain, rtol=0, atol=1e-5
        )


def test_in_layout_of_gives_standard_strides_in_the_layout_of_the_other_map():
    memory = torch.randn(1, 3 + 4 * 6, 8)
    view = memory[:, 3:].transpose(1, 2).reshape(1, 8, 4, 6)  # a view with batch stride S * C
    channels_last = torch.randn(1, 8, 8, 12).contiguous(memory_format=torch.channels_last)
    as_channels_last = in_layout_of(view, channels_last)
    assert as_channels_last.stride() == (4 * 6 * 8, 1, 6 * 8, 8)
    assert in_layout_of(view, torch.randn(1, 8, 8, 12)).is_contiguous()
    assert torch.equal(as_channels_last, view)


def test_keep_freed_memory_sets_glibc_thresholds_unless_the_environment_does(monkeypatch):
    calls = []
    monkeypatch.setattr(
        glibc, "libc_function", lambda name: lambda option, value: calls.append((option, value)) or 1
    )
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert glibc.keep_freed_memory()
    assert calls == [
        (glibc.M_MMAP_THRESHOLD, glibc.REUSE_MMAP_THRESHOLD),
        (glibc.M_TRIM_THRESHOLD, glibc.REUSE_TRIM_THRESHOLD),
    ]
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert glibc.keep_freed_memory()
    assert calls == [(glibc.M_TRIM_THRESHOLD, glibc.REUSE_TRIM_THRESHOLD)]
    monkeypatch.setattr(glibc, "libc_function", lambda name: None)  # not glibc: nothing to do
    assert not glibc.keep_freed_memory()


def test_freed_memory_kept_restores_the_settled_mmap_threshold_and_keeps_the_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(
        glibc, "libc_function", lambda name: lambda option, value: calls.append((option, value)) or 1
    )
    for variable in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(variable, raising=False)
    with glibc.freed_memory_kept():
        assert calls[-1] == (glibc.M_TRIM_THRESHOLD, glibc.REUSE_TRIM_THRESHOLD)
    # large blocks mapped again after the block; the heap not trimmed, so the next block reuses its pages
    assert calls[-1] == (glibc.M_MMAP_THRESHOLD, glibc.SETTLED_MMAP_THRESHOLD)
    assert (glibc.M_TRIM_THRESHOLD, glibc.SETTLED_TRIM_THRESHOLD) not in calls
    calls.clear()
    with glibc.freed_memory_kept(enabled=False):
        pass
    assert calls == []
