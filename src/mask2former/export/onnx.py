"""Export a Mask2Former to ONNX: fixed or dynamic size, fp32 or fp16, checked and with a parity report.

Exporter: PyTorch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`). It needs nothing
beyond torch and onnx, and its tracer records `tensor.shape` reads as graph ops, so the reference points,
sine positions and level sizes the model derives from the input shape stay computed in-graph when height
and width are dynamic. The dynamo exporter would need onnxscript as a further dependency. Whatever the
exporter, a dynamic graph is only trusted after it matched the eager model at a size other than the traced
one, which every dynamic export checks (a shape baked as a constant fails there, loudly).

Graph interface, the same for every export: input `images` float32 (B, 3, H, W), normalised and padded;
outputs `pred_logits` (B, Q, K+1) and `pred_masks` (B, Q, H/4, W/4) float32, no auxiliary outputs. An fp16
graph holds half-precision weights and casts the input to fp16 as its first node and both outputs back to
float32 as its last, so the runtime and pre/post-processing do not change with the dtype. The
pixel decoder stays float32 inside an fp16 graph, as under the official mixed precision; LayerNorm
exports as LayerNormalization (opset 17), whose statistics ONNX Runtime accumulates in float32
(stash_type 1); the sine position embedding is computed in float32 and cast once; the decoder's attention
mask is a finite -1e4 bias, representable in half.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mask2former.config import ModelConfig
from mask2former.export.ops import float64_locations, forbidden_ops, op_counts
from mask2former.export.parity import format_report, parity_report
from mask2former.export.runtime import (
    INPUT_NAME,
    OUTPUT_NAMES,
    SIDECAR_FORMAT,
    ExportError,
    OnnxRunner,
    require,
    sidecar_path,
)
from mask2former.fileio import write_json
from mask2former.modeling.layers import fold_frozen_batchnorm

MIN_OPSET = 17  # LayerNormalization; GridSample needs 16
MAX_OPSET = 20  # the TorchScript exporter's limit
# An fp32 graph further than this from eager (max |logit| difference) is wrong, not rounded.
FP32_FAIL_TOLERANCE = 1e-3
# fp16 rounding moves mask logits near 0 across it; a wrong graph moves a large share of them.
FP16_MIN_MASK_AGREEMENT = 0.95
# int8 rounds much more coarsely; below this the calibration did not cover the inputs' ranges.
INT8_MIN_MASK_AGREEMENT = 0.85


class _GraphInterface(nn.Module):
    """images float32 (B, 3, H, W) -> (pred_logits, pred_masks) float32, computed in `dtype`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(images.to(self.dtype), return_aux=False)
        return outputs["pred_logits"].float(), outputs["pred_masks"].float()


def check_options(size: tuple[int, int], opset: int, size_divisibility: int = 32) -> None:
    """One-line ExportError for a size or opset the export cannot honour."""
    height, width = size
    if height < size_divisibility or width < size_divisibility:
        raise ExportError(f"size {height}x{width}: each side must be at least {size_divisibility}")
    if height % size_divisibility or width % size_divisibility:
        raise ExportError(
            f"size {height}x{width}: height and width must be multiples of {size_divisibility} "
            f"(the model's padding), e.g. {-(-height // size_divisibility) * size_divisibility}x"
            f"{-(-width // size_divisibility) * size_divisibility}"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset}: supported opsets are {MIN_OPSET}..{MAX_OPSET}")


def graph_config(config: ModelConfig, size: tuple[int, int], dynamic: bool) -> ModelConfig:
    """The config the exported graph is used with: a fixed graph pre-processes in deploy mode at `size`."""
    config = copy.deepcopy(config)
    if not dynamic:
        config.input = dataclasses.replace(config.input, mode="deploy", size=(int(size[0]), int(size[1])))
    return config


def prepare_model(model: nn.Module, fp16: bool) -> nn.Module:
    """An inference copy of `model`: eval, frozen BatchNorm folded into the convolutions, fp16 if asked.

    fp16 is the official mixed precision: backbone and transformer decoder in half, the pixel decoder in
    float32 (its deformable sampling locations need the precision), cast at its two boundaries.
    """
    model = copy.deepcopy(model).cpu().eval().float()
    fold_frozen_batchnorm(model)
    if not fp16:
        return model
    model.half()
    pixel_decoder = model.sem_seg_head.pixel_decoder.float()
    pixel_decoder.register_forward_pre_hook(_inputs_to_float)
    pixel_decoder.register_forward_hook(_outputs_to_half)
    return model


