"""Swin backbone: official key names, shapes, parameter counts, shifted-window masking, drop path, init."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mask2former.config import swin_backbone
from mask2former.modeling.backbone import SwinTransformer
from mask2former.modeling.backbone.swin import SwinTransformerBlock, shifted_window_mask
from mask2former.modeling.build import build_backbone

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_swin(**kwargs) -> SwinTransformer:
    config = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), window_size=7)
    return SwinTransformer(**{**config, **kwargs})


@pytest.fixture(scope="module")
def swin_t() -> SwinTransformer:
    """One Swin-T for the read-only checks (its init takes about a second)."""
    torch.manual_seed(0)
    return build_backbone(swin_backbone("t"))


def swin_parameter_count(embed_dim, depths, num_heads, window_size, patch_size=4, mlp_ratio=4) -> int:
    """Parameters of the Swin backbone counted from the architecture (weights, biases, bias tables)."""
    total = 3 * patch_size * patch_size * embed_dim + embed_dim + 2 * embed_dim  # proj + patch norm
    for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        c = embed_dim * 2**i
        hidden = mlp_ratio * c
        norms = 2 * c + 2 * c
        attention = (3 * c * c + 3 * c) + (c * c + c) + (2 * window_size - 1) ** 2 * heads
        mlp = (c * hidden + hidden) + (hidden * c + c)
        block = norms + attention + mlp
        total += depth * block + 2 * c  # blocks + output norm{i}
        if i < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # patch merging norm + reduction
    return total


def test_swin_tiny_keys_and_shapes_match_official(swin_t):
    expected = json.loads((FIXTURES / "backbone_swin_tiny_keys.json").read_text())["keys"]
    state = swin_t.state_dict()
    assert sorted(state) == sorted(expected)
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert state["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert not any(v.dtype == torch.float64 for v in state.values())


def test_swin_tiny_parameter_count(swin_t):
    # Swin-T ImageNet classifier: 28,288,354 params; minus head (769,000) and its final norm (1,536),
    # plus norm0..norm3 (2,880) = 27,520,698.
    expected = swin_parameter_count(96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert expected == 27_520_698
    assert sum(p.numel() for p in swin_t.parameters()) == expected


@pytest.mark.parametrize(
    "builder, embed_dim, depths, heads, window",
    [
        ("s", 96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
        ("b", 128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
        ("l", 192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
    ],
)
def test_larger_presets_structure(builder, embed_dim, depths, heads, window):
    with torch.device("meta"):  # no memory, no init cost
        model = build_backbone(swin_backbone(builder))
    assert model.out_channels == {f"res{i + 2}": embed_dim * 2**i for i in range(4)}
    assert [len(layer.blocks) for layer in model.layers] == list(depths)
    assert [layer.blocks[0].attn.num_heads for layer in model.layers] == list(heads)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert tuple(table.shape) == ((2 * window - 1) ** 2, heads[0])
    expected = swin_parameter_count(embed_dim, depths, heads, window)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.layers[3].downsample is None


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97), (17, 9), (224, 160), (3, 5)])
def test_output_shapes_strides_and_channels(height, width):
    model = tiny_swin().eval()
    assert model.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.out_channels == {"res2": 24, "res3": 48, "res4": 96, "res5": 192}
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert list(outputs) == ["res2", "res3", "res4", "res5"]
    size = (math.ceil(height / 4), math.ceil(width / 4))
    for name, feature in outputs.items():
        assert feature.shape == (2, model.out_channels[name], *size), name
        assert torch.isfinite(feature).all()
        size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))


def test_out_features_subset_keeps_all_output_norms():
    model = tiny_swin(out_features=("res3", "res5"), patch_norm=False)
    assert model.out_channels == {"res3": 48, "res5": 192}
    assert {f"norm{i}.weight" for i in range(4)} <= set(model.state_dict())
    assert not any(k.startswith("patch_embed.norm") for k in model.state_dict())
    assert list(model(torch.randn(1, 3, 32, 32))) == ["res3", "res5"]


def reference_block(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block computed as dense attention over the whole padded map with an explicit allowed-pair rule.

    Two tokens attend to each other iff they share a window of the grid shifted by `shift` and neither
    pair of coordinates wraps around the border differently: i.e. they are neighbours in the original
    image, not across the cyclic roll.
    """
    batch, height, width, channels = x.shape
    ws, shift, attn = block.window_size, block.shift_size, block.attn
    heads, head_dim = attn.num_heads, channels // attn.num_heads
    padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    tokens = F.pad(block.norm1(x), (0, 0, 0, padded_w - width, 0, padded_h - height))
    tokens = tokens.reshape(batch, -1, channels)

    rows = torch.arange(padded_h).repeat_interleave(padded_w)
    cols = torch.arange(padded_w).repeat(padded_h)
    rows_shifted, cols_shifted = (rows - shift) % padded_h, (cols - shift) % padded_w
    same_window = (rows_shifted[:, None] // ws == rows_shifted[None, :] // ws) & (
        cols_shifted[:, None] // ws == cols_shifted[None, :] // ws
    )
    same_side = ((rows[:, None] < shift) == (rows[None, :] < shift)) & (
        (cols[:, None] < shift) == (cols[None, :] < shift)
    )
    allowed = same_window & same_side
    delta_r = rows_shifted[:, None] % ws - rows_shifted[None, :] % ws + ws - 1
    delta_c = cols_shifted[:, None] % ws - cols_shifted[None, :] % ws + ws - 1
    bias = attn.relative_position_bias_table[delta_r * (2 * ws - 1) + delta_c].permute(2, 0, 1)  # (h, L, L)

    q, k, v = attn.qkv(tokens).reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim) + bias
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(batch, padded_h, padded_w, channels))
    x = x + out[:, :height, :width]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("height, width", [(8, 8), (10, 7), (5, 13)])
