"""Public entry points: build a model from a preset, and the one loader every command uses.

`resolve_model(weights, preset)` is the single place that turns what a user names (nothing, a preset, a
checkpoint in any format) into a model and its config; `load_model` and `load` (a Predictor) stand on it,
and so do the predict / eval / export / bench / convert / train commands.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mask2former.checkpoints.io import is_our_format, load_state_dict_strict, read_checkpoint
from mask2former.checkpoints.zoo import resolve_weights
from mask2former.config import PRESETS, ModelConfig, get_preset

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


@dataclass
class LoadedModel:
    """A model (eval mode) with its config, where it came from and whether its weights were trained."""

    model: torch.nn.Module
    config: ModelConfig
    source: str
    trained: bool


def is_onnx(weights: str | Path | None) -> bool:
    return weights is not None and str(weights).endswith(".onnx")


def resolve_model(weights: str | Path | None = None, preset: str | None = None) -> LoadedModel:
    """The model for `weights` / `preset`, as every command and `load` understand them.

    - weights None, preset None: the bundled model (a seed-0 random synth-tiny, trained False, when the
      install has no trained bundled model);
    - weights None, preset P: preset P with random weights (seed 0), trained False;
    - weights a checkpoint: our folder (model.safetensors + config.json), an official detectron2 .pkl/.pth,
      or a Hugging Face folder; `preset` names the architecture where it cannot be inferred;
    - weights a released model's name ("coco-panoptic-r50", downloaded, verified and converted once into
      $MASK2FORMER_HOME, see checkpoints/zoo.py) or a Hugging Face hub id ("facebook/mask2former-...").
    Raises FileNotFoundError / CheckpointError / ValueError with one-line messages naming the file.
    """
    if is_onnx(weights):
        raise ValueError(f"weights {weights}: an ONNX graph is not a PyTorch model (load it with `load`)")
    if weights is None:
        if preset is not None:
            source = f"preset {preset} (random init, seed 0)"
            return LoadedModel(build(preset, seed=0), get_preset(preset), source, False)
        if not has_bundled_model():
            source = f"random init {BUNDLED_PRESET} (seed 0): no trained bundled model in this install"
            return LoadedModel(build(BUNDLED_PRESET, seed=0), get_preset(BUNDLED_PRESET), source, False)
        model, config = _read_model(BUNDLED_DIR, None)
        return LoadedModel(model, config, f"bundled model ({BUNDLED_DIR})", True)
    path = resolve_weights(weights)  # released names and hub ids -> the local converted copy
    if not path.exists():
        raise FileNotFoundError(f"weights {weights}: no such file or folder")
    model, config = _read_model(path, preset)
    return LoadedModel(model, config, str(weights), True)


def _read_model(path: Path, preset: str | None) -> tuple[torch.nn.Module, ModelConfig]:
    from mask2former.modeling.build import build_model

    if is_our_format(path):
        config, state_dict = read_checkpoint(path)
    else:
        from mask2former.checkpoints.convert import read_any_checkpoint

        config, state_dict = read_any_checkpoint(path, preset=preset)
    model = build_model(config)
    load_state_dict_strict(model, state_dict, str(path))
    return model.eval(), config


def load_model(
    path: str | Path | None = None, preset: str | None = None
) -> tuple[torch.nn.Module, ModelConfig]:
    """(model in eval mode, config) for a checkpoint in any supported format (see `resolve_model`)."""
    loaded = resolve_model(path, preset)
    return loaded.model, loaded.config


def load(
    path: str | Path | None = None,
    preset: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    reuse_memory: bool = True,
):
    """A Predictor for a checkpoint (any format, or an exported .onnx graph), a preset with random weights,
    or the bundled model when both are None (see `resolve_model`). `predictor.trained` says whether the
    weights were trained; the predictor never changes `predictor.model`, which keeps the checkpoint's keys
    and dtype.

    `device`: "auto" (CUDA when this torch sees a GPU, else CPU), "cpu", "cuda", "cuda:N" or "mps"; one the
    machine lacks raises ValueError("device cuda: CUDA is not available ..."). ONNX graphs run on the CPU.
    `dtype` "fp32" (default), "bf16" or "fp16" is the precision inference runs in (`inference.precision`;
    ValueError where the device would only emulate it). An .onnx graph has the precision it was exported
    with: `dtype`, when given, must name it. `reuse_memory`: on the CPU, have glibc keep freed memory for
    reuse during inference (process-wide, ~15% faster on large images; see `TorchRunner`).
    """
    from mask2former.devices import resolve_device
    from mask2former.inference.precision import resolve_dtype
    from mask2former.inference.predictor import Predictor, TorchRunner

    device = resolve_device(device)
    resolved = None if dtype is None else resolve_dtype(dtype)
    if is_onnx(path):
        from mask2former.export.runtime import load_onnx_predictor

        if not Path(path).is_file():
            raise FileNotFoundError(f"weights {path}: no such file")
        return load_onnx_predictor(path, dtype=resolved)
    loaded = resolve_model(path, preset)
    if path is None and preset is None and not loaded.trained:
        warnings.warn(f"{loaded.source}: results are meaningless", stacklevel=2)
    runner = TorchRunner(loaded.model, device, dtype=resolved or torch.float32, reuse_memory=reuse_memory)
    return Predictor(runner, loaded.config, loaded.source, loaded.trained)
