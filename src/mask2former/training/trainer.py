"""The training loop: one readable file, one process or many (torchrun + DistributedDataParallel).

Every source of randomness is a pure function of (seed, epoch, step, image index), so a run killed after
a checkpoint and resumed ends with the same weights as one that never stopped, and one process with batch
2B computes the same gradients as two processes with batch B:
- data order: ShardedSampler's permutation of (seed, epoch);
- augmentation: a numpy Generator seeded with (seed, epoch, image index) in the worker that loads it;
- point sampling of the matcher and the loss: `point_seed` of (seed, epoch, image index) in each target;
- anything else drawing from torch's global generator (Swin's drop path): reseeded with (seed, step, rank).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mask2former.checkpoints.io import CheckpointError, load_state_dict_strict, save_checkpoint
from mask2former.config import ModelConfig
from mask2former.data.collate import collate
from mask2former.fileio import atomic_write
from mask2former.training import distributed as dist_utils
from mask2former.training.batchnorm import BACKBONE_NORMS, frozen_state_dict, thaw_batchnorm
from mask2former.training.criterion import SetCriterion, global_mean
from mask2former.training.matcher import HungarianMatcher
from mask2former.training.optim import build_optimizer, lr_factor, set_learning_rate
from mask2former.training.plot import plot_loss_curve, read_metrics
from mask2former.training.progress import log_line
from mask2former.training.recovery import prepare_out_dir
from mask2former.training.train_config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and runs)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


def build_augmentation(config: TrainConfig):
    """The augmentation callable `(image, masks, labels, rng) -> (image, masks, labels)` or None."""
    from mask2former.data import augment

    if config.augment == "none":
        return None
    if config.augment == "lsj":
        return augment.LargeScaleJitter(
            size=config.crop_size, min_scale=config.min_scale, max_scale=config.max_scale
        )
    if config.augment == "multiscale":
        return augment.ShortestEdgeMultiScale(crop=(config.crop_size, config.crop_size))
    raise ValueError(f"unknown augmentation {config.augment!r} (lsj, multiscale or none)")


class SeededItems(Dataset):
    """Serves item (epoch, index): the dataset augments it with the Generator of (seed, epoch, index).

    The dataset's own `transform` / `seed` / `set_epoch` mechanism does the augmentation; keying items by
    (epoch, index) makes that independent of which worker process loads them.
    """

    def __init__(self, dataset: Dataset, augmentation, seed: int):
        self.dataset = dataset
        self.dataset.transform = augmentation
        self.dataset.seed = seed
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        item["point_seed"] = _seed_of(self.seed, 2, epoch, index)
        return item


def build_criterion(num_classes: int, config: TrainConfig) -> SetCriterion:
    matcher = HungarianMatcher(
        cost_class=config.class_weight,
        cost_mask=config.mask_weight,
        cost_dice=config.dice_weight,
        num_points=config.num_points,
    )
    weight_dict = {
        "loss_ce": config.class_weight,
        "loss_mask": config.mask_weight,
        "loss_dice": config.dice_weight,
    }
    return SetCriterion(
        num_classes,
        matcher,
        weight_dict,
        eos_coef=config.no_object_weight,
        num_points=config.num_points,
        oversample_ratio=config.oversample_ratio,
        importance_sample_ratio=config.importance_sample_ratio,
    )


def append_metrics_row(path: Path, row: dict) -> None:
    """One JSON line onto metrics.jsonl (training rows and validation rows alike)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda temp: torch.save(obj, temp))


def collate_with_seeds(items: list[dict]) -> dict:
    """The padded batch of `collate`, plus each image's point-sampling seed."""
    batch = collate(items)
    batch["point_seeds"] = [item["point_seed"] for item in items]
    return batch


