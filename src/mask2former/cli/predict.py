"""`mask2former predict`: segment files, folders, globs or a dataset; write pictures and standard files.

Output layout in --out DIR, per image STEM (see `mask2former.writers.PredictionWriter`):
  DIR/STEM.<task>.png              overlay picture (coloured masks with class names)
  semantic: DIR/semantic/STEM.png  contiguous class index 0..K-1 per pixel; DIR/semantic.json names them
  panoptic: DIR/panoptic/STEM.png  COCO panoptic PNG, and DIR/panoptic.json for all images
  instance: DIR/instances.json     COCO results (RLE masks) and DIR/coco_dataset.json (a COCO dataset)
Image ids are integers (the ground truth's with --gt-json or a dataset folder, else 1..N). Finished images
are journaled in DIR/.predict-journal, so --resume continues a stopped run; under torchrun the images are
sharded over the processes (`mask2former.outputs.folder`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mask2former.cli import DEVICE_HELP, UserError, example
from mask2former.inference.predictor import DEFAULT_SCORE_THRESHOLD


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images and write pictures + standard-format results",
        description="Segment image files, folders and globs; write overlay pictures and standard files.",
        epilog=example("mask2former predict photo.jpg photos/ --task panoptic --out predictions"),
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
        help="checkpoint: our folder, detectron2 .pkl/.pth, Hugging Face folder or .onnx, a released "
        "model's name (e.g. coco-panoptic-r50, see `mask2former presets`) or a Hugging Face hub id "
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
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--no-picture", action="store_true", help="skip the overlay pictures")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        help=f"instance task: drop instances scoring below this (default {DEFAULT_SCORE_THRESHOLD}, as "
        "detectron2's demo; 0 keeps the official top-100 list that `eval` scores)",
    )
    parser.add_argument(
        "--object-threshold",
        type=float,
        default=None,
        help="panoptic task: keep queries whose class probability exceeds this (default: the model's, 0.8)",
    )
    parser.add_argument(
        "--overlap-threshold",
        type=float,
        default=None,
        help="panoptic task: drop segments keeping less than this share of their mask "
        "(default: the model's, 0.8)",
    )
    parser.add_argument(
        "--gt-json",
        default=None,
        help="COCO JSON (panoptic or instances) the inputs belong to: files take its image and category ids",
    )
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue a stopped run into the same --out")
    state.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    device: str = "auto",
    backend: str | None = None,
    dtype: str | None = None,
    reuse_memory: bool = True,
):
    """The Predictor for --weights/--preset/--device/--backend/--dtype (`mask2former.load`), with one-line
    errors. reuse_memory: see `mask2former.load`."""
    import warnings

    import mask2former
    from mask2former.api import is_onnx
    from mask2former.cli import flag_error, resolve_device_flag

    device = resolve_device_flag(device)
    if backend == "onnxruntime" and not is_onnx(weights):
        raise UserError("--backend onnxruntime needs --weights MODEL.onnx (see `mask2former export`)")
    if backend == "torch" and is_onnx(weights):
        raise UserError(f"--weights {weights}: an ONNX graph runs with --backend onnxruntime")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mask2former.load(
                weights, preset=preset, device=device, dtype=dtype, reuse_memory=reuse_memory
            )
    except (ValueError, FileNotFoundError) as error:
        raise flag_error(error, ("weights", "preset", "dtype", "device")) from None


def describe(predictor) -> str:
    config = predictor.config
    state = (
        "trained weights" if predictor.trained else "RANDOMLY INITIALISED weights (results are meaningless)"
    )
    return f"model {config.name} ({config.num_classes} classes) from {predictor.source}: {state}"


def _thresholds(args: argparse.Namespace) -> dict:
    """The post-processing overrides of --score-threshold / --object-threshold / --overlap-threshold."""
    given = {
        "score_threshold": ("--score-threshold", args.score_threshold),
        "object_mask_threshold": ("--object-threshold", args.object_threshold),
        "overlap_threshold": ("--overlap-threshold", args.overlap_threshold),
    }
    from mask2former.cli.checks import FRACTION, check_number

    for flag, value in given.values():
        check_number(flag, value, FRACTION)
    return {name: value for name, (_, value) in given.items() if value is not None}


def _needed_classes(predictor, task: str) -> list[bool]:
    """Which model classes the task can output (an instance task of a panoptic model gives things only)."""
    from mask2former.inference.postprocess import PostprocessSettings

    things = PostprocessSettings.from_config(predictor.config, task).thing_classes
    if task == "instance" and things is not None:
        return list(things)
    return [True] * predictor.config.num_classes


# ---- numeric and output checks (issue #17): shared helpers of cli/checks.py ----
def check_predict_options(args: argparse.Namespace) -> None:
    """One-line UserErrors for predict's numbers and --out before any model is loaded."""
    from mask2former.cli import checks

    checks.check_number("--batch-size", args.batch_size, checks.Range(1, 1024))
    checks.check_number("--short-edge", args.short_edge, checks.AT_LEAST_1)
    checks.check_number("--max-size", args.max_size, checks.AT_LEAST_1)
    checks.check_output_folder("--out", args.out)


# ---- end of the checks ----


def run(args: argparse.Namespace) -> int:
    from mask2former.cli import flag_error
    from mask2former.outputs.folder import predict_folder
    from mask2former.outputs.inputs import InputError, digest, output_categories, plan_inputs
    from mask2former.outputs.journal import FolderError
    from mask2former.writers import PredictionWriter, meta_from_config

    check_predict_options(args)
    thresholds = _thresholds(args)
    try:
        images, gt = plan_inputs(args.inputs, args.gt_json)
    except InputError as error:
        raise flag_error(error, ("gt_json",)) from None
    from mask2former.cli import resolve_device_flag

    args.device = resolve_device_flag(args.device)  # "auto" -> the device itself, for torchrun's backend too
    predictor = make_predictor(args.weights, args.preset, args.device, args.backend, args.dtype)
    apply_scale_arguments(predictor, args.short_edge, args.max_size)
    task = args.task or predictor.config.task
    try:
        categories = output_categories(
            meta_from_config(predictor.config), gt, _needed_classes(predictor, task)
        )
    except InputError as error:
        raise flag_error(error, ("gt_json",)) from None
    out = Path(args.out)
    writer = PredictionWriter(out, predictor.config, task, categories, pictures=not args.no_picture)
    run_description = {
        "task": task,
        "images": len(images),
        "inputs": digest(images),
        "weights": predictor.source,
        "input_size": [predictor.config.input.short_edge, predictor.config.input.max_size],
        **{
            name: thresholds.get(name)
            for name in ("score_threshold", "object_mask_threshold", "overlap_threshold")
        },
        "ground_truth": str(gt.path.resolve()) if gt is not None else None,
        "pictures": not args.no_picture,
    }
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(describe(predictor))
    try:
        summary = predict_folder(
            predictor,
            images,
            writer,
            run_description,
            batch_size=args.batch_size,
            thresholds=thresholds,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            device=args.device,
        )
    except FolderError as error:
        raise flag_error(error, ("out",)) from None
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    finished = summary.done_before + summary.done
    if summary.interrupted:
        print(
            f"interrupted: {finished} of {summary.total} images are in {out.resolve()}; "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130
    print(f"segmented {finished} of {summary.total} images ({task}); results in {out.resolve()}")
    if not predictor.trained:
        print("note: the model had random weights; train one or pass --weights for real results")
    return 1 if summary.failed else 0
