"""`mask2former train`: train a preset or config on a dataset folder.

One process, or many with `torchrun --nproc_per_node N -m mask2former train ...`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

from mask2former.cli import DEVICE_HELP, UserError, checks, example, resolve_device_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (single process or under torchrun)",
        epilog=example(
            "mask2former train --preset synth-tiny --data runs/synth-train --out runs/mine --iters 2000",
            "mask2former train --init coco-panoptic-r50 --data my-coco-folder --out runs/finetuned",
            "torchrun --nproc_per_node 2 -m mask2former train --preset synth-tiny --data DIR --out RUN",
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", help="architecture preset (see `mask2former presets`); default: the --init model's"
    )
    source.add_argument(
        "--config", help="a model config JSON (a ModelConfig, or our checkpoint's config.json)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="dataset folder (synth / COCO panoptic / COCO instance / images+labels semantic)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder: checkpoint.pt, metrics.jsonl, loss.png, model/"
    )
    parser.add_argument(
        "--init",
        default=None,
        help="start from these weights: any checkpoint format or a released model's name (e.g. "
        "coco-panoptic-r50). Classes may differ from the dataset's: every other weight is loaded, the class "
        "rows of classes with the same name are carried over, the others re-initialised",
    )
    parser.add_argument(
        "--backbone-weights",
        default=None,
        help="ImageNet-pretrained backbone: torchvision ResNet-50/101 .pth, detectron2 R-50.pkl/R-101.pkl, "
        "Microsoft or timm Swin .pth/.safetensors (mapped strictly; the rest starts from scratch)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--iters", type=int, default=None, help="total optimisation steps")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="global batch size (split over processes)"
    )
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    parser.add_argument(
        "--backbone-multiplier",
        type=float,
        default=None,
        help="learning-rate factor of the backbone (official 0.1 for a pretrained backbone)",
    )
    parser.add_argument(
        "--backbone-norm",
        choices=["frozen", "bn"],
        default=None,
        help="frozen: FrozenBatchNorm as the official models (pretrained backbone); bn: BatchNorm with batch "
        "statistics while training, for a backbone trained from scratch (saved as FrozenBatchNorm)",
    )
    parser.add_argument(
        "--schedule", choices=["poly", "step", "cosine"], default=None, help="learning-rate schedule"
    )
    parser.add_argument("--warmup-iters", type=int, default=None, help="steps of linear warm-up")
    parser.add_argument(
        "--warmup-factor",
        type=float,
        default=None,
        help="learning-rate factor at step 0 of the warm-up (official 1.0, i.e. no warm-up whatever "
        "--warmup-iters says; e.g. 0.001 for detectron2's usual ramp)",
    )
    parser.add_argument(
        "--clip-grad-norm", type=float, default=None, help="full-model gradient clipping norm"
    )
    parser.add_argument(
        "--augment", choices=["lsj", "multiscale", "none"], default=None, help="training augmentation"
    )
    parser.add_argument("--crop-size", type=int, default=None, help="square crop side in pixels")
    parser.add_argument("--min-scale", type=float, default=None, help="smallest random scale (LSJ)")
    parser.add_argument("--max-scale", type=float, default=None, help="largest random scale (LSJ)")
    parser.add_argument("--num-points", type=int, default=None, help="points per mask for matching and loss")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=None, help="steps between metrics lines")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--workers", type=int, default=None, help="data-loading worker processes")
    parser.add_argument(
        "--device", default=None, help=f"{DEVICE_HELP} (default: auto; with --resume the run's own)"
    )
    parser.add_argument(
        "--val-data", default=None, help="a validation dataset folder, evaluated every --eval-every steps"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations of --val-data (PQ / mIoU / AP as the task has, into metrics.jsonl "
        "and loss.png; the best model is kept in --out/model-best)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: print a line (step, loss, lr, ETA) every --log-every steps instead",
    )
    for action in parser._actions:
        if action.dest in OVERRIDES and action.dest != "device":
            action.default_help = functools.partial(_train_default, OVERRIDES[action.dest])
    parser.set_defaults(func=run)


def _train_default(field_name: str) -> str:
    """A training setting's default per preset, for --help (computed only when the help is shown)."""
    from mask2former.training.recipes import describe_default

    return describe_default(field_name).removeprefix("default ") + "; with --resume the run's own"


