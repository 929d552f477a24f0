"""`mask2former eval`: score predictions with the reference metrics (PQ, mIoU, mask AP).

From files (no model):
  --task panoptic --pred-json P.json --pred-dir P/ --gt-json G.json --gt-dir G/
  --task semantic --pred-dir P/ --gt-dir G/ --num-classes N [--ignore-label 255]
  --task instance --pred-json P.json --gt-json G.json
  [--engine auto|hotcoco|reference] [--workers N]: the code computing PQ and mask AP (same figures)
From a model over a dataset: --weights W --data DIR --task ...

Prints a table and, with --out DIR, writes DIR/metrics.json (NaN written as null).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from mask2former.cli import DEVICE_HELP, UserError, example
from mask2former.cli.predict import add_dtype_argument, add_scale_arguments, apply_scale_arguments

ENGINES = ("auto", "hotcoco", "reference")
# Earlier spellings still accepted: --engine pycocotools (before PQ had engines) is the reference.
ENGINE_ALIASES = {"pycocotools": "reference"}

_FILE_ARGUMENTS = {
    "panoptic": ("pred_json", "pred_dir", "gt_json", "gt_dir"),
    "semantic": ("pred_dir", "gt_dir", "num_classes"),
    "instance": ("pred_json", "gt_json"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score predictions: PQ (panopticapi rules), mIoU (detectron2), mask AP (pycocotools)",
        description="Score a model over a dataset, or prediction files against ground truth.",
        epilog=example(
            "mask2former eval --data runs/synth-val --task panoptic --out metrics/",
            "mask2former eval --task instance --pred-json predictions/instances.json --gt-json gt.json",
        ),
    )
    parser.add_argument(
        "--task",
        choices=["panoptic", "semantic", "instance"],
        required=True,
        help="what to score: PQ, mIoU or mask AP",
    )
    files = parser.add_argument_group("prediction files")
    files.add_argument("--pred-json", help="panoptic: COCO panoptic JSON; instance: COCO results JSON")
    files.add_argument("--pred-dir", help="panoptic PNGs, or semantic label PNGs")
    files.add_argument("--gt-json", help="panoptic: COCO panoptic JSON; instance: COCO instances JSON")
    files.add_argument("--gt-dir", help="ground-truth panoptic PNGs, or semantic label PNGs (same names)")
    files.add_argument("--num-classes", type=int, help="semantic: number of classes (labels 0..N-1)")
    files.add_argument(
        "--ignore-label", type=int, default=255, help="semantic: label not scored (default 255)"
    )
    files.add_argument(
        "--workers",
        type=int,
        help="threads scoring the files: our PNG readers' (default: the cores, at most 8) or hotcoco's "
        "(it sizes its pool from RAYON_NUM_THREADS, which this sets; default: every core); pycocotools "
        "runs on one",
    )
    files.add_argument(
        "--engine",
        choices=[*ENGINES, *ENGINE_ALIASES],
        default="auto",
        help="panoptic and instance: the code computing PQ and mask AP, the same figures from each. auto: "
        "hotcoco if installed (files it refuses go to reference), else reference; hotcoco (Rust); "
        "reference: our own code for PQ (panopticapi's rules) and pycocotools' COCOeval for mask AP. Only "
        "reference PQ refuses a ground-truth JSON that disagrees with its PNGs; hotcoco follows panopticapi "
        "there (a listed segment missing from the PNG is a false negative, an unlisted id is ignored, areas "
        "come from the JSON); pycocotools: the former name of reference",
    )
    model = parser.add_argument_group("model over a dataset")
    model.add_argument("--weights", help="checkpoint to run (see `mask2former predict --help`)")
    model.add_argument("--data", help="dataset folder with ground truth")
    model.add_argument("--preset", help="architecture preset for --weights")
    model.add_argument("--device", default="auto", help=DEVICE_HELP)
    model.add_argument("--limit", type=int, help="evaluate the first N images only")
    add_dtype_argument(model)
    add_scale_arguments(model)
    parser.add_argument("--out", help="folder for metrics.json (created if missing)")
    parser.add_argument("--per-class", action="store_true", help="also print the per-class table")
    parser.add_argument("--verbose", action="store_true", help="show COCOeval's own output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def evaluate_files(args: argparse.Namespace) -> dict:
    """Metrics of prediction files named by the --pred-* / --gt-* arguments."""
    from mask2former.cli.checks import AT_LEAST_1, check_number
    from mask2former.evaluation import EvaluationError

    missing = [name for name in _FILE_ARGUMENTS[args.task] if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UserError(f"--task {args.task} from files needs {flags} (or --weights and --data)")
    progress = not args.no_progress
    check_number("--workers", args.workers, AT_LEAST_1)
    try:
        with _hotcoco_threads(args.workers):
            return _score_files(args, progress)
    except EvaluationError as error:
        raise UserError(str(error)) from None
    except ModuleNotFoundError as error:
        if "mask2former[eval]" not in str(error):  # our install hint, not a broken installation
            raise
        raise UserError(f"--engine {args.engine}: {error}") from None


def _engine(args: argparse.Namespace) -> str:
    """--engine with a former spelling replaced by today's."""
    return ENGINE_ALIASES.get(args.engine, args.engine)


