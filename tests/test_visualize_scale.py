"""Labels and lines grow with the picture: a 4000 px photo and a 64 px scene (drawn enlarged to 256 px)
are both legible."""

from __future__ import annotations

import numpy as np

from mask2former.visualize import MIN_FONT_SIZE, _class_info, draw_semantic, style_for
from mask2former.writers import MIN_PICTURE_SIDE


def label_box_height(picture: np.ndarray, color: tuple[int, int, int]) -> int:
    """Rows holding the label box, the only pixels painted in the full segment colour on a black image."""
    rows = np.nonzero((picture == np.array(color, np.uint8)).all(axis=2).any(axis=1))[0]
    return int(rows.max() - rows.min() + 1) if rows.size else 0


def test_style_scales_with_the_shorter_side():
    small, photo = style_for(MIN_PICTURE_SIDE, MIN_PICTURE_SIDE), style_for(2667, 4000)
    assert small.font_size == MIN_FONT_SIZE and small.line_width == 1
    assert photo.font_size >= 80 and photo.line_width >= 8 and photo.pad > small.pad
    assert style_for(4000, 2667) == photo  # portrait and landscape alike
    sizes = [style_for(side, side).font_size for side in (64, 256, 512, 1024, 2048, 4096)]
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[1]


def test_label_on_a_large_photo_is_large():
    image = np.zeros((2400, 3600, 3), np.uint8)
    class_map = np.zeros((2400, 3600), np.int64)
    class_map[:, 1800:] = 1
    picture = np.asarray(draw_semantic(image, class_map))
    _, color = _class_info(None, 1)
    height = label_box_height(picture, color)
    assert height >= 0.8 * style_for(2400, 3600).font_size  # was at most 24 + 4 px before
    # the outline between the halves is as thick as the style's line width
    outline = (np.array(color) * 0.6).astype(np.uint8)
    row = picture[100]
    assert int((row == outline).all(axis=1).sum()) == style_for(2400, 3600).line_width


def test_small_scene_label_keeps_its_minimum_size():
    image = np.zeros((MIN_PICTURE_SIDE, MIN_PICTURE_SIDE, 3), np.uint8)
    class_map = np.zeros(image.shape[:2], np.int64)
    class_map[:, 128:] = 1
    _, color = _class_info(None, 1)
    height = label_box_height(np.asarray(draw_semantic(image, class_map)), color)
    assert MIN_FONT_SIZE * 0.7 <= height <= 3 * MIN_FONT_SIZE
