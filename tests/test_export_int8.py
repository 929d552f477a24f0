"""int8 deployment: `export --int8 --calibrate DIR` writes a QDQ graph that ONNX Runtime loads, its parity
report against fp32 eager is produced, and predict / eval run it (and the fp16 graph) like any export."""

from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mask2former.api import BUNDLED_DIR  # noqa: E402
from mask2former.cli import main  # noqa: E402
from mask2former.export.quantize import (  # noqa: E402
    FLOAT_MODULES,
    _float_readers_read_float,
    calibration_images,
    int8_nodes,
)
from mask2former.export.runtime import DISABLED_OPTIMIZERS, ExportError, OnnxRunner  # noqa: E402

EXAMPLE = BUNDLED_DIR.parent / "example.png"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    assert main(["synth", str(root / "calib"), "--n", "3", "--seed", "3"]) == 0
    assert main(["synth", str(root / "val"), "--n", "3", "--seed", "2"]) == 0
    return root


@pytest.fixture(scope="module")
def int8_graph(scenes):
    graph = scenes / "int8.onnx"
    args = [
        "export",
        "--size",
        "192x192",
        "--int8",
        "--calibrate",
        str(scenes / "calib"),
        "--out",
        str(graph),
    ]
    assert main(args) == 0
    return graph


@pytest.mark.slow
def test_int8_export_is_a_quantised_graph_with_a_parity_report(int8_graph):
    onnx = pytest.importorskip("onnx")
    sidecar = json.loads((int8_graph.parent / "int8.onnx.json").read_text())
    assert sidecar["dtype"] == "int8"
    assert sidecar["quantization"]["format"] == "QDQ" and sidecar["quantization"]["calibration_images"] == 3
    graph = onnx.load(str(int8_graph)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    # The backbone convolutions with their Relu / residual Add, and the pixel decoder's Linear layers
    counts = sidecar["quantization"]["quantised_nodes"]
    assert counts["Conv"] >= 30 and counts["Relu"] >= 20 and counts["Add"] >= 8 and counts["Gemm"] >= 12
    # ... but nothing of the transformer decoder: its Linear layers read float32.
    dequantised = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    decoder_linear = [
        n for n in graph.node if n.name.startswith(FLOAT_MODULES) and n.op_type in ("MatMul", "Gemm")
    ]
    assert decoder_linear and not any(set(n.input) & dequantised for n in decoder_linear)
    # Raw-output and post-processed agreement against fp32 eager, stated after the export.
    (report,) = sidecar["parity"]
    assert report["mask_sign_agreement"] >= 0.95
    # Stated tolerances for 3 calibration scenes at 192x192 (one segment lost costs panoptic its pixels).
    assert report["semantic_agreement"] >= 0.93 and report["panoptic_agreement"] >= 0.9
    assert report["max_abs_logits"] > 0  # quantised: not bit-identical to fp32
    runner = OnnxRunner(int8_graph)  # ONNX Runtime loads it
    assert runner.input_shape == [1, 3, 192, 192]


def _weight(name: str, *shape: int):
    return numpy_helper.from_array(np.full(shape, 0.1, np.float32), name)


def _model(nodes, inputs, initializers):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_nodes_are_the_ones_int8_pays_for():
    decoder = FLOAT_MODULES[0]
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "w_stem"], ["stem"], name="stem_conv"),  # 3 input channels: float
        node("Relu", ["stem"], ["stem_relu"], name="stem_relu"),
        node("MaxPool", ["stem_relu"], ["pool"], kernel_shape=[2, 2], name="pool"),
        node("Conv", ["pool", "w_a"], ["a"], name="conv_a"),
        node("Relu", ["a"], ["a_relu"], name="relu_a"),  # between two quantised convs
        node("Conv", ["a_relu", "w_b"], ["b"], name="conv_b"),
        node("Conv", ["pool", "w_a"], ["shortcut"], name="conv_shortcut"),
        node("Add", ["b", "shortcut"], ["sum"], name="residual"),  # both inputs int8
        node("Add", ["sum", "pool"], ["mixed"], name="mixed_add"),  # one float input
        node("Flatten", ["mixed"], ["tokens"], name="flatten"),
        node("MatMul", ["tokens", "w_linear"], ["linear"], name="linear"),  # constant weight
        node("MatMul", ["linear", "linear_t"], ["scores"], name="scores"),  # activation x activation
        node("MatMul", ["scores", "w_linear"], ["out"], name=decoder + "linear"),  # transformer decoder
    ]
    weights = [_weight("w_stem", 16, 3, 3, 3), _weight("w_a", 16, 16, 1, 1), _weight("w_b", 16, 16, 1, 1)]
    model = _model(nodes, ["image", "linear_t"], weights + [_weight("w_linear", 16, 16)])
    chosen = int8_nodes(model)
    assert chosen == ["conv_a", "relu_a", "conv_b", "conv_shortcut", "residual", "linear"]


