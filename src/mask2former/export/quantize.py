"""int8 deployment: ONNX Runtime static quantisation of an exported float32 graph, calibrated on images.

    quantize_static_int8(fp32_graph, int8_graph, config, calibration_dir, limit=32)

The graph becomes a QDQ graph (QuantizeLinear / DequantizeLinear pairs around the quantised operators, which
ONNX Runtime fuses into int8 kernels): weights int8 per output channel, activations uint8 per tensor with
ranges observed (min / max) on the calibration images, pre-processed exactly as the graph's users will
(`inference.preprocess.preprocess_for` with the graph's config). Only the operators that carry the FLOPs
are quantised (Conv, MatMul, Gemm); the deformable sampling (GridSample), softmax, normalisation and the
element-wise glue stay float32, as their ranges and precision matter more than their cost. The graph keeps
its float32 input and outputs, so `Predictor` and `OnnxRunner` run it like any other export.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mask2former.config import ModelConfig
from mask2former.export.runtime import INPUT_NAME, ExportError, require

QUANTISED_OPS = ("Conv", "MatMul", "Gemm")
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
            _quantize(quantization, source, int8_graph, calibration, config)
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
        "quantised_ops": list(QUANTISED_OPS),
        "calibration_images": len(calibration),
        "calibration_first": str(calibration[0]),
    }


def _quantize(quantization, source: Path, int8_graph: Path, calibration: list[Path], config: ModelConfig):
    quantization.quantize_static(
        str(source),
        str(int8_graph),
        _CalibrationReader(calibration, config),
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTISED_OPS),
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
    )
