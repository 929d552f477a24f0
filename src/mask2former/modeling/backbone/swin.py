"""Swin Transformer backbone with the parameter names and semantics of Mask2Former's D2SwinTransformer.

Patch embedding (4x4 patches) -> four stages of window-attention blocks, each stage but the last ending in
patch merging -> one LayerNorm per output (`norm0..norm3`). Tokens are kept channels-last, (B, H, W, C),
inside the backbone; outputs are (B, C, H, W).

Official semantics kept for checkpoint parity: every block zero-pads its (normalised) input on the
bottom/right to a multiple of the window size and the padded tokens take part in attention; odd blocks
cyclically shift by window_size // 2 and add -100 to the logits between tokens of different regions.
Everything is written with tensor ops on shapes only (no .item(), numpy or data-dependent indexing) so
that it traces and exports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.backbone.resnet import STAGE_NAMES, check_out_features


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p (rescaled)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of window_size -> (B * num_windows, window_size**2, C), row-major."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_merge(
    windows: torch.Tensor, window_size: int, batch: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of window_partition: (B * num_windows, window_size**2, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(batch, height // window_size, width // window_size, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (num_windows, N, N), N = window_size**2, for attention on the shifted padded map.

    After the cyclic shift, the last window row/column mixes tokens from opposite borders. Rows fall in
    three regions ([0, H - ws), [H - ws, H - shift), [H - shift, H)), likewise columns; two tokens may
    attend to each other only inside one (row region, column region) cell, otherwise the logit gets -100.
    """

    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift_size).long()

    cell = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W) region id
    cell_windows = window_partition(cell[None, :, :, None], window_size).squeeze(-1)  # (nW, N)
    different = cell_windows[:, :, None] != cell_windows[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill(different, -100.0)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the (2*ws - 1)**2 bias table for every (query, key) pair of one window."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    delta_rows = rows[:, None] - rows[None, :] + window_size - 1  # 0 .. 2*ws - 2
    delta_cols = cols[:, None] - cols[None, :] + window_size - 1
    return delta_rows * (2 * window_size - 1) + delta_cols


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias per head."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) windows; mask: (nW, N, N) additive or None -> (B * nW, N, C)."""
        batch_windows, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[:, None]
            attn = attn.view(batch_windows, self.num_heads, tokens, tokens)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch_windows, tokens, channels)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (keys `mlp.fc1`, `mlp.fc2`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual with stochastic depth: (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); attn_mask: (nW, N, N) for the padded map, used by shifted blocks only."""
        batch, height, width, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        pad_bottom, pad_right = (ws - height % ws) % ws, (ws - width % ws) % ws
        shortcut = x
        x = F.pad(self.norm1(x), (0, 0, 0, pad_right, 0, pad_bottom))
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), attn_mask if shift > 0 else None)
        x = window_merge(windows, ws, batch, height + pad_bottom, width + pad_right)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + self.drop_path(x[:, :height, :width, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concat each 2x2 neighbourhood -> LayerNorm(4C) -> Linear(4C, 2C).

    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded on the bottom/right.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Official concat order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating regular / shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        height, width = x.shape[1], x.shape[2]
        ws = self.window_size
        attn_mask = shifted_window_mask(
            height + (ws - height % ws) % ws,
            width + (ws - width % ws) % ws,
            ws,
            self.shift_size,
            x.device,
            x.dtype,
        )
        for block in self.blocks:
            x = block(x, attn_mask)
        return x, (x if self.downsample is None else self.downsample(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C), input zero-padded."""

    def __init__(self, patch_size: int, embed_dim: int, patch_norm: bool, in_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        height, width = x.shape[2], x.shape[3]
        x = F.pad(x, (0, (p - width % p) % p, 0, (p - height % p) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class SwinTransformer(nn.Module):
    """Swin backbone (D2SwinTransformer). Stage i has embed_dim * 2**i channels at stride 4 * 2**i.

    drop_path_rate is the stochastic-depth rate of the last block, rising linearly from 0 at the first.
    pretrain_img_size only sizes the absolute position embedding of the original code, which no
    Mask2Former model uses: it is kept as a record. Dropout and attention dropout are 0 in every
    Mask2Former config and are left out.

    forward(x: (B, 3, H, W)) -> {name: (B, out_channels[name], H_i, W_i)}, H_1 = ceil(H / 4) and each
    next stage ceil(previous / 2).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
        patch_size: int = 4,
        pretrain_img_size: int = 224,
        patch_norm: bool = True,
        out_features: Sequence[str] = STAGE_NAMES,
    ):
        super().__init__()
        if len(depths) != len(STAGE_NAMES) or len(num_heads) != len(STAGE_NAMES):
            raise ValueError(f"depths and num_heads need 4 entries each, got {depths}, {num_heads}")
        self.out_features = check_out_features(out_features)
        self.pretrain_img_size = pretrain_img_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim, patch_norm)

        total_blocks = sum(depths)
        rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            first = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    num_features[i],
                    depth,
                    heads,
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    drop_path=rates[first : first + depth],
                    downsample=i < len(depths) - 1,
                )
            )
        # The official backbone normalises all four outputs, whichever are requested (norm0..norm3).
        for i, channels in enumerate(num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))

        self.out_channels: dict[str, int] = {
            name: num_features[STAGE_NAMES.index(name)] for name in self.out_features
        }
        self.out_strides: dict[str, int] = {
            name: patch_size * 2 ** STAGE_NAMES.index(name) for name in self.out_features
        }
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, WindowAttention):
            nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) normalised image -> {"res2": (B, C, ceil(H/4), ceil(W/4)), ...}."""
        x = self.patch_embed(x)
        outputs = {}
        for i, (name, layer) in enumerate(zip(STAGE_NAMES, self.layers, strict=True)):
            stage_out, x = layer(x)
            if name in self.out_features:
                outputs[name] = getattr(self, f"norm{i}")(stage_out).permute(0, 3, 1, 2).contiguous()
        return outputs
