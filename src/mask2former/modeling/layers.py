"""Reusable building blocks shared by the backbone, the pixel decoder and the transformer decoder.

Parameter names follow detectron2's so that official checkpoints load by name: a convolution owns its
normalisation as `conv.norm` (keys `<conv>.weight`, `<conv>.norm.weight`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Official checkpoints store `weight`, `bias`, `running_mean`, `running_var` (no `num_batches_tracked`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) such that `norm(x) == x * scale + shift`."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class Conv2d(nn.Conv2d):
    """nn.Conv2d followed by an optional norm and activation (detectron2's wrapper, same key names)."""

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    @torch.no_grad()
    def fold_frozen_norm(self) -> None:
        """Fold a FrozenBatchNorm2d into this convolution's weight and bias (exact up to rounding)."""
        if not isinstance(self.norm, FrozenBatchNorm2d):
            return
        scale, shift = self.norm.scale_and_shift()
        self.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = shift if self.bias is None else self.bias * scale + shift
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        self.norm = None


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) (B, C_in, H, W) -> (B, C_out, H', W'); one fused kernel where the layer offers it
    (`inference.optimize.OneDNNConv2d.relu_forward`)."""
    fused = getattr(conv, "relu_forward", None)
    return fused(x) if fused is not None else F.relu_(conv(x))


def conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + residual), residual shaped like conv(x); one fused kernel where the layer offers it
    (`inference.optimize.OneDNNConv2d.add_relu_forward`)."""
    fused = getattr(conv, "add_relu_forward", None)
    return fused(x, residual) if fused is not None else F.relu_(conv(x) + residual)


def linear_relu(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """relu(linear(x)) (..., in) -> (..., out); one fused kernel where the layer offers it
    (`inference.optimize.OneDNNLinear.relu_forward`)."""
    fused = getattr(linear, "relu_forward", None)
    return fused(x) if fused is not None else F.relu(linear(x))


def linear_add(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x): x (..., in), residual (..., out) -> (..., out); one fused kernel where the layer
    offers it (`inference.optimize.OneDNNLinear.add_forward`)."""
    fused = getattr(linear, "add_forward", None)
    return fused(x, residual) if fused is not None else residual + linear(x)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, reduced to a divisor of `channels` for small configs."""
    groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as detectron2 does it: kaiming_uniform(a=1) on the weight, bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2's MSRAFill: kaiming_normal(fan_out, relu) on the weight, bias 0."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine position embedding (DETR), computed from the feature map's shape alone.

    forward(x: (B, C, H, W)) -> (B, 2 * num_pos_feats, H, W); channels are [y features, x features],
    each interleaving sin (even) and cos (odd). Positions are (i + 1) / (H + 1e-6) * scale, as the
    official cumulative sum over an all-valid mask gives.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        eps = 1e-6
        y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=x.device)
        x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=x.device)
        y_embed = y_embed / (y_embed[-1:] + eps) * self.scale
        x_embed = x_embed / (x_embed[-1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = self._interleave(y_embed[:, None] / dim_t)  # (H, F)
        pos_x = self._interleave(x_embed[:, None] / dim_t)  # (W, F)
        pos = torch.cat(
            (
                pos_y[:, None, :].expand(height, width, self.num_pos_feats),
                pos_x[None, :, :].expand(height, width, self.num_pos_feats),
            ),
            dim=-1,
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1).to(x.dtype)

    @staticmethod
    def _interleave(angles: torch.Tensor) -> torch.Tensor:
        """(N, F) angles -> (N, F) with sin on even and cos on odd features."""
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (keys `layers.{i}`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d's FrozenBatchNorm2d into the convolution, in place, for inference."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.fold_frozen_norm()
    return model
