"""Hugging Face transformers checkpoints: parity with transformers as an independent implementation,
export that `from_pretrained` loads, bit-exact round trips, and configs our model cannot represent.

The reference models are random-initialised `Mask2FormerForUniversalSegmentation`s built offline (tiny
ResNet-50-style and Swin-T-style backbones), their weights perturbed so that every tensor matters (HF's
init zeroes the deformable sampling offsets and attention weights and gives BatchNorm near-zero scales).

What is compared: the raw outputs (class logits, mask logits at 1/4 resolution, and every auxiliary pair),
not post-processed segmentations: HF's post-processing diverges from the official one (SPEC.md section 3:
it resizes logits to 384x384 first, thresholds score*prob at 0.5 instead of prob at 0.8, skips the AND
with mask prob >= 0.5, lets fused stuff ids collide, ignores mask_threshold for instances, pads targets
with ignore_index), so only the network itself can agree.

Where HF's architecture differs from the official one, and what that means here:
- ResNet: HF's ResNetBackbone uses BatchNorm2d (identical to FrozenBatchNorm in eval mode, tested with
  non-trivial running statistics) and places the stride in the 3x3 conv unless downsample_in_bottleneck
  (then in the first 1x1 conv, as torchvision v1 / detectron2 STRIDE_IN_1X1=True): that variant cannot be
  represented by our ResNet and is refused. HF projects the shortcut when the stride is 2 or the channels
  change; detectron2 when the channels change: the same blocks for widths that double per stage.
- Swin: HF splits qkv into query/key/value and (transformers >= 5) names them q_proj/k_proj/v_proj/o_proj
  in memory while save_pretrained writes the 4.x names; SwinLayer shrinks the window to the feature size
  when the map is smaller than the window, but SwinBackbone passes always_partition=True, so the backbone
  pads like the official code (checked here: the 1/32 map of a 64x96 input is 2x3 < window 7).
- Decoder: HF's `decoder_layers` counts DEC_LAYERS (layers + 1); one `num_attention_heads` serves the
  pixel decoder and the transformer decoder; GroupNorm groups (32) and sampling points (4) are hard-coded;
  the encoder's reference points come from linspace instead of arange (rounding-level differences).
- Masked attention: HF and official use -inf (boolean masks), ours a finite -1e4 bias: identical in fp32
  since exp(-1e4) underflows to 0; rows with every pixel blocked are opened in all three.
- Same as official, checked by these tests: HF's mask predictor works on the LayerNorm-ed queries and
  builds the next layer's attention mask at level (i + 1) % 3; `masks_queries_logits` are at 1/4 of the
  input (like our pred_masks); the sine position embedding is normalised (scale 2 pi, 10000) in both
  decoders; `num_queries` maps one to one (queries_features = query_feat, queries_embedder = query_embed).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    SwinConfig,
)

import mask2former  # noqa: E402
from mask2former.checkpoints.convert import (  # noqa: E402
    build_and_load,
    convert_to_ours,
    read_any_checkpoint,
    write_checkpoint,
)
from mask2former.checkpoints.huggingface import key_mapping  # noqa: E402
from mask2former.checkpoints.io import DERIVED_BUFFER_SUFFIXES, CheckpointError  # noqa: E402
from mask2former.config import get_preset  # noqa: E402
from mask2former.modeling.build import build_model  # noqa: E402

STAGES = ["stage1", "stage2", "stage3", "stage4"]
RELATIVE_TOLERANCE = 1e-4  # max abs diff <= 1e-4 x max(1, largest magnitude of the reference), fp32
SYNTH_NAMES = get_preset("synth-tiny").class_names


def hf_config(kind: str) -> Mask2FormerConfig:
    """Tiny, with non-default class and query counts; decoder_layers=5 -> 4 layers (levels 0, 1, 2, 0)."""
    if kind == "resnet":  # ResNet-50 style (bottleneck, stride in the 3x3), reduced depths and widths
        backbone = ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1], out_features=STAGES
        )
        # 9 classes named as the synth dataset: the metadata then comes from the synth-tiny preset
        sizes = dict(hidden_dim=64, num_queries=7, id2label=dict(enumerate(SYNTH_NAMES)))
    else:  # Swin-T style (window 7, 2 blocks per stage so shifted windows run), reduced widths
        backbone = SwinConfig(
            embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 6], window_size=7, out_features=STAGES
        )
        sizes = dict(hidden_dim=32, num_queries=11, num_labels=13)  # hidden != feature size: input_proj
    return Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=64,
        mask_feature_size=64,
        encoder_feedforward_dim=128,
        encoder_layers=2,
        decoder_layers=5,
        num_attention_heads=4,
        dim_feedforward=96,
        **sizes,
    )


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or name == "criterion.empty_weight":
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        else:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict:
    """Per backbone kind: (HF model in eval mode, its save_pretrained folder)."""
    out = {}
    for seed, kind in enumerate(("resnet", "swin")):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(hf_config(kind)).eval()
        perturb(model, seed)
        folder = tmp_path_factory.mktemp(f"hf-{kind}")
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


def images(seed: int = 0) -> torch.Tensor:
    """Batch 2, non-square 64x96 (multiples of 32), already normalised."""
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output_pairs(ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor) -> list:
    """[(name, our tensor, HF tensor)] for the final and every auxiliary prediction."""
    out = ours(x, return_aux=True)
    ref = hf(pixel_values=x, output_auxiliary_logits=True)
    pairs = [
        ("pred_logits", out["pred_logits"], ref.class_queries_logits),
        ("pred_masks", out["pred_masks"], ref.masks_queries_logits),
    ]
    assert len(out["aux_outputs"]) == len(ref.auxiliary_logits)
    for i, (aux, ref_aux) in enumerate(zip(out["aux_outputs"], ref.auxiliary_logits, strict=True)):
        pairs.append((f"aux{i} logits", aux["pred_logits"], ref_aux["class_queries_logits"]))
        pairs.append((f"aux{i} masks", aux["pred_masks"], ref_aux["masks_queries_logits"]))
    return pairs


def assert_parity(pairs: list) -> None:
    report = []
    for name, actual, expected in pairs:
        assert actual.shape == expected.shape, name
        tolerance = RELATIVE_TOLERANCE * max(1.0, expected.abs().max().item())
        diff = (actual - expected).abs().max().item()
        report.append(f"{name} {diff:.2e}")
        assert diff <= tolerance, f"{name}: max abs diff {diff:.3g} > {tolerance:.3g}"
    print("max abs diffs: " + ", ".join(report))


@pytest.mark.filterwarnings("ignore:no preset has these 13 classes")
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_converted_hf_checkpoint_matches_transformers(kind, hf_folders):
    hf_model, folder = hf_folders[kind]
    config, state = read_any_checkpoint(folder)
    ours = build_and_load(config, state, str(folder))
    assert config.decoder.num_queries == hf_model.config.num_queries
    assert config.num_classes == hf_model.config.num_labels
    assert_parity(output_pairs(ours, hf_model, images()))


def test_hf_class_names_and_metadata(hf_folders):
    resnet = convert_to_ours(hf_folders["resnet"][1])
    # id2label equal to a preset's names: that preset's metadata (thing/stuff, ids, colours, task)
    assert resnet.config.class_names == SYNTH_NAMES and resnet.config.dataset == "synth"
    assert resnet.warnings == []
    swin = convert_to_ours(hf_folders["swin"][1])
    # LABEL_i defaults and no preset with 13 classes: generic names and a warning saying so
    assert swin.config.class_names == [f"class_{i}" for i in range(13)]
    assert any("generic class_{i} names" in warning for warning in swin.warnings)
    assert any("criterion.empty_weight" in note for note in swin.notes)


def tiny_config(kind: str):
    """Our tiny config that HF can represent (GroupNorm 32 groups, one head count)."""
    config = get_preset("synth-tiny")
    config.pixel_decoder.num_groups = 32
    if kind == "swin":
        config.backbone = type(config.backbone)(
            kind="swin", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)
        )
    return config


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_export_loads_in_transformers_and_matches(kind, tmp_path):
    config = tiny_config(kind)
    torch.manual_seed(3)
    ours = build_model(config).eval()
    perturb(ours, 3)
    write_checkpoint(ours.state_dict(), config, tmp_path / "hf", "hf")
    hf_model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf_model.config.id2label[0] == config.class_names[0]
    assert_parity(output_pairs(ours, hf_model.eval(), images(1)))


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_round_trip_ours_hf_ours_is_bit_exact(kind, tmp_path):
    config = tiny_config(kind)
    torch.manual_seed(4)
    state = build_model(config).state_dict()
    write_checkpoint(state, config, tmp_path / "hf", "hf")
    read_config, read_state = read_any_checkpoint(tmp_path / "hf")
    weights = {k for k in state if not k.endswith(DERIVED_BUFFER_SUFFIXES)}
    assert set(read_state) == weights
    for name in weights:
        assert read_state[name].dtype == state[name].dtype and torch.equal(read_state[name], state[name]), (
            name
        )
    assert read_config.class_names == config.class_names
    assert (read_config.backbone, read_config.pixel_decoder, read_config.decoder) == (
        config.backbone,
        config.pixel_decoder,
        config.decoder,
    )


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_key_mapping_covers_every_weight_of_our_model(kind):
    config = tiny_config(kind)
    renames, fused = key_mapping(config)
    ours = [k for k, _ in renames] + [k for k, _ in fused]
    assert len(ours) == len(set(ours))
    expected = {k for k in build_model(config).state_dict() if not k.endswith(DERIVED_BUFFER_SUFFIXES)}
    assert set(ours) == expected


def test_transformers_5_in_memory_names_are_accepted(hf_folders, tmp_path):
    from safetensors.torch import save_file

    hf_model, folder = hf_folders["swin"]
    modern = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(".attention.q_proj." in k for k in modern)  # transformers >= 5 names
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(modern, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    from_saved, from_modern = convert_to_ours(folder).state_dict, convert_to_ours(tmp_path).state_dict
    assert set(from_saved) == set(from_modern)
    assert all(torch.equal(from_saved[k], from_modern[k]) for k in from_saved)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["backbone_config"].update(downsample_in_bottleneck=True), "stride in the first 1x1"),
        (lambda c: c["backbone_config"].update(layer_type="basic"), "layer_type='basic'"),
        (lambda c: c.update(pre_norm=True), "pre_norm=True"),
        (lambda c: c.update(enforce_input_projection=True, hidden_dim=64), "enforce_input_projection"),
        (lambda c: c.update(feature_size=48), "multiple of GroupNorm's 32 groups"),
        (lambda c: c["backbone_config"].update(model_type="convnext"), "'convnext' backbone"),
    ],
)
def test_hf_configs_our_model_cannot_represent_are_refused(hf_folders, tmp_path, edit, expected):
    folder = hf_folders["resnet"][1]
    document = json.loads((folder / "config.json").read_text())
    edit(document)
    (tmp_path / "config.json").write_text(json.dumps(document))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=expected) as info:
        convert_to_ours(tmp_path)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_match_config_json_are_refused(hf_folders, tmp_path):
    folder = hf_folders["swin"][1]
    document = json.loads((folder / "config.json").read_text())
    document["encoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(document))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing .* HF keys"):
        convert_to_ours(tmp_path)


def test_export_refuses_configs_hf_cannot_represent(tmp_path):
    config = get_preset("synth-tiny")  # GroupNorm with 8 groups
    state = build_model(config).state_dict()
    with pytest.raises(CheckpointError, match="8 groups"):
        write_checkpoint(state, config, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()


def test_mask2former_load_accepts_an_hf_folder(hf_folders):
    predictor = mask2former.load(hf_folders["resnet"][1])
    assert predictor.config.dataset == "synth"
