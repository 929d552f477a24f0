"""ResNet backbone: detectron2 key names, shapes, parameter counts, init and frozen-BN folding."""

import json
import math
from pathlib import Path

import pytest
import torch

from mask2former.config import resnet_backbone
from mask2former.modeling.backbone import ResNet
from mask2former.modeling.build import build_backbone
from mask2former.modeling.layers import FrozenBatchNorm2d, fold_frozen_batchnorm

FIXTURES = Path(__file__).parent / "fixtures"


def resnet50() -> ResNet:
    return build_backbone(resnet_backbone(50))


def resnet101() -> ResNet:
    return build_backbone(resnet_backbone(101))


STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def tiny_resnet(**kwargs) -> ResNet:
    return ResNet(layers=(1, 1, 1, 1), stem_channels=16, res2_channels=32, **kwargs)


def randomize_frozen_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every FrozenBatchNorm2d non-trivial statistics so that folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def conv_weight_count(layers, stem_channels=64, res2_channels=256) -> int:
    """Number of conv weights of a bottleneck ResNet, counted from the architecture (no bias, no fc)."""
    total = 7 * 7 * 3 * stem_channels
    in_channels = stem_channels
    for i, num_blocks in enumerate(layers):
        out_channels = res2_channels * 2**i
        width = out_channels // 4
        for b in range(num_blocks):
            block_in = in_channels if b == 0 else out_channels
            total += block_in * width + 3 * 3 * width * width + width * out_channels
            if block_in != out_channels:
                total += block_in * out_channels  # projection shortcut
        in_channels = out_channels
    return total


def test_resnet50_keys_and_shapes_match_detectron2():
    expected = json.loads((FIXTURES / "backbone_resnet50_keys.json").read_text())["keys"]
    state = resnet50().state_dict()
    assert sorted(state) == sorted(expected)
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert not any(k.endswith("num_batches_tracked") for k in state)


@pytest.mark.parametrize(
    "builder, layers, expected",
    [
        # torchvision's resnet50 / resnet101 (25,557,032 / 44,549,160 params) minus fc (2,049,000) and
        # the BN affine params (2 x 26,560 / 2 x 52,672 channels): same conv shapes as detectron2's.
        (resnet50, (3, 4, 6, 3), 23_454_912),
        (resnet101, (3, 4, 23, 3), 42_394_816),
    ],
)
def test_parameter_count_is_the_conv_weights_of_the_architecture(builder, layers, expected):
    model = builder()
    assert conv_weight_count(layers) == expected
    # Frozen BN holds buffers only, so the trainable parameters are exactly the conv weights.
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(name.endswith(".weight") and p.dim() == 4 for name, p in model.named_parameters())
    assert conv_weight_count((1, 1, 1, 1), 16, 32) == sum(p.numel() for p in tiny_resnet().parameters())


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97), (33, 31), (32, 160)])
def test_output_shapes_strides_and_channels(height, width):
    model = tiny_resnet().eval()
    assert model.out_strides == STRIDES
    assert model.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert list(outputs) == ["res2", "res3", "res4", "res5"]
    for name, feature in outputs.items():
        stride = model.out_strides[name]
        expected = (2, model.out_channels[name], math.ceil(height / stride), math.ceil(width / stride))
        assert feature.shape == expected, name


def test_resnet50_output_channels():
    model = resnet50().eval()
    assert model.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 65, 97))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "res2": (1, 256, 17, 25),
        "res3": (1, 512, 9, 13),
        "res4": (1, 1024, 5, 7),
        "res5": (1, 2048, 3, 4),
    }


def test_out_features_subset_builds_only_the_stages_needed():
    model = tiny_resnet(out_features=("res3",))
    assert not any(k.startswith(("res4", "res5")) for k in model.state_dict())
    assert model.out_channels == {"res3": 64} and model.out_strides == {"res3": 8}
    assert list(model(torch.randn(1, 3, 32, 32))) == ["res3"]


@pytest.mark.parametrize("kwargs", [{"out_features": ("res6",)}, {"out_features": ()}, {"layers": (1, 1, 1)}])
def test_bad_arguments_raise_one_line_errors(kwargs):
    with pytest.raises(ValueError):
        ResNet(**{"layers": (1, 1, 1, 1), **kwargs})


def test_projection_shortcut_on_first_block_of_each_stage_and_stride_on_3x3():
    model = resnet50()
    for stage in ("res2", "res3", "res4", "res5"):
        blocks = getattr(model, stage)
        assert blocks[0].shortcut is not None
        assert all(block.shortcut is None for block in blocks[1:])
        first_stride = 1 if stage == "res2" else 2
        assert blocks[0].conv1.stride == (1, 1) and blocks[0].conv2.stride == (first_stride,) * 2
        assert blocks[0].shortcut.stride == (first_stride,) * 2
    assert all(conv.bias is None for conv in model.modules() if isinstance(conv, torch.nn.Conv2d))


def test_convs_use_msra_fill():
    torch.manual_seed(0)
    weight = resnet50().res5[1].conv2.weight  # 512 x 512 x 3 x 3
    fan_out = weight.shape[0] * weight.shape[2] * weight.shape[3]
    assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert weight.mean().abs().item() < 1e-3


def test_folded_frozen_batchnorm_matches_unfolded():
    torch.manual_seed(0)
    model = tiny_resnet().eval()
    randomize_frozen_bn(model)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        reference = model(x)
        fold_frozen_batchnorm(model)
        folded = model(x)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for name in reference:
        assert torch.allclose(folded[name], reference[name], atol=1e-5, rtol=0), name


def test_folded_resnet50_matches_unfolded():
    torch.manual_seed(0)
    model = resnet50().eval()
    randomize_frozen_bn(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        folded = fold_frozen_batchnorm(model)(x)
    for name in reference:
        scale = reference[name].abs().max()
        assert ((folded[name] - reference[name]).abs().max() / scale).item() <= 1e-5, name


def test_frozen_batchnorm_is_unchanged_by_training():
    torch.manual_seed(0)
    model = tiny_resnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".norm." in k}
    outputs = model(torch.randn(2, 3, 32, 32))
    sum(o.sum() for o in outputs.values()).backward()
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all(p.grad is not None for p in model.parameters())


def test_build_backbone_from_its_config():
    assert isinstance(resnet50(), ResNet)
    with pytest.raises(KeyError):
        resnet_backbone(18)