def _inputs_to_float(module: nn.Module, args: tuple) -> tuple:
    (features,) = args  # {"res2": (B, C, H/4, W/4), ...}
    return ({name: x.float() for name, x in features.items()},)


def _outputs_to_half(module: nn.Module, args: tuple, output: tuple) -> tuple:
    mask_features, multi_scale_features = output
    return mask_features.half(), [x.half() for x in multi_scale_features]


def trace_to_onnx(
    model: nn.Module, path: Path, size: tuple[int, int], dynamic: bool, fp16: bool, opset: int
) -> list[str]:
    """Write the graph of `model` (already prepared) to `path`; returns the tracer's warnings."""
    wrapper = _GraphInterface(model, torch.float16 if fp16 else torch.float32).eval()
    # a non-constant input so no branch of the trace is specialised on an all-zero image
    example = torch.randn(1, 3, size[0], size[1], generator=torch.Generator().manual_seed(0))
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {
            INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            "pred_logits": {0: "batch"},
            "pred_masks": {0: "batch", 2: "mask_height", 3: "mask_width"},
        }
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    # Warnings raised inside torch (e.g. group_norm's batch-size check) are its own business; ours name the
    # line that turned a traced shape into a Python number, i.e. a constant of the graph.
    torch_dir = str(Path(torch.__file__).parent)
    return sorted(
        {
            f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
            for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and not w.filename.startswith(torch_dir)
        }
    )