@pytest.mark.parametrize("shift", [0, 2])
def test_block_matches_dense_attention_with_explicit_window_rule(height, width, shift):
    torch.manual_seed(0)
    ws = 4
    block = SwinTransformerBlock(16, 2, ws, shift, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        x = torch.randn(2, height, width, 16)
        padded = (math.ceil(height / ws) * ws, math.ceil(width / ws) * ws)
        mask = shifted_window_mask(*padded, ws, ws // 2, x.device, x.dtype)
        assert torch.allclose(block(x, mask), reference_block(block, x), atol=1e-5, rtol=1e-5)


def test_shifted_block_mixes_no_tokens_across_regions():
    """d output / d input of a shifted block is zero (up to e^-100) between tokens of different regions."""
    torch.manual_seed(0)
    ws, shift, height, width = 4, 2, 10, 7
    block = SwinTransformerBlock(8, 2, ws, shift, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0).eval()
    mask = shifted_window_mask(12, 8, ws, shift, torch.device("cpu"), torch.float32)
    x = torch.randn(1, height, width, 8)
    jacobian = torch.autograd.functional.jacobian(lambda t: block(t, mask), x, vectorize=True)
    tokens = height * width
    influence = jacobian.reshape(tokens, 8, tokens, 8).abs().amax(dim=(1, 3))  # (output token, input token)

    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    window_r, window_c = ((rows - shift) % 12) // ws, ((cols - shift) % 8) // ws
    allowed = (
        (window_r[:, None] == window_r[None, :])
        & (window_c[:, None] == window_c[None, :])
        & ((rows[:, None] < shift) == (rows[None, :] < shift))
        & ((cols[:, None] < shift) == (cols[None, :] < shift))
    )
    assert influence[~allowed].max().item() < 1e-20
    assert (influence[allowed] > 0).all()
    # Top-left corner tokens sit in the last shifted window with the bottom/right ones, yet see none of them.
    assert not allowed[0, (height - 1) * width + width - 1]


def test_patch_merging_concatenates_2x2_neighbours_in_official_order():
    merging = tiny_swin().layers[0].downsample
    seen = {}
    merging.norm.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    position = (rows * 10 + cols)[None, :, :, None].expand(1, 5, 7, 24)  # channel value = 10 * row + col
    merged = merging(position)
    assert merged.shape == (1, 3, 4, 48)
    concat = seen["x"][0, 1, 2, ::24]  # output cell (1, 2): rows 2-3, cols 4-5
    assert concat.tolist() == [24.0, 34.0, 25.0, 35.0]  # (even, even), (odd, even), (even, odd), (odd, odd)
    assert seen["x"][0, 2, 3, ::24].tolist() == [46.0, 0.0, 0.0, 0.0]  # zero padding at the odd border


def test_shifted_window_mask_values():
    mask = shifted_window_mask(8, 8, 4, 2, torch.device("cpu"), torch.float32)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window never wraps
    assert (mask[3] == 0).sum() == 4 * 4 * 4  # the corner window holds four 2x2 regions


def test_drop_path_rates_rise_linearly_and_are_off_in_eval():
    torch.manual_seed(0)
    model = tiny_swin(drop_path_rate=0.5)
    rates = [block.drop_path.drop_prob for layer in model.layers for block in layer.blocks]
    assert rates == pytest.approx([0.5 * i / 4 for i in range(5)])
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert all(torch.equal(first[k], second[k]) for k in first)
    model.train()
    with torch.no_grad():
        trained = model(x)
    assert not all(torch.equal(first[k], trained[k]) for k in first)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    model = tiny_swin(drop_path_rate=0.5).train()
    drop_path = model.layers[3].blocks[0].drop_path  # rate 0.5
    x = torch.ones(64, 3, 5, 8)
    out = drop_path(x)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2.0).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_init(swin_t):
    model = swin_t
    qkv = model.layers[2].blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (qkv.bias == 0).all() and (model.layers[0].blocks[0].mlp.fc1.bias == 0).all()
    table = model.layers[2].blocks[0].attn.relative_position_bias_table
    assert table.std().item() == pytest.approx(0.02, rel=0.1)
    for name, value in model.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            assert (value == 1).all(), name
        if "norm" in name and name.endswith("bias"):
            assert (value == 0).all(), name


def test_relative_position_index(swin_t):
    index = swin_t.layers[0].blocks[0].attn.relative_position_index
    ws = 7
    assert index.shape == (ws * ws, ws * ws)
    assert (index.diagonal() == (ws - 1) * (2 * ws - 1) + ws - 1).all()  # zero offset: table centre
    # query (0, 0), key (6, 6): offset (-6, -6) -> entry 0; the reverse pair -> the last entry.
    assert index[0, ws * ws - 1] == 0 and index[ws * ws - 1, 0] == (2 * ws - 1) ** 2 - 1


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = tiny_swin().train()
    outputs = model(torch.randn(2, 3, 33, 47))
    sum(o.square().mean() for o in outputs.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_build_backbone_from_its_config():
    with torch.device("meta"):
        model = build_backbone(dataclasses.replace(swin_backbone("b"), window_size=7))
    assert model.layers[0].blocks[0].window_size == 7
    with pytest.raises(ValueError, match="unknown backbone kind"):
        build_backbone(dataclasses.replace(swin_backbone("b"), kind="vit"))


def test_onnx_export_with_dynamic_size_matches_eager(tmp_path):
    """Padding, shift masks and merging come from shape ops, so one export serves every input size."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = tiny_swin().eval()
    path = tmp_path / "swin.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 64, 96),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=list(model.out_features),
        dynamic_axes={"image": {2: "height", 3: "width"}},
        opset_version=17,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in [(64, 96), (65, 97), (33, 47)]:
        image = torch.randn(1, 3, height, width)
        with torch.no_grad():
            expected = model(image)
        outputs = session.run(None, {"image": image.numpy()})
        for name, value in zip(model.out_features, outputs, strict=True):
            assert torch.allclose(torch.from_numpy(value), expected[name], atol=1e-4), (name, height, width)
