"""Augmentations keep masks on their pixels; output sizes; colour jitter; collate padding."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from mask2former.config import PIXEL_MEAN, PIXEL_STD
from mask2former.data.augment import (
    ColorAugSSD,
    Compose,
    LargeScaleJitter,
    ShortestEdgeMultiScale,
    _hsv_to_rgb,
    _rgb_to_hsv,
    resize,
)
from mask2former.data.collate import collate

RED, BLUE, GRAY = (250, 10, 10), (10, 10, 250), (128, 128, 128)


def _scene(h=60, w=90):
    """Blue background, a red square on the left third: masks [square, background]."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:] = BLUE
    square = np.zeros((h, w), dtype=bool)
    square[10:40, 8:30] = True
    image[square] = RED
    return image, np.stack([square, ~square]), np.array([3, 1], dtype=np.int64)


def _assert_aligned(image, masks, labels):
    """Pixels well inside each mask have the colour of their class; padding is in no mask."""
    colors = {3: RED, 1: BLUE}
    for mask, label in zip(masks, labels, strict=True):
        inner = binary_erosion(mask, iterations=2)
        if inner.any():
            assert np.abs(image[inner].astype(int) - colors[int(label)]).max() <= 2
    gray = (image == GRAY).all(-1) & ~masks.any(0)
    uncovered = ~masks.any(0)
    assert np.array_equal(gray, uncovered) or not uncovered.any()


@pytest.mark.parametrize("seed", range(6))
def test_lsj_keeps_masks_aligned_and_fixed_size(seed):
    image, masks, labels = _scene()
    out_image, out_masks, out_labels = LargeScaleJitter(size=64)(
        image, masks, labels, rng=np.random.default_rng(seed)
    )
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.uint8
    assert out_masks.shape == (out_labels.shape[0], 64, 64) and out_masks.dtype == bool
    assert out_masks.reshape(len(out_masks), -1).any(1).all()  # vanished instances removed
    _assert_aligned(out_image, out_masks, out_labels)


def test_lsj_small_scale_pads_with_128_and_masks_zero():
    image, masks, labels = _scene()
    out_image, out_masks, _ = LargeScaleJitter(size=64, min_scale=0.3, max_scale=0.3, flip=False)(
        image, masks, labels, rng=np.random.default_rng(0)
    )
    # fits 60x90 into 19.2 x 19.2 -> 13x19, then padded bottom/right
    assert out_masks[:, :13, :19].any(0).all()
    assert not out_masks[:, 13:].any() and not out_masks[:, :, 19:].any()
    assert (out_image[13:] == 128).all() and (out_image[:, 19:] == 128).all()


def test_lsj_crop_drops_vanished_instance():
    image, masks, labels = _scene()
    # scale 2 of 32 -> image 43x64 resized, crop 32x32: over several seeds the square leaves the crop
    aug = LargeScaleJitter(size=32, min_scale=2.0, max_scale=2.0, flip=False)
    counts = {len(aug(image, masks, labels, rng=np.random.default_rng(s))[2]) for s in range(12)}
    assert counts == {1, 2}


def test_flip_moves_square_to_the_right():
    image, masks, labels = _scene()
    aug = ShortestEdgeMultiScale(short_edges=[60], crop=None, color_jitter=False, flip=True)
    flipped = [aug(image, masks, labels, rng=np.random.default_rng(s)) for s in range(8)]
    sides = set()
    for out_image, out_masks, out_labels in flipped:
        assert out_image.shape == (60, 90, 3)
        _assert_aligned(out_image, out_masks, out_labels)
        sides.add(bool(out_masks[0][:, 60:].any()))
    assert sides == {True, False}  # both flipped and unflipped outcomes occur


@pytest.mark.parametrize("seed", range(4))
def test_shortest_edge_crop_flip_aligned(seed):
    image, masks, labels = _scene()
    aug = ShortestEdgeMultiScale(short_edges=[48, 80, 120], max_size=160, crop=(40, 50), color_jitter=False)
    out_image, out_masks, out_labels = aug(image, masks, labels, rng=np.random.default_rng(seed))
    assert out_image.shape == (40, 50, 3) and out_masks.shape[1:] == (40, 50)
    _assert_aligned(out_image, out_masks, out_labels)


