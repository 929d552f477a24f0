"""Overlay pictures: size kept, masked pixels recoloured, the rest untouched, labels drawn, atomic save."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former.data.catalog import coco_panoptic
from mask2former.visualize import (
    draw_instances,
    draw_panoptic,
    draw_semantic,
    label_point,
    save_image,
)

META = coco_panoptic()
H, W = 96, 128


@dataclass
class Segment:
    id: int
    category_id: int
    isthing: bool
    score: float = 1.0


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _changed(a: Image.Image | np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a) != b).any(axis=2)


def test_semantic_recolours_only_the_masked_pixels():
    image = _image()
    class_map = np.full((H, W), 255, np.int64)  # ignore
    class_map[10:60, 20:90] = 16  # cat
    out = draw_semantic(image, class_map, META, show_labels=False)
    assert out.size == (W, H) and out.mode == "RGB"
    changed = _changed(out, image)
    inside = class_map == 16
    assert changed[inside].mean() > 0.95
    assert not changed[~inside].any()
    # The fill is the 50/50 blend with the class colour.
    blend = np.rint(image[30, 50] * 0.5 + np.array(META.colors[16]) * 0.5)
    assert np.asarray(out)[30, 50].tolist() == blend.astype(int).tolist()


def test_labels_are_drawn_at_the_interior_point():
    image = _image()
    class_map = np.full((H, W), -1, np.int64)
    class_map[10:90, 10:120] = 0
    with_labels = np.asarray(draw_semantic(image, class_map, META))
    without = np.asarray(draw_semantic(image, class_map, META, show_labels=False))
    y, x = label_point(class_map == 0)
    assert abs(y - 49.5) <= 1 and abs(x - 64.5) <= 1  # the middle of the rectangle
    differ = _changed(with_labels, without)
    assert differ[y - 3 : y + 4, x - 10 : x + 11].any()
    ys, xs = np.nonzero(differ)
    assert abs(ys.mean() - y) < 8 and abs(xs.mean() - x) < 12  # the label box is centred on the point


def test_label_point_stays_inside_concave_and_thin_masks():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:12] = True
    mask[28:35, 5:35] = True  # an L shape: its centroid is outside
    y, x = label_point(mask)
    assert mask[y, x]
    line = np.eye(600, dtype=bool)  # thin diagonal, subsampled EDT misses it
    y, x = label_point(line)
    assert line[y, x]
    with pytest.raises(ValueError):
        label_point(np.zeros((3, 3), bool))


def test_panoptic_distinct_colours_for_instances_of_one_class():
    image = np.full((H, W, 3), 128, np.uint8)
    id_map = np.zeros((H, W), np.int32)
    id_map[10:40, 10:50] = 1
    id_map[50:90, 60:120] = 2
    id_map[60:90, 0:40] = 3
    segments = [Segment(1, 0, True), Segment(2, 0, True), Segment(3, 125, False)]  # 125: a stuff class
    out = np.asarray(draw_panoptic(image, id_map, segments, META, show_labels=False))
    assert out.shape == image.shape
    assert (out[id_map == 0] == 128).all()
    first, second, stuff = out[25, 30], out[70, 90], out[75, 20]
    assert first.tolist() != second.tolist()
    assert first.tolist() == np.rint(128 * 0.5 + np.array(META.colors[0]) * 0.5).astype(int).tolist()
    assert stuff.tolist() == np.rint(128 * 0.5 + np.array(META.colors[125]) * 0.5).astype(int).tolist()
    # Dict segments work too, and labels change pixels.
    as_dicts = [{"id": 1, "category_id": 0, "isthing": True}]
    labelled = np.asarray(draw_panoptic(image, id_map, as_dicts, META))
    unlabelled = np.asarray(draw_panoptic(image, id_map, as_dicts, META, show_labels=False))
    assert _changed(labelled, unlabelled).any()


def test_instances_masks_boxes_and_labels():
    image = _image()
    masks = np.zeros((3, H, W), bool)
    masks[0, 20:60, 20:60] = True
    masks[1, 30:80, 70:120] = True
    masks[2, 0:5, 0:5] = True
    boxes = np.array([[20, 20, 60, 60], [70, 30, 120, 80], [0, 0, 5, 5]], np.float32)
    out = np.asarray(
        draw_instances(
            image, masks, [0, 0, 2], [0.9, 0.7, 0.1], boxes, META, show_labels=False, score_threshold=0.5
        )
    )
    changed = _changed(out, image)
    assert changed[masks[0]].mean() > 0.95 and changed[masks[1]].mean() > 0.95
    assert not changed[masks[2]].any()  # below the score threshold
    assert changed[19, 30] or changed[20, 30]  # the box outline
    far = np.ones((H, W), bool)
    far[15:65, 15:65] = False
    far[25:85, 65:125] = False
    assert not changed[far].any()
    # Same class, different instances: the colours recovered from the 50/50 blends differ.
    first = 2 * out[40, 40].astype(float) - image[40, 40]
    second = 2 * out[50, 95].astype(float) - image[50, 95]
    assert np.abs(first - second).max() > 20
    np.testing.assert_allclose(second, META.colors[0], atol=2)  # the largest instance keeps the class colour
    labelled = np.asarray(
        draw_instances(image, masks, [0, 0, 2], [0.9, 0.7, 0.1], boxes, META, score_threshold=0.5)
    )
    assert _changed(labelled, out).any()


def test_instance_colours_of_one_class_differ():
    image = np.zeros((H, W, 3), np.uint8)
    masks = np.zeros((4, H, W), bool)
    for index in range(4):
        masks[index, :, index * 30 : index * 30 + 20] = True
    out = np.asarray(draw_instances(image, masks, [0, 0, 0, 0], [0.9] * 4, None, META, show_labels=False))
    colours = {tuple(out[50, index * 30 + 10]) for index in range(4)}
    assert len(colours) == 4


def test_empty_results_give_the_unchanged_image():
    image = _image()
    assert (np.asarray(draw_semantic(image, np.full((H, W), 255), META)) == image).all()
    assert (np.asarray(draw_panoptic(image, np.zeros((H, W), np.int32), [], META)) == image).all()
    empty = np.zeros((0, H, W), bool)
    assert (np.asarray(draw_instances(image, empty, [], [], np.zeros((0, 4)), META)) == image).all()


def test_without_meta_and_unknown_classes():
    image = _image()
    class_map = np.zeros((H, W), np.int64)
    class_map[:, 64:] = 500  # beyond the catalog: a fallback colour and name
    out = draw_semantic(image, class_map, None)
    assert _changed(out, image).mean() > 0.95


def test_bad_inputs():
    image = _image()
    with pytest.raises(ValueError):
        draw_semantic(image, np.zeros((H + 1, W), np.int64), META)
    with pytest.raises(ValueError):
        draw_semantic(image.astype(np.float32), np.zeros((H, W), np.int64), META)
    with pytest.raises(ValueError):
        draw_instances(image, np.zeros((2, H, W), bool), [0], [0.5], None, META)


def test_save_image_atomic(tmp_path: Path):
    image = _image()
    picture = draw_semantic(image, np.zeros((H, W), np.int64), META)
    png = save_image(picture, tmp_path / "out" / "overlay.png")
    assert (np.asarray(Image.open(png)) == np.asarray(picture)).all()
    jpg = save_image(image, tmp_path / "raw.jpg")
    assert Image.open(jpg).format == "JPEG"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["overlay.png", "raw.jpg"]
    with pytest.raises(ValueError, match="unknown image format"):
        save_image(image, tmp_path / "overlay.xyz")
