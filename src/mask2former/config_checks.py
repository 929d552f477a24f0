"""`ModelConfig.validate`: the values a model can be built from, checked where a config is read.

A config.json is input like any other file: `num_heads` that do not divide the width, a negative number of
queries, a dimension written as a string or a `short_edge` of 0 would otherwise surface as a traceback deep
in the model (or as a huge allocation). Each rule raises ValueError with one line naming the key.
"""

from __future__ import annotations

import math
from typing import Any

from mask2former import limits

TASKS = ("semantic", "panoptic", "instance")
MAX_WIDTH = 16384  # channels, heads, points, layers and queries stay far below this in any real model
MAX_QUERIES = 10000


def _int(key: str, value: Any, low: int = 1, high: int = MAX_WIDTH) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} {value!r}: must be an integer")
    if not low <= value <= high:
        raise ValueError(f"{key} {value}: must be between {low} and {high}")
    return value


def _number(key: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} {value!r}: must be a finite number")
    if not low <= value <= high:
        raise ValueError(f"{key} {value}: must be between {low} and {high}")


def _ints(key: str, values: Any, length: int | None = None, low: int = 1) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or (length is not None and len(values) != length):
        raise ValueError(f"{key} {values!r}: must be a list of {length or 'some'} integers")
    return tuple(_int(f"{key}[{i}]", v, low) for i, v in enumerate(values))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} {value!r}: must be one of {', '.join(choices)}")


def _divides(key: str, width: int, heads_key: str, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{key} {width} is not divisible by {heads_key} {heads}")


def check_backbone(b) -> None:
    _choice("backbone.kind", b.kind, ("resnet", "swin"))
    if b.kind == "resnet":
        _ints("backbone.layers", b.layers, 4)
        _int("backbone.stem_channels", b.stem_channels)
        _divides("backbone.res2_channels", _int("backbone.res2_channels", b.res2_channels, 4), "4", 4)
        return
    _int("backbone.embed_dim", b.embed_dim)
    _ints("backbone.depths", b.depths, 4)
    heads = _ints("backbone.num_heads", b.num_heads, 4)
    for stage, head_count in enumerate(heads):
        width = b.embed_dim * 2**stage
        _divides(
            f"backbone width {width} of stage {stage}", width, f"backbone.num_heads[{stage}]", head_count
        )
    _int("backbone.window_size", b.window_size)
    _int("backbone.pretrain_img_size", b.pretrain_img_size)
    _number("backbone.drop_path_rate", b.drop_path_rate, 0.0, 1.0)


def check_input(i) -> None:
    _choice("input.mode", i.mode, ("official", "deploy"))
    short_edge = _int("input.short_edge", i.short_edge, 1, 1 << 20)
    _int("input.max_size", i.max_size, 1, 1 << 20)
    _int("input.size_divisibility", i.size_divisibility, 1, 1024)
    limits.INPUT_PIXELS.check(short_edge * short_edge, f"input.short_edge {short_edge}")
    if i.size is not None or i.mode == "deploy":
        height, width = _ints("input.size", i.size, 2)
        limits.INPUT_PIXELS.check(height * width, f"input.size {height}x{width}")


def check_classes(config) -> None:
    names = config.class_names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("class_names: must be a non-empty list of strings")
    limits.CLASSES.check(len(names), "class_names")
    k = len(names)
    if not isinstance(config.thing_classes, list) or len(config.thing_classes) != k:
        raise ValueError(f"thing_classes: must hold one true/false flag per class ({k})")
    if not all(isinstance(t, bool) or t in (0, 1) for t in config.thing_classes):
        raise ValueError("thing_classes: flags must be true or false")
    ids = config.category_ids
    if not isinstance(ids, list) or (ids and len(ids) != k):
        raise ValueError(f"category_ids: must be empty or hold one id per class ({k})")
    _ints("category_ids", ids, low=0)
    if len(set(ids)) != len(ids):
        raise ValueError("category_ids: ids must be unique")
    colors = config.colors
    if not isinstance(colors, list) or (colors and len(colors) != k):
        raise ValueError(f"colors: must be empty or hold one colour per class ({k})")
    for index, color in enumerate(colors):
        if len(_ints(f"colors[{index}]", color, 3, low=0)) == 3 and max(color) > 255:
            raise ValueError(f"colors[{index}] {list(color)}: values must be 0..255")


def validate(config) -> None:
    """Raise ValueError (one line naming the key) for any value the model cannot be built or run with."""
    for key in ("name", "dataset"):
        if not isinstance(getattr(config, key), str):
            raise ValueError(f"{key} {getattr(config, key)!r}: must be a string")
    check_backbone(config.backbone)
    p = config.pixel_decoder
    conv_dim = _int("pixel_decoder.conv_dim", p.conv_dim)
    _int("pixel_decoder.mask_dim", p.mask_dim)
    _int("pixel_decoder.num_encoder_layers", p.num_encoder_layers, 0)
    _int("pixel_decoder.num_points", p.num_points)
    _int("pixel_decoder.ffn_dim", p.ffn_dim)
    _divides(
        "pixel_decoder.conv_dim",
        conv_dim,
        "pixel_decoder.num_heads",
        _int("pixel_decoder.num_heads", p.num_heads),
    )
    _divides(
        "pixel_decoder.conv_dim",
        conv_dim,
        "pixel_decoder.num_groups",
        _int("pixel_decoder.num_groups", p.num_groups),
    )
    d = config.decoder
    hidden = _int("decoder.hidden_dim", d.hidden_dim)
    _int("decoder.num_queries", d.num_queries, 1, MAX_QUERIES)
    _int("decoder.dim_feedforward", d.dim_feedforward)
    _int("decoder.dec_layers", d.dec_layers)
    _divides("decoder.hidden_dim", hidden, "decoder.num_heads", _int("decoder.num_heads", d.num_heads))
    check_input(config.input)
    check_classes(config)
    _choice("task", config.task, TASKS)
    _number("object_mask_threshold", config.object_mask_threshold, 0.0, 1.0)
    _number("overlap_threshold", config.overlap_threshold, 0.0, 1.0)
    _int("test_topk", config.test_topk, 1, 1 << 20)
