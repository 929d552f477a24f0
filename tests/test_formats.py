"""formats.py: write-then-read round trips, COCO conformance (pycocotools decodes our RLE), atomic writes."""

import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as coco_mask
import pytest
from PIL import Image

from mask2former import formats
from mask2former.fileio import id2rgb, read_label_png, read_panoptic_png, rgb2id, write_json
from mask2former.formats import (
    instances_to_coco,
    write_panoptic,
    write_panoptic_json,
    write_semantic_png,
)
from mask2former.results import InstanceResult, PanopticResult, PanopticSegment


def test_semantic_png_round_trip_uint8_with_category_ids(tmp_path):
    rng = np.random.default_rng(0)
    class_map = rng.integers(0, 5, (9, 13)).astype(np.int32)
    ids = [3, 7, 11, 200, 254]
    write_semantic_png(tmp_path / "a.png", class_map, ids)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "L"
    np.testing.assert_array_equal(read_label_png(tmp_path / "a.png"), np.asarray(ids)[class_map])
    write_semantic_png(tmp_path / "b.png", class_map)  # no ids: the contiguous indices themselves
    np.testing.assert_array_equal(read_label_png(tmp_path / "b.png"), class_map)


def test_semantic_png_uses_16_bits_above_255(tmp_path):
    class_map = np.array([[0, 1], [2, 1]])
    write_semantic_png(tmp_path / "a.png", class_map, [5, 300, 65535])
    np.testing.assert_array_equal(read_label_png(tmp_path / "a.png"), [[5, 300], [65535, 300]])


def test_semantic_png_rejects_class_without_id(tmp_path):
    with pytest.raises(ValueError, match="class_map"):
        write_semantic_png(tmp_path / "a.png", np.array([[0, 3]]), [1, 2])
    assert list(tmp_path.iterdir()) == []


def test_id_rgb_conversions_follow_panopticapi():
    ids = np.array([[0, 1, 255], [256, 65536 + 2, 16777215]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[1, 1], [2, 0, 1])
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    assert id2rgb(70000) == [70000 % 256, 70000 // 256 % 256, 70000 // 65536]
    assert rgb2id([112, 17, 1]) == 70000


def _panoptic_result() -> PanopticResult:
    id_map = np.zeros((6, 8), dtype=np.int32)
    id_map[0:2, :] = 1  # sky, stuff
    id_map[3:5, 1:4] = 2  # person
    id_map[3:6, 5:7] = 300  # a large id: needs the G channel
    segments = [
        PanopticSegment(id=1, category_id=0, isthing=False, score=0.9, area=16),
        PanopticSegment(id=2, category_id=1, isthing=True, score=0.95, area=6),
        PanopticSegment(id=300, category_id=1, isthing=True, score=0.85, area=6),
        PanopticSegment(id=4, category_id=1, isthing=True, score=0.85, area=0),  # not in the map: omitted
    ]
    return PanopticResult(id_map=id_map, segments=segments)


def test_panoptic_round_trip_and_annotation(tmp_path):
    result = _panoptic_result()
    ann = write_panoptic(
        tmp_path / "x.png", tmp_path / "x.json", result, image_id=42, file_name="x.png", category_ids=[184, 1]
    )
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "x.png"), result.id_map)
    assert ann["image_id"] == 42 and ann["file_name"] == "x.png"
    assert ann["segments_info"] == [
        {"id": 1, "category_id": 184, "iscrowd": 0, "bbox": [0, 0, 8, 2], "area": 16},
        {"id": 2, "category_id": 1, "iscrowd": 0, "bbox": [1, 3, 3, 2], "area": 6},
        {"id": 300, "category_id": 1, "iscrowd": 0, "bbox": [5, 3, 2, 3], "area": 6},
    ]
    assert json.loads((tmp_path / "x.json").read_text()) == ann
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.png"]  # no temporary files left


def test_panoptic_json_of_a_folder(tmp_path):
    ann = write_panoptic(tmp_path / "a.png", None, _panoptic_result(), image_id="a")
    assert ann["file_name"] == "a.png" and ann["segments_info"][0]["category_id"] == 0
    categories = [{"id": 0, "name": "sky", "isthing": 0}, {"id": 1, "name": "person", "isthing": 1}]
    write_panoptic_json(tmp_path / "panoptic.json", [ann], categories)
    written = json.loads((tmp_path / "panoptic.json").read_text())
    assert written == {"annotations": [ann], "categories": categories}


def test_instances_to_coco_rle_decodes_with_pycocotools(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.random((3, 11, 7)) < 0.3
    masks[2] = False  # an empty mask still gives a valid result with a zero box
    scores = np.array([0.9, 0.5, 0.1], np.float32)
    result = InstanceResult(
        masks=masks, classes=np.array([0, 2, 1]), scores=scores, boxes=np.zeros((3, 4), np.float32)
    )
    results = instances_to_coco(result, image_id=7, category_ids=[1, 5, 9])
    write_json(tmp_path / "r.json", results)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert [r["category_id"] for r in loaded] == [1, 9, 5]
    assert [r["image_id"] for r in loaded] == [7, 7, 7]
    np.testing.assert_allclose([r["score"] for r in loaded], [0.9, 0.5, 0.1], rtol=1e-6)
    rles = [
        {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()} for r in loaded
    ]
    np.testing.assert_array_equal(coco_mask.decode(rles).transpose(2, 0, 1), masks)
    np.testing.assert_array_equal([r["bbox"] for r in loaded], coco_mask.toBbox(rles))
    assert loaded[2]["bbox"] == [0, 0, 0, 0]


def test_instances_to_coco_empty():
    empty = InstanceResult(
        masks=np.zeros((0, 4, 5), bool),
        classes=np.zeros(0, np.int64),
        scores=np.zeros(0, np.float32),
        boxes=np.zeros((0, 4), np.float32),
    )
    assert instances_to_coco(empty, image_id=1, category_ids=[3]) == []


def test_failed_json_write_keeps_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"ok": np.int64(1), "v": np.float32(0.5), "a": np.arange(2)})
    assert json.loads(target.read_text()) == {"ok": 1, "v": 0.5, "a": [0, 1]}
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text())["ok"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_during_png_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")  # some bytes reach the temporary file before the failure
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_semantic_png(tmp_path / "s.png", np.zeros((3, 3), np.int32))
    with pytest.raises(OSError, match="disk full"):
        write_panoptic(tmp_path / "p.png", None, _panoptic_result(), image_id=1)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_json(tmp_path / "nowhere" / "x.json", {})


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "a.json", [])
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert formats  # the module imports cleanly without pycocotools in src
