"""The Python API as users of HF pipelines / ultralytics / detectron2 call it: a callable predictor, every
accepted image kind giving the same result, result objects with names, plot, save, COCO and RLE, and the
device choice ("auto", one-line errors for a device the machine lacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mask2former
from mask2former import rle
from mask2former.data.image_io import ImageReadError
from mask2former.devices import resolve_device
from mask2former.inference.inputs import to_rgb
from mask2former.inference.prediction import Prediction
from mask2former.results import InstanceResult, PanopticResult, SemanticResult

EXAMPLE = Path(mask2former.__file__).parent / "assets" / "example.png"
SRC = Path(mask2former.__file__).parents[1]


@pytest.fixture(scope="module")
def predictor():
    return mask2former.load()


@pytest.fixture(scope="module")
def small_predictor():
    """The bundled model at a test-time scale of 64 px: the input-kind tests compare results, not quality."""
    predictor = mask2former.load()
    predictor.set_short_edge(64)
    return predictor


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.asarray(Image.open(EXAMPLE).convert("RGB"))


def every_kind(rgb: np.ndarray) -> dict[str, tuple[object, bool]]:
    """(image, bgr flag) of each accepted kind, all holding the same pixels."""
    chw = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    return {
        "path": (str(EXAMPLE), False),
        "Path": (EXAMPLE, False),
        "PIL": (Image.open(EXAMPLE), False),
        "uint8 HWC": (rgb, False),
        "float 0..1": (rgb / 255.0, False),
        "float32 0..255": (rgb.astype(np.float32), False),
        "BGR uint8": (np.ascontiguousarray(rgb[:, :, ::-1]), True),
        "BGRA uint8": (np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 255, np.uint8)]), True),
        "tensor uint8 CHW": (chw, False),
        "tensor float CHW 0..1": (chw.float() / 255, False),
        "tensor uint8 HWC": (chw.permute(1, 2, 0), False),
        "tensor float HWC 0..255": (chw.permute(1, 2, 0).double(), False),
        "tensor BGR CHW": (chw.flip(0), True),
    }


def test_to_rgb_reads_every_kind_to_the_same_pixels(rgb):
    for name, (image, bgr) in every_kind(rgb).items():
        np.testing.assert_array_equal(to_rgb(image, bgr=bgr), rgb, err_msg=name)


@pytest.mark.slow  # one forward pass per input kind
def test_every_input_kind_gives_the_same_result(small_predictor, rgb):
    reference = small_predictor(str(EXAMPLE), task="panoptic")
    assert reference.segments, "the bundled model finds segments on its example"
    for name, (image, bgr) in every_kind(rgb).items():
        prediction = small_predictor(image, task="panoptic", bgr=bgr)
        np.testing.assert_array_equal(prediction.id_map, reference.id_map, err_msg=name)
        assert prediction.labels == reference.labels, name


@pytest.mark.slow  # one forward pass per input kind
def test_lists_and_stacked_batches_equal_one_at_a_time(small_predictor, rgb):
    single = small_predictor(rgb, task="semantic")
    kinds = [image for image, bgr in every_kind(rgb).values() if not bgr]
    predictions = small_predictor(kinds, task="semantic", batch_size=4)
    assert isinstance(predictions, list) and len(predictions) == len(kinds)
    stacked = torch.from_numpy(np.stack([rgb, rgb])).permute(0, 3, 1, 2)  # (B, 3, H, W)
    predictions += small_predictor(stacked, task="semantic")
    predictions += small_predictor(np.stack([rgb, rgb]), task="semantic")  # (B, H, W, 3)
    for prediction in predictions:
        np.testing.assert_array_equal(prediction.class_map, single.class_map)


def test_inputs_are_not_modified(small_predictor, rgb):
    array = np.ascontiguousarray(rgb[:, :, ::-1])
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    before_array, before_tensor = array.copy(), tensor.clone()
    small_predictor([array, tensor], bgr=True)
    np.testing.assert_array_equal(array, before_array)
    assert torch.equal(tensor, before_tensor)


def test_float_and_bad_inputs_have_one_line_errors():
    np.testing.assert_array_equal(to_rgb(np.full((4, 5, 3), 0.5)), np.full((4, 5, 3), 128, np.uint8))
    np.testing.assert_array_equal(to_rgb(np.full((4, 5, 3), 200.0)), np.full((4, 5, 3), 200, np.uint8))
    for bad, words in (
        (np.full((4, 5, 3), -0.5), "normalised"),
        (np.full((4, 5, 3), np.nan), "NaN"),
        (np.zeros((6, 5, 7), np.uint8), "shape"),
        ({"not": "an image"}, "dict"),
    ):
        with pytest.raises(ImageReadError, match=words) as info:
            to_rgb(bad)
        assert "\n" not in str(info.value)


def test_predict_keeps_returning_the_typed_result(predictor):
    result = predictor.predict(EXAMPLE, task="panoptic")
    assert isinstance(result, PanopticResult)
    prediction = predictor(EXAMPLE, task="panoptic")
    assert isinstance(prediction, Prediction) and isinstance(prediction.result, PanopticResult)
    np.testing.assert_array_equal(prediction.id_map, result.id_map)


def test_results_carry_class_names_and_their_fields(predictor):
    names = predictor.config.class_names
    panoptic = predictor(EXAMPLE, task="panoptic")
    assert panoptic.class_names == names
    assert panoptic.labels == [names[s.category_id] for s in panoptic.segments]
    instance = predictor(EXAMPLE, task="instance")
    assert isinstance(instance.result, InstanceResult)
    assert instance.masks.shape[0] == len(instance.classes) == len(instance.scores) == len(instance.boxes)
    assert instance.labels == [names[c] for c in instance.classes]
    semantic = predictor(EXAMPLE, task="semantic")
    assert isinstance(semantic.result, SemanticResult)
    assert semantic.labels == [names[c] for c in np.unique(semantic.class_map)]
    assert "segments:" in repr(panoptic) or "segments" in repr(panoptic)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_masks_rle_decode_to_the_masks(predictor, task):
    prediction = predictor(EXAMPLE, task=task)
    rles = prediction.masks_rle()
    dense = prediction.masks_array()
    assert len(rles) == len(prediction.labels) == len(dense) > 0
    np.testing.assert_array_equal(rle.decode(rles), dense)
    pycocotools = pytest.importorskip("pycocotools.mask")
    coded = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    np.testing.assert_array_equal(pycocotools.decode(coded).transpose(2, 0, 1).astype(bool), dense)
    if task == "panoptic":
        np.testing.assert_array_equal(dense, [prediction.id_map == s.id for s in prediction.segments])


def test_to_coco_and_to_json(predictor):
    prediction = predictor(EXAMPLE, task="panoptic")
    coco = prediction.to_coco(image_id=42)
    ids = predictor.config.category_ids
    for annotation, segment in zip(coco, prediction.segments, strict=True):
        assert annotation["image_id"] == 42
        assert annotation["category_id"] == ids[segment.category_id]
        assert annotation["area"] == segment.area == int((prediction.id_map == segment.id).sum())
        assert annotation["score"] == pytest.approx(segment.score)
        ys, xs = np.nonzero(prediction.id_map == segment.id)
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    document = json.loads(prediction.to_json())
    assert document["task"] == "panoptic" and document["class_names"] == predictor.config.class_names
    assert [s["label"] for s in document["segments"]] == prediction.labels
    assert "mask" not in document["segments"][0]
    with_masks = json.loads(prediction.to_json(rle=True))
    assert with_masks["segments"][0]["mask"] == prediction.masks_rle()[0]


def test_instance_to_coco_loads_in_pycocotools(predictor):
    coco_module = pytest.importorskip("pycocotools.coco")
    prediction = predictor(EXAMPLE, task="instance")
    height, width = prediction.image.shape[:2]
    ids = predictor.config.category_ids
    ground_truth = coco_module.COCO()
    ground_truth.dataset = {
        "images": [{"id": 7, "height": height, "width": width, "file_name": "example.png"}],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in zip(ids, predictor.config.class_names, strict=True)],
    }
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(prediction.to_coco(image_id=7))
    assert len(loaded.getAnnIds()) == len(prediction.labels)


def test_plot_and_save(predictor, tmp_path):
    prediction = predictor(EXAMPLE, task="panoptic")
    picture = prediction.plot()
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[0] >= prediction.image.shape[0]  # small images are drawn enlarged
    assert not np.array_equal(picture[::2, ::2], prediction.image)  # something was drawn
    saved = prediction.save(tmp_path / "sub" / "overlay.png")
    np.testing.assert_array_equal(np.asarray(Image.open(saved).convert("RGB")), picture)
    document = json.loads(prediction.save(tmp_path / "result.json").read_text())
    assert [s["label"] for s in document["segments"]] == prediction.labels
    with pytest.raises(ValueError, match="unknown suffix"):
        prediction.save(tmp_path / "result.txt")


def test_device_auto_and_unavailable_devices(predictor):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert predictor.runner.device == resolve_device("auto")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the unavailable-device error cannot be shown")
    with pytest.raises(ValueError, match=r"^device cuda: CUDA is not available") as info:
        mask2former.load(device="cuda")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^device gpu7: not a device name"):
        resolve_device("gpu7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_on_a_cpu_torch_is_one_line(tmp_path):
    for command in (["predict", str(EXAMPLE), "--out", str(tmp_path)], ["eval", "--data", str(tmp_path)]):
        done = subprocess.run(
            [sys.executable, "-m", "mask2former", *command, "--task", "panoptic", "--device", "cuda"],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--device cuda: CUDA is not available" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