def test_float_readers_of_a_quantised_input_read_the_float_tensor():
    node = helper.make_node
    scale = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.uint8(0), "z"),
    ]
    nodes = [
        node("Relu", ["x"], ["t"], name="norm"),  # a float producer (LayerNorm in the encoder)
        node("QuantizeLinear", ["t", "s", "z"], ["t_q"], name="t_q"),
        node("DequantizeLinear", ["t_q", "s", "z"], ["t_dq"], name="t_dq"),
        node("MatMul", ["t_dq", "w_dq"], ["y"], name="linear"),  # the quantised reader
        node("Add", ["t_dq", "y"], ["out"], name="residual"),  # a float reader
    ]
    weight = [_weight("w_dq", 4, 4)]
    model = _model(nodes, ["x"], scale + weight)
    assert _float_readers_read_float(model, {"linear"}) == 1
    inputs = {n.name: list(n.input) for n in model.graph.node}
    assert inputs["linear"][0] == "t_dq" and inputs["residual"][0] == "t"


def test_runner_keeps_quantise_steps_in_place_and_stops_spinning(tmp_path):
    # ORT ignores unknown names in disabled_optimizers: check the name still stops Q moving above MaxPool.
    node = helper.make_node
    scale = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.uint8(128), "z"),
    ]
    nodes = [
        node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        node("QuantizeLinear", ["p", "s", "z"], ["p_q"], name="q"),
        node("DequantizeLinear", ["p_q", "s", "z"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        scale,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    orders = []
    for disabled in ([], list(DISABLED_OPTIMIZERS)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / f"opt{len(disabled)}.onnx")
        ort.InferenceSession(str(tmp_path / "m.onnx"), options, disabled_optimizers=disabled)
        orders.append([n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node])
    assert orders[0][0] == "QuantizeLinear"  # propagated above the pool: a uint8 MaxPool
    assert orders[1][:2] == ["MaxPool", "QuantizeLinear"]
    # ... and its workers stop spinning when a run returns, leaving the cores to what comes next.
    options = OnnxRunner(tmp_path / "m.onnx").session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.slow
def test_predict_and_eval_run_int8_and_fp16_graphs(tmp_path, scenes, int8_graph):
    fp16_graph = tmp_path / "fp16.onnx"
    assert main(["export", "--size", "192x192", "--fp16", "--out", str(fp16_graph)]) == 0
    metrics = {}
    for name, graph in (("int8", int8_graph), ("fp16", fp16_graph)):
        assert main(["predict", str(EXAMPLE), "--weights", str(graph), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name / "example.panoptic.png").is_file()
        out = tmp_path / f"eval-{name}"
        args = ["eval", "--weights", str(graph), "--data", str(scenes / "val"), "--task", "semantic"]
        assert main(args + ["--out", str(out), "--no-progress"]) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())["mIoU"]
    out = tmp_path / "eval-fp32"
    args = ["eval", "--data", str(scenes / "val"), "--task", "semantic"]
    assert main(args + ["--out", str(out), "--no-progress"]) == 0
    fp32 = json.loads((out / "metrics.json").read_text())["mIoU"]
    # Stated tolerance on 3 scenes at 192x192: mIoU within 3 points of eager fp32 at the same scale.
    for name, value in metrics.items():
        assert abs(value - fp32) <= 3.0, (name, value, fp32)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--int8"], "--int8 needs --calibrate"),
        (["--int8", "--fp16", "--calibrate", "."], "choose one precision"),
        (["--calibrate", "."], "--calibrate is for --int8"),
        (["--int8", "--calibrate", "nowhere"], "--calibrate nowhere: no such folder"),
    ],
)
def test_int8_flag_errors(tmp_path, capsys, extra, message):
    assert main(["export", "--size", "64x64", "--out", str(tmp_path / "m.onnx")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_calibration_images_of_a_dataset_folder(tmp_path):
    scenes = tmp_path / "scenes"
    assert main(["synth", str(scenes / "calib"), "--n", "2", "--seed", "3"]) == 0
    assert [p.name for p in calibration_images(scenes / "calib", 2)] == ["000000.png", "000001.png"]
    with pytest.raises(ExportError, match="no images"):
        calibration_images(tmp_path)
