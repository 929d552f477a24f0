"""`TrainConfig`: the optimisation and data settings of a training run (no torch import: the CLI's --help
shows these defaults per preset through training/recipes.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Optimisation and data settings; defaults are the official ones (ADE20K-style poly schedule)."""

    max_iters: int = 160000
    batch_size: int = 16  # global, split over processes
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_multiplier: float = 0.1
    clip_grad_norm: float = 0.01
    schedule: str = "poly"
    poly_power: float = 0.9
    milestones: tuple[int, ...] = ()
    warmup_iters: int = 0
    warmup_factor: float = 1.0  # lr factor at step 0, rising linearly to 1 over warmup_iters (official 1.0)
    amp: bool = True  # used where the device supports it (CUDA fp16); CPU trains in fp32
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = 5000  # with a validation set (train --val-data): evaluate every this many steps
    seed: int = 0
    num_workers: int = 0
    augment: str = "lsj"  # lsj | multiscale | none
    crop_size: int = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    device: str = "cpu"
    # "frozen": the official FrozenBatchNorm backbone (fine-tuning pretrained weights); "bn": BatchNorm
    # with batch statistics while training from scratch, saved as FrozenBatchNorm (training/batchnorm.py)
    backbone_norm: str = "frozen"

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["milestones"] = tuple(data.get("milestones", ()))
        return cls(**data)
