"""`mask2former train`: train a preset or config on a dataset folder.

One process, or many with `torchrun --nproc_per_node N -m mask2former train ...`.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from mask2former.cli import DEVICE_HELP, UserError, example, resolve_device_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (single process or under torchrun)",
        epilog=example(
            "mask2former train --preset synth-tiny --data runs/synth-train --out runs/mine --iters 2000",
            "torchrun --nproc_per_node 2 -m mask2former train --preset synth-tiny --data DIR --out RUN",
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="architecture preset (see `mask2former presets`)")
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
        "--init", default=None, help="start from these weights (any supported checkpoint format)"
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for action in parser._actions:
        if action.dest in OVERRIDES and action.dest != "device":
            action.default_help = functools.partial(_train_default, OVERRIDES[action.dest])
    parser.set_defaults(func=run)


def _train_default(field_name: str) -> str:
    """TrainConfig's value of a field, for --help (imported then only: the trainer imports torch)."""
    from mask2former.training.trainer import TrainConfig

    return f"{getattr(TrainConfig(), field_name)}; with --resume the run's own"


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
    "seed": "seed",
    "workers": "num_workers",
    "device": "device",
}


def _model_config(args: argparse.Namespace):
    from mask2former.config import ModelConfig, get_preset

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


def run(args: argparse.Namespace) -> int:
    from mask2former.data.datasets import open_dataset
    from mask2former.training.trainer import CHECKPOINT_NAME, TrainConfig, Trainer

    out_dir = Path(args.out)
    model_config = _model_config(args)
    train_config = TrainConfig()
    saved_config = out_dir / "train_config.json"
    if args.resume:
        if not (out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"--resume: no {out_dir / CHECKPOINT_NAME} to resume from")
        if saved_config.exists():
            train_config = TrainConfig.from_dict(json.loads(saved_config.read_text()))
    if args.device is not None or not args.resume:
        args.device = resolve_device_flag(args.device)
    for arg_name, field_name in OVERRIDES.items():
        value = getattr(args, arg_name)
        if value is not None:
            setattr(train_config, field_name, value)
    try:
        dataset = open_dataset(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--data {args.data}: {error}") from None
    model_config = _adopt_dataset_classes(model_config, dataset.meta)
    init_weights = None
    if args.init:
        import mask2former

        try:
            init_model, _ = mask2former.load_model(args.init)
        except Exception as error:  # any unreadable checkpoint is a user error here
            raise UserError(f"--init {args.init}: {error}") from None
        init_weights = init_model.state_dict()
    try:
        trainer = Trainer(
            model_config,
            train_config,
            dataset,
            out_dir,
            init_weights=init_weights,
            show_progress=not args.no_progress,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    if trainer.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved_config.write_text(
            json.dumps(vars(train_config) | {"milestones": list(train_config.milestones)}, indent=1)
        )
    if args.resume and trainer.resume() and trainer.rank == 0:
        print(f"resumed from {out_dir / CHECKPOINT_NAME} at step {trainer.step}")
    try:
        last = trainer.train()
    except FloatingPointError as error:  # diverged: the message says what to change
        raise UserError(str(error)) from None
    if trainer.rank == 0:
        print(
            f"trained {model_config.name} for {trainer.step} steps; "
            f"last loss {last.get('loss', float('nan')):.4f}"
        )
        print(f"model written to {out_dir / 'model'} (use --weights {out_dir / 'model'})")
    from mask2former.training.distributed import cleanup

    cleanup()
    return 0
