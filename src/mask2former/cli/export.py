"""`mask2former export`: an ONNX graph plus its sidecar JSON, checked against the eager model.

    mask2former export --format onnx --size 512x512 [--dynamic] [--fp16 | --int8 --calibrate DIR]
                       [--opset 17] --out model.onnx

Weights: --weights (any supported checkpoint), else --preset with random weights, else the bundled model
(a random synth-tiny before it is trained; said plainly).
"""

from __future__ import annotations

import argparse

from mask2former.cli import UserError, example, flag_error
from mask2former.cli.checks import AT_LEAST_1, check_input_size, check_number, check_output_file
from mask2former.cli.ops import parse_size

FORMATS = ("onnx",)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export to ONNX (fixed or dynamic size, fp32 or fp16) with a parity report",
        epilog=example("mask2former export --size 192x192 --dynamic --out model.onnx"),
    )
    parser.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument(
        "--preset", default=None, help="architecture preset (random weights when given without --weights)"
    )
    parser.add_argument("--format", default="onnx", help="export format (only onnx)")
    parser.add_argument(
        "--size",
        default=None,
        help="HxW input size, multiples of 32 (required for a fixed graph; the traced size with --dynamic)",
    )
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="half precision (the pixel decoder stays float32, as the official AMP)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="static int8 for ONNX Runtime (QDQ, per-channel weights), calibrated on --calibrate",
    )
    parser.add_argument("--calibrate", default=None, help="with --int8: folder of calibration images")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=32,
        help="with --int8: how many images of --calibrate to use (default 32, sorted by name)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (default 17)")
    parser.add_argument("--out", required=True, help="output .onnx file (the sidecar is OUT.json)")
    parser.add_argument(
        "--image", default=None, help="image for the parity report (default: the package's example photo)"
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the parity run")
    parser.set_defaults(func=run)


def load_for_export(weights: str | None, preset: str | None):
    """(model, config, trained, source description) for --weights / --preset (one-line errors)."""
    from mask2former.api import resolve_model

    try:
        loaded = resolve_model(weights, preset)
    except (ValueError, FileNotFoundError) as error:
        raise flag_error(error) from None
    return loaded.model, loaded.config, loaded.trained, loaded.source


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mask2former.export.onnx import MAX_OPSET, MIN_OPSET, check_options
    from mask2former.export.runtime import ExportError, require

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: unknown export format (supported: {', '.join(FORMATS)})")
    size = parse_size(args.size)
    if size is None and not args.dynamic:
        raise UserError("--size HxW is required for a fixed-size graph (or pass --dynamic)")
    if not str(args.out).endswith(".onnx"):
        raise UserError(f"--out {args.out}: the file name must end in .onnx")
    check_number("--threads", args.threads, AT_LEAST_1)
    check_output_file("--out", args.out)
    check_input_size("--size", size)
    try:
        require("onnx")
        require("onnxruntime")
        if size is not None:
            check_options(size, args.opset)
        elif not MIN_OPSET <= args.opset <= MAX_OPSET:
            check_options((32, 32), args.opset)
    except ExportError as error:
        raise flag_error(error) from None
    calibration = _calibration(args)
    if args.image is not None and not Path(args.image).is_file():
        raise UserError(f"--image {args.image}: no such file")
    model, config, trained, source = load_for_export(args.weights, args.preset)
    if size is None:  # a dynamic graph traced at the model's own test size, rounded up to the padding
        step = config.input.size_divisibility
        side = -(-config.input.short_edge // step) * step
        size = (side, side)
    from mask2former.export.onnx import export_onnx
    from mask2former.export.runtime import sidecar_path

    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    kind = f"{'dynamic' if args.dynamic else 'fixed'} {size[0]}x{size[1]} {precision}"
    print(f"exporting {config.name} from {source} to ONNX ({kind}, opset {args.opset})")
    if not trained:
        print("note: RANDOMLY INITIALISED weights: the graph is correct but its predictions are meaningless")
    try:
        sidecar = export_onnx(
            model,
            config,
            args.out,
            size,
            dynamic=args.dynamic,
            fp16=args.fp16,
            opset=args.opset,
            trained=trained,
            source=source,
            image=args.image,
            threads=args.threads,
            int8_calibration=calibration,
        )
    except ExportError as error:
        raise flag_error(error, ("weights", "preset", "size", "opset", "out", "calibrate")) from None
    counts = sidecar["op_counts"]
    print(
        f"wrote {args.out} ({sum(counts.values())} nodes, {counts.get('GridSample', 0)} GridSample) "
        f"and {sidecar_path(args.out)}"
    )
    return 0


def _calibration(args: argparse.Namespace):
    """The calibration image paths of --int8 --calibrate DIR (None without --int8), one-line errors."""
    from mask2former.export.quantize import calibration_images
    from mask2former.export.runtime import ExportError

    if not args.int8:
        if args.calibrate is not None:
            raise UserError("--calibrate is for --int8 exports")
        return None
    if args.fp16:
        raise UserError("--int8 and --fp16: choose one precision")
    if args.calibrate is None:
        raise UserError("--int8 needs --calibrate DIR (images like the ones the graph will see)")
    check_number("--calibration-images", args.calibration_images, AT_LEAST_1)
    try:
        return calibration_images(args.calibrate, args.calibration_images)
    except ExportError as error:
        raise flag_error(error, ("calibrate",)) from None
