"""MSDeformAttnPixelDecoder: official parameter names and shapes, output shapes on odd input sizes, float32
under autocast, reference points, FPN ordering, the gather path against the grid_sample reference end to
end, and a traced graph that follows the input size."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from mask2former.modeling import deform_attn
from mask2former.modeling.pixel_decoder import MSDeformAttnPixelDecoder, encoder_reference_points

R50_CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
TINY_CHANNELS = {"res2": 8, "res3": 16, "res4": 24, "res5": 32}


def tiny_decoder(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(conv_dim=32, mask_dim=16, num_encoder_layers=2, num_heads=4, ffn_dim=64, num_groups=8)
    args.update(overrides)
    return MSDeformAttnPixelDecoder(TINY_CHANNELS, **args).eval()


def backbone_features(height, width, channels=TINY_CHANNELS, batch=1, seed=0):
    """Features as a stride-2**k backbone gives them: each stage halves with ceil (padding 'same')."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, c, math.ceil(height / 2**k), math.ceil(width / 2**k), generator=gen)
        for (name, c), k in zip(channels.items(), range(2, 6), strict=True)
    }


def official_key_shapes(d=256, ffn=1024, heads=8, levels=3, points=4, mask_dim=256, layers=6):
    """Parameter names of the official MSDeformAttnPixelDecoder (relative to it), written out by hand
    from its module structure, with the shapes of an R50 model."""
    keys = {}
    for i, c in enumerate((2048, 1024, 512)):  # res5, res4, res3
        keys[f"input_proj.{i}.0.weight"] = (d, c, 1, 1)
        keys[f"input_proj.{i}.0.bias"] = (d,)
        keys[f"input_proj.{i}.1.weight"] = (d,)
        keys[f"input_proj.{i}.1.bias"] = (d,)
    keys["transformer.level_embed"] = (levels, d)
    for n in range(layers):
        layer = f"transformer.encoder.layers.{n}"
        for name, out in (
            ("self_attn.sampling_offsets", heads * levels * points * 2),
            ("self_attn.attention_weights", heads * levels * points),
            ("self_attn.value_proj", d),
            ("self_attn.output_proj", d),
            ("linear1", ffn),
        ):
            keys[f"{layer}.{name}.weight"] = (out, d)
            keys[f"{layer}.{name}.bias"] = (out,)
        keys[f"{layer}.linear2.weight"] = (d, ffn)
        keys[f"{layer}.linear2.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            keys[f"{layer}.{norm}.weight"] = (d,)
            keys[f"{layer}.{norm}.bias"] = (d,)
    keys["mask_features.weight"] = (mask_dim, d, 1, 1)
    keys["mask_features.bias"] = (mask_dim,)
    keys["adapter_1.weight"] = (d, 256, 1, 1)  # from res2, no bias (GroupNorm follows)
    keys["adapter_1.norm.weight"] = (d,)
    keys["adapter_1.norm.bias"] = (d,)
    keys["layer_1.weight"] = (d, d, 3, 3)
    keys["layer_1.norm.weight"] = (d,)
    keys["layer_1.norm.bias"] = (d,)
    return keys


def test_state_dict_matches_official_names_and_shapes():
    decoder = MSDeformAttnPixelDecoder(R50_CHANNELS)
    got = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    assert got == official_key_shapes()
    # GroupNorm(32) everywhere in the official decoder
    assert decoder.input_proj[0][1].num_groups == 32 and decoder.layer_1.norm.num_groups == 32


def test_small_widths_keep_the_names():
    decoder = tiny_decoder(num_encoder_layers=6)
    assert set(decoder.state_dict()) == set(official_key_shapes())
    assert decoder.adapter_1.norm.num_groups == 8


def test_init():
    decoder = tiny_decoder()
    for proj in decoder.input_proj:
        conv = proj[0]
        bound = math.sqrt(6 / (conv.in_channels + conv.out_channels))  # xavier uniform, gain 1
        assert not conv.bias.any() and conv.weight.abs().max() <= bound and conv.weight.std() > bound / 3
    assert not decoder.mask_features.bias.any()
    assert decoder.transformer.level_embed.std() > 0.5  # normal(0, 1), not the blanket xavier
    layer = decoder.transformer.encoder.layers[0]
    assert not layer.self_attn.sampling_offsets.weight.any()  # the attention's own init survives
    assert layer.self_attn.sampling_offsets.bias.abs().max() == 4  # num_points steps along the ring


@pytest.mark.parametrize("height,width", [(64, 96), (70, 90)])
def test_output_shapes_on_odd_sizes(height, width):
    decoder = tiny_decoder()
    features = backbone_features(height, width, batch=2)
    with torch.no_grad():
        mask_features, multi_scale = decoder(features)
    assert mask_features.shape == (2, 16, *features["res2"].shape[-2:])
    assert [tuple(x.shape) for x in multi_scale] == [
        (2, 32, *features[name].shape[-2:]) for name in ("res5", "res4", "res3")
    ]
    assert mask_features.dtype == torch.float32 and all(x.dtype == torch.float32 for x in multi_scale)


def test_autocast_bfloat16_runs_in_float32():
    decoder = tiny_decoder()
    # Under autocast the backbone hands over bfloat16 features; the decoder casts them up.
    features = {name: x.bfloat16() for name, x in backbone_features(64, 96).items()}
    with torch.no_grad():
        plain_mask, plain_scales = decoder({name: x.float() for name, x in features.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask, scales = decoder(features)
    assert mask.dtype == torch.float32 and all(x.dtype == torch.float32 for x in scales)
    torch.testing.assert_close(mask, plain_mask, rtol=0, atol=1e-6)
    for got, expected in zip(scales, plain_scales, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_reference_points_are_pixel_centres_like_the_official_linspace():
    shapes = [(2, 3), (5, 7)]
    points = encoder_reference_points(shapes, batch=2, device=torch.device("cpu"))
    assert points.shape == (2, 6 + 35, 2, 2) and points.dtype == torch.float32
    expected = []
    for h, w in shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h) / h, torch.linspace(0.5, w - 0.5, w) / w, indexing="ij"
        )
        expected.append(torch.stack((ref_x.flatten(), ref_y.flatten()), -1))
    expected = torch.cat(expected)
    for level in range(2):  # valid ratios 1: the same point on every level
        torch.testing.assert_close(points[1, :, level], expected)


def test_fpn_order_matches_official_with_two_fpn_levels():
    # Encoder on res4, res5 only: two FPN steps, adapter_1 on res2 (the finest), adapter_2 on res3.
    decoder = tiny_decoder(transformer_in_features=("res4", "res5"))
    assert decoder.adapter_1.weight.shape[1] == TINY_CHANNELS["res2"]
    assert decoder.adapter_2.weight.shape[1] == TINY_CHANNELS["res3"]
    assert len(decoder.input_proj) == 2 and decoder.transformer.level_embed.shape == (2, 32)
    features = backbone_features(70, 90)
    with torch.no_grad():
        mask_features, multi_scale = decoder(features)
    assert mask_features.shape[-2:] == features["res2"].shape[-2:]
    # three scales always: res5, res4 from the encoder, res3 from the first FPN step
    assert [x.shape[-2:] for x in multi_scale] == [features[n].shape[-2:] for n in ("res5", "res4", "res3")]


def test_gather_path_equals_grid_sample_reference_end_to_end(monkeypatch):
    decoder = tiny_decoder()
    features = backbone_features(70, 90, batch=2)
    with torch.no_grad():
        fast_mask, fast_scales = decoder(features)
        monkeypatch.setattr(deform_attn, "ms_deform_attn", deform_attn.ms_deform_attn_reference)
        ref_mask, ref_scales = decoder(features)
    torch.testing.assert_close(fast_mask, ref_mask, rtol=0, atol=1e-4)
    for got, expected in zip(fast_scales, ref_scales, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


class _Positional(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, res2, res3, res4, res5):
        mask_features, multi_scale = self.decoder({"res2": res2, "res3": res3, "res4": res4, "res5": res5})
        return mask_features, multi_scale[0]


def test_traced_decoder_follows_the_input_size_and_has_no_float64():
    model = _Positional(tiny_decoder(num_encoder_layers=1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, tuple(backbone_features(64, 96).values()))
        other = tuple(backbone_features(70, 90, seed=1).values())
        got, expected = traced(*other), model(*other)
    # python float scalars trace as 0-dim Double constants; a float64 tensor would print its sizes
    assert not re.search(r"Double\(\d", str(traced.inlined_graph))
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
