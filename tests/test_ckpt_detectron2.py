"""Official detectron2 checkpoints: key layout, reading (.pkl of numpy, .pth), inference of the
architecture, legacy names, strict errors, export back and bit-exact round trips.

The fixtures tests/fixtures/official_keys_<preset>.json list the state-dict names and shapes of the official
model (detectron2 ResNet / Mask2Former's D2SwinTransformer + MSDeformAttnPixelDecoder +
MultiScaleMaskedTransformerDecoder + SetCriterion). `official_keys` below derives them from the official
module structure (not from our model); `python tests/test_ckpt_detectron2.py` rewrites the files.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mask2former
from mask2former.checkpoints.convert import build_and_load, convert_to_ours, read_any_checkpoint
from mask2former.checkpoints.detectron2 import write_official
from mask2former.checkpoints.io import CheckpointError, load_state_dict_strict, save_checkpoint
from mask2former.checkpoints.safe_pickle import load_pickled
from mask2former.config import BackboneConfig, ModelConfig, get_preset
from mask2former.modeling.build import build_model

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_PRESETS = ("coco-panoptic-r50", "coco-panoptic-swin-t")

# ----------------------------------------------------------------------------------------------------
# The official module structure, written out. Names are those of state_dict() of the official MaskFormer
# meta-architecture; shapes follow each module's constructor.


def _norm(prefix: str, channels: int, frozen_bn: bool = False) -> dict[str, list[int]]:
    names = ("weight", "bias", "running_mean", "running_var") if frozen_bn else ("weight", "bias")
    return {f"{prefix}.{name}": [channels] for name in names}


def _linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, list[int]]:
    keys = {f"{prefix}.weight": [out_features, in_features]}
    if bias:
        keys[f"{prefix}.bias"] = [out_features]
    return keys


def official_resnet(depths=(3, 4, 6, 3), stem=64, res2=256) -> dict[str, list[int]]:
    """detectron2 build_resnet_backbone, BottleneckBlock, FrozenBN (MODEL.RESNETS defaults), FREEZE_AT 0."""
    keys = {"backbone.stem.conv1.weight": [stem, 3, 7, 7], **_norm("backbone.stem.conv1.norm", stem, True)}
    in_channels = stem
    for index, blocks in enumerate(depths):
        out_channels, bottleneck = res2 * 2**index, res2 * 2**index // 4
        for b in range(blocks):
            prefix = f"backbone.res{index + 2}.{b}"
            if in_channels != out_channels:  # detectron2: projection shortcut where channels change
                keys[f"{prefix}.shortcut.weight"] = [out_channels, in_channels, 1, 1]
                keys.update(_norm(f"{prefix}.shortcut.norm", out_channels, True))
            convs = [(bottleneck, in_channels, 1), (bottleneck, bottleneck, 3), (out_channels, bottleneck, 1)]
            for n, (out_c, in_c, k) in enumerate(convs, start=1):
                keys[f"{prefix}.conv{n}.weight"] = [out_c, in_c, k, k]
                keys.update(_norm(f"{prefix}.conv{n}.norm", out_c, True))
            in_channels = out_channels
    return keys


def official_swin(embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7) -> dict[str, list[int]]:
    """Mask2Former's D2SwinTransformer: patch 4, mlp ratio 4, qkv bias, no APE, patch norm, norm0..norm3."""
    keys = {"backbone.patch_embed.proj.weight": [embed, 3, 4, 4], "backbone.patch_embed.proj.bias": [embed]}
    keys.update(_norm("backbone.patch_embed.norm", embed))
    for i, (depth, num_heads) in enumerate(zip(depths, heads, strict=True)):
        dim = embed * 2**i
        for j in range(depth):
            block = f"backbone.layers.{i}.blocks.{j}"
            keys.update(_norm(f"{block}.norm1", dim))
            keys[f"{block}.attn.relative_position_bias_table"] = [(2 * window - 1) ** 2, num_heads]
            keys[f"{block}.attn.relative_position_index"] = [window * window, window * window]  # a buffer
            keys.update(_linear(f"{block}.attn.qkv", 3 * dim, dim))
            keys.update(_linear(f"{block}.attn.proj", dim, dim))
            keys.update(_norm(f"{block}.norm2", dim))
            keys.update(_linear(f"{block}.mlp.fc1", 4 * dim, dim))
            keys.update(_linear(f"{block}.mlp.fc2", dim, 4 * dim))
        if i < len(depths) - 1:  # PatchMerging
            keys.update(_linear(f"backbone.layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False))
            keys.update(_norm(f"backbone.layers.{i}.downsample.norm", 4 * dim))
    for i in range(len(depths)):
        keys.update(_norm(f"backbone.norm{i}", embed * 2**i))
    return keys


def official_head(
    channels: tuple[int, int, int, int],
    num_classes: int,
    conv_dim=256,
    mask_dim=256,
    enc_layers=6,
    heads=8,
    points=4,
    hidden=256,
    queries=100,
    dec_ffn=2048,
    dec_layers=9,
) -> dict[str, list[int]]:
    """sem_seg_head (MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder) and the criterion."""
    pd, pred, levels = "sem_seg_head.pixel_decoder", "sem_seg_head.predictor", 3
    keys: dict[str, list[int]] = {}
    for i, in_channels in enumerate(reversed(channels[1:])):  # res5, res4, res3
        keys[f"{pd}.input_proj.{i}.0.weight"] = [conv_dim, in_channels, 1, 1]
        keys[f"{pd}.input_proj.{i}.0.bias"] = [conv_dim]
        keys.update(_norm(f"{pd}.input_proj.{i}.1", conv_dim))  # GroupNorm(32)
    keys[f"{pd}.transformer.level_embed"] = [levels, conv_dim]
    for layer in range(enc_layers):
        prefix = f"{pd}.transformer.encoder.layers.{layer}"
        keys.update(_linear(f"{prefix}.self_attn.sampling_offsets", heads * levels * points * 2, conv_dim))
        keys.update(_linear(f"{prefix}.self_attn.attention_weights", heads * levels * points, conv_dim))
        keys.update(_linear(f"{prefix}.self_attn.value_proj", conv_dim, conv_dim))
        keys.update(_linear(f"{prefix}.self_attn.output_proj", conv_dim, conv_dim))
        keys.update(_norm(f"{prefix}.norm1", conv_dim))
        keys.update(_linear(f"{prefix}.linear1", 1024, conv_dim))  # hard-coded 1024 in the official decoder
        keys.update(_linear(f"{prefix}.linear2", conv_dim, 1024))
        keys.update(_norm(f"{prefix}.norm2", conv_dim))
    keys[f"{pd}.mask_features.weight"] = [mask_dim, conv_dim, 1, 1]
    keys[f"{pd}.mask_features.bias"] = [mask_dim]
    keys[f"{pd}.adapter_1.weight"] = [conv_dim, channels[0], 1, 1]  # no bias: followed by GroupNorm
    keys.update(_norm(f"{pd}.adapter_1.norm", conv_dim))
    keys[f"{pd}.layer_1.weight"] = [conv_dim, conv_dim, 3, 3]
    keys.update(_norm(f"{pd}.layer_1.norm", conv_dim))
    for i in range(dec_layers):
        for kind, attn in (("self", "self_attn"), ("cross", "multihead_attn")):
            prefix = f"{pred}.transformer_{kind}_attention_layers.{i}"
            keys[f"{prefix}.{attn}.in_proj_weight"] = [3 * hidden, hidden]
            keys[f"{prefix}.{attn}.in_proj_bias"] = [3 * hidden]
            keys.update(_linear(f"{prefix}.{attn}.out_proj", hidden, hidden))
            keys.update(_norm(f"{prefix}.norm", hidden))
        keys.update(_linear(f"{pred}.transformer_ffn_layers.{i}.linear1", dec_ffn, hidden))
        keys.update(_linear(f"{pred}.transformer_ffn_layers.{i}.linear2", hidden, dec_ffn))
        keys.update(_norm(f"{pred}.transformer_ffn_layers.{i}.norm", hidden))
    keys.update(_norm(f"{pred}.decoder_norm", hidden))
    keys[f"{pred}.query_feat.weight"] = [queries, hidden]
    keys[f"{pred}.query_embed.weight"] = [queries, hidden]
    keys[f"{pred}.level_embed.weight"] = [levels, hidden]
    # input_proj: empty nn.Sequential() per level when the pixel decoder already gives `hidden` channels
    keys.update(_linear(f"{pred}.class_embed", num_classes + 1, hidden))
    for k in range(3):
        keys.update(_linear(f"{pred}.mask_embed.layers.{k}", mask_dim if k == 2 else hidden, hidden))
    keys["criterion.empty_weight"] = [num_classes + 1]  # SetCriterion's persistent buffer
    return keys


def official_keys(preset: str) -> dict[str, list[int]]:
    if preset == "coco-panoptic-r50":
        return {**official_resnet(), **official_head((256, 512, 1024, 2048), num_classes=133)}
    if preset == "coco-panoptic-swin-t":
        return {**official_swin(), **official_head((96, 192, 384, 768), num_classes=133)}
    raise ValueError(preset)


def fixture_path(preset: str) -> Path:
    return FIXTURES / f"official_keys_{preset}.json"


def write_fixtures() -> None:
    for preset in OFFICIAL_PRESETS:
        document = {
            "source": "state_dict() names and shapes of the official Mask2Former model (detectron2 "
            "MaskFormer meta-architecture) for this preset, derived from the official module structure "
            "by tests/test_ckpt_detectron2.py::official_keys",
            "preset": preset,
            "keys": official_keys(preset),
        }
        fixture_path(preset).write_text(json.dumps(document, indent=1) + "\n")


def read_fixture(preset: str) -> dict[str, list[int]]:
    return json.loads(fixture_path(preset).read_text())["keys"]


# ----------------------------------------------------------------------------------------------------
# Full-size presets are built once per session.


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, dict]:
    """Per preset: random weights with the fixture's names and shapes, written as .pkl (numpy) and .pth."""
    out = {}
    for seed, preset in enumerate(OFFICIAL_PRESETS):
        rng = np.random.default_rng(seed)
        weights = {}
        for name, shape in read_fixture(preset).items():
            if name.endswith("relative_position_index"):  # an integer buffer, as the official one
                window = int(round(shape[0] ** 0.5))
                weights[name] = _official_relative_position_index(window)
            else:
                weights[name] = rng.standard_normal(shape, dtype=np.float32)
        folder = tmp_path_factory.mktemp(preset)
        with open(folder / "model_final.pkl", "wb") as handle:
            pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, handle)
        torch.save(
            {"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, folder / "model_final.pth"
        )
        out[preset] = {
            "weights": weights,
            "pkl": folder / "model_final.pkl",
            "pth": folder / "model_final.pth",
        }
    return out


def _official_relative_position_index(window: int) -> np.ndarray:
    """The official WindowAttention buffer: (dy + w - 1) * (2w - 1) + (dx + w - 1) per token pair."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (relative[..., 0] * (2 * window - 1) + relative[..., 1]).astype(np.int64)


@pytest.fixture(scope="module")
def preset_models() -> dict[str, torch.nn.Module]:
    return {preset: build_model(get_preset(preset)).eval() for preset in OFFICIAL_PRESETS}


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", OFFICIAL_PRESETS)
def test_fixture_is_the_official_structure(preset):
    assert read_fixture(preset) == official_keys(preset)


@pytest.mark.parametrize("preset", OFFICIAL_PRESETS)
def test_our_model_has_exactly_the_official_keys(preset, preset_models):
    ours = {k: list(v.shape) for k, v in preset_models[preset].state_dict().items()}
    official = read_fixture(preset)
    del official["criterion.empty_weight"]  # the loss lives outside our nn.Module
    assert ours == official


@pytest.mark.parametrize("preset", OFFICIAL_PRESETS)
@pytest.mark.parametrize("suffix", ["pkl", "pth"])
def test_official_checkpoint_loads_with_inferred_architecture(preset, suffix, official_files, preset_models):
    files = official_files[preset]
    converted = convert_to_ours(files[suffix])
    expected = get_preset(preset)
    # Without --preset: architecture from the shapes, names from the preset with 133 classes.
    assert converted.config == expected
    assert converted.warnings == []
    assert any("criterion.empty_weight" in note for note in converted.notes)
    model = preset_models[preset]
    load_state_dict_strict(model, converted.state_dict, str(files[suffix]))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, torch.from_numpy(files["weights"][name])), name


@pytest.mark.parametrize("preset", OFFICIAL_PRESETS)
@pytest.mark.parametrize("suffix", ["pkl", "pth"])
def test_export_writes_the_official_layout(preset, suffix, preset_models, tmp_path):
    model, config = preset_models[preset], get_preset(preset)
    path = write_official(model.state_dict(), config, tmp_path / f"model.{suffix}")
    stored = load_pickled(path)
    assert stored["__author__"] == "mask2former" and set(stored) == {"model", "__author__"}
    kind = np.ndarray if suffix == "pkl" else torch.Tensor
    assert all(isinstance(v, kind) for v in stored["model"].values())
    assert {k: list(v.shape) for k, v in stored["model"].items()} == read_fixture(preset)
    empty_weight = np.asarray(stored["model"]["criterion.empty_weight"])
    assert empty_weight[-1] == np.float32(0.1) and (empty_weight[:-1] == 1).all()


def tiny_swin_config() -> ModelConfig:
    config = get_preset("synth-tiny")
    config.backbone = BackboneConfig(kind="swin", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    return config


@pytest.mark.parametrize("make_config", [lambda: get_preset("synth-tiny"), tiny_swin_config])
@pytest.mark.parametrize("suffix", ["pkl", "pth"])
def test_round_trip_ours_detectron2_ours_is_bit_exact(make_config, suffix, tmp_path):
    config = make_config()
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    path = write_official(state, config, tmp_path / f"model.{suffix}")
    read_config, read_state = read_any_checkpoint(path)
    assert set(read_state) == set(state)
    for name, tensor in state.items():
        assert read_state[name].dtype == tensor.dtype and torch.equal(read_state[name], tensor), name
    # 9 classes: the synth-tiny preset supplies names and the sizes no shape shows (GroupNorm 8 groups)
    assert read_config.pixel_decoder == config.pixel_decoder and read_config.decoder == config.decoder
    assert read_config.class_names == config.class_names


def test_mask2former_load_accepts_a_detectron2_file(tmp_path):
    config = get_preset("synth-tiny")
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = write_official(model.state_dict(), config, tmp_path / "model_final.pkl")
    predictor = mask2former.load(path)
    assert predictor.config.name == "synth-tiny"
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    assert predictor.predict(image, task="semantic") is not None


def _tiny_official(tmp_path, edit) -> Path:
    config = get_preset("synth-tiny")
    torch.manual_seed(0)
    weights = {k: v.numpy() for k, v in build_model(config).state_dict().items()}
    edit(weights)
    path = tmp_path / "edited.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": weights, "__author__": "test"}, handle)
    return path


def test_legacy_names_and_non_weights_are_handled_knowingly(tmp_path):
    def edit(weights):
        weights["sem_seg_head.predictor.static_query.weight"] = weights.pop(
            "sem_seg_head.predictor.query_feat.weight"
        )
        weights["pixel_mean"] = np.zeros((3, 1, 1), np.float32)
        weights["pixel_std"] = np.ones((3, 1, 1), np.float32)
        weights["criterion.empty_weight"] = np.ones(10, np.float32)
        weights["backbone.stem.conv1.norm.num_batches_tracked"] = np.array(0)

    path = _tiny_official(tmp_path, edit)
    converted = convert_to_ours(path)
    assert "sem_seg_head.predictor.query_feat.weight" in converted.state_dict
    assert not {"pixel_mean", "pixel_std", "criterion.empty_weight"} & set(converted.state_dict)
    assert any("static_query" in note for note in converted.notes)
    build_and_load(converted.config, converted.state_dict, str(path))


def test_module_prefix_of_ddp_checkpoints_is_stripped(tmp_path):
    def edit(weights):
        for key in list(weights):
            weights[f"module.{key}"] = weights.pop(key)

    converted = convert_to_ours(_tiny_official(tmp_path, edit))
    assert all(not key.startswith("module.") for key in converted.state_dict)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda w: w.pop("sem_seg_head.pixel_decoder.mask_features.bias"), "missing 1 keys"),
        (lambda w: w.update({"sem_seg_head.extra.weight": np.zeros(3, np.float32)}), "unexpected 1 keys"),
        (
            lambda w: w.update({"sem_seg_head.pixel_decoder.mask_features.bias": np.zeros(5, np.float32)}),
            "1 shape mismatches: sem_seg_head.pixel_decoder.mask_features.bias (5,)",
        ),
    ],
)
def test_strict_loading_names_the_file_and_keys(tmp_path, edit, expected):
    path = _tiny_official(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        mask2former.api.load_model(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda w: w.pop("backbone.stem.conv1.weight"), "no ResNet"),
        (
            lambda w: w.pop("sem_seg_head.predictor.class_embed.weight"),
            "no sem_seg_head.predictor.class_embed",
        ),
        (lambda w: w.update({"backbone.res3.0.conv3.weight": np.zeros((48, 16, 1, 1), np.float32)}), "res3"),
    ],
)
def test_unrepresentable_or_foreign_weights_are_refused(tmp_path, edit, expected):
    path = _tiny_official(tmp_path, edit)
    with pytest.raises(CheckpointError, match=expected):
        convert_to_ours(path)


def test_swin_with_absolute_position_embedding_is_refused(tmp_path):
    config = tiny_swin_config()
    state = build_model(config).state_dict()
    state["backbone.absolute_pos_embed"] = torch.zeros(1, 16, 56, 56)
    path = write_official(state, config, tmp_path / "ape.pth")
    with pytest.raises(CheckpointError, match="absolute position"):
        convert_to_ours(path)


def test_preset_supplies_sizes_not_visible_in_shapes(tmp_path):
    # GroupNorm's group count, the decoder's head count and how heads x points split leave no trace in any
    # shape. A head no preset has gets the official values (and a note); --preset supplies the real ones.
    config = get_preset("synth-tiny")
    config.pixel_decoder.ffn_dim = 96  # no longer the synth-tiny head
    path = write_official(build_model(config).state_dict(), config, tmp_path / "model.pkl")
    guessed = convert_to_ours(path)
    assert guessed.config.pixel_decoder.num_groups == 32 and guessed.config.decoder.num_heads == 4
    assert any("name a preset" in note for note in guessed.notes)
    told = convert_to_ours(path, preset="synth-tiny")
    assert told.config.pixel_decoder == config.pixel_decoder and told.config.decoder == config.decoder


def test_our_own_folder_passes_through(tmp_path):
    config = get_preset("synth-tiny")
    state = build_model(config).state_dict()
    converted = convert_to_ours(save_checkpoint(state, config, tmp_path / "ours"))
    assert converted.source_format == "ours" and converted.config == config


if __name__ == "__main__":
    write_fixtures()
    sys.exit(0)
