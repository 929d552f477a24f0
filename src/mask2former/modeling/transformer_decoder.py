"""Masked-attention transformer decoder of Mask2Former (paper section 3.2, official
`MultiScaleMaskedTransformerDecoder`).

Learned queries attend, one feature level per layer (1/32, 1/16, 1/8, 1/32, ...), only to the pixels inside
the mask they predicted at the previous step. Parameter names match the official checkpoints
(`sem_seg_head.predictor.*`); the attention modules are `nn.MultiheadAttention` for their parameter names
only, attention itself runs through `F.scaled_dot_product_attention` on those parameters, batch first.

Everything here is export friendly: masks are additive finite biases built with arithmetic (no boolean
index assignment, which becomes ScatterND in ONNX), no data-dependent shapes, no float64.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.layers import (
    MLP,
    Conv2d,
    PositionEmbeddingSine,
    c2_xavier_fill,
    linear_add,
    linear_relu,
)

# Added to the attention scores of blocked pixels. Finite so it is representable in fp16 (min -65504) and
# -inf never turns a row into NaN; far enough from the fp16 limit that score + MASK_VALUE cannot overflow;
# exp(MASK_VALUE) underflows to exactly 0 in fp16/fp32, so blocked pixels get zero weight as with -inf.
MASK_VALUE = -1.0e4


def masked_attention_bias(mask_logits: torch.Tensor) -> torch.Tensor:
    """Predicted mask logits at memory size (B, Q, h, w) -> additive attention bias (B, 1, Q, h*w).

    A pixel is blocked where sigmoid(logit) < 0.5; a query whose pixels are all blocked attends to every
    pixel instead (the official rule, so its softmax is defined). The head axis is 1 so that it broadcasts
    over heads instead of being repeated. The bias carries no gradient, like the official detached mask.
    """
    blocked = mask_logits.detach().flatten(2).sigmoid() < 0.5  # (B, Q, h*w)
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    return (blocked.to(mask_logits.dtype) * MASK_VALUE).unsqueeze(1)


def multi_head_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """nn.MultiheadAttention's computation on its own parameters, batch first, through SDPA.

    query (B, Lq, C), key and value (B, Lk, C), attn_bias None or broadcastable to (B, heads, Lq, Lk)
    -> (B, Lq, C).
    """
    heads = attn.num_heads
    # An optimised copy (inference.optimize.OneDNNMultiheadAttention) projects on prepacked weights.
    project = getattr(attn, "in_projection", None) or functools.partial(_in_projection, attn)

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C/heads)
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    q = split_heads(project(query, 0))
    k = split_heads(project(key, 1))
    v = split_heads(project(value, 2))
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, heads, Lq, C/heads)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _in_projection(attn: nn.MultiheadAttention, x: torch.Tensor, index: int) -> torch.Tensor:
    """Input projection `index` (0 query, 1 key, 2 value) of nn.MultiheadAttention: (B, L, C) -> (B, L, C)."""
    return F.linear(x, attn.in_proj_weight.chunk(3)[index], attn.in_proj_bias.chunk(3)[index])


def _xavier_init_matrices(module: nn.Module) -> None:
    """Official init of the decoder layers: xavier_uniform on every parameter with more than one dim."""
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from queries to one memory level, then residual + LayerNorm (post-norm)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        _xavier_init_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        attn_bias: torch.Tensor | None,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """tgt, query_pos (B, Q, C); memory, pos (B, h*w, C); attn_bias (B, 1, Q, h*w) -> (B, Q, C)."""
        update = multi_head_attention(self.multihead_attn, tgt + query_pos, memory + pos, memory, attn_bias)
        return self.norm(tgt + update)


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries (q = k = tgt + query_pos, v = tgt), then residual + LayerNorm."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        _xavier_init_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos (B, Q, C) -> (B, Q, C)."""
        q = tgt + query_pos
        return self.norm(tgt + multi_head_attention(self.self_attn, q, q, tgt))


class FFNLayer(nn.Module):
    """Two-layer ReLU feed-forward network, then residual + LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier_init_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        """tgt (B, Q, C) -> (B, Q, C)."""
        return self.norm(linear_add(self.linear2, linear_relu(self.linear1, tgt), tgt))


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Queries -> `dec_layers` masked-attention layers -> class logits and mask logits per query.

    Post-norm layers, dropout 0 (the official configuration). `num_classes` excludes the no-object class.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 133,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        num_feature_levels: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(
        self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor, return_aux: bool = True
    ) -> dict:
        """Decode queries against the pixel decoder's outputs.

        multi_scale_features: `num_feature_levels` maps (B, in_channels, h_l, w_l) at 1/32, 1/16, 1/8.
        mask_features: (B, mask_dim, H/4, W/4).
        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4)} and, when `return_aux`,
        "aux_outputs": `dec_layers` dicts of the same two keys, predicted before layer 0 and after layers
        0..dec_layers-2 (deep supervision). Without aux outputs the intermediate masks are only needed as
        attention masks, so they are computed directly at memory resolution (see `_predict_masks`).
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} multi-scale features, got {len(multi_scale_features)}"
            )
        memories, positions, sizes = self._prepare_memory(multi_scale_features)
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        # Bilinear resizing is linear in its input, so resize(einsum(e, F)) == einsum(e, resize(F)): the
        # fast path resizes mask_features once per level instead of every layer's full-resolution masks.
        low_res_features = None
        if not return_aux:
            low_res_features = [_resize(mask_features, size) for size in sizes]

        aux_outputs = []
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            if return_aux:
                logits, masks = self.forward_prediction_heads(output, mask_features)
                aux_outputs.append({"pred_logits": logits, "pred_masks": masks})
                attn_mask_logits = _resize(masks, sizes[level])
            else:
                attn_mask_logits = self._predict_masks(output, low_res_features[level])
            attn_bias = masked_attention_bias(attn_mask_logits)

            output = self.transformer_cross_attention_layers[i](
                output, memories[level], attn_bias, positions[level], query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)

        logits, masks = self.forward_prediction_heads(output, mask_features)
        out = {"pred_logits": logits, "pred_masks": masks}
        if return_aux:
            out["aux_outputs"] = aux_outputs
        return out

    def forward_prediction_heads(
        self, output: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query features (B, Q, C) and mask features (B, mask_dim, h, w) -> class logits (B, Q, K+1)
        and mask logits (B, Q, h, w)."""
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        return outputs_class, outputs_mask

    def _predict_masks(self, output: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Mask logits only (B, Q, h, w) at the resolution of the given mask features."""
        mask_embed = self.mask_embed(self.decoder_norm(output))
        return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

    def _prepare_memory(
        self, multi_scale_features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Per level: memory = input_proj(x) + level_embed (B, h*w, C), sine positions (B, h*w, C), (h, w).

        Both contiguous: three layers per level project them, and each projection of a transposed view
        would copy it first."""
        memories, positions, sizes = [], [], []
        for level, features in enumerate(multi_scale_features):
            sizes.append((features.shape[-2], features.shape[-1]))
            positions.append(self.pe_layer(features).flatten(2).transpose(1, 2).contiguous())
            memory = self.input_proj[level](features).flatten(2).transpose(1, 2)
            memories.append((memory + self.level_embed.weight[level]).contiguous())
        return memories, positions, sizes


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners False, no antialias) of (B, C, h, w) to `size`, as the official code."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
