"""--backbone-norm bn: BatchNorm while training a backbone from scratch, FrozenBatchNorm when saved."""

from __future__ import annotations

import torch
from torch import nn

import mask2former
from mask2former.cli import main
from mask2former.modeling.build import build_model
from mask2former.modeling.layers import FrozenBatchNorm2d
from mask2former.training.batchnorm import frozen_state_dict, thaw_batchnorm


def _randomise_frozen_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator))
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_thawed_backbone_in_eval_mode_computes_what_the_frozen_one_does(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    _randomise_frozen_norms(model)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(images)
        assert thaw_batchnorm(model.backbone) == frozen > 0
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
        after = model.eval()(images)
    torch.testing.assert_close(after["pred_masks"], before["pred_masks"], rtol=0, atol=1e-5)
    torch.testing.assert_close(after["pred_logits"], before["pred_logits"], rtol=0, atol=1e-5)


def test_trained_batchnorm_statistics_reload_into_the_frozen_architecture(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    thaw_batchnorm(model.backbone)
    model.train()
    with torch.no_grad():  # train-mode forwards update the running statistics
        for _ in range(3):
            model(torch.randn(2, 3, 64, 64) * 3 + 1)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 3 for m in norms)
    assert any(not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)

    frozen = build_model(tiny_config()).eval()
    state = frozen_state_dict(model.state_dict())
    assert not any(key.endswith("num_batches_tracked") for key in state)
    frozen.load_state_dict(state, strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = model.eval()(images), frozen(images)
    torch.testing.assert_close(got["pred_masks"], expected["pred_masks"], rtol=0, atol=1e-5)


def test_train_cli_with_backbone_bn_saves_a_frozen_model_that_loads(
    synth_dataset, tiny_config_file, tmp_path, capsys
):
    data = synth_dataset(4)
    config = tiny_config_file
    out = tmp_path / "out"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--iters", "3", "--batch-size", "2", "--augment", "none", "--num-points", "256"]
    assert main(args + ["--backbone-norm", "bn", "--lr", "1e-3"]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    tracked = [key for key in checkpoint["model"] if key.endswith("num_batches_tracked")]
    assert tracked and all(int(checkpoint["model"][key]) == 3 for key in tracked)
    assert checkpoint["train_config"]["backbone_norm"] == "bn"

    model, _ = mask2former.load_model(out / "model")  # strict load into the FrozenBatchNorm architecture
    frozen = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == len(tracked)
    key = tracked[0].removesuffix("num_batches_tracked") + "running_var"
    trained = checkpoint["model"][key]
    assert torch.equal(model.state_dict()[key], trained)
    assert not torch.equal(trained, torch.ones_like(trained))
