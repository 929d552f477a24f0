"""Test-time scale: `Predictor.set_short_edge` and the `--short-edge/--max-size` options of the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import mask2former
from mask2former.cli import main

DATA = Path(__file__).parent / "data"


class _RecordingRunner:
    """Wraps a runner and remembers the (B, 3, Hp, Wp) shape of every batch it is given."""

    def __init__(self, runner):
        self.runner, self.shapes = runner, []

    def __call__(self, images):
        self.shapes.append(tuple(images.shape))
        return self.runner(images)


@pytest.fixture()
def predictor():
    predictor = mask2former.load()
    predictor.runner = _RecordingRunner(predictor.runner)
    return predictor


def test_short_edge_sets_the_network_input_and_results_stay_in_image_coordinates(predictor):
    image = np.random.default_rng(0).integers(0, 256, (96, 144, 3), dtype=np.uint8)
    default = predictor.config.input
    assert (default.mode, default.short_edge, default.max_size) == ("official", 192, 384)

    predictor.set_short_edge(64)  # cap scales with it: 384 * 64 / 192 = 128
    assert predictor.config.input.max_size == 128
    assert predictor.preprocess(image).image_size == (64, 96)
    result = predictor.predict(image, "semantic")
    assert predictor.runner.shapes[-1] == (1, 3, 64, 96)
    assert result.class_map.shape == (96, 144)

    predictor.set_short_edge(64, max_size=64)  # the long edge is capped first: 96x144 -> 43x64
    assert predictor.preprocess(image).image_size == (43, 64)
    assert predictor.predict(image, "panoptic").id_map.shape == (96, 144)
    assert predictor.runner.shapes[-1] == (1, 3, 64, 64)  # padded to a multiple of 32


def test_short_edge_is_refused_for_fixed_size_models_and_bad_values(predictor):
    with pytest.raises(ValueError, match="at least 1"):
        predictor.set_short_edge(0)
    predictor.config.input = dataclasses.replace(predictor.config.input, mode="deploy", size=(128, 128))
    with pytest.raises(ValueError, match="fixed"):
        predictor.set_short_edge(96)


def test_predict_and_eval_options(tmp_path, capsys):
    out = tmp_path / "out"
    image = DATA / "chelsea.png"
    assert main(["predict", str(image), "--short-edge", "96", "--no-picture", "--out", str(out)]) == 0
    assert (out / "panoptic" / "chelsea.png").is_file()
    capsys.readouterr()

    assert main(["predict", str(image), "--short-edge", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--short-edge" in err[0] and "at least 1" in err[0]

    files = ["--pred-dir", str(tmp_path), "--gt-dir", str(tmp_path), "--num-classes", "3"]
    assert main(["eval", "--task", "semantic", *files, "--short-edge", "96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prediction files" in err[0]
