"""Any supported checkpoint -> (ModelConfig, state dict in our layout), and back out to any format.

Formats: "ours" (folder: model.safetensors + config.json with our ModelConfig), "detectron2" (official
.pkl/.pth), "hf" (transformers save_pretrained folder). The architecture comes from the checkpoint (shapes,
or HF's config.json); what it cannot say (class names, thing/stuff split, test-time input size, and for
detectron2 files a few sizes not visible in any shape) comes from a preset: the one named, else a preset
with the same number of classes (133 -> COCO panoptic, 80 -> COCO instance, 150 -> ADE20K), else generic
`class_{i}` names with a warning.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mask2former.checkpoints import detectron2, huggingface
from mask2former.checkpoints.io import (
    CheckpointError,
    is_our_format,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from mask2former.config import PRESETS, ModelConfig, get_preset, with_dataset_meta

FORMATS = ("ours", "detectron2", "hf")
DETECTRON2_SUFFIXES = (".pkl", ".pth", ".pt")


@dataclass
class Converted:
    """A checkpoint read into our layout. `notes`: what was dropped or assumed (for the CLI to print);
    `warnings`: the subset a library user should hear about too (e.g. generic class names)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source_format: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """Which format is at `path`: "ours", "hf" or "detectron2" (CheckpointError when none fits)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if huggingface.is_hf_folder(path):
            return "hf"
        if is_our_format(path):
            return "ours"
        if (path / "config.json").is_file():  # a config.json that is no JSON at all: say so
            try:
                json.loads((path / "config.json").read_text())
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({error})") from None
        raise CheckpointError(
            f"{path}: not a checkpoint folder (neither model.safetensors + our config.json nor a "
            "Hugging Face Mask2Former config.json)"
        )
    if path.suffix in DETECTRON2_SUFFIXES:
        return "detectron2"
    raise CheckpointError(f"{path}: unknown checkpoint type (expected a folder, .pkl or .pth)")


def convert_to_ours(
    path: str | Path, source_format: str | None = None, preset: str | None = None
) -> Converted:
    """Read a checkpoint of any format into our config and key layout (no model is built)."""
    path = Path(path)
    source_format = source_format or detect_format(path)
    if source_format not in FORMATS:
        raise CheckpointError(
            f"{path}: unknown format {source_format!r} (expected one of {', '.join(FORMATS)})"
        )
    if preset is not None and preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    if source_format == "ours":
        if not is_our_format(path):
            raise CheckpointError(f"{path}: not a folder with model.safetensors and our config.json")
        config, state = read_checkpoint(path)
        return Converted(config, state, "ours")
    converted = _from_detectron2(path, preset) if source_format == "detectron2" else _from_hf(path, preset)
    try:
        converted.config.validate()
    except ValueError as error:
        raise CheckpointError(f"{path}: the checkpoint implies an invalid model config ({error})") from None
    return converted


def read_any_checkpoint(
    path: str | Path, preset: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict in our layout) of any supported checkpoint; warns about guessed metadata."""
    converted = convert_to_ours(path, preset=preset)
    for message in converted.warnings:
        warnings.warn(message, stacklevel=2)
    return converted.config, converted.state_dict


def _from_detectron2(path: Path, preset: str | None) -> Converted:
    if path.is_dir():
        raise CheckpointError(f"{path}: a detectron2 checkpoint is a .pkl or .pth file, not a folder")
    raw = detectron2.read_official(path)
    if any(k.startswith(("model.pixel_level_module.", "class_predictor.")) for k in raw):
        raise CheckpointError(
            f"{path}: these are Hugging Face weights; convert the folder with its config.json"
        )
    state, notes = detectron2.official_to_ours(raw)
    source = str(path)
    guess = detectron2.infer_config(state, source)
    candidates = _presets_with(guess.num_classes)
    if preset is not None:
        arch_base = get_preset(preset)
        notes.append(f"sizes not stored in the weights (GroupNorm groups, decoder heads) taken from {preset}")
    else:
        # A preset whose head (pixel + transformer decoder) the weights reproduce also supplies the sizes
        # no shape shows; the backbone's such settings (Swin pre-training size) change no computation.
        arch_base = next(
            (c for c in candidates if _same_head(detectron2.infer_config(state, source, c), c)), None
        )
        if arch_base is None:
            notes.append(
                "sizes not stored in the weights assumed as in the official configs (GroupNorm 32 groups, "
                "decoder heads = pixel-decoder heads, 4 sampling points); name a preset to choose"
            )
    arch = detectron2.infer_config(state, source, arch_base)
    converted = Converted(arch, state, "detectron2", notes)
    converted.config = _complete(arch, preset, candidates, None, converted)
    return converted


