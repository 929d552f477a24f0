import json

import pytest

from mask2former.config import PRESETS, ModelConfig, get_preset

REQUIRED = [
    "coco-panoptic-r50",
    "coco-panoptic-r101",
    "coco-panoptic-swin-t",
    "coco-panoptic-swin-s",
    "coco-panoptic-swin-b",
    "coco-panoptic-swin-l",
    "coco-instance-r50",
    "ade20k-semantic-r50",
    "ade20k-semantic-swin-t",
]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(PRESETS)


@pytest.mark.parametrize("name", REQUIRED)
def test_preset_dataset_facts(name):
    config = get_preset(name)
    expected = {"coco-panoptic": (133, 80), "coco-instance": (80, 80), "ade20k-semantic": (150, None)}
    prefix = "-".join(name.split("-")[:2])
    classes, things = expected[prefix]
    assert config.num_classes == classes
    assert len(config.thing_classes) == len(config.category_ids) == classes
    if things is not None:
        assert sum(config.thing_classes) == things
    assert len(set(config.category_ids)) == classes
    test_size = {"coco": (800, 1333), "ade20k": (512, 2048)}[name.split("-")[0]]
    assert (config.input.short_edge, config.input.max_size) == test_size


def test_query_counts_and_backbones():
    assert get_preset("coco-panoptic-swin-l").decoder.num_queries == 200
    assert get_preset("coco-panoptic-r50").decoder.num_queries == 100
    assert get_preset("ade20k-semantic-swin-t").decoder.num_queries == 100
    assert get_preset("coco-panoptic-r101").backbone.layers == (3, 4, 23, 3)
    swin_b = get_preset("coco-panoptic-swin-b").backbone
    assert (swin_b.embed_dim, swin_b.window_size, swin_b.num_heads) == (128, 12, (4, 8, 16, 32))
    swin_s = get_preset("coco-panoptic-swin-s").backbone
    assert swin_s.depths == (2, 2, 18, 2) and swin_s.window_size == 7


def test_json_round_trip():
    config = get_preset("coco-panoptic-swin-t")
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"nmae": "x"})
    with pytest.raises(ValueError, match="known presets"):
        get_preset("coco-panoptic-r51")


# SPEC.md section 5: the official model zoo's parameter counts (millions, as published, rounded).
PUBLISHED_MILLIONS = {
    "coco-panoptic-r50": 44,
    "coco-panoptic-r101": 63,
    "coco-panoptic-swin-t": 47,
    "coco-panoptic-swin-s": 69,
    "coco-panoptic-swin-b": 107,
    "coco-panoptic-swin-l": 216,
}


@pytest.mark.parametrize("name, millions", PUBLISHED_MILLIONS.items())
def test_parameter_counts_match_the_published_ones_within_one_percent(name, millions):
    import torch

    import mask2former

    with torch.device("meta"):  # shapes only: Swin-L's 216M parameters cost no memory or init time
        model = mask2former.build(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - millions * 1e6) <= 0.01 * millions * 1e6, f"{name}: {count:,} parameters"


def test_config_written_before_the_num_heads_rename_still_reads():
    from mask2former.config import ModelConfig, get_preset

    document = get_preset("synth-tiny").to_dict()
    document["decoder"]["nheads"] = document["decoder"].pop("num_heads")
    assert ModelConfig.from_dict(document).decoder.num_heads == 4
