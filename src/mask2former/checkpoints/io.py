"""Our own checkpoint format: a folder with `model.safetensors` (weights) and `config.json` (ModelConfig)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mask2former.config import ModelConfig
from mask2former.fileio import atomic_write, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one-line message naming the file)."""


def is_our_format(path: str | Path) -> bool:
    """A folder with model.safetensors and a config.json of ours (a Hugging Face folder can hold the same
    two file names; its config.json has no "format_version" + "model" document)."""
    path = Path(path)
    if not (path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()):
        return False
    try:
        document = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and "format_version" in document and "model" in document


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/config.json` (each atomically); returns out_dir.

    Buffers that carry no weights (e.g. Swin's relative_position_index) are saved too: loading stays strict.
    """
    out_dir = Path(out_dir)
    try:
        config.validate()  # never write a config.json that no reader would accept
    except ValueError as error:
        raise CheckpointError(f"{out_dir}: refusing to write an invalid model config ({error})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(
        out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "mask2former"})
    )
    document = {"format_version": FORMAT_VERSION, "model": config.to_dict()}
    if extra:
        document.update(extra)

    write_json(out_dir / CONFIG_NAME, document, indent=1)
    return out_dir


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole config.json document) of a checkpoint folder."""
    config_path = Path(path) / CONFIG_NAME
    try:
        document = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read ({error})") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise CheckpointError(f"{config_path}: not a mask2former config (no 'model' object)")
    try:
        return ModelConfig.from_dict(document["model"]), document
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid model config ({error})") from None


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) of a checkpoint folder in our format."""
    path = Path(path)
    config, _ = read_config(path)
    weights_path = path / WEIGHTS_NAME
    try:
        state_dict = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: no such file") from None
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error})") from None
    return config, state_dict


# Buffers that carry no learned weights: derived from the architecture, so absent or extra copies are fine.
DERIVED_BUFFER_SUFFIXES = ("num_batches_tracked", "relative_position_index")


def _group(keys: list[str], depth: int = 3) -> str:
    """'a.b.c.weight, a.b.c.bias, a.b.d.weight' -> 'a.b.c.{weight,bias}, a.b.d.weight' grouped by module."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        parts = key.split(".")
        head = ".".join(parts[:depth]) if len(parts) > depth else ".".join(parts[:-1])
        tail = key[len(head) + 1 :] if head else key
        groups.setdefault(head, []).append(tail)
    items = []
    for head, tails in groups.items():
        if len(tails) == 1:
            items.append(f"{head}.{tails[0]}" if head else tails[0])
        elif len(tails) <= 4:
            items.append(f"{head}.{{{','.join(tails)}}}")
        else:
            items.append(f"{head}.* ({len(tails)} keys)")
    return "; ".join(items)


def key_problems(
    missing: list[str],
    unexpected: list[str],
    given: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    limit: int = 20,
) -> list[str]:
    """The parts of a strict-loading report: missing and unexpected keys grouped by module, and the keys
    whose given shape differs from the model's (at most `limit` of them named)."""
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in given and tuple(given[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_group(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_group(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:limit])}")
    return problems


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model`, refusing any missing, unexpected or mis-shaped key.

    Raises CheckpointError with one message naming `source` and the offending keys grouped by module.
    """
    own = model.state_dict()
    ignorable = lambda key: key.endswith(DERIVED_BUFFER_SUFFIXES)  # noqa: E731
    missing = [k for k in own if k not in state_dict and not ignorable(k)]
    unexpected = [k for k in state_dict if k not in own and not ignorable(k)]
    problems = key_problems(missing, unexpected, state_dict, own, limit=20)
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + " | ".join(problems))
    loadable = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(loadable, strict=False)
