"""Run an exported graph with ONNX Runtime behind the same `Predictor` as the eager model.

An export is two files: the graph (`model.onnx`) and its sidecar JSON (`model.onnx.json`, or `model.json`
beside it) holding the full ModelConfig (classes, thing/stuff split, pre-processing), the traced size,
dtype, dynamic flag and opset. The sidecar's config already says how to pre-process for this graph: a
fixed-size graph has `input.mode == "deploy"` at its traced size, a dynamic one keeps the model's own
official resize. The graph input is always float32 `images` (B, 3, H, W), normalised and padded; an fp16
graph casts it inside, so callers never change.

onnx and onnxruntime are an optional extra and imported only here, on first use.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mask2former.config import ModelConfig

INSTALL_HINT = 'pip install "mask2former[onnx]"'
SIDECAR_FORMAT = "mask2former-onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_masks")
DEFAULT_THREADS = 2
# ORT's QDQ propagation moves an int8 graph's quantise steps upstream across data-movement ops; above the
# float stem's MaxPool that makes it a uint8 NCHW pool, 10x slower than the float one. Our quantiser already
# puts Q/DQ where int8 pays (export.quantize), so the runner keeps them there. No-op on float graphs.
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


class ExportError(ValueError):
    """A graph that cannot be exported, read or run as asked; the message is one line for the user.

    A ValueError so that callers which already turn ValueErrors into one-line messages (the predict CLI)
    report it the same way.
    """


def require(module: str):
    """Import `onnx` or `onnxruntime`, or fail with one line saying how to install the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: {INSTALL_HINT}") from None


def sidecar_path(onnx_path: str | Path) -> Path:
    """Where an export writes its sidecar: `model.onnx` -> `model.onnx.json`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def find_sidecar(onnx_path: str | Path) -> Path:
    """The sidecar of a graph: `model.onnx.json`, else `model.json` beside it (one-line error if neither)."""
    onnx_path = Path(onnx_path)
    for candidate in (sidecar_path(onnx_path), onnx_path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    raise ExportError(
        f"{onnx_path}: no sidecar {sidecar_path(onnx_path).name} (or {onnx_path.with_suffix('.json').name}) "
        "beside it; re-export with `mask2former export`"
    )


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar dict of a graph, checked to be ours."""
    path = find_sidecar(onnx_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: unreadable sidecar JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or "config" not in data:
        raise ExportError(f"{path}: not a mask2former export sidecar (no format/config keys)")
    return data


def _is_static(dim) -> bool:
    return isinstance(dim, int) and dim > 0


class OnnxRunner:
    """An onnxruntime.InferenceSession as a Predictor runner.

    `runner(images (B, 3, Hp, Wp) float32) -> {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, Hp/4,
    Wp/4)}` as float32 CPU tensors. A graph with a fixed batch of 1 runs a batch one image at a time.
    """

    def __init__(self, path: str | Path, threads: int = DEFAULT_THREADS):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graph is one chain; a second pool only competes for cores
        options.log_severity_level = 3  # ORT's fp16 fallback and shape warnings are not the user's concern
        # Workers spin between the graph's many small kernels but stop when run() returns: a pool still
        # spinning then holds the cores, and whatever runs next on them (post-processing, another session or
        # job) ran up to 2x slower. (No spinning at all costs a lone session a quarter of its speed.)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(
                str(path),
                sess_options=options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(DISABLED_OPTIMIZERS),
            )
        except Exception as error:  # ORT raises its own exception types for corrupt or unsupported graphs
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{path}: onnxruntime cannot load the graph: {first_line}") from None
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_shape = list(graph_input.shape)
        self.input_dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
        self.path = str(path)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_shape(images)
        batch = images.shape[0]
        if _is_static(self.input_shape[0]) and self.input_shape[0] != batch:
            parts = [self._run(images[i : i + 1]) for i in range(batch)]
            return {name: torch.cat([p[name] for p in parts]) for name in OUTPUT_NAMES}
        return self._run(images)

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: images.detach().cpu().numpy().astype(self.input_dtype, copy=False)}
        logits, masks = self.session.run(list(OUTPUT_NAMES), feed)
        return {
            "pred_logits": torch.from_numpy(np.asarray(logits, dtype=np.float32)),
            "pred_masks": torch.from_numpy(np.asarray(masks, dtype=np.float32)),
        }

    def _check_shape(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.path}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        for axis, name in ((2, "height"), (3, "width")):
            want = self.input_shape[axis]
            if _is_static(want) and images.shape[axis] != want:
                raise ValueError(
                    f"{self.path}: this graph was exported for {name} {want}, got {images.shape[axis]} "
                    "(pre-process in deploy mode at the exported size, or export a dynamic graph)"
                )


def load_onnx_predictor(path: str | Path, threads: int = DEFAULT_THREADS, dtype: torch.dtype | None = None):
    """A `Predictor` running `path` (an exported .onnx) in ONNX Runtime with its sidecar's config.

    The pre- and post-processing are the eager Predictor's own, so both backends write the same files.
    A graph's precision is fixed at export: `dtype`, when given, must be the one its sidecar records.
    """
    from mask2former.inference.predictor import Predictor

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    sidecar = read_sidecar(path)
    graph_dtype = str(sidecar.get("dtype", "float32"))
    if dtype is not None and graph_dtype != str(dtype).removeprefix("torch."):
        raise ExportError(
            f"dtype {str(dtype).removeprefix('torch.')}: {path} is a {graph_dtype} graph; its precision is "
            "chosen at export (export --fp16 / --int8)"
        )
    try:
        config = ModelConfig.from_dict(sidecar["config"])
    except (TypeError, ValueError) as error:
        raise ExportError(f"{find_sidecar(path)}: bad model config ({error})") from None
    runner = OnnxRunner(path, threads=threads)
    check_sidecar_matches(runner, config, find_sidecar(path))
    return Predictor(runner, config, source=str(path), trained=bool(sidecar.get("trained", False)))


def check_sidecar_matches(runner: OnnxRunner, config: ModelConfig, sidecar: Path) -> None:
    """ExportError naming the sidecar when its config disagrees with the graph's static shapes: classes
    (pred_logits (B, Q, K+1)), queries, and the input size of a fixed-size graph in deploy mode."""
    outputs = {output.name: list(output.shape) for output in runner.session.get_outputs()}
    logits = outputs.get("pred_logits", [None, None, None])
    expected = {
        "classes + 1 (pred_logits last axis)": (logits[-1], config.num_classes + 1),
        "queries (pred_logits axis 1)": (logits[1] if len(logits) > 2 else None, config.decoder.num_queries),
    }
    size = config.input.size if config.input.mode == "deploy" else None
    if size is not None:
        expected["input height"] = (runner.input_shape[2], size[0])
        expected["input width"] = (runner.input_shape[3], size[1])
    for what, (graph, said) in expected.items():
        if _is_static(graph) and graph != said:
            raise ExportError(f"{sidecar}: says {what} {said} but the graph has {graph}")
