"""int8 deployment: ONNX Runtime static quantisation of an exported float32 graph, calibrated on images.

    quantize_static_int8(fp32_graph, int8_graph, config, calibration_images(folder, limit=32))

The graph becomes a QDQ graph (QuantizeLinear / DequantizeLinear pairs around the quantised operators, which
ONNX Runtime fuses into int8 kernels): weights int8 per output channel, activations uint8 per tensor with
ranges observed (min / max) on the calibration images, pre-processed exactly as the graph's users will
(`inference.preprocess.preprocess_for` with the graph's config). The graph keeps its float32 input and
outputs, so `Predictor` and `OnnxRunner` run it like any other export.

Only what int8 pays for is quantised (`int8_nodes`), as measured with ONNX Runtime's per-node profile: every
quantise / dequantise step costs about what a small int8 kernel saves, so
- the convolutions, except those reading fewer than MIN_CONV_CHANNELS channels (the stem on the RGB image,
  whose int8 kernel is slower than the float one and needs the image quantised and transposed to NHWC);
- the Relu, MaxPool and residual Add between two quantised convolutions, so the backbone stays uint8 from
  convolution to convolution instead of dequantising and requantising at every activation;
- the Linear layers (MatMul / Gemm with a constant weight) outside the transformer decoder, with float32
  outputs (QGemm / MatMulIntegerToFloat: no requantisation of outputs that only float ops read).
The transformer decoder (FLOAT_MODULES) stays float32: it works on the Q queries, whose small matrices gain
less from int8 than quantising their inputs costs; so do the activation x activation products, the
deformable sampling (GridSample), softmax, normalisation and the element-wise glue, whose ranges and
precision matter more than their cost. A float node that shares an input with a quantised one reads the float
tensor, not its uint8 round trip. `OnnxRunner` keeps the quantise steps where this module puts them
(runtime.DISABLED_OPTIMIZERS).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mask2former.config import ModelConfig
from mask2former.export.runtime import INPUT_NAME, ExportError, require

QUANTISED_OPS = ("Conv", "Relu", "MaxPool", "Add", "MatMul", "Gemm")
# Node-name prefixes (the exporter names nodes by module path) that stay float32: the transformer decoder.
FLOAT_MODULES = ("/model/sem_seg_head/predictor/",)
MIN_CONV_CHANNELS = 8
DEFAULT_CALIBRATION_IMAGES = 32


def calibration_images(folder: str | Path, limit: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """The first `limit` images (sorted) of `folder`, or of `folder`/images for a dataset folder."""
    from mask2former.data.image_io import ImageReadError, list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"calibrate {folder}: no such folder")
    for candidate in (folder, folder / "images"):
        try:
            if candidate.is_dir():
                return list_images(str(candidate))[:limit]
        except ImageReadError:
            continue
    raise ExportError(f"calibrate {folder}: no images in the folder (nor in {folder / 'images'})")


class _CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader protocol: one {"images": (1, 3, H, W)} per image."""

    def __init__(self, paths: list[Path], config: ModelConfig):
        self.paths = paths
        self.config = config
        self._feeds: Iterator[dict[str, np.ndarray]] | None = None

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        from mask2former.data.image_io import load_image
        from mask2former.inference.preprocess import preprocess_for

        for path in self.paths:
            item = preprocess_for(self.config.input, load_image(path))
            yield {INPUT_NAME: item.tensor.numpy().astype(np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._feeds is None:
            self._feeds = self._generate()
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = None


def quantize_static_int8(
    fp32_graph: str | Path,
    int8_graph: str | Path,
    config: ModelConfig,
    calibration: list[Path],
) -> dict:
    """Write the QDQ int8 version of `fp32_graph` (an export of ours) to `int8_graph`, calibrated on the
    `calibration` images pre-processed by `config` (the graph's config); returns what the sidecar records."""
    require("onnx")
    quantization = require("onnxruntime.quantization")
    if not calibration:
        raise ExportError("calibrate: no calibration images")
    fp32_graph, int8_graph = Path(fp32_graph), Path(int8_graph)
    prepared = int8_graph.with_name(int8_graph.name + ".prep")
    try:
        # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantising (ONNX's own
        # shape inference: ORT's symbolic one cannot follow the in-graph size arithmetic of our Reshapes).
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_graph), str(prepared), skip_symbolic_shape=True)
            source = prepared
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantise the plain graph
            source = fp32_graph
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser logs its advice on the root logger
        try:
            quantised = _quantize(quantization, source, int8_graph, calibration, config)
        finally:
            root.setLevel(level)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in int8_graph.parent.glob(int8_graph.name + ".prep*"):
            leftover.unlink(missing_ok=True)
    return {
        "format": "QDQ",
        "weights": "int8 per channel",
        "activations": "uint8 per tensor, min/max calibration",
        "quantised_nodes": quantised,
        "float_modules": list(FLOAT_MODULES),
        "calibration_images": len(calibration),
        "calibration_first": str(calibration[0]),
    }


