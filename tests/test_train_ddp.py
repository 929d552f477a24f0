"""Two gloo processes compute the gradient of the doubled batch; a torchrun training run writes from rank 0.

Run as a script (`python tests/test_train_ddp.py DATA OUT` with torchrun's RANK / WORLD_SIZE / MASTER_*
variables) this file is the worker of the gradient test: one Trainer, one forward/backward, gradients saved.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mask2former.training import distributed as dist_utils

GLOBAL_BATCH = 4
TIMEOUT = 180


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_first_batch_gradients(data: Path, out: Path) -> None:
    """The worker: gradients of this process's first batch after backward (DDP-averaged), before clipping."""
    from conftest import tiny_trainer  # run as a script from tests/, where conftest.py is importable

    trainer = tiny_trainer(data, out, batch_size=GLOBAL_BATCH)
    batch = next(iter(trainer._loader(0, 0)))
    loss, _ = trainer.compute_gradients(batch)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"grads": grads, "loss": loss.detach(), "image_ids": batch["image_ids"]},
        out / f"rank{trainer.rank}.pt",
    )
    dist_utils.cleanup()


@pytest.fixture(scope="module")
def data(synth_dataset) -> Path:
    return synth_dataset(6)


@pytest.mark.slow
def test_two_processes_give_the_gradient_of_the_doubled_batch(data, make_trainer, tmp_path):
    port = str(_free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(data), str(tmp_path)],
            env=_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=TIMEOUT)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = make_trainer(data, tmp_path / "single", batch_size=GLOBAL_BATCH)
    batch = next(iter(single._loader(0, 0)))
    loss, _ = single.compute_gradients(batch)

    # the two halves are the single process's batch (rank r takes global positions r, r + 2, ...)
    assert sorted(ranks[0]["image_ids"] + ranks[1]["image_ids"]) == sorted(batch["image_ids"])
    assert len(ranks[0]["image_ids"]) == GLOBAL_BATCH // 2
    # each rank's loss is its share over the global normalisers, so their mean is the whole batch's loss
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert torch.allclose(mean_loss, loss.detach(), rtol=1e-5, atol=0)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the halves really differ
    for name, p in single.model.named_parameters():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name  # DDP all-reduced
        error = (ranks[0]["grads"][name] - p.grad).abs().max()
        assert error <= 1e-5, f"{name}: max |difference| {error:.2e}"  # measured ~1e-6 (sum order)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "mask2former", "train", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.slow
def test_torchrun_training_completes_and_only_rank_0_writes(data, make_trainer, tiny_config_file, tmp_path):
    config = tiny_config_file
    out = tmp_path / "out"
    common = ["--config", str(config), "--data", str(data), "--augment", "none", "--num-points", "256"]
    result = _torchrun(
        *common,
        *("--out", str(out), "--iters", "4", "--batch-size", str(GLOBAL_BATCH), "--lr", "1e-3"),
        *("--checkpoint-every", "2", "--log-every", "1", "--no-progress"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained synth-test for 4 steps") == 1  # printed by rank 0 only
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "loss.png", "metrics.jsonl", "model", "train_config.json"]
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4

    # the logged loss is the whole batch's (mean over ranks), as one process with the full batch logs it
    single = make_trainer(data, tmp_path / "single", batch_size=GLOBAL_BATCH)
    first = single.train_step(next(iter(single._loader(0, 0))))
    assert rows[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)

    # a batch the processes cannot share: each rank exits with the one-line error (their lines may
    # interleave on the shared stderr), not a traceback
    result = _torchrun(*common, "--out", str(tmp_path / "odd"), "--batch-size", "3", "--no-progress")
    assert result.returncode != 0
    assert "mask2former train: error: --batch-size 3 is not divisible by 2 processes" in result.stderr
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr) and "ValueError" not in result.stderr
    assert not (tmp_path / "odd").exists()


if __name__ == "__main__":
    save_first_batch_gradients(Path(sys.argv[1]), Path(sys.argv[2]))
