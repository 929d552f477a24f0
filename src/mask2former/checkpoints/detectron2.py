"""Official Mask2Former checkpoints (detectron2 layout) <-> our state dicts, and the architecture they imply.

Our modules carry the official names (`backbone.*`, `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`), so the mapping is the identity except for what the official model stores
that is not a weight of the network:

- `criterion.empty_weight`: the loss's class weights (1, ..., 1, no-object weight), a buffer of SetCriterion;
- `pixel_mean` / `pixel_std`: normalisation constants older detectron2 meta-architectures saved (Mask2Former
  registers them non-persistent; ours live in the config);
- `num_batches_tracked`: BatchNorm counters (FrozenBatchNorm has none);
- `sem_seg_head.predictor.static_query.weight`: the older name of `query_feat`, which the official decoder
  renames when it loads a state dict without version >= 2 metadata (every pickled dict).

Files: `model_final_*.pkl` (a plain pickle of {"model": {name: numpy array}, "__author__": ...}) or a .pth
with a "model" dict of tensors; both are read without running code (`safe_pickle`).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch

from mask2former.checkpoints.io import CheckpointError
from mask2former.checkpoints.safe_pickle import load_pickled
from mask2former.config import BackboneConfig, ModelConfig, PixelDecoderConfig, TransformerDecoderConfig
from mask2former.fileio import atomic_write

AUTHOR = "mask2former"
# The official no-object class weight (MODEL.MASK_FORMER.NO_OBJECT_WEIGHT), last entry of empty_weight.
NO_OBJECT_WEIGHT = 0.1
EMPTY_WEIGHT_KEY = "criterion.empty_weight"
NOT_NETWORK_WEIGHTS = ("pixel_mean", "pixel_std", EMPTY_WEIGHT_KEY)
LEGACY_NAMES = {"sem_seg_head.predictor.static_query.weight": "sem_seg_head.predictor.query_feat.weight"}
PD = "sem_seg_head.pixel_decoder."
PRED = "sem_seg_head.predictor."


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw {name: tensor} weights of an official .pkl/.pth checkpoint (official names, all kept)."""
    path = Path(path)
    stored = load_pickled(path)
    weights = _weights_dict(stored, path)
    state = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: weight name {key!r} is a {type(key).__name__}, not a string")
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            raise CheckpointError(f"{path}: entry {key!r} is an array of {value.dtype}, not of numbers")
        if isinstance(value, np.ndarray):
            # Arrays from a pickle may be read-only; torch wants writable memory it can own.
            state[key] = torch.from_numpy(np.array(value, copy=True))
        elif isinstance(value, torch.Tensor):
            state[key] = value
        elif isinstance(value, (int, float)) and key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(value)
        else:
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not an array")
    return state