def int8_nodes(model) -> list[str]:
    """Names of the nodes of `model` (an onnx.ModelProto, topologically sorted as exported) that
    `quantize_static_int8` quantises; the rules and their reasons are in the module docstring."""
    weights = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    chosen: list[str] = []
    int8_tensors: set[str] = set()  # outputs that stay uint8 between quantised nodes
    for node in model.graph.node:
        if node.name.startswith(FLOAT_MODULES):
            continue
        op, inputs = node.op_type, [name for name in node.input if name]
        if op == "Conv":
            quantise = (
                inputs[1] in weights and _conv_in_channels(node, weights[inputs[1]]) >= MIN_CONV_CHANNELS
            )
        elif op in ("MatMul", "Gemm"):
            quantise = len(inputs) > 1 and inputs[1] in weights
        elif op in ("Relu", "MaxPool"):
            quantise = inputs[0] in int8_tensors
        elif op == "Add":
            quantise = len(inputs) == 2 and all(name in int8_tensors for name in inputs)
        else:
            quantise = False
        if quantise:
            chosen.append(node.name)
            if op not in ("MatMul", "Gemm"):  # their outputs stay float32 (see _quantize)
                int8_tensors.update(node.output[:1])
    return chosen


def _float_readers_read_float(model, chosen: set[str]) -> int:
    """Rewire the float nodes that read a quantise-dequantise of a float tensor to the tensor itself.

    The quantiser routes every reader of a quantised activation through its DequantizeLinear, so when a
    Linear layer and a residual Add or LayerNorm share an input, the float path is rounded to uint8 and ONNX
    Runtime must dequantise it at run time. Only the quantised readers (`chosen`) need the int8 copy.
    Returns how many inputs were rewired."""
    producer = {name: node for node in model.graph.node for name in node.output}
    readers = defaultdict(list)  # tensor -> [(node, input index)]
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            readers[name].append((node, index))
    rewired = 0
    for dequantize in model.graph.node:
        quantize = producer.get(dequantize.input[0]) if dequantize.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        source = producer.get(quantize.input[0])
        if source is not None and source.name in chosen and source.op_type not in ("MatMul", "Gemm"):
            continue  # an int8 output (QLinearConv / QLinearAdd): the dequantised value is the computed one
        for reader, index in readers[dequantize.output[0]]:
            if reader.name not in chosen and reader.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                reader.input[index] = quantize.input[0]
                rewired += 1
    return rewired


def _load(path: Path):
    return require("onnx").load(str(path))


def _conv_in_channels(node, weight_shape: list[int]) -> int:
    """Input channels of a Conv: weight (C_out, C_in / groups, kH, kW) times groups."""
    groups = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
    return weight_shape[1] * max(groups, 1) if len(weight_shape) > 1 else 0


def _quantize(
    quantization, source: Path, int8_graph: Path, calibration: list[Path], config: ModelConfig
) -> dict[str, int]:
    """Quantise `source` into `int8_graph`; returns the quantised nodes counted per op type."""
    graph = _load(source)
    nodes = int8_nodes(graph)
    if not nodes:
        raise ExportError("int8: the graph has no convolution or linear layer to quantise")
    quantization.quantize_static(
        str(source),
        str(int8_graph),
        _CalibrationReader(calibration, config),
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTISED_OPS),
        nodes_to_quantize=nodes,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
        # Linear layers keep float32 outputs: ORT runs them as QGemm / MatMulIntegerToFloat instead of
        # requantising an output that only float ops (norms, deformable sampling) read.
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )
    chosen = set(nodes)
    quantised = _load(int8_graph)
    if _float_readers_read_float(quantised, chosen):
        require("onnx").save(quantised, str(int8_graph))
    return dict(Counter(node.op_type for node in graph.graph.node if node.name in chosen).most_common())
