"""The Trainer on a tiny model and 64x64 synthetic scenes: it learns, it is deterministic, it resumes.

The tiny config, datasets and `make_trainer` come from conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def data(synth_dataset) -> Path:
    return synth_dataset(5)


def test_overfits_one_image(synth_dataset, make_trainer, tmp_path):
    """One image, no augmentation, constant lr 1e-3: the loss falls 10x within 150 steps (~3 s)."""
    trainer = make_trainer(synth_dataset(1), tmp_path / "out", batch_size=1, schedule="step", max_iters=150)
    batch = next(iter(trainer._loader(0, 0)))
    first = trainer.train_step(batch)["loss"]
    losses = [first]
    while trainer.step < 150 and losses[-1] > first / 10:
        losses.append(trainer.train_step(batch)["loss"])
    assert losses[-1] <= first / 10, f"loss {first:.3f} -> {losses[-1]:.3f} after {trainer.step} steps"
    assert all(abs(record) < 1e6 for record in losses)


def test_same_seed_same_weights_and_records(data, make_trainer, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(data, tmp_path / name, max_iters=3)
        records = [trainer.train_step(batch) for batch in trainer._loader(0, 0)][:2]
        runs.append((trainer.model.state_dict(), records))
    (weights_a, records_a), (weights_b, records_b) = runs
    assert records_a == records_b
    assert set(records_a[0]) >= {"loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm", "lr"}
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def test_compute_gradients_fills_every_parameter_unclipped(data, make_trainer, tmp_path):
    trainer = make_trainer(data, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss, losses = trainer.compute_gradients(next(iter(trainer._loader(0, 0))))
    assert loss.ndim == 0 and {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= set(losses)
    missing = [name for name, p in trainer.model.named_parameters() if p.grad is None]
    assert not missing  # DDP needs every parameter in the graph
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm > trainer.config.clip_grad_norm  # clipping happens in train_step, not here
    assert trainer.step == 0
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimiser step


def test_items_do_not_depend_on_the_number_of_loader_workers(data, make_trainer, tmp_path):
    trainer = make_trainer(data, tmp_path, augment="lsj", crop_size=64, min_scale=0.5, max_scale=1.5)
    serial = list(trainer._loader(1, 0))
    trainer.config.num_workers = 2
    parallel = list(trainer._loader(1, 0))
    assert len(serial) == len(parallel) == 2
    for one, two in zip(serial, parallel, strict=True):
        assert torch.equal(one["images"], two["images"])
        assert one["point_seeds"] == two["point_seeds"]
        for t1, t2 in zip(one["targets"], two["targets"], strict=True):
            assert torch.equal(t1["masks"], t2["masks"]) and torch.equal(t1["labels"], t2["labels"])
    # the same image is augmented afresh every epoch, and its points are drawn afresh
    assert not torch.equal(trainer.items[(1, 0)]["image"], trainer.items[(2, 0)]["image"])
    assert trainer.items[(1, 0)]["point_seed"] != trainer.items[(2, 0)]["point_seed"]
    assert torch.equal(trainer.items[(1, 0)]["image"], trainer.items[(1, 0)]["image"])


def test_resume_restores_step_optimizer_and_continues_identically(data, make_trainer, tmp_path):
    """Train 3 steps (checkpoint), resume in a fresh Trainer, train both to 6: identical weights."""
    out = tmp_path / "out"
    first = make_trainer(data, out, max_iters=3, checkpoint_every=3, schedule="poly")
    assert first.resume() is False  # nothing to resume yet
    first.train()
    assert (out / "checkpoint.pt").exists() and (out / "model" / "model.safetensors").exists()

    second = make_trainer(data, out, max_iters=3, schedule="poly")
    assert second.resume() is True
    assert second.step == 3
    saved, restored = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert saved["state"].keys() == restored["state"].keys()
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, restored["state"][index][key]), (index, key)
    assert [g["lr"] for g in saved["param_groups"]] == [g["lr"] for g in restored["param_groups"]]
    weights = second.model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in first.model.state_dict().items())

    for trainer in (first, second):
        trainer.config.max_iters = 6
        trainer.out_dir = tmp_path / f"continued-{id(trainer)}"
        trainer.train()
        assert trainer.step == 6
    weights = second.model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in first.model.state_dict().items())


def test_resume_takes_this_runs_learning_rate_and_decay(data, make_trainer, tmp_path):
    out = tmp_path / "out"
    make_trainer(data, out, max_iters=2, checkpoint_every=2).train()
    resumed = make_trainer(data, out, max_iters=2, lr=5e-5, weight_decay=0.01)
    assert resumed.resume() is True
    head = [g for g in resumed.optimizer.param_groups if not g["name"].startswith("backbone")]
    assert {g["initial_lr"] for g in head} == {5e-5}
    assert {g["weight_decay"] for g in head} <= {0.0, 0.01}
    assert resumed.optimizer.state  # the AdamW moments still come from the checkpoint


def test_rejects_a_dataset_smaller_than_a_batch(synth_dataset, make_trainer, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_trainer(synth_dataset(1), tmp_path / "out", batch_size=2)