def test_resized_size_follows_resize_shortest_edge():
    aug = ShortestEdgeMultiScale(max_size=2048)
    assert aug.resized_size(480, 640, 512) == (512, 683)
    assert aug.resized_size(100, 1000, 512) == (205, 2048)  # long side capped
    assert aug.short_edges[0] == 256 and aug.short_edges[-1] == 1024 and len(aug.short_edges) == 16


def test_category_area_constraint_avoids_single_class_crops():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    small = np.zeros((100, 100), dtype=bool)
    small[40:60, 40:60] = True
    masks, labels = np.stack([small, ~small]), np.array([0, 1])
    options = dict(crop=(30, 30), color_jitter=False, flip=False)
    constrained = ShortestEdgeMultiScale([100], cat_max_ratio=0.75, **options)
    plain = ShortestEdgeMultiScale([100], cat_max_ratio=1.0, **options)
    got = [len(constrained(image, masks, labels, rng=np.random.default_rng(s))[2]) for s in range(20)]
    free = [len(plain(image, masks, labels, rng=np.random.default_rng(s))[2]) for s in range(20)]
    assert sum(n == 2 for n in got) > sum(n == 2 for n in free)


def test_color_jitter_changes_colours_only_and_is_seeded():
    image, masks, labels = _scene()
    jitter = ColorAugSSD()
    outs = [jitter(image, masks, labels, rng=np.random.default_rng(s)) for s in range(6)]
    assert all(o[1] is masks and o[0].shape == image.shape and o[0].dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o[0], image) for o in outs)
    assert np.array_equal(jitter(image, masks, labels, rng=np.random.default_rng(2))[0], outs[2][0])


def test_hsv_round_trip():
    colors = np.random.default_rng(0).uniform(0, 255, (500, 3))
    assert np.allclose(_hsv_to_rgb(_rgb_to_hsv(colors)), colors, atol=1e-6)
    assert np.allclose(_rgb_to_hsv(np.array([[255.0, 0, 0], [0, 255, 0]]))[:, 0], [0, 120])


def test_nearest_mask_resize_matches_scale():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    _, up = resize(np.zeros((4, 4, 3), np.uint8), masks, 8, 8)
    assert up[0, :4, :4].all() and up[0].sum() == 16


def test_compose_uses_one_generator():
    image, masks, labels = _scene()
    aug = Compose([LargeScaleJitter(48), ColorAugSSD()], seed=1)
    again = Compose([LargeScaleJitter(48), ColorAugSSD()], seed=1)
    a, b = aug(image, masks, labels), again(image, masks, labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_collate_normalises_and_pads_with_zeros():
    items = [
        {
            "image": torch.full((3, 20, 33), 200, dtype=torch.uint8),
            "masks": torch.ones((2, 20, 33), dtype=torch.bool),
            "labels": torch.tensor([1, 4]),
            "image_id": 1,
            "file_name": "a.png",
        },
        {
            "image": torch.zeros((3, 40, 10), dtype=torch.uint8),
            "masks": torch.zeros((0, 40, 10), dtype=torch.bool),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": 2,
            "file_name": "b.png",
        },
    ]
    batch = collate(items, size_divisibility=32)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["image_sizes"] == [(20, 33), (40, 10)] and batch["image_ids"] == [1, 2]
    expected = (200 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    assert torch.allclose(batch["images"][0, :, 5, 5], expected)
    assert (batch["images"][0, :, 20:] == 0).all() and (batch["images"][0, :, :, 33:] == 0).all()
    assert (batch["images"][1, :, :, 10:] == 0).all() and (batch["images"][1, :, :40, :10] != 0).all()
    masks = batch["targets"][0]["masks"]
    assert masks.shape == (2, 64, 64) and masks[:, :20, :33].all() and masks.sum() == 2 * 20 * 33
    assert batch["targets"][1]["masks"].shape == (0, 64, 64)
    assert batch["targets"][0]["labels"].tolist() == [1, 4]


def test_resize_window_equals_resize_then_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    masks = rng.uniform(size=(3, 23, 31)) > 0.5
    full_image, full_masks = resize(image, masks, 50, 70)
    window_image, window_masks = resize(image, masks, 50, 70, window=(7, 11, 30, 40))
    assert np.array_equal(window_image, full_image[7:37, 11:51])
    assert np.array_equal(window_masks, full_masks[:, 7:37, 11:51])
