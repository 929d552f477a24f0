"""Dataset catalogs: counts, order, ids and flags of the official class tables."""

from __future__ import annotations

import pytest

from mask2former.data.catalog import (
    DatasetMeta,
    ade20k_semantic,
    available,
    coco_instance,
    coco_panoptic,
    get_meta,
    register_meta,
)


def _check_consistent(meta: DatasetMeta) -> None:
    n = meta.num_classes
    assert len(meta.thing_classes) == len(meta.category_ids) == len(meta.colors) == n
    assert len(set(meta.category_ids)) == n
    assert len(set(meta.class_names)) == n
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta.colors)
    assert meta.ignore_label == 255


def test_coco_panoptic():
    meta = coco_panoptic()
    _check_consistent(meta)
    assert meta.num_classes == 133 and sum(meta.thing_classes) == 80
    assert all(meta.thing_classes[:80]) and not any(meta.thing_classes[80:])
    assert meta.class_names[0] == "person" and meta.class_names[79] == "toothbrush"
    assert meta.class_names[80] == "banner" and meta.class_names[-1] == "rug-merged"
    assert meta.category_ids[0] == 1 and meta.category_ids[-1] == 200
    assert meta.category_ids == sorted(meta.category_ids)
    assert meta.colors[0] == (220, 20, 60)
    assert meta.contiguous_index(200) == 132 and meta.contiguous_index(13) == 11  # id 12 does not exist
    with pytest.raises(ValueError):
        meta.contiguous_index(12)


def test_coco_instance_is_the_thing_half_of_panoptic():
    instance, panoptic = coco_instance(), coco_panoptic()
    _check_consistent(instance)
    assert instance.num_classes == 80 and all(instance.thing_classes)
    assert instance.class_names == panoptic.class_names[:80]
    assert instance.category_ids == panoptic.category_ids[:80]
    # COCO's 80 detection classes skip exactly these ten of 1..90.
    assert sorted(set(range(1, 91)) - set(instance.category_ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_ade20k_semantic():
    meta = ade20k_semantic()
    _check_consistent(meta)
    assert meta.num_classes == 150
    assert meta.class_names[:3] == ["wall", "building", "sky"] and meta.class_names[-1] == "flag"
    assert meta.class_names[8] == "window"  # the official trailing space is stripped
    assert meta.category_ids == list(range(150))
    # Mask2Former's ADE20K panoptic split: 100 things, 50 stuff.
    assert sum(meta.thing_classes) == 100
    assert meta.thing_classes[12] and meta.class_names[12] == "person"
    assert not meta.thing_classes[0] and not meta.thing_classes[2]


def test_get_meta_returns_fresh_copies():
    first = get_meta("coco_panoptic")
    first.class_names[0] = "changed"
    assert get_meta("coco_panoptic").class_names[0] == "person"
    assert get_meta("coco_instance").num_classes == 80
    assert get_meta("ade20k_semantic").num_classes == 150


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="coco_panoptic"):
        get_meta("imagenet")
    assert {"coco_panoptic", "coco_instance", "ade20k_semantic"} <= set(available())


def test_register_custom_dataset():
    meta = DatasetMeta("toy_test", ["a", "b"], [True, False], [1, 2], [(1, 2, 3), (4, 5, 6)])
    register_meta("toy_test", lambda: meta)
    assert get_meta("toy_test").class_names == ["a", "b"]


def test_inconsistent_meta_is_rejected():
    with pytest.raises(ValueError, match="length"):
        DatasetMeta("bad", ["a", "b"], [True], [1, 2], [(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ValueError, match="unique"):
        DatasetMeta("bad", ["a", "b"], [True, True], [1, 1], [(0, 0, 0), (1, 1, 1)])