def _from_hf(path: Path, preset: str | None) -> Converted:
    if not huggingface.is_hf_folder(path):
        raise CheckpointError(
            f"{path}: not a Hugging Face Mask2Former folder (config.json with model_type mask2former)"
        )
    hf_config, hf_state = huggingface.read_hf_folder(path)
    arch, names = huggingface.config_from_hf(hf_config, str(path / huggingface.CONFIG_NAME))
    state, notes = huggingface.hf_to_ours(hf_state, arch, str(path))
    converted = Converted(arch, state, "hf", notes)
    converted.config = _complete(arch, preset, _presets_with(arch.num_classes), names, converted)
    processor_path = path / huggingface.PREPROCESSOR_NAME
    if processor_path.is_file():
        try:
            processor = json.loads(processor_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{processor_path}: unreadable ({error})") from None
        input_config = huggingface.input_config_from_preprocessor(processor, str(processor_path))
        if input_config is not None:
            converted.config.input = input_config
            converted.notes.append(f"test-time pre-processing from {huggingface.PREPROCESSOR_NAME}")
    return converted


def _presets_with(num_classes: int) -> list[ModelConfig]:
    configs = [get_preset(name) for name in PRESETS]
    return [c for c in configs if c.num_classes == num_classes]


def _same_head(a: ModelConfig, b: ModelConfig) -> bool:
    return a.pixel_decoder == b.pixel_decoder and a.decoder == b.decoder


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    return a.backbone == b.backbone and _same_head(a, b)


def _complete(
    arch: ModelConfig,
    preset: str | None,
    candidates: list[ModelConfig],
    names: list[str] | None,
    converted: Converted,
) -> ModelConfig:
    """The inferred architecture plus dataset metadata, task and input settings from the best preset."""
    num_classes = arch.num_classes
    named = get_preset(preset) if preset else None
    if named is not None and named.num_classes != num_classes:
        converted.warnings.append(
            f"preset {preset} has {named.num_classes} classes but the checkpoint {num_classes}: "
            "class names not taken from it"
        )
    if named is not None and named.num_classes == num_classes:
        meta = named  # the user's word, even over differing HF id2label names
        if names is not None and names != named.class_names:
            converted.notes.append(f"class names from preset {preset}, not from config.json's id2label")
    else:
        # Presets whose architecture the checkpoint reproduces first: their name and settings fit best.
        candidates = sorted(candidates, key=lambda c: not _same_architecture(arch, c))
        if names is not None:  # HF id2label: a preset only if it has exactly these names
            meta = next((c for c in candidates if c.class_names == names), None)
        else:
            meta = next(iter(candidates), None)
    settings = named or meta
    config = dataclasses.replace(
        settings if settings is not None else ModelConfig(),
        backbone=arch.backbone,
        pixel_decoder=arch.pixel_decoder,
        decoder=arch.decoder,
    )
    if meta is not None:
        for name in ("dataset", "class_names", "thing_classes", "category_ids", "colors", "task"):
            setattr(config, name, getattr(meta, name))
        converted.notes.append(
            f"class names: {num_classes} classes of {meta.dataset} (as preset {meta.name})"
        )
    else:
        label = "HF id2label names" if names is not None else "generic class_{i} names"
        config = _generic_metadata(config, names or [f"class_{i}" for i in range(num_classes)])
        converted.warnings.append(
            f"no preset has these {num_classes} classes: {label}, every class treated as a thing; "
            "name a preset or edit the converted config.json"
        )
    if not (settings is not None and _same_architecture(config, settings) and meta is settings):
        config.name = "custom"
    return config


def _generic_metadata(config: ModelConfig, names: list[str]) -> ModelConfig:
    """`config` with classes that are only names: every one a thing, ids 0..K-1."""
    from mask2former.data.catalog import DatasetMeta

    # evenly spread hues (golden-ratio steps) so neighbouring classes get distinct colours
    colors = [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.65, 0.95))
        for i in range(len(names))
    ]
    meta = DatasetMeta("custom", list(names), [True] * len(names), list(range(len(names))), colors)
    return with_dataset_meta(config, meta)


def build_and_load(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Our model for `config` with `state_dict` loaded strictly (CheckpointError naming `source`)."""
    from mask2former.modeling.build import build_model

    model = build_model(config)
    load_state_dict_strict(model, state_dict, source)
    return model.eval()


def write_checkpoint(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, dst: str | Path, target_format: str
) -> Path:
    """Write weights in `target_format` ("ours": folder, "detectron2": .pkl/.pth file, "hf": folder)."""
    dst = Path(dst)
    if target_format == "ours":
        return save_checkpoint(state_dict, config, dst)
    if target_format == "detectron2":
        return detectron2.write_official(state_dict, config, dst)
    if target_format == "hf":
        return huggingface.write_hf_folder(state_dict, config, dst)
    raise CheckpointError(
        f"{dst}: unknown target format {target_format!r} (expected one of {', '.join(FORMATS)})"
    )


def convert(
    src: str | Path,
    dst: str | Path,
    source_format: str | None = None,
    target_format: str = "ours",
    preset: str | None = None,
) -> Converted:
    """Read `src`, check the weights fit our model strictly, write them to `dst` in `target_format`.

    The written weights are the loaded model's own state dict: complete (e.g. Swin's
    relative_position_index buffers) and equal to the source weights (bit for bit when those are fp32).
    """
    converted = convert_to_ours(src, source_format, preset)
    model = build_and_load(converted.config, converted.state_dict, str(src))
    write_checkpoint(model.state_dict(), converted.config, dst, target_format)
    if target_format == "hf" and converted.config.input.mode == "official":
        converted.notes.append(huggingface.PREPROCESSOR_NOTE)
    return converted


__all__ = [
    "FORMATS",
    "Converted",
    "build_and_load",
    "convert",
    "convert_to_ours",
    "detect_format",
    "read_any_checkpoint",
    "write_checkpoint",
]
