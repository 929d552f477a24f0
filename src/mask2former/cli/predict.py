"""`mask2former predict`: segment files, folders and globs; write pictures and standard-format results.

Output layout in --out DIR, per image STEM:
  DIR/STEM.<task>.png              overlay picture (coloured masks with class names)
  semantic: DIR/semantic/STEM.png  class-index PNG (dataset category ids when the dataset has them)
  panoptic: DIR/panoptic/STEM.png  COCO panoptic PNG, and DIR/panoptic.json for all images
  instance: DIR/instances.json     COCO results (RLE masks) for all images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mask2former.cli import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment images and write pictures + standard-format results"
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument(
        "--task",
        choices=["semantic", "instance", "panoptic"],
        default=None,
        help="default: the model's own task",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint: our folder, detectron2 .pkl/.pth, Hugging Face folder or .onnx "
        "(default: the bundled model)",
    )
    parser.add_argument(
        "--preset", default=None, help="architecture preset (random weights when given without --weights)"
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default=None,
        help="default: onnxruntime for .onnx weights, torch otherwise",
    )
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-picture", action="store_true", help="skip the overlay pictures")
    add_scale_arguments(parser)
    add_dtype_argument(parser)
    parser.set_defaults(func=run)


def add_dtype_argument(parser) -> None:
    """--dtype: the precision inference runs in (`mask2former.inference.precision`)."""
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="inference precision (default fp32; bf16/fp16 where the CPU or GPU has them natively; "
        "an .onnx graph keeps the precision it was exported with)",
    )


def add_scale_arguments(parser) -> None:
    """--short-edge / --max-size: test-time scale of the official pre-processing."""
    parser.add_argument(
        "--short-edge",
        type=int,
        default=None,
        help="resize the shortest image edge to this many pixels (default: the model's own)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="cap on the longest edge (default: the model's own, scaled with --short-edge)",
    )


def apply_scale_arguments(predictor, short_edge: int | None, max_size: int | None) -> None:
    """Apply --short-edge / --max-size to a predictor, with one-line errors."""
    if short_edge is None and max_size is None:
        return
    try:
        predictor.set_short_edge(
            predictor.config.input.short_edge if short_edge is None else short_edge, max_size
        )
    except ValueError as error:
        raise UserError(f"--short-edge/--max-size: {error}") from None


def make_predictor(
    weights: str | None,
    preset: str | None,
    device: str = "cpu",
    backend: str | None = None,
    dtype: str | None = None,
):
    """The Predictor for --weights/--preset/--backend (`mask2former.load`), with one-line errors."""
    import warnings

    import mask2former
    from mask2former.api import is_onnx
    from mask2former.cli import flag_error

    if backend == "onnxruntime" and not is_onnx(weights):
        raise UserError("--backend onnxruntime needs --weights MODEL.onnx (see `mask2former export`)")
    if backend == "torch" and is_onnx(weights):
        raise UserError(f"--weights {weights}: an ONNX graph runs with --backend onnxruntime")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mask2former.load(weights, preset=preset, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as error:
        raise flag_error(error, ("weights", "preset", "dtype")) from None


def describe(predictor) -> str:
    config = predictor.config
    state = (
        "trained weights" if predictor.trained else "RANDOMLY INITIALISED weights (results are meaningless)"
    )
    return f"model {config.name} ({config.num_classes} classes) from {predictor.source}: {state}"


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = path.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mask2former.data.image_io import ImageReadError, list_images, load_image
    from mask2former.writers import PredictionWriter

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    try:
        paths = list_images(args.inputs)
    except (ImageReadError, ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from None
    if not paths:
        raise UserError(f"no images found in {' '.join(args.inputs)}")
    predictor = make_predictor(args.weights, args.preset, args.device, args.backend, args.dtype)
    apply_scale_arguments(predictor, args.short_edge, args.max_size)
    task = args.task or predictor.config.task
    print(describe(predictor))
    writer = PredictionWriter(Path(args.out), predictor.config, task, pictures=not args.no_picture)
    failures = 0
    stems = _unique_stems(paths)
    progress = tqdm(total=len(paths), unit="img", disable=len(paths) <= 1, file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        chunk = list(
            zip(paths[start : start + args.batch_size], stems[start : start + args.batch_size], strict=True)
        )
        loaded = []
        for path, stem in chunk:
            try:
                loaded.append((path, stem, load_image(path)))
            except ImageReadError as error:
                failures += 1
                tqdm.write(f"mask2former predict: skipped: {error}", file=sys.stderr)
                progress.update(1)
        if loaded:
            predictions = predictor.predict_batch([image for _, _, image in loaded], task)
            for (path, stem, _), prediction in zip(loaded, predictions, strict=True):
                written = writer.write(stem, path.name, prediction)
                tqdm.write(f"{path}: {writer.summary(prediction)} -> {written}")
                progress.update(1)
    progress.close()
    writer.finish()
    done = len(paths) - failures
    print(f"segmented {done} of {len(paths)} images ({task}); results in {Path(args.out).resolve()}")
    if not predictor.trained:
        print("note: the model had random weights; train one or pass --weights for real results")
    return 1 if failures else 0
