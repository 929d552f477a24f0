"""Evaluation during training (`train --val-data DIR --eval-every N`): the figures the model's task has.

panoptic models: PQ and mIoU (and mask AP of the things when pycocotools is installed); instance models:
mask AP; semantic models: mIoU. The model is evaluated as it would be saved (BatchNorm statistics frozen)
on a copy, so training state is untouched.
"""

from __future__ import annotations

import importlib.util

import torch

from mask2former.checkpoints.io import load_state_dict_strict
from mask2former.config import ModelConfig
from mask2former.training.batchnorm import frozen_state_dict

PRIMARY = {"panoptic": "val_PQ", "instance": "val_AP", "semantic": "val_mIoU"}
FIGURE_OF_TASK = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


def tasks_for(model_task: str) -> list[str]:
    """The evaluation tasks run for a model of `model_task`."""
    if model_task == "panoptic":
        has_coco = importlib.util.find_spec("pycocotools") is not None
        return ["panoptic", "semantic"] + (["instance"] if has_coco else [])
    return [model_task]


def open_validation_set(path: str, model_task: str):
    """The dataset at `path` opened for `model_task` (ValueError / FileNotFoundError when unusable)."""
    from mask2former.data.datasets import open_dataset

    return open_dataset(path, task="semantic" if model_task == "semantic" else None)


def validate(
    model: torch.nn.Module,
    config: ModelConfig,
    dataset,
    device: str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float] | None:
    """{"val_PQ": ..., "val_mIoU": ...} in percent on rank 0 (None on the others); every rank calls it."""
    from mask2former.evaluation.model import evaluate_predictor
    from mask2former.inference.predictor import Predictor, TorchRunner
    from mask2former.modeling.build import build_model

    copy = build_model(config)
    load_state_dict_strict(copy, frozen_state_dict(model.state_dict()), "the model being trained")
    predictor = Predictor(TorchRunner(copy.eval(), device), config, source="validation", trained=True)
    figures: dict[str, float] = {}
    with torch.no_grad():
        for task in tasks_for(config.task):
            metrics = evaluate_predictor(predictor, dataset, task, None, rank, world_size, progress=False)
            if metrics is None:
                continue
            name = FIGURE_OF_TASK[task]
            value = metrics.get(name)
            if isinstance(value, (int, float)):
                figures[f"val_{name}"] = round(float(value), 3)
    return figures if rank == 0 else None


def primary_figure(config: ModelConfig) -> str:
    """The figure that decides the best model: PQ, AP or mIoU as the task has."""
    return PRIMARY.get(config.task, "val_mIoU")
