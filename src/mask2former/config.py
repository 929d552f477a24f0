"""Dataclass configs and the named presets of the official model zoo.

A `ModelConfig` says everything needed to rebuild a model and use it: the architecture, the class names
and thing/stuff split of the dataset it was trained on, and the test-time pre-processing. It round-trips
through JSON (`to_dict` / `from_dict`), which is how our checkpoint format stores it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ImageNet statistics on RGB 0..255, the official PIXEL_MEAN / PIXEL_STD of every preset.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class BackboneConfig:
    """A detectron2-layout ResNet (`kind="resnet"`) or Swin Transformer (`kind="swin"`)."""

    kind: str = "resnet"
    # ResNet
    layers: tuple[int, ...] = (3, 4, 6, 3)
    stem_channels: int = 64
    res2_channels: int = 256
    # Swin
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    pretrain_img_size: int = 224
    drop_path_rate: float = 0.3


@dataclass
class PixelDecoderConfig:
    """MSDeformAttnPixelDecoder sizes (official defaults)."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    num_groups: int = 32


@dataclass
class TransformerDecoderConfig:
    """Masked-attention transformer decoder sizes (official defaults: DEC_LAYERS 10 -> 9 layers)."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9


@dataclass
class InputConfig:
    """Test-time pre-processing.

    `official`: shortest edge resized to `short_edge` (longest at most `max_size`), padded to a multiple of
    `size_divisibility`. `deploy`: bilinear resize to exactly `size` (H, W).
    """

    mode: str = "official"
    short_edge: int = 800
    max_size: int = 1333
    size: tuple[int, int] | None = None
    size_divisibility: int = 32


@dataclass
class ModelConfig:
    """Architecture + dataset metadata + pre/post-processing defaults of one model."""

    name: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    input: InputConfig = field(default_factory=InputConfig)
    dataset: str = "coco_panoptic"
    class_names: list[str] = field(default_factory=list)
    thing_classes: list[bool] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    colors: list[tuple[int, int, int]] = field(default_factory=list)
    task: str = "panoptic"
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    test_topk: int = 100

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> ModelConfig:
        """Raise ValueError (one line naming the key) unless a model can be built and run from this config;
        returns self (config_checks.py holds the rules)."""
        from mask2former.config_checks import validate

        validate(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`, validated; unknown keys are an error so a typo never passes silently."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object, not {type(data).__name__}")
        sections = {
            "backbone": BackboneConfig,
            "pixel_decoder": PixelDecoderConfig,
            "decoder": TransformerDecoderConfig,
            "input": InputConfig,
        }
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown model config key {key!r}")
            if key in sections:
                kwargs[key] = _section_from_dict(sections[key], value)
            elif key == "colors" and isinstance(value, list):
                kwargs[key] = [tuple(c) if isinstance(c, list) else c for c in value]
            else:
                kwargs[key] = value
        return cls(**kwargs).validate()


# Keys written by earlier versions, read under their current names.
_LEGACY_KEYS = {"TransformerDecoderConfig": {"nheads": "num_heads"}}


def _section_from_dict(section: type, value: dict[str, Any]):
    if not isinstance(value, dict):
        raise ValueError(f"{section.__name__} must be a JSON object, not {type(value).__name__}")
    renames = _LEGACY_KEYS.get(section.__name__, {})
    value = {renames.get(key, key): item for key, item in value.items()}
    known = {f.name: f for f in dataclasses.fields(section)}
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown {section.__name__} keys: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return section(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Presets: one plain builder per official model-zoo architecture.


# Bottleneck blocks per stage of detectron2's R-50 / R-101.
RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Swin variants: embed dim, depths, heads, window, pre-training size (B and L as pre-trained at 384).
SWIN_SIZES = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def resnet_backbone(depth: int) -> BackboneConfig:
    """detectron2's R-50 or R-101."""
    return BackboneConfig(kind="resnet", layers=RESNET_LAYERS[depth])


def swin_backbone(size: str) -> BackboneConfig:
    """Swin-T/S/B/L by its letter ("t", "s", "b", "l")."""
    embed, depths, heads, window, pretrain = SWIN_SIZES[size]
    return BackboneConfig(
        kind="swin",
        embed_dim=embed,
        depths=depths,
        num_heads=heads,
        window_size=window,
        pretrain_img_size=pretrain,
    )


def _backbone(name: str) -> BackboneConfig:
    """ "r50", "r101", "swin-t", ... -> its BackboneConfig."""
    return resnet_backbone(int(name[1:])) if name.startswith("r") else swin_backbone(name.split("-")[1])


