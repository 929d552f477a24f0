"""ONNX export of synth-tiny: fixed and dynamic graphs agree with eager PyTorch, fp16 stays close, the
sidecar carries everything the ONNX Runtime predictor needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from mask2former.api import has_bundled_model, load_model  # noqa: E402
from mask2former.config import ModelConfig, get_preset  # noqa: E402
from mask2former.data.image_io import load_image  # noqa: E402
from mask2former.export import onnx as export_module  # noqa: E402
from mask2former.export.onnx import export_onnx, graph_config  # noqa: E402
from mask2former.export.parity import panoptic_agreement  # noqa: E402
from mask2former.export.runtime import ExportError, OnnxRunner, load_onnx_predictor, sidecar_path  # noqa: E402
from mask2former.inference.predictor import Predictor, TorchRunner  # noqa: E402
from mask2former.inference.preprocess import preprocess_for  # noqa: E402
from mask2former.modeling.build import build_model  # noqa: E402
from mask2former.results import PanopticResult, PanopticSegment  # noqa: E402

TRACED = (96, 128)
IMAGE = str(Path(__file__).parent / "data" / "chelsea.png")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("synth-tiny")).eval()


@pytest.fixture(scope="module")
def config():
    return get_preset("synth-tiny")


def _export(tmp_path_factory, model, config, name, **kwargs):
    out = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
    sidecar = export_onnx(
        model, config, out, TRACED, trained=False, image=IMAGE, log=lambda _: None, **kwargs
    )
    return out, sidecar


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, model, config):
    return _export(tmp_path_factory, model, config, "fixed")


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory, model, config):
    return _export(tmp_path_factory, model, config, "dynamic", dynamic=True)


@pytest.fixture(scope="module")
def half(tmp_path_factory, model, config):
    return _export(tmp_path_factory, model, config, "fp16", dynamic=True, fp16=True)


def _eager(model, images):
    with torch.inference_mode():
        return model(images, return_aux=False)


def _max_diff(a, b, key):
    return float((a[key].float() - b[key].float()).abs().max())


def test_fixed_graph_matches_eager_at_traced_size(fixed, model):
    path, _ = fixed
    images = torch.randn(1, 3, *TRACED, generator=torch.Generator().manual_seed(1))
    ours, ref = OnnxRunner(path)(images), _eager(model, images)
    assert _max_diff(ours, ref, "pred_logits") <= 1e-4
    assert _max_diff(ours, ref, "pred_masks") <= 1e-4
    assert ours["pred_masks"].shape == (1, 20, TRACED[0] // 4, TRACED[1] // 4)


def test_fixed_graph_rejects_other_sizes_in_one_line(fixed):
    with pytest.raises(ValueError, match="exported for height 96") as error:
        OnnxRunner(fixed[0])(torch.zeros(1, 3, 128, 128))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("batch,height,width", [(1, 96, 128), (2, 128, 192), (1, 160, 160)])
def test_dynamic_graph_matches_eager_at_other_sizes(dynamic, model, batch, height, width):
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
    ours, ref = OnnxRunner(dynamic[0])(images), _eager(model, images)
    assert ours["pred_masks"].shape == (batch, 20, height // 4, width // 4)
    assert _max_diff(ours, ref, "pred_logits") <= 1e-4
    assert _max_diff(ours, ref, "pred_masks") <= 1e-4


def test_graph_interface(fixed, dynamic):
    for path, is_dynamic in ((fixed[0], False), (dynamic[0], True)):
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == ["images"]
        assert [o.name for o in graph.output] == ["pred_logits", "pred_masks"]  # no aux outputs
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims == (["batch", 3, "height", "width"] if is_dynamic else [1, 3, *TRACED])
        opset = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
        assert opset >= 17


def test_sidecar_carries_config_and_parity(fixed, dynamic, config):
    path, sidecar = fixed
    assert json.loads(sidecar_path(path).read_text()) == sidecar
    assert sidecar["preprocessing"] == {"mode": "deploy", "size": list(TRACED)}
    assert sidecar["config"]["input"]["mode"] == "deploy" and sidecar["config"]["input"]["size"] == list(
        TRACED
    )
    assert sidecar["classes"] == config.class_names and sidecar["isthing"] == config.thing_classes
    assert set(sidecar["thing_classes"]) | set(sidecar["stuff_classes"]) == set(config.class_names)
    assert (sidecar["size"], sidecar["dynamic"], sidecar["dtype"], sidecar["opset"]) == (
        [96, 128],
        False,
        "float32",
        17,
    )
    [report] = sidecar["parity"]
    assert report["input_size"] == list(TRACED) and report["max_abs_logits"] <= 1e-4
    assert report["panoptic_agreement"] == 1.0 and report["semantic_agreement"] == 1.0

    dyn = dynamic[1]
    assert dyn["preprocessing"]["mode"] == "official"
    assert ModelConfig.from_dict(dyn["config"]).input == config.input
    # checked at the traced size and at sizes it was not traced at
    assert len({tuple(r["input_size"]) for r in dyn["parity"]}) >= 2
    assert all(r["max_abs_logits"] <= 1e-4 for r in dyn["parity"])


def test_onnx_predictor_equals_eager_predictor(fixed, model):
    path, _ = fixed
    predictor = load_onnx_predictor(path)
    assert predictor.config.input.mode == "deploy" and predictor.trained is False
    eager = Predictor(TorchRunner(model), predictor.config)
    ours, ref = predictor.predict(IMAGE, "panoptic"), eager.predict(IMAGE, "panoptic")
    assert panoptic_agreement(ref, ours) == 1.0
    semantic = predictor.predict(IMAGE, "semantic").class_map
    assert (semantic == eager.predict(IMAGE, "semantic").class_map).all()


def test_fp16_graph_is_half_and_close_to_fp32(half, model, config):
    path, sidecar = half
    graph = onnx.load(str(path)).graph
    dtypes = {i.name: i.data_type for i in graph.initializer if np.prod(i.dims) > 64}
    half_parts = [n for n in dtypes if n.startswith(("model.backbone.", "model.sem_seg_head.predictor."))]
    assert half_parts and all(dtypes[n] == onnx.TensorProto.FLOAT16 for n in half_parts)
    # the pixel decoder runs in float32, as under the official mixed precision
    pixel_decoder = [n for n in dtypes if n.startswith("model.sem_seg_head.pixel_decoder.")]
    assert pixel_decoder and all(dtypes[n] == onnx.TensorProto.FLOAT for n in pixel_decoder)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # cast inside the graph
    assert sidecar["dtype"] == "float16"
    item = preprocess_for(graph_config(config, TRACED, dynamic=True).input, load_image(IMAGE))
    ours, ref = OnnxRunner(path)(item.tensor), _eager(model, item.tensor)
    # Random weights: every query predicts nearly the same mask and class, so panoptic and semantic labels
    # are decided by near-ties and their agreement says little; the logits themselves must stay close.
    assert _max_diff(ours, ref, "pred_logits") < 2e-2
    assert _max_diff(ours, ref, "pred_masks") < 2e-2
    assert ((ours["pred_masks"] > 0) == (ref["pred_masks"] > 0)).float().mean() > 0.995
    for report in sidecar["parity"]:
        assert report["max_abs_masks"] < 2e-2 and report["mask_sign_agreement"] > 0.995
        assert report["panoptic_agreement"] >= 0.99  # holds, but is near-trivial without segments


@pytest.mark.skipif(not has_bundled_model(), reason="needs the trained bundled model")
@pytest.mark.slow
def test_fp16_panoptic_agreement_with_trained_model(tmp_path):
    model, config = load_model()
    sidecar = export_onnx(
        model,
        config,
        tmp_path / "m.onnx",
        (128, 128),
        dynamic=True,
        fp16=True,
        image=IMAGE,
        log=lambda _: None,
    )
    for report in sidecar["parity"]:
        assert report["panoptic_segments"][0] > 0
        assert report["panoptic_agreement"] >= 0.99


def test_panoptic_agreement_ignores_renumbering():
    ids = np.array([[1, 1, 2], [0, 2, 2]], dtype=np.int32)
    a = PanopticResult(ids, [PanopticSegment(1, 3, True, 0.9, 2), PanopticSegment(2, 4, False, 0.9, 3)])
    b = PanopticResult(
        np.where(ids == 1, 5, ids),
        [PanopticSegment(5, 3, True, 0.9, 2), PanopticSegment(2, 4, False, 0.9, 3)],
    )
    assert panoptic_agreement(a, b) == 1.0
    c = PanopticResult(ids, [PanopticSegment(1, 3, True, 0.9, 2), PanopticSegment(2, 7, False, 0.9, 3)])
    assert panoptic_agreement(a, c) == pytest.approx(3 / 6)


def test_failed_export_leaves_nothing(tmp_path, model, config, monkeypatch):
    monkeypatch.setattr(export_module, "FP32_FAIL_TOLERANCE", -1.0)  # every graph now "disagrees"
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="disagrees with eager"):
        export_onnx(model, config, out, (64, 64), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,opset,match", [((100, 128), 17, "multiples of 32"), ((64, 64), 13, "17..20")])
def test_unexportable_options_say_why(tmp_path, model, config, size, opset, match):
    with pytest.raises(ExportError, match=match) as error:
        export_onnx(model, config, tmp_path / "m.onnx", size, opset=opset)
    assert "\n" not in str(error.value)
