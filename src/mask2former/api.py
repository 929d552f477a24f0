"""Public entry points: build a model from a preset, load weights from any supported format."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mask2former.checkpoints.io import is_our_format, load_state_dict_strict, read_checkpoint
from mask2former.checkpoints.zoo import resolve_weights
from mask2former.config import PRESETS, ModelConfig, get_preset
from mask2former.predictor import Predictor, TorchRunner

BUNDLED_DIR = Path(__file__).parent / "assets" / "synth-tiny"
BUNDLED_PRESET = "synth-tiny"


def presets() -> list[str]:
    """Names accepted by `build` and `--preset`."""
    return list(PRESETS)


def build(name_or_config: str | ModelConfig, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised Mask2Former for a preset name or a ModelConfig (eval mode)."""
    from mask2former.modeling.build import build_model

    config = get_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(config).eval()


def has_bundled_model() -> bool:
    return is_our_format(BUNDLED_DIR)


def load_model(
    path: str | Path | None = None, preset: str | None = None
) -> tuple[torch.nn.Module, ModelConfig]:
    """(model in eval mode, config) from a checkpoint in any supported format.

    path None -> the bundled model. Formats: our folder (model.safetensors + config.json), official
    detectron2 .pkl/.pth, Hugging Face folder; a released model's name ("coco-panoptic-r50", downloaded
    once into $MASK2FORMER_HOME) or a Hugging Face hub id; `preset` names the architecture where it
    cannot be inferred.
    """
    from mask2former.modeling.build import build_model

    if path is None:
        path = BUNDLED_DIR
    path = resolve_weights(path)  # released names and hub ids -> the local converted copy
    if is_our_format(path):
        config, state_dict = read_checkpoint(path)
    else:
        from mask2former.checkpoints.convert import read_any_checkpoint

        config, state_dict = read_any_checkpoint(path, preset=preset)
    model = build_model(config)
    load_state_dict_strict(model, state_dict, str(path))
    return model.eval(), config


def load(path: str | Path | None = None, preset: str | None = None, device: str = "cpu") -> Predictor:
    """A Predictor for a checkpoint (any format), or the bundled model when `path` is None.

    Before the bundled model is trained, `load()` returns a randomly initialised synth-tiny model with
    `trained == False` and a warning.
    """
    if path is None and not has_bundled_model():
        warnings.warn(
            "no trained bundled model in this install: using a randomly initialised synth-tiny model",
            stacklevel=2,
        )
        config = get_preset(BUNDLED_PRESET)
        return Predictor(
            TorchRunner(build(config, seed=0), device), config, source="random init", trained=False
        )
    if path is not None and str(path).endswith(".onnx"):
        from mask2former.export.runtime import load_onnx_predictor

        return load_onnx_predictor(path)
    model, config = load_model(path, preset)
    source = str(path) if path is not None else f"bundled model ({BUNDLED_DIR})"
    return Predictor(TorchRunner(model, device), config, source=source, trained=True)