def check_graph(path: Path) -> dict[str, int]:
    """Validate the written graph (ONNX checker, no float64, no ScatterND); returns its op counts."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"exported graph fails the ONNX checker: {str(error).splitlines()[0]}") from None
    doubles = float64_locations(model)
    if doubles:
        raise ExportError(f"exported graph holds float64 ({len(doubles)} places, first: {doubles[0]})")
    forbidden = forbidden_ops(model)
    if forbidden:
        raise ExportError(f"exported graph holds data-dependent writes: {forbidden}")
    return op_counts(model)


def check_sizes(size: tuple[int, int], dynamic: bool) -> list[tuple[int, int] | None]:
    """Sizes the parity runs at: the traced one, plus (dynamic) the official pre-processing of the image
    (None) and a non-square size other than the traced one."""
    if not dynamic:
        return [size]
    other = (size[0] + 32, size[1] + 64)
    return [size, None, other]


def export_onnx(
    model: nn.Module,
    config: ModelConfig,
    out: str | Path,
    size: tuple[int, int],
    dynamic: bool = False,
    fp16: bool = False,
    opset: int = MIN_OPSET,
    trained: bool = True,
    source: str = "",
    image: np.ndarray | str | Path | None = None,
    threads: int = 2,
    log=print,
    int8_calibration: list[Path] | None = None,
) -> dict[str, Any]:
    """Export `model` (eager, fp32) to `out` (.onnx) and its sidecar `out`.json; returns the sidecar dict.

    `int8_calibration` (image paths): statically quantise the float32 graph to int8 (QDQ, calibrated on
    those images; `export.quantize`) before the parity check; the sidecar's dtype is then "int8".

    The graph is written to a temporary file, checked, compared with eager on `image` (default: the
    package's example photo) and only then renamed into place, so a failed export leaves nothing behind.
    """
    require("onnx")
    require("onnxruntime")
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    check_options(size, opset, config.input.size_divisibility)
    if out.suffix != ".onnx":
        raise ExportError(f"out {out}: the file name must end in .onnx")
    if not out.parent.is_dir():
        raise ExportError(f"out {out}: folder {out.parent} does not exist")
    eager = copy.deepcopy(model).cpu().eval().float()
    tmp = out.with_name(out.name + ".tmp")
    try:
        tracer_warnings = trace_to_onnx(prepare_model(model, fp16), tmp, size, dynamic, fp16, opset)
        counts = check_graph(tmp)
        quantisation = None
        if int8_calibration is not None:
            from mask2former.export.quantize import quantize_static_int8

            quantised = out.with_name(out.name + ".int8.tmp")
            try:
                used = graph_config(config, size, dynamic)
                quantisation = quantize_static_int8(tmp, quantised, used, int8_calibration)
                quantised.replace(tmp)
            finally:
                quantised.unlink(missing_ok=True)
            counts = check_graph(tmp)
        runner = OnnxRunner(tmp, threads=threads)
        reports = _parity(eager, runner, config, size, dynamic, image)
        for report in reports:
            log(f"parity vs eager fp32: {format_report(report)}")
        _fail_on_disagreement(
            reports, "int8" if quantisation else "fp16" if fp16 else "fp32", tracer_warnings
        )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = _sidecar(config, size, dynamic, fp16, opset, trained, source, reports, counts, tracer_warnings)
    if quantisation is not None:
        sidecar["dtype"] = "int8"
        sidecar["quantization"] = quantisation
    write_json(sidecar_path(out), sidecar, indent=2)
    return json.loads(json.dumps(sidecar))  # as a reader of the file sees it (tuples become lists)


def _fail_on_disagreement(reports: list[dict], precision: str, tracer_warnings: list[str]) -> None:
    """Raise when the graph computes something else than eager, beyond what its precision explains."""
    hint = "a shape was likely baked as a constant" + (f" ({tracer_warnings[0]})" if tracer_warnings else "")
    if precision in ("fp16", "int8"):
        least = FP16_MIN_MASK_AGREEMENT if precision == "fp16" else INT8_MIN_MASK_AGREEMENT
        worst = min(r["mask_sign_agreement"] for r in reports)
        if worst < least:
            raise ExportError(
                f"exported {precision} graph disagrees with eager fp32: only {worst:.1%} of mask logits have "
                f"the same sign; " + (hint if precision == "fp16" else "calibrate on images like the inputs")
            )
        return
    worst = max(r["max_abs_logits"] for r in reports)
    if worst > FP32_FAIL_TOLERANCE:
        raise ExportError(
            f"exported graph disagrees with eager (max |dlogits| {worst:.3g} > {FP32_FAIL_TOLERANCE}); {hint}"
        )


def _parity(
    eager: nn.Module, runner: OnnxRunner, config: ModelConfig, size: tuple[int, int], dynamic: bool, image
) -> list[dict]:
    def eager_runner(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return eager(images, return_aux=False)

    reports = []
    for check_size in check_sizes(size, dynamic):
        if check_size is None:
            check_config = config  # the graph's own (official) pre-processing of the image
        else:
            check_config = graph_config(config, check_size, dynamic=False)
        report = parity_report(eager_runner, runner, check_config, image)
        if any(r["input_size"] == report["input_size"] for r in reports):
            continue
        reports.append(report)
    return reports


def _sidecar(
    config: ModelConfig, size, dynamic, fp16, opset, trained, source, reports, counts, tracer_warnings
) -> dict[str, Any]:
    used = graph_config(config, size, dynamic)
    inp = used.input
    if inp.mode == "deploy":
        preprocessing = {"mode": "deploy", "size": list(inp.size)}
    else:
        preprocessing = {
            "mode": "official",
            "short_edge": inp.short_edge,
            "max_size": inp.max_size,
            "size_divisibility": inp.size_divisibility,
        }
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"] if dynamic else [1, 3, size[0], size[1]],
            "normalised": True,
        },
        "outputs": list(OUTPUT_NAMES),
        "size": list(size),
        "dynamic": dynamic,
        "dtype": "float16" if fp16 else "float32",
        "opset": opset,
        "exporter": f"torch {torch.__version__} torchscript (dynamo=False)",
        "preprocessing": preprocessing,
        "classes": list(used.class_names),
        "isthing": [bool(flag) for flag in used.thing_classes],
        "thing_classes": [
            name for name, thing in zip(used.class_names, used.thing_classes, strict=True) if thing
        ],
        "stuff_classes": [
            name for name, thing in zip(used.class_names, used.thing_classes, strict=True) if not thing
        ],
        "category_ids": list(used.category_ids),
        "task": used.task,
        "trained": bool(trained),
        "source": source,
        "parity": reports,
        "op_counts": counts,
        "tracer_warnings": tracer_warnings,
        "config": used.to_dict(),
    }
