"""Masked-attention transformer decoder: official key names, output contract, masking semantics.

The independent check is `reference_decoder`: the decoder written from the paper / official forward in
(L, B, C) layout with nn.MultiheadAttention's own forward and boolean masks repeated per head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mask2former.modeling.transformer_decoder import (
    MASK_VALUE,
    MultiScaleMaskedTransformerDecoder,
    masked_attention_bias,
)

TINY = dict(
    in_channels=24, num_classes=7, hidden_dim=32, num_queries=5, num_heads=4, dim_feedforward=64, mask_dim=16
)
LEVEL_SIZES = [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of a 64x96 image
MASK_SIZE = (16, 24)  # 1/4


def make_inputs(batch: int = 2, in_channels: int = 24, mask_dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, in_channels, h, w, generator=gen) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(batch, mask_dim, *MASK_SIZE, generator=gen)
    return features, mask_features


def expected_official_keys(num_layers: int, with_input_proj: bool) -> set[str]:
    """Written by hand from the official module tree (sem_seg_head.predictor.*)."""
    keys = {
        "query_feat.weight",
        "query_embed.weight",
        "level_embed.weight",
        "decoder_norm.weight",
        "decoder_norm.bias",
        "class_embed.weight",
        "class_embed.bias",
    }
    for j in range(3):
        keys |= {f"mask_embed.layers.{j}.weight", f"mask_embed.layers.{j}.bias"}
    if with_input_proj:
        for j in range(3):
            keys |= {f"input_proj.{j}.weight", f"input_proj.{j}.bias"}
    for i in range(num_layers):
        for prefix, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            keys |= {
                f"{prefix}.{i}.{attn}.in_proj_weight",
                f"{prefix}.{i}.{attn}.in_proj_bias",
                f"{prefix}.{i}.{attn}.out_proj.weight",
                f"{prefix}.{i}.{attn}.out_proj.bias",
                f"{prefix}.{i}.norm.weight",
                f"{prefix}.{i}.norm.bias",
            }
        for name in ("linear1", "linear2", "norm"):
            keys |= {f"transformer_ffn_layers.{i}.{name}.weight", f"transformer_ffn_layers.{i}.{name}.bias"}
    return keys


def test_default_state_dict_matches_official_names_and_shapes():
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoder()
    state = decoder.state_dict()
    assert set(state) == expected_official_keys(9, with_input_proj=False)
    assert state["query_feat.weight"].shape == (100, 256)
    assert state["level_embed.weight"].shape == (3, 256)
    assert state["class_embed.weight"].shape == (134, 256)
    assert state["transformer_cross_attention_layers.0.multihead_attn.in_proj_weight"].shape == (768, 256)
    assert state["transformer_ffn_layers.8.linear1.weight"].shape == (2048, 256)
    assert state["mask_embed.layers.2.weight"].shape == (256, 256)


def test_input_proj_only_when_channels_differ():
    decoder = MultiScaleMaskedTransformerDecoder(**TINY, dec_layers=2)
    assert set(decoder.state_dict()) == expected_official_keys(2, with_input_proj=True)
    assert decoder.state_dict()["input_proj.0.weight"].shape == (32, 24, 1, 1)
    assert torch.count_nonzero(decoder.input_proj[1].bias) == 0


def test_attention_and_ffn_matrices_are_xavier_initialised():
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoder(
        hidden_dim=64, num_heads=4, dim_feedforward=128, dec_layers=2
    )
    weight = decoder.transformer_ffn_layers[0].linear1.weight  # xavier bound sqrt(6 / (64 + 128))
    bound = (6 / (64 + 128)) ** 0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    out_proj = decoder.transformer_self_attention_layers[1].self_attn.out_proj.weight
    bound = (6 / (64 + 64)) ** 0.5
    assert out_proj.abs().max() <= bound and out_proj.abs().max() > 0.9 * bound


def test_output_shapes_and_one_aux_output_per_layer():
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoder(**TINY)  # default 9 layers
    features, mask_features = make_inputs()
    out = decoder(features, mask_features, return_aux=True)
    assert out["pred_logits"].shape == (2, 5, 8)
    assert out["pred_masks"].shape == (2, 5, *MASK_SIZE)
    assert len(out["aux_outputs"]) == 9
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks"}
        assert aux["pred_logits"].shape == (2, 5, 8)
        assert aux["pred_masks"].shape == (2, 5, *MASK_SIZE)
    fast = decoder(features, mask_features, return_aux=False)
    assert set(fast) == {"pred_logits", "pred_masks"}


def test_attention_bias_blocks_below_half_and_opens_fully_blocked_rows():
    logits = torch.tensor([[[[1.0, -1.0], [0.0, -2.0]], [[-1.0, -3.0], [-0.5, -0.1]]]])  # (1, 2, 2, 2)
    bias = masked_attention_bias(logits)
    assert bias.shape == (1, 1, 2, 4)
    # sigmoid(0) == 0.5 is not "< 0.5", so logit 0 stays open
    assert bias[0, 0, 0].tolist() == [0.0, MASK_VALUE, 0.0, MASK_VALUE]
    assert bias[0, 0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all blocked -> all open
    half = masked_attention_bias(logits.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert half[0, 0, 0, 1].item() == MASK_VALUE


def reference_decoder(decoder, features, mask_features):
    """The official forward in (L, B, C) layout with nn.MultiheadAttention modules and boolean masks.

    Returns (predictions [(logits, masks)] for every step, count of fully blocked rows, count of rows with
    both blocked and open pixels) so the test can check that both masking cases were exercised.
    """
    heads = decoder.num_heads
    batch = mask_features.shape[0]
    memories, positions, sizes = [], [], []
    for level, x in enumerate(features):
        sizes.append(x.shape[-2:])
        positions.append(decoder.pe_layer(x).flatten(2).permute(2, 0, 1))
        projected = decoder.input_proj[level](x).flatten(2).permute(2, 0, 1)
        memories.append(projected + decoder.level_embed.weight[level][None, None, :])
    query_pos = decoder.query_embed.weight[:, None, :].repeat(1, batch, 1)
    tgt = decoder.query_feat.weight[:, None, :].repeat(1, batch, 1)

    def heads_out(tgt):
        normed = decoder.decoder_norm(tgt).transpose(0, 1)
        embed = normed
        for j, layer in enumerate(decoder.mask_embed.layers):
            embed = layer(embed) if j == 2 else torch.relu(layer(embed))
        masks = (embed[:, :, :, None, None] * mask_features[:, None]).sum(2)
        return decoder.class_embed(normed), masks

    predictions, fully_blocked, partial = [heads_out(tgt)], 0, 0
    for i in range(decoder.num_layers):
        level = i % 3
        small = F.interpolate(predictions[-1][1], size=sizes[level], mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5  # (B, Q, hw)
        full_rows = blocked.all(-1)
        fully_blocked += int(full_rows.sum())
        partial += int((blocked.any(-1) & ~full_rows).sum())
        blocked[full_rows] = False
        attn_mask = blocked.repeat_interleave(heads, dim=0)  # (B*heads, Q, hw), batch-major like MHA

        cross = decoder.transformer_cross_attention_layers[i]
        update = cross.multihead_attn(
            tgt + query_pos,
            memories[level] + positions[level],
            memories[level],
            attn_mask=attn_mask,
            need_weights=False,
        )[0]
        tgt = cross.norm(tgt + update)
        self_layer = decoder.transformer_self_attention_layers[i]
        q = tgt + query_pos
        tgt = self_layer.norm(tgt + self_layer.self_attn(q, q, tgt, need_weights=False)[0])
        ffn = decoder.transformer_ffn_layers[i]
        tgt = ffn.norm(tgt + ffn.linear2(torch.relu(ffn.linear1(tgt))))
        predictions.append(heads_out(tgt))
    return predictions, fully_blocked, partial


def make_masking_case(seed: int = 0):
    """A tiny decoder and inputs where some queries' masks are blocked everywhere and others partly.

    mask_features has one constant channel: a query's weight on it shifts its whole mask up or down, and a
    negative bias on that weight tips many queries below 0.5 everywhere (fully blocked rows) while others
    stay partly blocked or fully open.
    """
    torch.manual_seed(seed)
    decoder = MultiScaleMaskedTransformerDecoder(**{**TINY, "num_queries": 8}, dec_layers=4).eval()
    with torch.no_grad():
        decoder.mask_embed.layers[2].bias[0] -= 0.1
    features, mask_features = make_inputs(seed=seed)
    mask_features[:, 0] = 10.0
    return decoder, features, mask_features


def test_matches_reference_with_multihead_attention_and_boolean_masks():
    decoder, features, mask_features = make_masking_case()
    with torch.no_grad():
        reference, fully_blocked, partial = reference_decoder(decoder, features, mask_features)
        train_path = decoder(features, mask_features, return_aux=True)
        fast_path = decoder(features, mask_features, return_aux=False)
    assert fully_blocked > 0 and partial > 0, (fully_blocked, partial)
    ours = [(a["pred_logits"], a["pred_masks"]) for a in train_path["aux_outputs"]]
    ours.append((train_path["pred_logits"], train_path["pred_masks"]))
    assert len(ours) == len(reference)
    for (logits, masks), (ref_logits, ref_masks) in zip(ours, reference, strict=True):
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(masks, ref_masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_path["pred_logits"], reference[-1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_path["pred_masks"], reference[-1][1], atol=1e-5, rtol=0)


def test_masking_changes_the_result():
    # Guards the reference test against a decoder that ignores the mask: opening every pixel differs.
    decoder, features, mask_features = make_masking_case()
    with torch.no_grad():
        masked = decoder(features, mask_features, return_aux=False)["pred_logits"]
        opened = decoder(features, torch.zeros_like(mask_features) + 1e-3, return_aux=False)["pred_logits"]
        reference = reference_decoder(decoder, features, mask_features)[0][-1][0]
    assert (masked - opened).abs().max() > 1e-2
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dec_layers", [1, 4])
def test_fast_path_equals_training_path(dec_layers):
    torch.manual_seed(1)
    decoder = MultiScaleMaskedTransformerDecoder(**TINY, dec_layers=dec_layers)
    features, mask_features = make_inputs(seed=1)
    with torch.no_grad():
        train_path = decoder(features, mask_features, return_aux=True)
        fast_path = decoder(features, mask_features, return_aux=False)
    torch.testing.assert_close(fast_path["pred_logits"], train_path["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_path["pred_masks"], train_path["pred_masks"], atol=1e-5, rtol=0)


def test_gradients_flow_to_queries_and_every_layer():
    torch.manual_seed(2)
    decoder = MultiScaleMaskedTransformerDecoder(**TINY, dec_layers=3)
    features, mask_features = make_inputs(seed=2)
    mask_features.requires_grad_(True)
    out = decoder(features, mask_features, return_aux=True)
    loss = out["pred_logits"].square().mean() + out["pred_masks"].sigmoid().mean()
    for aux in out["aux_outputs"]:
        loss = loss + aux["pred_logits"].square().mean() + aux["pred_masks"].sigmoid().mean()
    loss.backward()
    for name, param in decoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert mask_features.grad.abs().sum() > 0


def test_half_precision_stays_finite():
    torch.manual_seed(3)
    decoder, features, mask_features = make_masking_case(seed=3)
    decoder = decoder.to(torch.bfloat16)
    out = decoder([f.bfloat16() for f in features], mask_features.bfloat16(), return_aux=False)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_masks"]).all()


def test_wrong_number_of_levels_is_a_clear_error():
    decoder = MultiScaleMaskedTransformerDecoder(**TINY, dec_layers=1)
    features, mask_features = make_inputs()
    with pytest.raises(ValueError, match="expected 3 multi-scale features"):
        decoder(features[:2], mask_features)


class _ExportWrapper(torch.nn.Module):
    """Flat tensor inputs and outputs, as an exported inference graph has."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, res5, res4, res3, mask_features):
        out = self.decoder([res5, res4, res3], mask_features, return_aux=False)
        return out["pred_logits"], out["pred_masks"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_path_exports_to_onnx_without_scatter_or_float64():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    from onnx import numpy_helper

    decoder, features, mask_features = make_masking_case()
    buffer = io.BytesIO()
    torch.onnx.export(
        _ExportWrapper(decoder), (*features, mask_features), buffer, opset_version=17, dynamo=False
    )
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert not {node.op_type for node in graph.node} & {"ScatterND", "ScatterElements", "NonZero"}
    constants = list(graph.initializer)
    constants += [attr.t for node in graph.node if node.op_type == "Constant" for attr in node.attribute]
    assert all(t.data_type != onnx.TensorProto.DOUBLE for t in constants)
    assert all(
        torch.isfinite(torch.from_numpy(numpy_helper.to_array(t).copy()).float()).all()
        for t in constants
        if t.data_type == onnx.TensorProto.FLOAT
    )

    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = [x.numpy() for x in (*features, mask_features)]
    logits, masks = session.run(None, dict(zip(names, arrays, strict=True)))
    with torch.no_grad():
        expected = decoder(features, mask_features, return_aux=False)
    torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(masks), expected["pred_masks"], atol=1e-5, rtol=0)
