"""Pre-processing: the official resize rule, golden values on a real photo, any size 1..4000, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mask2former.data.image_io import load_image
from mask2former.inference.preprocess import (
    PIXEL_MEAN,
    PIXEL_STD,
    pad_batch,
    preprocess,
    preprocess_deploy,
    preprocess_official,
    shortest_edge_size,
)

DATA = Path(__file__).parent / "data"
MEAN = np.array(PIXEL_MEAN, np.float64)
STD = np.array(PIXEL_STD, np.float64)
LOW, HIGH = float(((0 - MEAN) / STD).min()), float(((255 - MEAN) / STD).max())


def _reference_normalise(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float64, written out with numpy only."""
    return ((rgb.astype(np.float64) - MEAN) / STD).transpose(2, 0, 1)


def _reference_bilinear(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear without antialiasing (edge pixels repeated), float64 (out_h, out_w, 3)."""
    in_h, in_w = rgb.shape[:2]
    ys = np.clip((np.arange(out_h) + 0.5) * in_h / out_h - 0.5, 0, None)
    xs = np.clip((np.arange(out_w) + 0.5) * in_w / out_w - 0.5, 0, None)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, in_h - 1), np.minimum(x0 + 1, in_w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    image = rgb.astype(np.float64)
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize(
    "size, expected",
    [
        ((300, 451), (800, 1203)),  # chelsea: 451 * 800 / 300 = 1202.67
        ((480, 640), (800, 1067)),  # 1066.67 rounds half up
        ((100, 1000), (133, 1333)),  # long side capped: 800 * 1333 / 8000 = 133.3
        ((1000, 100), (1333, 133)),
        ((800, 800), (800, 800)),
        ((1, 4000), (1, 1333)),  # detectron2 would round the short side to 0
    ],
)
def test_shortest_edge_size(size, expected):
    assert shortest_edge_size(*size, short_edge=800, max_size=1333) == expected


def test_official_golden_chelsea():
    rgb = load_image(DATA / "chelsea.png")
    item = preprocess_official(rgb)
    assert item.image_size == (800, 1203) and item.original_size == (300, 451)
    assert tuple(item.tensor.shape) == (1, 3, 800, 1216) and item.tensor.dtype == torch.float32
    # Independent path: PIL bilinear on uint8 (as detectron2 does), then the formula in numpy.
    resized = np.asarray(Image.fromarray(rgb).resize((1203, 800), Image.BILINEAR))
    expected = _reference_normalise(resized)
    got = item.tensor[0].double().numpy()
    np.testing.assert_allclose(got[:, :800, :1203], expected, rtol=0, atol=1e-5)
    assert (got[:, :, 1203:] == 0).all()
    for y, x in [(0, 0), (400, 600), (799, 1202)]:
        np.testing.assert_allclose(got[:, y, x], expected[:, y, x], atol=1e-5)
    assert abs(got[:, :, :1203].sum() - expected.sum()) < 1e-2 * expected.size**0.5


def test_deploy_golden_chelsea_fp32_and_fp16():
    rgb = load_image(DATA / "chelsea.png")
    item = preprocess_deploy(rgb, size=(64, 96))
    assert tuple(item.tensor.shape) == (1, 3, 64, 96) and item.image_size == (64, 96)
    assert item.original_size == (300, 451)
    expected = ((_reference_bilinear(rgb, 64, 96) - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(item.tensor[0].double().numpy(), expected, atol=1e-4)
    half = preprocess_deploy(rgb, size=(64, 96), dtype=torch.float16)
    assert half.tensor.dtype == torch.float16
    np.testing.assert_allclose(half.tensor[0].double().numpy(), expected, atol=5e-3)


def test_deploy_upsamples_and_reads_paths():
    item = preprocess(DATA / "rocket.jpg", mode="deploy", size=(512, 1024))
    assert tuple(item.tensor.shape) == (1, 3, 512, 1024) and item.original_size == (427, 640)
    rgb = load_image(DATA / "rocket.jpg")
    expected = ((_reference_bilinear(rgb, 512, 1024) - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(item.tensor[0].numpy(), expected, atol=1e-4)


def test_dispatcher_and_bad_arguments():
    rgb = np.zeros((10, 20, 3), np.uint8)
    assert preprocess(rgb, mode="official", short_edge=64, max_size=128).image_size == (64, 128)
    with pytest.raises(ValueError, match="mode"):
        preprocess(rgb, mode="fast")
    with pytest.raises(ValueError):
        preprocess_deploy(rgb, size=(0, 32))


_sides = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 31, 32, 33, 799, 1333, 1334, 4000]))
_colors = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))


def _constant_image(height: int, width: int, color) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.array(color, np.uint8), (height, width, 3)))


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(height=_sides, width=_sides, color=_colors, half=st.booleans())
@example(height=1, width=4000, color=(0, 0, 0), half=False)
@example(height=4000, width=1, color=(255, 255, 255), half=False)
@example(height=1, width=1, color=(1, 2, 3), half=True)
def test_official_any_size(height, width, color, half):
    dtype = torch.float16 if half else torch.float32
    item = preprocess_official(_constant_image(height, width, color), dtype=dtype)
    new_h, new_w = item.image_size
    padded_h, padded_w = item.tensor.shape[-2:]
    assert item.original_size == (height, width) and item.tensor.dtype == dtype
    assert item.tensor.shape[:2] == (1, 3)
    assert padded_h % 32 == 0 and padded_w % 32 == 0
    assert new_h <= padded_h < new_h + 32 and new_w <= padded_w < new_w + 32
    # The resize rule: the long side never exceeds 1333; else the short side is 800; aspect kept.
    assert max(new_h, new_w) <= 1333
    assert min(new_h, new_w) == 800 or max(new_h, new_w) == 1333
    scale = min(800 / min(height, width), 1333 / max(height, width))
    assert abs(new_h - height * scale) <= 0.5 + 1e-6 or new_h == 1
    assert abs(new_w - width * scale) <= 0.5 + 1e-6 or new_w == 1
    values = item.tensor[0].double().numpy()
    assert (values[:, new_h:, :] == 0).all() and (values[:, :, new_w:] == 0).all()
    # A constant image stays constant through bilinear resizing: every valid pixel is the normalised colour.
    expected = (np.array(color) - MEAN) / STD
    tolerance = 5e-3 if half else 1e-5
    np.testing.assert_allclose(
        values[:, :new_h, :new_w], np.broadcast_to(expected[:, None, None], (3, new_h, new_w)), atol=tolerance
    )


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    height=_sides,
    width=_sides,
    out_h=st.integers(1, 48),
    out_w=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
@example(height=1, width=4000, out_h=32, out_w=32, seed=0)
@example(height=4000, width=1, out_h=1, out_w=48, seed=1)
@example(height=1, width=1, out_h=1, out_w=1, seed=2)
def test_deploy_any_size(height, width, out_h, out_w, seed):
    rng = np.random.default_rng(seed)
    # A small random tile repeated: cheap for 4000-pixel sides, still varied.
    tile = rng.integers(0, 256, (min(height, 7), min(width, 7), 3), dtype=np.uint8)
    rgb = np.tile(tile, (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1))[:height, :width]
    item = preprocess_deploy(rgb, size=(out_h, out_w))
    assert tuple(item.tensor.shape) == (1, 3, out_h, out_w)
    assert item.image_size == (out_h, out_w) and item.original_size == (height, width)
    values = item.tensor.numpy()
    assert np.isfinite(values).all()
    assert values.min() >= LOW - 1e-5 and values.max() <= HIGH + 1e-5


def test_pad_batch():
    first = torch.ones(1, 3, 10, 40)
    second = torch.full((1, 3, 33, 5), 2.0)
    batch = pad_batch([first, second])
    assert tuple(batch.shape) == (2, 3, 64, 64)
    assert (batch[0, :, :10, :40] == 1).all() and batch[0].sum() == first.sum()
    assert (batch[1, :, :33, :5] == 2).all() and batch[1].sum() == second.sum()
    assert tuple(pad_batch([first, second], size_divisibility=1).shape) == (2, 3, 33, 40)
    assert pad_batch([first.half()]).dtype == torch.float16
    with pytest.raises(ValueError):
        pad_batch([])
    with pytest.raises(ValueError):
        pad_batch([torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError):
        pad_batch([first, second.half()])


def test_batched_official_equals_single():
    rgb = load_image(DATA / "chelsea.png")
    small = np.ascontiguousarray(rgb[:100, :70])
    items = [preprocess_official(image, short_edge=64, max_size=128) for image in (rgb, small)]
    batch = pad_batch([item.tensor for item in items])
    for index, item in enumerate(items):
        h, w = item.tensor.shape[-2:]
        assert torch.equal(batch[index, :, :h, :w], item.tensor[0])
        assert (batch[index, :, h:] == 0).all() and (batch[index, :, :, w:] == 0).all()
