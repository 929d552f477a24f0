"""Hugging Face transformers Mask2Former folders (config.json + weights) <-> our config and state dicts.

Works without transformers installed: the key mapping is written out from the module structure of
`Mask2FormerForUniversalSegmentation`. Names are those its `save_pretrained` writes (the transformers 4.x
layout, which 5.x still writes and renames on load); the 5.x in-memory names of the Swin backbone
(`swin.` prefix, `q_proj`/`k_proj`/`v_proj`/`o_proj`, `mlp.fc1`) are accepted too.

What HF stores differently from the official model:
- separate q/k/v projections where the official model has one fused matrix (Swin `attn.qkv`, the decoder's
  self-attention `in_proj_weight`): concatenated / split in q, k, v order;
- ResNet as HF's `ResNetBackbone`: BatchNorm2d (identical to FrozenBatchNorm in eval mode; its
  `num_batches_tracked` counters are dropped) and, for `downsample_in_bottleneck=True`, the stride in the
  first 1x1 conv, which our detectron2-style ResNet (stride in the 3x3) cannot represent;
- `decoder_layers` counts DEC_LAYERS (layers + 1); one `num_attention_heads` for both attentions; GroupNorm
  with 32 groups and 4 sampling points fixed in code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mask2former.checkpoints.huggingface_keys import ENC, STAGES, key_mapping
from mask2former.checkpoints.io import CheckpointError
from mask2former.checkpoints.safe_pickle import load_torch_file
from mask2former.config import (
    PIXEL_MEAN,
    PIXEL_STD,
    BackboneConfig,
    InputConfig,
    ModelConfig,
    PixelDecoderConfig,
    TransformerDecoderConfig,
)
from mask2former.fileio import atomic_write, write_json

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
NO_OBJECT_WEIGHT = 0.1
HF_GROUPS, HF_POINTS = 32, 4  # hard-coded in transformers' Mask2Former pixel decoder

# transformers >= 5 in-memory Swin names -> the names save_pretrained writes (checked in this order)
_MODERN_SWIN = (
    (
        ".attention.relative_position_bias.relative_position_bias_table",
        ".attention.self.relative_position_bias_table",
    ),
    (".attention.q_proj.", ".attention.self.query."),
    (".attention.k_proj.", ".attention.self.key."),
    (".attention.v_proj.", ".attention.self.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)


def is_hf_folder(path: str | Path) -> bool:
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()).get("model_type") == "mask2former"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of a save_pretrained folder: safetensors (sharded or not) or .bin."""
    path = Path(path)
    try:
        hf_config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / CONFIG_NAME}: unreadable ({error})") from None
    index = path / "model.safetensors.index.json"
    try:
        if (path / WEIGHTS_NAME).is_file():
            return hf_config, load_file(str(path / WEIGHTS_NAME))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(path / shard)))
            return hf_config, state
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable weights ({type(error).__name__}: {error})") from None
    if (path / "pytorch_model.bin").is_file():
        return hf_config, load_torch_file(path / "pytorch_model.bin")
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME}, sharded safetensors or pytorch_model.bin")


# ----------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