def _score_files(args: argparse.Namespace, progress: bool) -> dict:
    from mask2former import limits
    from mask2former.cli.checks import AT_LEAST_1, check_limit, check_number
    from mask2former.evaluation import files

    if args.task == "panoptic":
        return files.evaluate_panoptic_files(
            args.pred_json, args.pred_dir, args.gt_json, args.gt_dir, progress, args.workers, _engine(args)
        )
    if args.task == "semantic":
        check_number("--num-classes", args.num_classes, AT_LEAST_1)
        check_limit(limits.CLASSES, args.num_classes, f"--num-classes {args.num_classes}")
        if 0 <= args.ignore_label < args.num_classes:
            raise UserError(
                f"--ignore-label {args.ignore_label} is a class index (--num-classes {args.num_classes})"
            )
        return files.evaluate_semantic_files(
            args.pred_dir,
            args.gt_dir,
            args.num_classes,
            args.ignore_label,
            progress=progress,
            workers=args.workers,
        )
    engine = "pycocotools" if _engine(args) == "reference" else _engine(args)
    return files.evaluate_instance_files(args.pred_json, args.gt_json, verbose=args.verbose, engine=engine)


@contextlib.contextmanager
def _hotcoco_threads(workers: int | None):
    """hotcoco's threads are rayon's global pool, sized by RAYON_NUM_THREADS when a process first uses it
    (once: in a CLI run, this one); the variable is put back afterwards."""
    if workers is None:
        yield
        return
    before = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAYON_NUM_THREADS"]
        else:
            os.environ["RAYON_NUM_THREADS"] = before


def _number(value: Any) -> str:
    return "    nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:7.2f}"


def format_table(task: str, metrics: dict, per_class: bool = False) -> str:
    """The metrics as a text table (percent)."""
    lines = []
    if task == "panoptic":
        lines.append(f"{'':10s}|{'PQ':>7s}{'SQ':>7s}{'RQ':>7s}{'N':>6s}")
        lines.append("-" * 37)
        for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            row = "".join(_number(metrics[key + suffix]) for key in ("PQ", "SQ", "RQ"))
            lines.append(f"{name:10s}|{row}{metrics['n' + suffix]:6d}")
        columns = ("PQ", "SQ", "RQ", "TP", "FP", "FN")
    elif task == "semantic":
        keys = ("mIoU", "fwIoU", "pACC", "mACC")
        lines.append("".join(f"{key:>7s}" for key in keys))
        lines.append("".join(_number(metrics[key]) for key in keys))
        columns = ("IoU", "ACC")
    else:
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        lines.append("".join(f"{key:>7s}" for key in keys))
        lines.append("".join(_number(metrics[key]) for key in keys))
        columns = ("AP",)
    if per_class:
        lines.append("")
        lines.append(f"{'id':>6s} {'name':24s}" + "".join(f"{c:>7s}" for c in columns))
        for key, row in metrics["per_class"].items():
            cells = "".join(f"{row[c]:7d}" if isinstance(row[c], int) else _number(row[c]) for c in columns)
            lines.append(f"{key:>6s} {str(row['name'])[:24]:24s}{cells}")
    lines.append(f"({metrics['images']} images)")
    return "\n".join(lines)


def _without_nan(value: Any) -> Any:
    """JSON has no NaN: undefined metrics (class absent from the ground truth, ...) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write out_dir/metrics.json atomically (NaN as null)."""
    from mask2former.fileio import write_json

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return write_json(out_dir / "metrics.json", _without_nan(metrics), indent=2)
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot write ({error.strerror or error})") from None


def _evaluate_model(args: argparse.Namespace) -> dict | None:
    """`evaluation.model.evaluate_model` for --weights/--data, its errors as one line naming the flag."""
    from mask2former.cli import flag_error, resolve_device_flag
    from mask2former.cli.checks import AT_LEAST_1, check_number
    from mask2former.cli.predict import make_predictor
    from mask2former.evaluation import EvaluationError
    from mask2former.evaluation.model import evaluate_model, open_evaluation_dataset

    if args.data is None:
        raise UserError("--data DIR is needed to evaluate a model (or give prediction files)")
    device = resolve_device_flag(args.device)
    check_number("--limit", args.limit, AT_LEAST_1)
    try:
        dataset = open_evaluation_dataset(args.data, args.task)
    except ValueError as error:
        raise flag_error(error, ("data",)) from None
    predictor = make_predictor(args.weights, args.preset, device, dtype=args.dtype)
    apply_scale_arguments(predictor, args.short_edge, args.max_size)
    try:
        return evaluate_model(
            predictor,
            dataset,
            args.task,
            args.limit,
            progress=not args.no_progress,
            device=device,
            name=args.data,
        )
    except (EvaluationError, FileNotFoundError, ValueError) as error:
        raise flag_error(error, ("data", "limit")) from None


def run(args: argparse.Namespace) -> int:
    from mask2former.cli.checks import check_output_folder

    if args.out is not None:
        check_output_folder("--out", args.out)
    if args.weights is not None or args.data is not None:
        given = [
            name
            for names in _FILE_ARGUMENTS.values()
            for name in names
            if name != "num_classes" and getattr(args, name) is not None
        ]
        if given:
            raise UserError("give either prediction files or --weights/--data, not both")
        metrics = _evaluate_model(args)
    else:
        if args.short_edge is not None or args.max_size is not None:
            raise UserError(
                "--short-edge/--max-size apply to a model (--weights/--data), not to prediction files"
            )
        metrics = evaluate_files(args)
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    metrics = {"task": args.task, **metrics}
    print(format_table(args.task, metrics, per_class=args.per_class))
    for warning in metrics.get("warnings", []):
        print(f"mask2former eval: warning: {warning}", file=sys.stderr)
    if args.out is not None:
        print(f"wrote {write_metrics(args.out, metrics)}")
    return 0