OVERRIDES = {
    "iters": "max_iters",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "backbone_multiplier": "backbone_multiplier",
    "backbone_norm": "backbone_norm",
    "schedule": "schedule",
    "warmup_iters": "warmup_iters",
    "warmup_factor": "warmup_factor",
    "clip_grad_norm": "clip_grad_norm",
    "augment": "augment",
    "crop_size": "crop_size",
    "min_scale": "min_scale",
    "max_scale": "max_scale",
    "num_points": "num_points",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
    "eval_every": "eval_every",
    "seed": "seed",
    "workers": "num_workers",
    "device": "device",
}


def _model_config(args: argparse.Namespace, init_config=None):
    from mask2former.config import ModelConfig, get_preset

    if not args.preset and not args.config:
        if init_config is None:
            raise UserError("give --preset, --config or --init to choose the architecture")
        return copy.deepcopy(init_config)  # adopting the dataset's classes must not change init_config
    if args.preset:
        try:
            return get_preset(args.preset)
        except ValueError as error:
            raise UserError(str(error)) from None
    try:
        document = json.loads(Path(args.config).read_text())
        return ModelConfig.from_dict(document.get("model", document))
    except FileNotFoundError:
        raise UserError(f"--config {args.config}: no such file") from None
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise UserError(f"--config {args.config}: not a model config ({error})") from None


def _adopt_dataset_classes(config, meta):
    """The architecture with the dataset's own classes when they differ from the preset's."""
    from mask2former.config import with_dataset_meta

    if list(meta.class_names) == list(config.class_names):
        return config
    return with_dataset_meta(config, meta)


def _validation_set(path: str, train_set, task: str):
    """The --val-data dataset, refused in one line when unreadable or its classes differ."""
    from mask2former.training.validation import open_validation_set

    try:
        val_set = open_validation_set(path, task)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--val-data {path}: {error}") from None
    if list(val_set.meta.class_names) != list(train_set.meta.class_names):
        raise UserError(
            f"--val-data {path}: its classes differ from --data's; use a split of the same dataset"
        )
    return val_set


def _read_init(weights: str):
    """(state dict, config) of the --init weights (one-line errors)."""
    import mask2former

    try:
        init_model, init_config = mask2former.load_model(weights)
    except Exception as error:  # any unreadable checkpoint is a user error here
        raise UserError(f"--init {weights}: {error}") from None
    return init_model.state_dict(), init_config


def _read_train_config(path: Path):
    """The train_config.json of a run being resumed (one-line UserError naming the file)."""
    from mask2former.training.trainer import TrainConfig

    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict):
            raise ValueError("expected a JSON object")
        return TrainConfig.from_dict(document)
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read ({error})") from None
    except (ValueError, TypeError) as error:
        raise UserError(f"{path}: not a train config ({str(error).splitlines()[0]})") from None


# Allowed values of every number of a TrainConfig (from a flag or a resumed run's train_config.json).
TRAIN_RANGES = {
    "max_iters": checks.AT_LEAST_1,
    "batch_size": checks.AT_LEAST_1,
    "lr": checks.NON_NEGATIVE,  # 0 is a legitimate check: carried-over weights stay as loaded
    "weight_decay": checks.NON_NEGATIVE,
    "backbone_multiplier": checks.NON_NEGATIVE,
    "clip_grad_norm": checks.POSITIVE,
    "poly_power": checks.POSITIVE,
    "warmup_iters": checks.NON_NEGATIVE,
    "warmup_factor": checks.Range(0, 1, open_low=True),
    "checkpoint_every": checks.AT_LEAST_1,
    "log_every": checks.AT_LEAST_1,
    "seed": checks.Range(0, 2**32 - 1),
    "num_workers": checks.Range(0, 256),
    "crop_size": checks.AT_LEAST_1,  # and limits.INPUT_PIXELS below
    "min_scale": checks.POSITIVE,
    "max_scale": checks.POSITIVE,
    "num_points": checks.Range(1, 1 << 20),
    "oversample_ratio": checks.Range(1, 100),
    "importance_sample_ratio": checks.FRACTION,
    "class_weight": checks.NON_NEGATIVE,
    "mask_weight": checks.NON_NEGATIVE,
    "dice_weight": checks.NON_NEGATIVE,
    "no_object_weight": checks.NON_NEGATIVE,
}
TRAIN_CHOICES = {
    "schedule": ("poly", "step", "cosine"),
    "augment": ("lsj", "multiscale", "none"),
    "backbone_norm": ("frozen", "bn"),
}