def _weights_dict(stored: object, path: Path) -> dict:
    """{name: array} from {"model": ...} (detectron2), {"state_dict": ...} or a bare state dict."""
    if isinstance(stored, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(stored.get(wrapper), dict):
                return stored[wrapper]
        if stored and all(isinstance(k, str) for k in stored):
            if all(isinstance(v, (np.ndarray, torch.Tensor)) for v in stored.values()):
                return stored
    raise CheckpointError(f"{path}: no 'model' dict of weights in this checkpoint")


def official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official-layout weights -> our layout, and notes on what was dropped or renamed (and why)."""
    keys = list(state)
    # Checkpoints saved from a DistributedDataParallel wrapper prefix every name with "module.".
    strip = len("module.") if keys and all(k.startswith("module.") for k in keys) else 0
    ours, dropped, notes = {}, [], []
    for key, value in state.items():
        name = key[strip:]
        if name in NOT_NETWORK_WEIGHTS or name.endswith("num_batches_tracked"):
            dropped.append(name)
            continue
        if name in LEGACY_NAMES:
            notes.append(f"renamed legacy {name} to {LEGACY_NAMES[name]}")
            name = LEGACY_NAMES[name]
        ours[name] = value
    if dropped:
        shown = sorted({k.rsplit(".", 1)[-1] if "num_batches" in k else k for k in dropped})
        notes.append(f"dropped {len(dropped)} entries that are not network weights: {', '.join(shown)}")
    return ours, notes


def ours_to_official(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights -> the official state dict, plus the class-weight buffer of the official criterion."""
    official = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    empty_weight = torch.ones(config.num_classes + 1)
    empty_weight[-1] = NO_OBJECT_WEIGHT
    official[EMPTY_WEIGHT_KEY] = empty_weight
    return official


def write_official(state: dict[str, torch.Tensor], config: ModelConfig, path: str | Path) -> Path:
    """Write `path` (.pkl: {"model": {name: numpy}, "__author__"}; .pth/.pt: the same with tensors)."""
    path = Path(path)
    if path.suffix not in (".pkl", ".pth", ".pt"):
        raise CheckpointError(f"{path}: a detectron2 checkpoint must end with .pkl or .pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    official = ours_to_official(state, config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in official.items()}
    if path.suffix == ".pkl":
        unsupported = sorted(k for k, v in tensors.items() if v.dtype == torch.bfloat16)
        if unsupported:
            raise CheckpointError(f"{path}: numpy has no bfloat16 for {unsupported[0]}; write a .pth instead")
        document = {"model": {k: v.numpy() for k, v in tensors.items()}, "__author__": AUTHOR}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                pickle.dump(document, handle, protocol=4)

    else:
        document = {"model": tensors, "__author__": AUTHOR}

        def write(tmp: str) -> None:
            torch.save(document, tmp)

    atomic_write(path, write)
    return path


# ----------------------------------------------------------------------------------------------------
# The architecture a state dict implies. Shapes give almost everything; what they cannot give (GroupNorm
# groups, the decoder's head count, how heads * points splits in the deformable attention, Swin's
# pre-training size) comes from `base` (a preset), else the official values.


def infer_config(state: dict[str, torch.Tensor], source: str, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig (architecture + generic class names) of weights in our/official layout.

    Raises CheckpointError (one line naming `source`) when the weights are not a Mask2Former our model
    can represent.
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        backbone = _infer_backbone(shapes, source, base)
        pixel_decoder = _infer_pixel_decoder(shapes, source, base)
        decoder, num_classes = _infer_decoder(shapes, source, pixel_decoder, base)
    except (ValueError, IndexError, TypeError) as error:  # a weight of another rank (1-D for a 2-D one)
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{source}: a weight has the wrong number of dimensions ({error})") from None
    return ModelConfig(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        class_names=[f"class_{i}" for i in range(num_classes)],
    )


def _shape(shapes: dict[str, tuple[int, ...]], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: no {key}; not a Mask2Former checkpoint in detectron2's layout")
    return shapes[key]


def _count(shapes: dict[str, tuple[int, ...]], template: str) -> int:
    """How many consecutive indices i = 0, 1, ... have template.format(i) among the keys."""
    count = 0
    while template.format(count) in shapes:
        count += 1
    return count


def _infer_backbone(shapes: dict, source: str, base: ModelConfig | None) -> BackboneConfig:
    drop_path_rate = base.backbone.drop_path_rate if base else BackboneConfig().drop_path_rate
    if "backbone.stem.conv1.weight" in shapes:
        return _infer_resnet(shapes, source, drop_path_rate)
    if "backbone.patch_embed.proj.weight" in shapes:
        return _infer_swin(shapes, source, base, drop_path_rate)
    raise CheckpointError(
        f"{source}: no ResNet (backbone.stem.conv1.weight) or Swin (backbone.patch_embed.proj.weight) "
        "backbone"
    )


def _infer_resnet(shapes: dict, source: str, drop_path_rate: float) -> BackboneConfig:
    # The stride's place (3x3 here, STRIDE_IN_1X1=False as in every Mask2Former config) leaves no trace in
    # the shapes; weights trained with the stride in the 1x1 conv would load and compute something else.
    stem_channels = _shape(shapes, "backbone.stem.conv1.weight", source)[0]
    layers = tuple(_count(shapes, f"backbone.res{stage}.{{}}.conv1.weight") for stage in (2, 3, 4, 5))
    res2_channels = _shape(shapes, "backbone.res2.0.conv3.weight", source)[0]
    for index, stage in enumerate((2, 3, 4, 5)):
        if layers[index] == 0:
            raise CheckpointError(f"{source}: backbone.res{stage} has no blocks")
        out_channels = _shape(shapes, f"backbone.res{stage}.0.conv3.weight", source)[0]
        width = _shape(shapes, f"backbone.res{stage}.0.conv1.weight", source)[0]
        if out_channels != res2_channels * 2**index or 4 * width != out_channels:
            raise CheckpointError(
                f"{source}: backbone.res{stage} has {out_channels} output and {width} bottleneck channels; "
                "only widths doubling per stage with a 4x bottleneck can be represented"
            )
    return BackboneConfig(
        kind="resnet",
        layers=layers,
        stem_channels=stem_channels,
        res2_channels=res2_channels,
        drop_path_rate=drop_path_rate,
    )


def _infer_swin(shapes: dict, source: str, base: ModelConfig | None, drop_path_rate: float) -> BackboneConfig:
    embed_dim, _, patch, _ = _shape(shapes, "backbone.patch_embed.proj.weight", source)
    if patch != 4:
        raise CheckpointError(f"{source}: Swin patch size {patch}; only 4 can be represented")
    if "backbone.absolute_pos_embed" in shapes:
        raise CheckpointError(f"{source}: Swin with absolute position embedding (APE) is not supported")
    if "backbone.patch_embed.norm.weight" not in shapes:
        raise CheckpointError(f"{source}: Swin without patch-embedding norm is not supported")
    if "backbone.layers.4.blocks.0.norm1.weight" in shapes:
        raise CheckpointError(f"{source}: Swin with more than 4 stages is not supported")
    depths = tuple(_count(shapes, f"backbone.layers.{i}.blocks.{{}}.norm1.weight") for i in range(4))
    if 0 in depths:
        raise CheckpointError(f"{source}: Swin stage backbone.layers.{depths.index(0)} has no blocks")
    table = "backbone.layers.{}.blocks.0.attn.relative_position_bias_table"
    num_heads = tuple(_shape(shapes, table.format(i), source)[1] for i in range(4))
    rows = _shape(shapes, table.format(0), source)[0]
    window_size = (math.isqrt(rows) + 1) // 2
    if (2 * window_size - 1) ** 2 != rows:
        raise CheckpointError(f"{source}: relative position table of {rows} rows is not a square window's")
    if _shape(shapes, "backbone.layers.0.blocks.0.mlp.fc1.weight", source)[0] != 4 * embed_dim:
        raise CheckpointError(f"{source}: Swin MLP ratio other than 4 is not supported")
    if "backbone.layers.0.blocks.0.attn.qkv.bias" not in shapes:
        raise CheckpointError(f"{source}: Swin without qkv bias is not supported")
    if base is not None and base.backbone.kind == "swin" and base.backbone.window_size == window_size:
        pretrain_img_size = base.backbone.pretrain_img_size
    else:  # a record only (sizes the absolute embedding no Mask2Former uses): the official pairing
        pretrain_img_size = 224 if window_size == 7 else 384
    return BackboneConfig(
        kind="swin",
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        pretrain_img_size=pretrain_img_size,
        drop_path_rate=drop_path_rate,
    )


def _infer_pixel_decoder(shapes: dict, source: str, base: ModelConfig | None) -> PixelDecoderConfig:
    conv_dim = _shape(shapes, PD + "input_proj.0.0.weight", source)[0]
    if _count(shapes, PD + "input_proj.{}.0.weight") != 3:
        raise CheckpointError(f"{source}: the pixel decoder must project exactly 3 levels (res3..res5)")
    levels = _shape(shapes, PD + "transformer.level_embed", source)[0]
    if levels != 3:
        raise CheckpointError(f"{source}: the pixel decoder has {levels} levels; 3 are supported")
    if PD + "adapter_1.weight" not in shapes or PD + "adapter_2.weight" in shapes:
        raise CheckpointError(f"{source}: only one FPN step (res2, common stride 4) is supported")
    layer = PD + "transformer.encoder.layers.0."
    heads_times_points = _shape(shapes, layer + "self_attn.attention_weights.weight", source)[0] // levels
    defaults = base.pixel_decoder if base else PixelDecoderConfig()
    # The official encoder hard-codes 4 sampling points; only heads * points is visible in the shapes.
    num_points = defaults.num_points
    if heads_times_points % num_points or conv_dim % (heads_times_points // num_points):
        raise CheckpointError(
            f"{source}: {heads_times_points} heads x points do not split with {num_points} points"
        )
    return PixelDecoderConfig(
        conv_dim=conv_dim,
        mask_dim=_shape(shapes, PD + "mask_features.weight", source)[0],
        num_encoder_layers=_count(shapes, PD + "transformer.encoder.layers.{}.linear1.weight"),
        num_heads=heads_times_points // num_points,
        num_points=num_points,
        ffn_dim=_shape(shapes, layer + "linear1.weight", source)[0],
        num_groups=defaults.num_groups,
    )


def _infer_decoder(
    shapes: dict, source: str, pixel_decoder: PixelDecoderConfig, base: ModelConfig | None
) -> tuple[TransformerDecoderConfig, int]:
    num_queries, hidden_dim = _shape(shapes, PRED + "query_feat.weight", source)
    dec_layers = _count(shapes, PRED + "transformer_self_attention_layers.{}.self_attn.in_proj_weight")
    if dec_layers == 0:
        raise CheckpointError(f"{source}: the transformer decoder has no layers")
    num_classes = _shape(shapes, PRED + "class_embed.weight", source)[0] - 1
    mask_out = _shape(shapes, PRED + "mask_embed.layers.2.weight", source)[0]
    if mask_out != pixel_decoder.mask_dim:
        raise CheckpointError(
            f"{source}: mask embedding of {mask_out} channels vs mask features of {pixel_decoder.mask_dim}"
        )
    # The official config uses one head count (MASK_FORMER.NHEADS) for both attentions.
    num_heads = base.decoder.num_heads if base else pixel_decoder.num_heads
    if hidden_dim % num_heads:
        raise CheckpointError(f"{source}: hidden dim {hidden_dim} does not split into {num_heads} heads")
    decoder = TransformerDecoderConfig(
        hidden_dim=hidden_dim,
        num_queries=num_queries,
        num_heads=num_heads,
        dim_feedforward=_shape(shapes, PRED + "transformer_ffn_layers.0.linear1.weight", source)[0],
        dec_layers=dec_layers,
    )
    return decoder, num_classes
