"""`mask2former convert --to hf` writes a folder the Hugging Face tools load as they are: AutoImageProcessor
(preprocessor_config.json with our test-time pre-processing), Mask2FormerForUniversalSegmentation and
pipeline("image-segmentation"). Offline: nothing is downloaded.

The bundled model itself cannot be expressed in HF's layout (its pixel decoder's GroupNorm has 8 groups,
transformers hard-codes 32): the CLI says so in one line. The folder tested is the bundled architecture
and pre-processing with 32 groups (random weights)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mask2former  # noqa: E402
from mask2former.api import BUNDLED_DIR  # noqa: E402
from mask2former.checkpoints.io import read_checkpoint, save_checkpoint  # noqa: E402
from mask2former.cli import main  # noqa: E402
from mask2former.inference.preprocess import preprocess_for  # noqa: E402

EXAMPLE = BUNDLED_DIR.parent / "example.png"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Our folder (bundled architecture, 32 GroupNorm groups, random weights) and its `convert --to hf`."""
    root = tmp_path_factory.mktemp("hf")
    config, _ = read_checkpoint(BUNDLED_DIR)
    config = dataclasses.replace(
        config, pixel_decoder=dataclasses.replace(config.pixel_decoder, num_groups=32)
    )
    save_checkpoint(mask2former.build(config, seed=0).state_dict(), config, root / "ours")
    assert main(["convert", str(root / "ours"), str(root / "hf"), "--to", "hf"]) == 0
    return {"ours": root / "ours", "hf": root / "hf", "config": config, "root": root}


def test_preprocessor_config_states_our_preprocessing(converted):
    processor = json.loads((converted["hf"] / "preprocessor_config.json").read_text())
    cfg = converted["config"].input
    assert processor["size"] == {"shortest_edge": cfg.short_edge, "longest_edge": cfg.max_size}
    assert processor["size_divisor"] == cfg.size_divisibility == 32
    assert processor["image_mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert processor["image_std"] == pytest.approx([0.229, 0.224, 0.225], abs=1e-6)
    assert processor["do_resize"] and processor["do_normalize"] and processor["do_rescale"]
    assert processor["ignore_index"] == 255 and processor["num_labels"] == converted["config"].num_classes


@pytest.mark.slow
def test_hf_tools_load_the_folder_and_agree_with_us(converted):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, pipeline

    folder = str(converted["hf"])
    image = Image.open(EXAMPLE).convert("RGB")
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = preprocess_for(converted["config"].input, np.asarray(image)).tensor
    assert pixels.shape == ours.shape  # 128 -> 192, a multiple of 32: no stretch, no padding
    assert float((pixels - ours).abs().max()) < 1e-4
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
    assert model.config.id2label[0] == converted["config"].class_names[0]
    segmenter = pipeline("image-segmentation", model=folder)
    assert isinstance(segmenter(image), list)  # panoptic (random weights: few or no segments)
    semantic = segmenter(image, subtask="semantic")
    assert semantic, "semantic segmentation labels every pixel"
    names = converted["config"].class_names
    hf_map = np.full(image.size[::-1], -1)
    for entry in semantic:
        hf_map[np.asarray(entry["mask"]) > 0] = names.index(entry["label"])
    prediction = mask2former.load(converted["ours"])(image, task="semantic")
    assert (hf_map == prediction.class_map).mean() > 0.99


def test_hf_folder_converts_back_with_its_preprocessing(converted):
    back = converted["root"] / "back"
    assert main(["convert", str(converted["hf"]), str(back), "--from", "hf"]) == 0
    config, _ = read_checkpoint(back)
    assert config.input == converted["config"].input
    assert config.class_names == converted["config"].class_names


def test_bundled_model_refused_in_one_line(tmp_path, capsys):
    assert main(["convert", str(BUNDLED_DIR), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "GroupNorm with 8 groups (transformers hard-codes 32)" in err
    assert not (tmp_path / "hf").exists()