def with_dataset_meta(config: ModelConfig, meta) -> ModelConfig:
    """A copy of `config` with the classes of a DatasetMeta (names, thing flags, ids, colours, name): the one
    place dataset metadata enters a model config."""
    return dataclasses.replace(
        config,
        dataset=meta.name,
        class_names=list(meta.class_names),
        thing_classes=[bool(t) for t in meta.thing_classes],
        category_ids=[int(c) for c in meta.category_ids],
        colors=[tuple(int(v) for v in c) for c in meta.colors],
    )


def _with_dataset(config: ModelConfig, dataset: str) -> ModelConfig:
    from mask2former.data.catalog import get_meta

    return dataclasses.replace(with_dataset_meta(config, get_meta(dataset)), dataset=dataset)


def coco_panoptic(backbone: str) -> ModelConfig:
    """COCO panoptic (133 classes), test shortest edge 800 / max 1333; Swin-L uses 200 queries."""
    bb = _backbone(backbone)
    queries = 200 if backbone == "swin-l" else 100
    config = ModelConfig(
        name=f"coco-panoptic-{backbone}",
        backbone=bb,
        decoder=TransformerDecoderConfig(num_queries=queries),
        input=InputConfig(short_edge=800, max_size=1333),
        task="panoptic",
    )
    return _with_dataset(config, "coco_panoptic")


def coco_instance(backbone: str) -> ModelConfig:
    """COCO instance (80 thing classes), test shortest edge 800 / max 1333."""
    bb = _backbone(backbone)
    queries = 200 if backbone == "swin-l" else 100
    config = ModelConfig(
        name=f"coco-instance-{backbone}",
        backbone=bb,
        decoder=TransformerDecoderConfig(num_queries=queries),
        input=InputConfig(short_edge=800, max_size=1333),
        task="instance",
    )
    return _with_dataset(config, "coco_instance")


def ade20k_semantic(backbone: str) -> ModelConfig:
    """ADE20K semantic (150 classes), test shortest edge 512 / max 2048, 100 queries."""
    bb = _backbone(backbone)
    if backbone in ("swin-b", "swin-l"):
        input_config = InputConfig(short_edge=640, max_size=2560)
    else:
        input_config = InputConfig(short_edge=512, max_size=2048)
    config = ModelConfig(
        name=f"ade20k-semantic-{backbone}",
        backbone=bb,
        input=input_config,
        task="semantic",
    )
    return _with_dataset(config, "ade20k_semantic")


def synth_tiny() -> ModelConfig:
    """The bundled model: the same architecture with a reduced backbone and widths, for synthetic scenes."""
    config = ModelConfig(
        name="synth-tiny",
        backbone=BackboneConfig(kind="resnet", layers=(2, 2, 2, 2), stem_channels=32, res2_channels=64),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64,
            mask_dim=64,
            num_encoder_layers=2,
            num_heads=4,
            num_points=4,
            ffn_dim=128,
            num_groups=8,
        ),
        decoder=TransformerDecoderConfig(
            hidden_dim=64, num_queries=20, num_heads=4, dim_feedforward=256, dec_layers=9
        ),
        # The bundled weights read 128x128 scenes best enlarged 1.5x: the scale was chosen on a tuning set
        # of its own (README, "The bundled model"); the shapes then cover more cells of the 1/8 features.
        input=InputConfig(short_edge=192, max_size=384),
        task="panoptic",
    )
    return _with_dataset(config, "synth")


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "coco-panoptic-r50": lambda: coco_panoptic("r50"),
    "coco-panoptic-r101": lambda: coco_panoptic("r101"),
    "coco-panoptic-swin-t": lambda: coco_panoptic("swin-t"),
    "coco-panoptic-swin-s": lambda: coco_panoptic("swin-s"),
    "coco-panoptic-swin-b": lambda: coco_panoptic("swin-b"),
    "coco-panoptic-swin-l": lambda: coco_panoptic("swin-l"),
    "coco-instance-r50": lambda: coco_instance("r50"),
    "coco-instance-r101": lambda: coco_instance("r101"),
    "coco-instance-swin-t": lambda: coco_instance("swin-t"),
    "coco-instance-swin-l": lambda: coco_instance("swin-l"),
    "ade20k-semantic-r50": lambda: ade20k_semantic("r50"),
    "ade20k-semantic-r101": lambda: ade20k_semantic("r101"),
    "ade20k-semantic-swin-t": lambda: ade20k_semantic("swin-t"),
    "ade20k-semantic-swin-l": lambda: ade20k_semantic("swin-l"),
    "synth-tiny": synth_tiny,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for preset `name` (ValueError listing the presets when unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
