"""ResNet backbone in detectron2's layout (not torchvision's), so official checkpoints load by name.

Stem: 7x7/2 conv + FrozenBatchNorm + ReLU + 3x3/2 max-pool. Stages res2..res5 of bottleneck blocks with
the stride on the 3x3 conv (detectron2's STRIDE_IN_1X1 = False) and a projection shortcut where the
channel count changes. Keys: `stem.conv1.{weight,norm.*}`, `res{2..5}.{b}.{conv1,conv2,conv3,shortcut}`
with `.weight` and `.norm.{weight,bias,running_mean,running_var}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.layers import Conv2d, FrozenBatchNorm2d, c2_msra_fill, conv_add_relu, conv_relu

STAGE_NAMES = ("res2", "res3", "res4", "res5")


def check_out_features(out_features: Sequence[str]) -> tuple[str, ...]:
    """The requested backbone outputs as a tuple, or a one-line error naming the valid ones."""
    if not out_features or any(name not in STAGE_NAMES for name in out_features):
        raise ValueError(f"out_features must be a non-empty subset of {STAGE_NAMES}, got {out_features}")
    return tuple(out_features)


def conv_frozen_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> Conv2d:
    """Bias-free conv owning a FrozenBatchNorm2d as `.norm`, MSRA-initialised as detectron2 does."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=False,
        norm=FrozenBatchNorm2d(out_channels),
    )
    c2_msra_fill(conv)
    return conv


class BasicStem(nn.Module):
    """conv1 7x7/2 + norm + ReLU + max-pool 3x3/2: (B, 3, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""

    stride = 4

    def __init__(self, in_channels: int = 3, out_channels: int = 64):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = conv_frozen_bn(in_channels, out_channels, kernel_size=7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_relu(self.conv1, x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1, each with frozen BN; residual add, then ReLU.

    (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1):
        super().__init__()
        # detectron2 projects exactly when the channel count changes: the first block of every stage.
        if in_channels != out_channels:
            self.shortcut = conv_frozen_bn(in_channels, out_channels, kernel_size=1, stride=stride)
        else:
            self.shortcut = None
        self.conv1 = conv_frozen_bn(in_channels, bottleneck_channels, kernel_size=1)
        self.conv2 = conv_frozen_bn(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride)
        self.conv3 = conv_frozen_bn(bottleneck_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_relu(self.conv1, x)
        out = conv_relu(self.conv2, out)
        return conv_add_relu(self.conv3, out, x if self.shortcut is None else self.shortcut(x))


class ResNet(nn.Module):
    """Bottleneck ResNet returning the requested stage outputs.

    Stage i of res2..res5 has `res2_channels * 2**i` output channels and a bottleneck width of a quarter
    of that; res2 keeps the stem's stride 4, every later stage halves the resolution. As in detectron2,
    stages after the last requested one are not built.

    forward(x: (B, 3, H, W)) -> {name: (B, out_channels[name], ceil(H / s), ceil(W / s))} with
    s = out_strides[name] in (4, 8, 16, 32).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        stem_channels: int = 64,
        res2_channels: int = 256,
        out_features: Sequence[str] = STAGE_NAMES,
    ):
        super().__init__()
        if len(layers) != len(STAGE_NAMES):
            raise ValueError(f"layers must give 4 block counts (res2..res5), got {tuple(layers)}")
        self.out_features = check_out_features(out_features)
        self.stem = BasicStem(3, stem_channels)

        num_stages = max(STAGE_NAMES.index(name) for name in out_features) + 1
        self.stage_names = STAGE_NAMES[:num_stages]
        all_channels, all_strides = {}, {}
        in_channels, stride = stem_channels, BasicStem.stride
        for i, name in enumerate(self.stage_names):
            out_channels = res2_channels * 2**i
            first_stride = 1 if i == 0 else 2
            blocks = [
                BottleneckBlock(
                    in_channels if b == 0 else out_channels,
                    out_channels,
                    bottleneck_channels=out_channels // 4,
                    stride=first_stride if b == 0 else 1,
                )
                for b in range(layers[i])
            ]
            self.add_module(name, nn.Sequential(*blocks))
            stride *= first_stride
            all_channels[name], all_strides[name] = out_channels, stride
            in_channels = out_channels

        self.out_channels: dict[str, int] = {name: all_channels[name] for name in self.out_features}
        self.out_strides: dict[str, int] = {name: all_strides[name] for name in self.out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) normalised image -> {"res2": (B, C2, ceil(H/4), ceil(W/4)), ...}."""
        x = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs
