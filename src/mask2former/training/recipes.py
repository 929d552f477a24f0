"""Training defaults per preset: the official recipe for the model-zoo presets, ours for synth-tiny.

`TrainConfig()` alone is the official ADE20K-style recipe; `recipe_for(name)` gives the TrainConfig whose
defaults fit the preset `name` (the CLI applies it before the flags a user gives). Figures are those of
the official configs (Base-COCO-PanopticSegmentation.yaml and friends) and of the bundled model's README
section (its stage-1 command).
"""

from __future__ import annotations

from dataclasses import replace

from mask2former.training.train_config import TrainConfig

# COCO, 50 epochs at batch 16: step decay at 0.889 and 0.963 of the run, 10 warm-up iterations at factor 1.
_COCO = dict(
    max_iters=368750,
    schedule="step",
    milestones=(327778, 355092),
    warmup_iters=10,
    augment="lsj",
    crop_size=1024,
    min_scale=0.1,
    max_scale=2.0,
    eval_every=5000,
)
_COCO_100_EPOCHS = _COCO | dict(max_iters=737500, milestones=(655556, 710184))  # Swin-L
# ADE20K: 160k iterations of poly decay, crops of 512 (640 for the Swin-B/L "res640" models).
_ADE20K = dict(max_iters=160000, schedule="poly", augment="multiscale", crop_size=512, eval_every=5000)
# The bundled model's stage 1 (README, "The bundled model"): a from-scratch backbone on 128x128 scenes.
_SYNTH_TINY = dict(
    max_iters=13500,
    batch_size=8,
    lr=4e-4,
    backbone_multiplier=1.0,
    backbone_norm="bn",
    schedule="poly",
    augment="lsj",
    crop_size=128,
    min_scale=0.6,
    max_scale=1.4,
    num_points=1024,
    log_every=50,
    checkpoint_every=500,
    eval_every=1000,
)


def recipe_overrides(name: str | None) -> dict:
    """The TrainConfig fields that preset `name` sets differently from TrainConfig's defaults."""
    if not name:
        return {}
    if name == "synth-tiny":
        return dict(_SYNTH_TINY)
    if name.startswith(("coco-panoptic-", "coco-instance-")):
        return dict(_COCO_100_EPOCHS if name.endswith("swin-l") else _COCO)
    if name.startswith("ade20k-"):
        return dict(_ADE20K, crop_size=640) if name.endswith(("swin-b", "swin-l")) else dict(_ADE20K)
    return {}


def recipe_for(name: str | None) -> TrainConfig:
    """TrainConfig with preset `name`'s recipe (the plain defaults for names without one)."""
    return replace(TrainConfig(), **recipe_overrides(name))


def describe_default(field: str) -> str:
    """ "default by preset: COCO 368750, COCO Swin-L 737500, ADE20K 160000, synth-tiny 13500" for --help."""
    base = getattr(TrainConfig(), field)
    families = [
        ("COCO", "coco-panoptic-r50"),
        ("COCO Swin-L", "coco-panoptic-swin-l"),
        ("ADE20K", "ade20k-semantic-r50"),
        ("ADE20K Swin-L", "ade20k-semantic-swin-l"),
        ("synth-tiny", "synth-tiny"),
    ]
    values, seen = [], set()
    for label, preset in families:
        value = getattr(recipe_for(preset), field)
        text = _show(value)
        if (label.split()[0], text) in seen:
            continue
        seen.add((label.split()[0], text))
        values.append(f"{label} {text}")
    if all(getattr(recipe_for(p), field) == base for _, p in families):
        return f"default {_show(base)}"
    return "default by preset: " + ", ".join(values) + f"; other models {_show(base)}"


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
