"""`mask2former eval --weights --data`: a model over a dataset, on one process and sharded under torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mask2former.checkpoints.io import save_checkpoint
from mask2former.cli import main
from mask2former.config import get_preset
from mask2former.modeling.build import build_model


@pytest.fixture(scope="module")
def scene(tmp_path_factory, synth_dataset):
    root = tmp_path_factory.mktemp("evalmodel")
    (root / "data").symlink_to(synth_dataset(5, seed=3))
    config = get_preset("synth-tiny")
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # make the random model keep some queries so every metric is exercised
        model.sem_seg_head.predictor.class_embed.bias[:-1] += 6.0
    save_checkpoint(model.state_dict(), config, root / "model")
    return root


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_eval_model_writes_metrics(scene, tmp_path, capsys, task):
    out = tmp_path / task
    code = main(
        [
            "eval",
            "--weights",
            str(scene / "model"),
            "--data",
            str(scene / "data"),
            "--task",
            task,
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    key = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}[task]
    assert metrics[key] is None or 0.0 <= metrics[key] <= 100.0
    assert metrics["images"] == 5
    assert key in capsys.readouterr().out


def test_eval_model_rejects_a_dataset_with_other_classes(scene, tmp_path, capsys):
    config = get_preset("synth-tiny")
    config.class_names = [f"c{i}" for i in range(config.num_classes)]
    save_checkpoint(build_model(config).state_dict(), config, tmp_path / "other")
    code = main(
        [
            "eval",
            "--weights",
            str(tmp_path / "other"),
            "--data",
            str(scene / "data"),
            "--task",
            "semantic",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "classes differ" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_shards_give_the_numbers_of_one_process(scene, tmp_path):
    args = [
        "eval",
        "--weights",
        str(scene / "model"),
        "--data",
        str(scene / "data"),
        "--task",
        "panoptic",
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        f"--master_port={_free_port()}",
        "-m",
        "mask2former",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one == two