# Settings our model hard-wires, in transformers' names: written on export, required on import. Each equals
# transformers' default, so an absent key passes.
FIXED = {
    "pre_norm": False,
    "common_stride": 4,
    "feature_strides": [4, 8, 16, 32],
    "activation_function": "relu",
}
FIXED_SWIN = {"num_channels": 3, "patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True, "hidden_act": "gelu"}
FIXED_SWIN |= {"use_absolute_embeddings": False, "layer_norm_eps": 1e-5, "out_features": STAGES}
FIXED_RESNET = {"num_channels": 3, "layer_type": "bottleneck", "hidden_act": "relu", "out_features": STAGES}
FIXED_RESNET |= {"downsample_in_first_stage": False, "downsample_in_bottleneck": False}
WHY = {"downsample_in_bottleneck": "HF's stride in the first 1x1 conv; ours strides the 3x3 as detectron2"}


def _check_fixed(given: dict, fixed: dict, source: str) -> None:
    for key, value in fixed.items():
        if given.get(key) is not None and given[key] != value:
            why = f" ({WHY[key]})" if key in WHY else ""
            raise CheckpointError(f"{source}: {key}={given[key]!r}{why}; our model needs {value!r}")


def config_from_hf(hf: dict, source: str) -> tuple[ModelConfig, list[str] | None]:
    """(ModelConfig with generic class names, the id2label names or None when they are LABEL_i defaults).

    A value of the wrong type is a CheckpointError naming `source` (convert_to_ours validates the result)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: config.json must hold a JSON object")
    try:
        config, names = _config_from_hf(hf, source)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise CheckpointError(f"{source}: config.json is not a usable Mask2Former config ({error})") from None
    return config, names


def _config_from_hf(hf: dict, source: str) -> tuple[ModelConfig, list[str] | None]:

    def get(key: str, default):
        return default if hf.get(key) is None else hf[key]

    if hf.get("use_timm_backbone") or hf.get("backbone"):
        raise CheckpointError(f"{source}: timm / hub backbones are not supported (only backbone_config)")
    _check_fixed(hf, FIXED, source)
    backbone = _backbone_from_hf(hf.get("backbone_config"), source)
    conv_dim, hidden_dim, heads = (
        get("feature_size", 256),
        get("hidden_dim", 256),
        get("num_attention_heads", 8),
    )
    if get("enforce_input_projection", False) and conv_dim == hidden_dim:
        raise CheckpointError(f"{source}: enforce_input_projection=True with feature_size == hidden_dim")
    if conv_dim % HF_GROUPS:
        raise CheckpointError(f"{source}: feature_size {conv_dim} is not a multiple of GroupNorm's 32 groups")
    pixel_decoder = PixelDecoderConfig(
        conv_dim=conv_dim,
        mask_dim=get("mask_feature_size", 256),
        num_encoder_layers=get("encoder_layers", 6),
        num_heads=heads,
        num_points=HF_POINTS,
        ffn_dim=get("encoder_feedforward_dim", 1024),
        num_groups=HF_GROUPS,
    )
    decoder = TransformerDecoderConfig(
        hidden_dim=hidden_dim,
        num_queries=get("num_queries", 100),
        num_heads=heads,
        dim_feedforward=get("dim_feedforward", 2048),
        dec_layers=get("decoder_layers", 10) - 1,  # HF counts DEC_LAYERS, the layers + 1
    )
    id2label = {int(k): v for k, v in get("id2label", {}).items()}
    num_classes = len(id2label) if id2label else get("num_labels", 2)
    names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_classes)]
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    classes = [f"class_{i}" for i in range(num_classes)]
    config = ModelConfig(backbone=backbone, pixel_decoder=pixel_decoder, decoder=decoder, class_names=classes)
    return config, (None if generic else names)


def _backbone_from_hf(bb: dict | None, source: str) -> BackboneConfig:
    # No backbone_config: transformers builds its default, a Swin with depths [2, 2, 18, 2].
    bb = bb or {"model_type": "swin", "depths": [2, 2, 18, 2]}

    def get(key: str, default):
        return default if bb.get(key) is None else bb[key]

    kind = bb.get("model_type")
    if kind not in ("swin", "resnet"):
        raise CheckpointError(f"{source}: a {kind!r} backbone; only swin and resnet are supported")
    _check_fixed(bb, FIXED_SWIN if kind == "swin" else FIXED_RESNET, source)
    depths = tuple(get("depths", [2, 2, 6, 2] if kind == "swin" else [3, 4, 6, 3]))
    if len(depths) != 4:
        raise CheckpointError(f"{source}: a backbone with {len(depths)} stages; 4 are needed")
    if kind == "swin":
        return BackboneConfig(
            kind="swin",
            embed_dim=get("embed_dim", 96),
            depths=depths,
            num_heads=tuple(get("num_heads", [3, 6, 12, 24])),
            window_size=get("window_size", 7),
            pretrain_img_size=get("image_size", 224),
            drop_path_rate=float(get("drop_path_rate", 0.1)),
        )
    widths = list(get("hidden_sizes", [256, 512, 1024, 2048]))
    if widths != [widths[0] * 2**i for i in range(4)]:
        raise CheckpointError(f"{source}: ResNet widths {widths}; ours double per stage")
    return BackboneConfig(
        kind="resnet", layers=depths, stem_channels=get("embedding_size", 64), res2_channels=widths[0]
    )


def hf_config_from_ours(config: ModelConfig, target: str) -> dict:
    """config.json for transformers' Mask2FormerForUniversalSegmentation (CheckpointError if impossible)."""
    pd, dec, bb = config.pixel_decoder, config.decoder, config.backbone
    groups = math.gcd(pd.num_groups, pd.conv_dim)  # what our group_norm builds
    problems = []
    if groups != HF_GROUPS:
        problems.append(f"GroupNorm with {groups} groups (transformers hard-codes 32)")
    if pd.num_points != HF_POINTS:
        problems.append(f"{pd.num_points} sampling points (transformers hard-codes 4)")
    if pd.num_heads != dec.num_heads:
        problems.append(f"{pd.num_heads} pixel-decoder vs {dec.num_heads} decoder heads (one setting in HF)")
    if problems:
        raise CheckpointError(f"{target}: cannot export to Hugging Face: " + "; ".join(problems))
    if bb.kind == "swin":
        backbone = {"model_type": "swin", **FIXED_SWIN, "embed_dim": bb.embed_dim, "depths": list(bb.depths)}
        backbone |= {"num_heads": list(bb.num_heads), "window_size": bb.window_size}
        backbone |= {"image_size": bb.pretrain_img_size, "drop_path_rate": bb.drop_path_rate}
    else:
        widths = [bb.res2_channels * 2**i for i in range(4)]
        backbone = {"model_type": "resnet", **FIXED_RESNET, "embedding_size": bb.stem_channels}
        backbone |= {"hidden_sizes": widths, "depths": list(bb.layers)}
    sizes = {
        "feature_size": pd.conv_dim,
        "mask_feature_size": pd.mask_dim,
        "hidden_dim": dec.hidden_dim,
        "encoder_feedforward_dim": pd.ffn_dim,
        "encoder_layers": pd.num_encoder_layers,
        "decoder_layers": dec.dec_layers + 1,
        "num_attention_heads": dec.num_heads,
        "dim_feedforward": dec.dim_feedforward,
        "num_queries": dec.num_queries,
    }
    names = config.class_names
    return {
        "model_type": "mask2former",
        "architectures": ["Mask2FormerForUniversalSegmentation"],
        "backbone_config": backbone,
        **sizes,
        **FIXED,
        "enforce_input_projection": False,
        "dropout": 0.0,
        "no_object_weight": NO_OBJECT_WEIGHT,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


# ----------------------------------------------------------------------------------------------------
# Weights.


def _saved_name(key: str) -> str:
    """A transformers >= 5 in-memory backbone name -> the name save_pretrained writes (others unchanged)."""
    if not key.startswith(ENC):
        return key
    rest = key[len(ENC) :]
    rest = rest[len("swin.") :] if rest.startswith("swin.") else rest
    for modern, saved in _MODERN_SWIN:
        rest = rest.replace(modern, saved)
    return ENC + rest


def _not_a_weight(key: str) -> str | None:
    """Why an HF entry is no network weight of ours (derived buffer, counter, loss, unused norm), or None."""
    if key.endswith("num_batches_tracked"):
        return "BatchNorm num_batches_tracked"
    if key.endswith("relative_position_index"):
        return "relative_position_index (derived from the window size)"
    if key == "criterion.empty_weight":
        return "criterion.empty_weight (loss class weights)"
    if key.startswith(f"{ENC}layernorm."):
        return "SwinModel's final layernorm (unused by the backbone)"
    return None


def hf_to_ours(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF weights -> our state dict (strict: every HF weight used, every one of ours found)."""
    hf_state = {_saved_name(k): v for k, v in hf_state.items()}
    renames, fused = key_mapping(config)
    used, missing, ours = set(), [], {}
    for our_key, hf_key in renames:
        if hf_key in hf_state:
            ours[our_key] = hf_state[hf_key]
            used.add(hf_key)
        else:
            missing.append(hf_key)
    for our_key, parts in fused:
        if all(p in hf_state for p in parts):
            ours[our_key] = torch.cat([hf_state[p] for p in parts], dim=0)
            used.update(parts)
        else:
            missing.extend(p for p in parts if p not in hf_state)
    ignored = {_not_a_weight(k) for k in hf_state if k not in used} - {None}
    unexpected = [k for k in hf_state if k not in used and _not_a_weight(k) is None]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} HF keys (first {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} HF keys (first {unexpected[0]})")
        raise CheckpointError(f"{source}: weights do not match config.json: {'; '.join(parts)}")
    notes = []
    if ignored:
        notes.append(f"dropped HF entries that are not network weights: {', '.join(sorted(ignored))}")
    return ours, notes


def ours_to_hf(state: dict[str, torch.Tensor], config: ModelConfig, target: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF weights in save_pretrained's layout (each tensor its own contiguous copy)."""
    renames, fused = key_mapping(config)
    missing = [k for k, _ in renames if k not in state] + [k for k, _ in fused if k not in state]
    if missing:
        raise CheckpointError(
            f"{target}: our weights lack {len(missing)} keys for this config (first {missing[0]})"
        )
    hf = {hf_key: state[our_key] for our_key, hf_key in renames}
    for our_key, parts in fused:
        for part, chunk in zip(parts, state[our_key].chunk(3, dim=0), strict=True):
            hf[part] = chunk
    if config.backbone.kind == "swin":
        # transformers 5 builds (and saves) SwinModel's final norm, which the backbone never applies;
        # writing an identity norm keeps from_pretrained from reporting it missing.
        width = config.backbone.embed_dim * 2 ** (len(config.backbone.depths) - 1)
        hf[f"{ENC}swin.layernorm.weight"] = torch.ones(width)
        hf[f"{ENC}swin.layernorm.bias"] = torch.zeros(width)
    if config.backbone.kind == "resnet":  # HF's BatchNorm2d counters (unused in eval mode)
        for key in [k for k in hf if k.endswith(".normalization.running_mean")]:
            hf[key.replace("running_mean", "num_batches_tracked")] = torch.zeros((), dtype=torch.long)
    empty_weight = torch.ones(config.num_classes + 1)
    empty_weight[-1] = NO_OBJECT_WEIGHT
    hf["criterion.empty_weight"] = empty_weight
    # safetensors refuses tensors sharing memory (the q/k/v chunks do): give each its own storage.
    return {k: v.detach().cpu().contiguous().clone() for k, v in hf.items()}


def preprocessor_config_from_ours(config: ModelConfig) -> dict:
    """preprocessor_config.json for transformers' Mask2FormerImageProcessor, doing our test-time
    pre-processing: bilinear resize (shortest edge / longest edge, or a fixed size for deploy mode), then
    (x / 255 - mean / 255) / (std / 255), which is our (x - PIXEL_MEAN) / PIXEL_STD on the 0..1 scale.

    One difference HF's processor cannot avoid (PREPROCESSOR_NOTE): its size_divisor rounds the resized
    size up to a multiple of 32 (a stretch of < 32 px) where ours pads it with zeros."""
    cfg = config.input
    if cfg.mode == "deploy":
        if cfg.size is None:
            raise CheckpointError("input.size: deploy pre-processing needs a fixed (H, W) size")
        size, divisor = {"height": int(cfg.size[0]), "width": int(cfg.size[1])}, 0
    else:
        size = {"shortest_edge": int(cfg.short_edge), "longest_edge": int(cfg.max_size)}
        divisor = int(cfg.size_divisibility)
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": size,
        "size_divisor": divisor,
        "resample": 2,  # PIL bilinear, as detectron2's ResizeShortestEdge
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [round(m / 255, 6) for m in PIXEL_MEAN],
        "image_std": [round(s / 255, 6) for s in PIXEL_STD],
        "ignore_index": 255,
        "do_reduce_labels": False,
        "num_labels": config.num_classes,
    }


def input_config_from_preprocessor(processor: dict, source: str) -> InputConfig | None:
    """Our test-time pre-processing from a preprocessor_config.json (None when it names no size we use).

    Mean / std other than ImageNet's cannot be represented (our normalisation is fixed): CheckpointError."""
    mean, std = processor.get("image_mean"), processor.get("image_std")
    for name, given, ours in (("image_mean", mean, PIXEL_MEAN), ("image_std", std, PIXEL_STD)):
        if given is not None and any(abs(g * 255 - o) > 0.05 for g, o in zip(given, ours, strict=True)):
            raise CheckpointError(f"{source}: {name} {given} differs from ImageNet's, which our model fixes")
    size = processor.get("size")
    if isinstance(size, dict) and size.get("shortest_edge") and size.get("longest_edge"):
        divisor = int(processor.get("size_divisor") or 32)
        return InputConfig("official", int(size["shortest_edge"]), int(size["longest_edge"]), None, divisor)
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        return InputConfig("deploy", size=(int(size["height"]), int(size["width"])))
    return None


PREPROCESSOR_NOTE = (
    "preprocessor_config.json: transformers resizes to a multiple of 32 (up to 31 px of stretch) where we "
    "pad with zeros; images whose resized sides are multiples of 32 get identical pixels"
)


def write_hf_folder(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path) -> Path:
    """A folder transformers loads: config.json and model.safetensors for
    Mask2FormerForUniversalSegmentation.from_pretrained, preprocessor_config.json for
    AutoImageProcessor.from_pretrained (so pipeline("image-segmentation", model=folder) runs)."""
    out_dir = Path(out_dir)
    hf_config = hf_config_from_ours(config, str(out_dir))
    preprocessor = preprocessor_config_from_ours(config)
    tensors = ours_to_hf(state, config, str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers checks the "format" metadata of safetensors files it loads.
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out_dir / CONFIG_NAME, hf_config, indent=2)
    write_json(out_dir / PREPROCESSOR_NAME, preprocessor, indent=2)
    return out_dir