def check_train_config(config, given: dict[str, str], saved: Path) -> None:
    """One-line UserError for a value no run can use (a negative batch size used to loop forever).

    given: field name -> the flag that set it; other values came from `saved` (a resumed run) or defaults.
    """
    from mask2former import limits

    def name(field: str) -> str:
        return given.get(field) or f"{saved}: {field}"

    for field, allowed in TRAIN_RANGES.items():
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name(field)} {value!r}: must be a number")
        checks.check_number(name(field), value, allowed)
    for field, choices in TRAIN_CHOICES.items():
        if getattr(config, field) not in choices:
            raise UserError(f"{name(field)} {getattr(config, field)!r}: must be one of {', '.join(choices)}")
    checks.check_ordered(name("min_scale"), config.min_scale, name("max_scale"), config.max_scale)
    try:
        limits.INPUT_PIXELS.check(config.crop_size**2, f"{name('crop_size')} {config.crop_size}")
    except limits.LimitError as error:
        raise UserError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from mask2former.checkpoints.io import CheckpointError
    from mask2former.cli.checks import check_output_folder
    from mask2former.data.datasets import DatasetError, open_dataset
    from mask2former.fileio import write_json
    from mask2former.training.recipes import recipe_for
    from mask2former.training.trainer import CHECKPOINT_NAME, Trainer

    out_dir = check_output_folder("--out", args.out)
    checks.check_number("--eval-every", args.eval_every, checks.AT_LEAST_1)
    if args.init and args.backbone_weights:
        raise UserError("--init already holds a backbone: give --init or --backbone-weights, not both")
    init_weights, init_config = _read_init(args.init) if args.init else (None, None)
    model_config = _model_config(args, init_config)
    train_config = recipe_for(model_config.name)  # the preset's recipe; flags and --resume override it
    saved_config = out_dir / "train_config.json"
    if args.resume:
        if not (out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"--resume: no {out_dir / CHECKPOINT_NAME} to resume from")
        if saved_config.exists():
            train_config = _read_train_config(saved_config)
    if args.device is not None or not args.resume:
        args.device = resolve_device_flag(args.device)
    given = {}
    for arg_name, field_name in OVERRIDES.items():
        value = getattr(args, arg_name)
        if value is not None:
            setattr(train_config, field_name, value)
            given[field_name] = "--" + arg_name.replace("_", "-")
    check_train_config(train_config, given, saved_config)
    try:
        dataset = open_dataset(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--data {args.data}: {error}") from None
    model_config = _adopt_dataset_classes(model_config, dataset.meta)
    val_dataset = _validation_set(args.val_data, dataset, model_config.task) if args.val_data else None
    try:
        trainer = Trainer(
            model_config,
            train_config,
            dataset,
            out_dir,
            init_weights=init_weights,
            show_progress=not args.no_progress,
            init_config=init_config,
            backbone_weights=args.backbone_weights,
            val_dataset=val_dataset,
        )
    except CheckpointError as error:
        flag = f"--init {args.init}" if args.init else f"--backbone-weights {args.backbone_weights}"
        raise UserError(f"{flag}: {error}") from None
    except ValueError as error:
        from mask2former.cli import flag_error

        raise flag_error(error, ("batch_size",)) from None
    if trainer.rank == 0 and trainer.backbone_report is not None:
        print(trainer.backbone_report.summary())
    if trainer.rank == 0 and trainer.init_report is not None:
        print(trainer.init_report.summary())
    if args.resume:
        try:
            resumed = trainer.resume()
        except CheckpointError as error:
            raise UserError(f"--resume: {str(error).splitlines()[0]}") from None
        if resumed and trainer.rank == 0:
            print(f"resumed from {out_dir / CHECKPOINT_NAME} at step {trainer.step}")
    if trainer.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(saved_config, vars(train_config) | {"milestones": list(train_config.milestones)}, indent=1)
    try:
        last = trainer.train()
    except FloatingPointError as error:  # diverged: the message says what to change
        raise UserError(str(error)) from None
    except DatasetError as error:  # a bad image or annotation met while training: name it
        # A DataLoader worker's error carries the worker's traceback; its last line is the message.
        lines = [line for line in str(error).splitlines() if line.strip()]
        message = lines[-1].removeprefix("mask2former.data.datasets.DatasetError: ") if lines else ""
        raise UserError(f"--data {args.data}: {message}") from None
    if trainer.rank == 0:
        print(
            f"trained {model_config.name} for {trainer.step} steps; "
            f"last loss {last.get('loss', float('nan')):.4f}"
        )
        print(f"model written to {out_dir / 'model'} (use --weights {out_dir / 'model'})")
    from mask2former.training.distributed import cleanup

    cleanup()
    return 0