class Trainer:
    """Trains `model_config` on `dataset` into `out_dir` (checkpoint.pt, metrics.jsonl, loss.png, model/)."""

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        dataset: Dataset,
        out_dir: str | Path,
        init_weights: dict[str, torch.Tensor] | None = None,
        show_progress: bool = True,
        init_config: ModelConfig | None = None,
        backbone_weights: str | Path | None = None,
        val_dataset: Dataset | None = None,
    ):
        """init_weights: a state dict to start from; with `init_config` (the config it was trained for) its
        classes may differ from model_config's: see checkpoints/finetune.py (report in `init_report`).
        backbone_weights: an ImageNet backbone file (checkpoints/backbone_weights.py; `backbone_report`).
        val_dataset: evaluated every `eval_every` steps and at the end (training/validation.py); the best
        model by the task's figure (PQ / AP / mIoU) is kept in out_dir/model-best beside out_dir/model."""
        from mask2former.checkpoints.backbone_weights import load_backbone_weights
        from mask2former.checkpoints.finetune import load_for_finetuning
        from mask2former.modeling.build import build_model

        self.model_config = model_config
        self.config = train_config
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.rank, self.world_size = dist_utils.init_from_environment(train_config.device)
        if train_config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {train_config.batch_size} is not divisible by {self.world_size} processes"
            )
        self.local_batch = train_config.batch_size // self.world_size
        self.device = torch.device(train_config.device)
        torch.manual_seed(train_config.seed)  # identical initial weights on every process
        self.model = build_model(model_config).to(self.device).train()
        self.init_report = self.backbone_report = None
        if backbone_weights is not None:
            self.backbone_report = load_backbone_weights(self.model, backbone_weights)
        if init_weights is not None and init_config is not None:
            self.init_report = load_for_finetuning(self.model, model_config, init_weights, init_config)
        elif init_weights is not None:
            load_state_dict_strict(self.model, init_weights, "initial weights")
        if train_config.backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone_norm {train_config.backbone_norm!r} is not one of {BACKBONE_NORMS}")
        if train_config.backbone_norm == "bn":
            thaw_batchnorm(self.model.backbone)
        self.ddp_model = self.model
        if self.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = build_optimizer(
            self.model, train_config.lr, train_config.weight_decay, train_config.backbone_multiplier
        )
        self.criterion = build_criterion(model_config.num_classes, train_config).to(self.device)
        self.use_amp = train_config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.sampler = dist_utils.ShardedSampler(len(dataset), train_config.seed, self.rank, self.world_size)
        if self.sampler.batches_per_epoch(self.local_batch) == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} images: fewer than one batch of {train_config.batch_size}"
            )
        self.items = SeededItems(dataset, build_augmentation(train_config), train_config.seed)
        self.step = 0
        self.show_progress = show_progress and self.rank == 0
        self.val_dataset = val_dataset
        self.best: tuple[str, float] | None = None  # (figure, value) of out_dir/model-best

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self) -> None:
        if self.rank == 0:
            state = {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "model_config": self.model_config.to_dict(),
                "train_config": asdict(self.config),
            }
            _atomic_torch_save(state, self.checkpoint_path())
        dist_utils.barrier()

    def resume(self) -> bool:
        """Restore the last checkpoint in out_dir; False when there is none."""
        path = self.checkpoint_path()
        if not path.exists():
            return False
        state = read_training_checkpoint(path)
        load_state_dict_strict(self.model, state["model"], str(path))
        # The moments come from the checkpoint; base rates and decay from this run's config, so a resumed
        # run with a new --lr / --weight-decay / --backbone-multiplier uses them instead of ignoring them.
        configured = [(group["initial_lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({error})") from None
        for group, (initial_lr, weight_decay) in zip(self.optimizer.param_groups, configured, strict=True):
            group["initial_lr"], group["weight_decay"] = initial_lr, weight_decay
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        return True

    # -- the loop ----------------------------------------------------------------------------------------
    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        batches = list(self.sampler.batches(epoch, self.local_batch))[skip_batches:]
        keyed = [[(epoch, index) for index in batch] for batch in batches]
        return DataLoader(
            self.items,
            batch_sampler=keyed,
            num_workers=self.config.num_workers,
            collate_fn=collate_with_seeds,
            persistent_workers=False,
        )

    def compute_gradients(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one batch: (weighted total loss, unweighted losses of this process).

        Afterwards each parameter's .grad holds the gradient of the whole global batch (DDP averages it
        over processes), multiplied by the AMP scale when it is on, not clipped.
        """
        torch.manual_seed(_seed_of(self.config.seed, 3, self.step, self.rank))
        images = batch["images"].to(self.device)
        targets = [
            {"labels": t["labels"].to(self.device), "masks": t["masks"].to(self.device), "point_seed": seed}
            for t, seed in zip(batch["targets"], batch["point_seeds"], strict=True)
        ]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = self.ddp_model(images, return_aux=True)
        losses = self.criterion(outputs, targets)
        loss = self.criterion.total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, losses

    def train_step(self, batch: dict) -> dict[str, float]:
        config = self.config
        factor = lr_factor(
            self.step,
            config.max_iters,
            config.schedule,
            config.poly_power,
            config.milestones,
            warmup_iters=config.warmup_iters,
            warmup_factor=config.warmup_factor,
        )
        set_learning_rate(self.optimizer, factor)
        loss, losses = self.compute_gradients(batch)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        # The losses of the global batch: each process's loss is its share over global normalisers, so
        # their mean is the loss of the whole batch (rank 0's alone is a noisy half; every rank must agree
        # before check_finite raises, or the others would wait forever in the next all_reduce).
        keys = [key for key in ("loss_ce", "loss_mask", "loss_dice") if key in losses]
        values = global_mean(torch.stack([loss.detach()] + [losses[k].detach() for k in keys]).float())
        record = {"loss": float(values[0])}
        check_finite(record["loss"], self.step)
        record.update({key: float(value) for key, value in zip(keys, values[1:], strict=True)})
        record["grad_norm"] = float(grad_norm)
        # The heads' rate: group 0 is the backbone stem's (x backbone_multiplier).
        groups = self.optimizer.param_groups
        record["lr"] = next(g["lr"] for g in groups if not g["name"].startswith("backbone"))
        return record

    def train(self) -> dict:
        """Run until max_iters; returns the last logged metrics."""
        from tqdm import tqdm

        config = self.config
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            prepare_out_dir(self.out_dir, self.step)  # temporaries and torn rows of an interrupted run
        dist_utils.barrier()
        per_epoch = self.sampler.batches_per_epoch(self.local_batch)
        progress = tqdm(
            total=config.max_iters,
            initial=self.step,
            disable=not self.show_progress,
            unit="it",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        metrics_path = self.out_dir / "metrics.jsonl"
        last: dict = {}
        started, started_step = time.perf_counter(), self.step
        while self.step < config.max_iters:
            epoch, skip = divmod(self.step, per_epoch)
            for batch in self._loader(epoch, skip):
                record = self.train_step(batch)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                if self.step % config.log_every == 0 or self.step == config.max_iters:
                    last = {
                        "step": self.step,
                        "epoch": epoch,
                        **record,
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                    if self.rank == 0:
                        append_metrics_row(metrics_path, last)
                        if not self.show_progress:  # no bar: a line per --log-every steps instead
                            print(log_line(last, config.max_iters, started_step), flush=True)
                if self.val_dataset is not None and (
                    self.step % config.eval_every == 0 or self.step == config.max_iters
                ):
                    self.evaluate(metrics_path)
                if self.step % config.checkpoint_every == 0 or self.step == config.max_iters:
                    self.save()
                    if self.rank == 0 and metrics_path.exists():
                        plot_loss_curve(read_metrics(metrics_path), self.out_dir / "loss.png")
                if self.step >= config.max_iters:
                    break
        progress.close()
        if self.rank == 0 and metrics_path.exists():
            plot_loss_curve(read_metrics(metrics_path), self.out_dir / "loss.png")
        if self.rank == 0:
            save_checkpoint(
                frozen_state_dict(self.model.state_dict()),
                self.model_config,
                self.out_dir / "model",
                extra={"trained_steps": self.step, "train_config": asdict(config)},
            )
        dist_utils.barrier()
        return last

    def evaluate(self, metrics_path: Path) -> dict | None:
        """Score the validation set now; log the figures, keep the best model (rank 0 returns them)."""
        from mask2former.training.validation import primary_figure, validate

        self.model.eval()
        try:
            figures = validate(
                self.model,
                self.model_config,
                self.val_dataset,
                self.config.device,
                self.rank,
                self.world_size,
            )
        finally:
            self.model.train()
        if self.rank != 0 or figures is None:
            return None
        key = primary_figure(self.model_config)
        row = {"step": self.step, **figures}
        append_metrics_row(metrics_path, row)
        value = figures.get(key)
        improved = value is not None and (self.best is None or value > self.best[1])
        if improved:
            self.best = (key, value)
            save_checkpoint(
                frozen_state_dict(self.model.state_dict()),
                self.model_config,
                self.out_dir / "model-best",
                extra={"trained_steps": self.step, key: value, "train_config": asdict(self.config)},
            )
        shown = "  ".join(f"{k[4:]} {v:.2f}" for k, v in figures.items())
        print(f"step {self.step}: validation {shown}" + ("  (best so far: model-best)" if improved else ""))
        plot_loss_curve(read_metrics(metrics_path), self.out_dir / "loss.png")
        return figures


def read_training_checkpoint(path: Path) -> dict:
    """checkpoint.pt as written by `Trainer.save`, checked: CheckpointError (one line) for a truncated, empty,
    foreign or malformed file."""
    from mask2former.checkpoints.safe_pickle import load_torch_file

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (not a training checkpoint)")
    state = load_torch_file(path)
    if not isinstance(state, dict) or not all(key in state for key in ("step", "model", "optimizer")):
        raise CheckpointError(f"{path}: not a training checkpoint (no step, model and optimizer)")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{path}: step {state['step']!r} is not a step number")
    if not isinstance(state["model"], dict) or not isinstance(state["optimizer"], dict):
        raise CheckpointError(f"{path}: model and optimizer must be state dicts")
    state.setdefault("scaler", {})
    return state


def check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss became {value} at step {step}: lower the learning rate or check the data"
        )
