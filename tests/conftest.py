"""Shared fixtures: the tiny model config, synthetic datasets and a tiny trainer, built once per session.

Tests ask for them by name (or, in module-level helpers, import the plain functions `tiny_model_config`,
`synth_data` and `write_tiny_config` from conftest) instead of importing each other's helpers:
- `tiny_config()`: a fresh ModelConfig of synth-tiny shrunk further (~110k parameters; one training step on a
  64x64 image takes ~20 ms on one core), safe to edit;
- `tiny_config_file`: that config written as JSON (for `train --config`);
- `synth_dataset(n, seed=0, size=(64, 64))`: a folder of `mask2former synth` scenes, made once per argument
  set and shared read-only;
- `make_trainer(data, out, **train_overrides)`: a Trainer of the tiny config on a dataset folder;
- `example_image`: the bundled example scene (the bundled model's domain).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mask2former.config import ModelConfig, get_preset

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "src" / "mask2former" / "assets" / "example.png"


def tiny_model_config() -> ModelConfig:
    config = get_preset("synth-tiny")
    config.name = "synth-test"
    backbone = config.backbone
    backbone.res2_channels, backbone.stem_channels, backbone.layers = 16, 16, (1, 1, 2, 1)
    pd = config.pixel_decoder
    pd.conv_dim, pd.mask_dim, pd.num_encoder_layers, pd.ffn_dim = 32, 32, 1, 64
    dec = config.decoder
    dec.hidden_dim, dec.num_queries, dec.dec_layers, dec.dim_feedforward = 32, 10, 3, 64
    return config


def write_tiny_config(path: Path) -> Path:
    path.write_text(json.dumps(tiny_model_config().to_dict()))
    return path


def synth_data(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """Write n synthetic scenes into `folder` (a private copy; prefer the shared `synth_dataset`)."""
    from mask2former.data.synth import generate

    generate(folder, n, seed=seed, size=tuple(size))
    return folder


@pytest.fixture(scope="session")
def tiny_config():
    """Call it for a fresh tiny ModelConfig."""
    return tiny_model_config


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("config") / "tiny.json")


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """Call it as synth_dataset(n, seed=0, size=(64, 64)) for a dataset folder (shared: do not modify)."""
    made: dict[tuple, Path] = {}

    def make(n: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
        key = (n, seed, tuple(size))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"synth-{n}-{seed}-{size[0]}x{size[1]}")
            made[key] = synth_data(folder, n, seed, size)
        return made[key]

    return make


def tiny_trainer(data: Path, out: Path, **overrides):
    """A quiet Trainer of the tiny config on a dataset folder (also imported by test_train_ddp's workers)."""
    from mask2former.data.datasets import open_dataset
    from mask2former.training.trainer import TrainConfig, Trainer

    settings = dict(
        max_iters=10,
        batch_size=2,
        lr=1e-3,
        backbone_multiplier=1.0,
        augment="none",
        num_points=256,
        checkpoint_every=1000,
        log_every=1,
    )
    train_config = TrainConfig(**(settings | overrides))
    return Trainer(tiny_model_config(), train_config, open_dataset(data), out, show_progress=False)


@pytest.fixture(scope="session")
def make_trainer():
    """Call it as make_trainer(data, out, **train_config_overrides)."""
    return tiny_trainer


@pytest.fixture(scope="session")
def example_image() -> Path:
    return EXAMPLE_IMAGE
