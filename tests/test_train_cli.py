"""`mask2former train`: its outputs, its one-line errors, SIGKILL + --resume ending on the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mask2former
from mask2former.cli import main
from mask2former.training.plot import read_metrics

TIMEOUT = 180


@pytest.fixture(scope="module")
def data(synth_dataset) -> Path:
    return synth_dataset(5)


@pytest.fixture(scope="module")
def config(tiny_config_file) -> Path:
    return tiny_config_file


def _train_args(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress", *extra]


def test_train_writes_metrics_plot_checkpoint_and_a_loadable_model(config, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--iters", "4", "--batch-size", "2", "--augment", "none", "--num-points", "256", "--lr", "1e-3")
    assert main(_train_args(config, data, out, *args, "--checkpoint-every", "3", "--log-every", "2")) == 0
    assert "trained synth-test for 4 steps" in capsys.readouterr().out

    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4]  # every --log-every steps and the last
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    assert rows[0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 4) ** 0.9)  # --lr, not the backbone's 0.1x
    with Image.open(out / "loss.png") as picture:
        assert picture.format == "PNG" and picture.size == (640, 360)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["train_config"]["max_iters"] == 4
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["batch_size"] == 2 and saved["num_points"] == 256

    model, model_config = mask2former.load_model(out / "model")
    assert model_config.name == "synth-test"
    weights = model.state_dict()
    assert weights.keys() == checkpoint["model"].keys()
    assert all(torch.equal(weights[key], value) for key, value in checkpoint["model"].items())
    predictor = mask2former.load(out / "model")
    assert predictor.trained
    result = predictor.predict(np.zeros((64, 64, 3), np.uint8))
    assert result is not None


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing-data", "--data {tmp}/nowhere: "),
        ("resume-without-checkpoint", "--resume: no {tmp}/out/checkpoint.pt to resume from"),
        ("too-few-images", "the dataset has 5 images: fewer than one batch of 8"),
        ("diverged", ""),
    ],
)
def test_train_errors_are_one_line(problem, expected, config, data, tmp_path, capsys):
    out = tmp_path / "out"
    if problem == "missing-data":
        args = _train_args(config, tmp_path / "nowhere", out)
    elif problem == "resume-without-checkpoint":
        args = _train_args(config, data, out, "--resume")
    elif problem == "too-few-images":
        args = _train_args(config, data, out, "--batch-size", "8")
    else:
        args = _train_args(config, data, out, "--lr", "1e8", "--iters", "3", "--batch-size", "1")
        args += ["--augment", "none", "--num-points", "64", "--backbone-multiplier", "1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mask2former train: error: " + expected.format(tmp=tmp_path))
    if problem == "diverged":  # a NaN loss or matching cost says what to change instead of a traceback
        assert "lower" in lines[0] and ("nan" in lines[0].lower() or "inf" in lines[0]), lines[0]
    assert not (out / "checkpoint.pt").exists()


def _launch(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mask2former", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _checkpoint_step(out: Path) -> int | None:
    try:
        return int(torch.load(out / "checkpoint.pt", weights_only=True)["step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_weights(config, data, tmp_path):
    """LSJ augmentation, 5 images in batches of 2 (the resumed epoch starts mid-way), poly lr."""
    iters, every = 20, 5
    settings = ("--iters", str(iters), "--batch-size", "2", "--lr", "1e-3", "--num-points", "256")
    settings += ("--augment", "lsj", "--crop-size", "64", "--min-scale", "0.5", "--max-scale", "1.5")
    settings += ("--checkpoint-every", str(every), "--log-every", "1")
    killed_out, straight_out = tmp_path / "killed", tmp_path / "straight"

    victim = _launch(*_train_args(config, data, killed_out, *settings))
    deadline = time.monotonic() + TIMEOUT
    while _checkpoint_step(killed_out) is None and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    _, stderr = victim.communicate(timeout=TIMEOUT)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-2000:]}"
    killed_at = _checkpoint_step(killed_out)
    assert killed_at is not None and killed_at % every == 0 and killed_at < iters
    assert not (killed_out / "model").exists()

    # Only what the run needs: the rest comes from killed/train_config.json.
    resumed = _launch(*_train_args(config, data, killed_out, "--resume"))
    straight = _launch(*_train_args(config, data, straight_out, *settings))
    outputs = [process.communicate(timeout=TIMEOUT) for process in (resumed, straight)]
    assert resumed.returncode == 0, outputs[0][1][-3000:]
    assert straight.returncode == 0, outputs[1][1][-3000:]
    assert f"resumed from {killed_out / 'checkpoint.pt'} at step {killed_at}" in outputs[0][0]
    assert f"trained synth-test for {iters} steps" in outputs[0][0]

    killed_weights = load_file(killed_out / "model" / "model.safetensors")
    straight_weights = load_file(straight_out / "model" / "model.safetensors")
    assert killed_weights.keys() == straight_weights.keys()
    different = [k for k in straight_weights if not torch.equal(killed_weights[k], straight_weights[k])]
    assert not different, different[:5]
    # the logged losses agree at every step, including those recomputed after the kill
    losses = [(row["step"], row["loss"]) for row in read_metrics(killed_out / "metrics.jsonl")]
    assert losses == [(row["step"], row["loss"]) for row in read_metrics(straight_out / "metrics.jsonl")]
    assert len(losses) == iters
