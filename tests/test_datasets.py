"""Dataset readers on tiny folders written here: COCO instance, COCO panoptic, semantic folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former import rle
from mask2former.data.augment import LargeScaleJitter
from mask2former.data.datasets import (
    CocoInstanceDataset,
    CocoPanopticDataset,
    DatasetError,
    SemanticFolderDataset,
    open_dataset,
    polygons_to_mask,
)
from mask2former.data.synth import SYNTH_META
from mask2former.fileio import id2rgb


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def coco_instances(tmp_path):
    root = tmp_path / "coco"
    _save(root / "val2017/a.png", _image(20, 30))
    _save(root / "val2017/b.png", _image(10, 12, 1))
    square = np.zeros((20, 30), dtype=bool)
    square[5:15, 20:28] = True
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 8, "file_name": "b.png", "height": 10, "width": 12},
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 9, "name": "boat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 9,
                "iscrowd": 0,
                "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]],
            },
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": rle.encode(square)[0]},
            {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "segmentation": rle.encode(square)[0]},
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations/instances_val2017.json").write_text(json.dumps(data))
    return root, square


def test_coco_instance_polygon_rle_crowd_and_empty(coco_instances):
    root, square = coco_instances
    dataset = CocoInstanceDataset(root / "val2017", root / "annotations/instances_val2017.json")
    assert dataset.meta.category_ids == [3, 9] and dataset.meta.class_names == ["car", "boat"]
    item = dataset[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 20, 30)
    assert item["masks"].dtype == torch.bool and item["masks"].shape == (2, 20, 30)  # crowd skipped
    assert item["labels"].tolist() == [1, 0]  # category 9 -> index 1, category 3 -> index 0
    assert torch.equal(item["masks"][1], torch.from_numpy(square))
    polygon = item["masks"][0].numpy()
    assert polygon[3:10, 3:12].all() and not polygon[12:].any() and not polygon[:, 14:].any()
    empty = dataset[1]
    assert empty["masks"].shape == (0, 10, 12) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == torch.int64 and empty["image_id"] == 8
    assert len(dataset.ground_truth(0)["annotations"]) == 3
    assert isinstance(open_dataset(root), CocoInstanceDataset)


def test_polygon_close_to_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    polygon = [[3.2, 4.1, 40.7, 9.9, 28.3, 35.6, 8.8, 30.2]]
    ours = polygons_to_mask(polygon, 48, 50)
    theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 48, 50))).astype(bool)
    iou = (ours & theirs).sum() / (ours | theirs).sum()
    assert iou > 0.93


@pytest.fixture(scope="module")
def synth_root(synth_dataset):
    return synth_dataset(3, seed=11, size=(48, 64))


def test_panoptic_reader_on_synth(synth_root):
    dataset = open_dataset(synth_root)
    assert isinstance(dataset, CocoPanopticDataset) and len(dataset) == 3
    assert dataset.meta.category_ids == SYNTH_META.category_ids
    for i in range(3):
        item, truth = dataset[i], dataset.ground_truth(i)
        assert item["masks"].shape[0] == len(truth["segments_info"]) == item["labels"].shape[0]
        # masks partition the image (synthetic scenes have no void) and labels follow the categories
        assert torch.all(item["masks"].sum(0) == 1)
        for mask, label, segment in zip(item["masks"], item["labels"], truth["segments_info"], strict=True):
            assert SYNTH_META.category_ids[int(label)] == segment["category_id"]
            assert int(mask.sum()) == segment["area"]
        semantic = np.asarray(Image.open(synth_root / "semantic" / truth["file_name"]))
        assert np.array_equal(dataset.semantic_ground_truth(i), semantic)


def test_semantic_view_of_synth(synth_root):
    dataset = open_dataset(synth_root, task="semantic")
    assert isinstance(dataset, SemanticFolderDataset)
    assert dataset.meta.class_names == SYNTH_META.class_names
    item = dataset[0]
    assert torch.all(item["masks"].sum(0) == 1)
    assert item["labels"].tolist() == sorted(item["labels"].tolist())


def test_panoptic_crowd_and_unannotated_image(tmp_path):
    _save(tmp_path / "images/a.png", _image(8, 8))
    _save(tmp_path / "images/b.png", _image(8, 8, 2))
    ids = np.zeros((8, 8), dtype=np.int64)
    ids[:4] = 5
    ids[4:, :4] = 6
    _save(tmp_path / "panoptic/a.png", id2rgb(ids))
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png", "height": 8, "width": 8}]
    data = {
        "images": images,
        "annotations": [
            {
                "image_id": 1,
                "file_name": "a.png",
                "segments_info": [
                    {"id": 5, "category_id": 40, "iscrowd": 0},
                    {"id": 6, "category_id": 40, "iscrowd": 1},
                ],
            }
        ],
        "categories": [{"id": 40, "name": "x", "isthing": 1}],
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(data))
    dataset = open_dataset(tmp_path)
    item = dataset[0]
    assert item["masks"].shape == (1, 8, 8) and int(item["masks"].sum()) == 32
    empty = dataset[1]
    assert empty["masks"].shape == (0, 8, 8) and empty["labels"].shape == (0,)
    semantic = dataset.semantic_ground_truth(0)
    assert (semantic[:4] == 0).all() and (semantic[4:, :4] == 0).all() and (semantic[4:, 4:] == 255).all()


def test_semantic_folder_with_ignore_and_empty(tmp_path):
    label = np.full((6, 7), 255, dtype=np.uint8)
    label[:2] = 2
    label[2:4, :3] = 0
    _save(tmp_path / "images/x.jpg", _image(6, 7))
    _save(tmp_path / "labels/x.png", label)
    _save(tmp_path / "images/y.png", _image(6, 7, 3))
    _save(tmp_path / "labels/y.png", np.full((6, 7), 255, dtype=np.uint8))
    dataset = open_dataset(tmp_path)
    assert isinstance(dataset, SemanticFolderDataset) and dataset.meta.num_classes == 3
    item = dataset[0]
    assert item["labels"].tolist() == [0, 2] and item["file_name"] == "x.jpg"
    assert torch.equal(item["masks"][1], torch.from_numpy(label == 2))
    assert not item["masks"].any(0)[4:].any()  # ignore pixels belong to no mask
    assert dataset[1]["masks"].shape == (0, 6, 7) and dataset[1]["labels"].shape == (0,)
    assert np.array_equal(dataset.ground_truth(0), label)
    assert dataset.meta.class_names == ["class_0", "class_1", "class_2"]
    (tmp_path / "classes.txt").write_text("wall\nfloor\nperson\ncar\n")  # names for fine-tuning by name
    named = open_dataset(tmp_path)
    assert named.meta.class_names == ["wall", "floor", "person", "car"] and named.meta.num_classes == 4
    (tmp_path / "classes.txt").write_text("wall\nfloor\n")
    with pytest.raises(DatasetError, match="classes.txt: names 2 classes but the labels use 3"):
        open_dataset(tmp_path)


def test_seeded_transform_is_per_item_deterministic(synth_root):
    make = lambda: open_dataset(synth_root, transform=LargeScaleJitter(32, 0.5, 1.5), seed=5)  # noqa: E731
    first, second = make(), make()
    a, b = first[2], second[2]  # the other dataset has not seen items 0, 1: same result anyway
    assert a["image"].shape == (3, 32, 32) and torch.equal(a["image"], b["image"])
    assert torch.equal(a["masks"], b["masks"])
    first.set_epoch(1)
    assert not torch.equal(first[2]["image"], a["image"])


def test_errors_name_the_file(tmp_path, synth_root):
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        open_dataset(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="bad.json"):
        open_dataset(tmp_path / "bad.json")
    _save(tmp_path / "imgs/z.png", _image(4, 4))
    (tmp_path / "lbl").mkdir()
    with pytest.raises(DatasetError, match="z.png: label file not found"):
        SemanticFolderDataset(tmp_path / "imgs", tmp_path / "lbl")
    _save(tmp_path / "lbl/z.png", np.full((4, 5), 1, dtype=np.uint8))
    with pytest.raises(DatasetError, match="z.png: annotation is 5x4"):
        SemanticFolderDataset(tmp_path / "imgs", tmp_path / "lbl")[0]
