"""Overlay pictures of semantic, panoptic and instance results on the input image.

Each segment is blended with its colour (alpha 0.5 by default), outlined where it meets other pixels,
and named at its most interior pixel (the one farthest from its boundary), which stays inside thin or
concave shapes where a centroid would not. Pixels outside every segment keep their exact input value.
Text size, outline and box widths grow with the picture (`style_for`), so labels read the same on a 256 px
scene and a 4000 px photo seen at screen size.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mask2former import fileio
from mask2former.data.catalog import DatasetMeta

Color = tuple[int, int, int]


@dataclass
class DrawStyle:
    """Sizes in pixels of what is drawn on a picture."""

    font_size: int  # label text height
    line_width: int  # outlines and boxes
    pad: int  # space around label text


# Label text is 1/32 of the shorter side (10 px at least): about 25 px on screen for a photo fitted to a
# ~1000 px window, whatever its resolution; outlines and boxes are 1/320 of it (1 px at least).
TEXT_FRACTION = 1 / 32
LINE_FRACTION = 1 / 320
MIN_FONT_SIZE = 10


def style_for(height: int, width: int) -> DrawStyle:
    """The label size, line width and label padding for a picture of (height, width)."""
    short = min(height, width)
    font_size = max(MIN_FONT_SIZE, round(short * TEXT_FRACTION))
    return DrawStyle(font_size, max(1, round(short * LINE_FRACTION)), max(2, font_size // 6))


@dataclass
class _Segment:
    mask: np.ndarray  # (H, W) bool
    color: Color
    label: str


# ----------------------------------------------------------------------------------------------------
# Public drawing functions


def draw_semantic(
    image: np.ndarray,
    class_map: np.ndarray,
    meta: DatasetMeta | None = None,
    alpha: float = 0.5,
    show_labels: bool = True,
) -> Image.Image:
    """image (H, W, 3) uint8, class_map (H, W) int of contiguous class indices -> overlay (W x H PIL image).

    Negative values and meta.ignore_label are left unpainted.
    """
    image, class_map = _check_image(image), np.asarray(class_map)
    _check_map(class_map, image, "class_map")
    ignore = meta.ignore_label if meta is not None else 255
    segments = []
    for class_index in np.unique(class_map):
        if class_index < 0 or class_index == ignore:
            continue
        name, color = _class_info(meta, int(class_index))
        segments.append(_Segment(class_map == class_index, color, name))
    return _render(image, segments, alpha, show_labels)


def draw_panoptic(
    image: np.ndarray,
    id_map: np.ndarray,
    segments: Sequence,
    meta: DatasetMeta | None = None,
    alpha: float = 0.5,
    show_labels: bool = True,
) -> Image.Image:
    """image (H, W, 3) uint8, id_map (H, W) int32 with 0 = void -> overlay.

    `segments` items have `id`, `category_id` (contiguous class index) and `isthing` (objects or dicts).
    Stuff uses its class colour; each thing gets its own shade of its class colour.
    """
    image, id_map = _check_image(image), np.asarray(id_map)
    _check_map(id_map, image, "id_map")
    palette = _InstancePalette()
    drawn = []
    for segment in segments:
        segment_id = int(_field(segment, "id"))
        if segment_id == 0:
            continue
        mask = id_map == segment_id
        if not mask.any():
            continue
        class_index = int(_field(segment, "category_id"))
        name, color = _class_info(meta, class_index)
        if bool(_field(segment, "isthing", False)):
            color = palette.next(class_index, color)
        drawn.append(_Segment(mask, color, name))
    return _render(image, drawn, alpha, show_labels)


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    classes: Sequence[int],
    scores: Sequence[float],
    boxes: np.ndarray | None = None,
    meta: DatasetMeta | None = None,
    alpha: float = 0.5,
    show_labels: bool = True,
    score_threshold: float = 0.0,
) -> Image.Image:
    """image (H, W, 3) uint8, masks (N, H, W) bool, classes (N,), scores (N,), boxes (N, 4) xyxy -> overlay.

    Instances scoring below score_threshold are skipped; larger masks are painted first so small ones
    stay visible on top. Labels read "<class> <score %>".
    """
    image = _check_image(image)
    masks = np.asarray(masks).astype(bool, copy=False)
    classes, scores = np.asarray(classes).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2] or not len(classes) == len(masks) == len(scores):
        raise ValueError(
            f"draw_instances: masks {masks.shape}, classes {classes.shape} and scores {scores.shape} do not "
            f"match an image of size {image.shape[:2]} (expected (N, H, W), (N,), (N,))"
        )
    box_array = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep = [i for i in range(len(masks)) if scores[i] >= score_threshold and masks[i].any()]
    keep.sort(key=lambda i: -int(masks[i].sum()))
    palette = _InstancePalette()
    drawn, outlines = [], []
    for i in keep:
        name, color = _class_info(meta, int(classes[i]))
        color = palette.next(int(classes[i]), color)
        drawn.append(_Segment(masks[i], color, f"{name} {100 * scores[i]:.0f}%"))
        if box_array is not None:
            outlines.append((tuple(float(v) for v in box_array[i]), color))
    return _render(image, drawn, alpha, show_labels, boxes=outlines)


def save_image(img: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write a picture atomically (`fileio.save_image`; folders created); the format follows the suffix."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(_check_image(img))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fileio.save_image(img, path)


def label_point(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of the mask pixel farthest from the mask's boundary (ValueError for an empty mask).

    Large masks are subsampled first (stride keeps the longer box side near 256) so this stays cheap.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("label_point: empty mask")
    top, left = int(ys.min()), int(xs.min())
    crop = mask[top : int(ys.max()) + 1, left : int(xs.max()) + 1]
    stride = max(1, -(-max(crop.shape) // 256))
    sampled = crop[::stride, ::stride]
    if not sampled.any():  # a thin mask the subsampling missed: any pixel of it will do
        middle = len(ys) // 2
        return int(ys[middle]), int(xs[middle])
    # Zero border: the image edge counts as boundary, otherwise a full-image mask has no distance.
    distance = ndimage.distance_transform_edt(np.pad(sampled, 1))[1:-1, 1:-1]
    # Deepest points form ridges (a rectangle's middle line): take the one nearest the mask's centroid.
    cand_y, cand_x = np.nonzero(distance >= distance.max() - 0.5)
    centre_y, centre_x = (np.mean(np.nonzero(sampled)[axis]) for axis in (0, 1))
    best = int(np.argmin((cand_y - centre_y) ** 2 + (cand_x - centre_x) ** 2))
    return top + int(cand_y[best]) * stride, left + int(cand_x[best]) * stride


# ----------------------------------------------------------------------------------------------------
# Rendering


def _render(
    image: np.ndarray,
    segments: list[_Segment],
    alpha: float,
    show_labels: bool,
    boxes: list[tuple[tuple[float, float, float, float], Color]] | None = None,
) -> Image.Image:
    out = image.copy()
    for segment in segments:
        color = np.array(segment.color, dtype=np.float32)
        pixels = out[segment.mask].astype(np.float32)
        out[segment.mask] = np.clip(np.rint(pixels * (1.0 - alpha) + color * alpha), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    style = style_for(height, width)
    for segment in segments:
        # The darker outline separates touching segments of similar colour.
        edge = _inner_boundary(segment.mask, style.line_width)
        out[edge] = (np.array(segment.color) * 0.6).astype(np.uint8)
    picture = Image.fromarray(out)
    if not segments:
        return picture
    draw = ImageDraw.Draw(picture)
    for (x0, y0, x1, y1), color in boxes or []:
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=style.line_width)
    if show_labels:
        font = _font(style.font_size)
        min_area = max(4, int(0.0002 * height * width))
        for segment in segments:
            if segment.label and int(segment.mask.sum()) >= min_area:
                point = label_point(segment.mask)
                _draw_label(draw, segment.label, point, segment.color, font, (height, width), style.pad)
    return picture


def _inner_boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (thickness 1), or within `thickness` pixels (square
    neighbourhood) of one; the image edge does not count as outside."""
    ys, xs = np.nonzero(mask)
    edge = np.zeros_like(mask)
    if len(ys) == 0:
        return edge
    height, width = mask.shape
    # The bounding box grown by one pixel holds every neighbour that can be outside the mask.
    region = (
        slice(max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, height)),
        slice(max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, width)),
    )
    crop = mask[region]
    if thickness <= 1:
        edge[region] = crop & ~ndimage.binary_erosion(crop, border_value=1)
    else:  # a separable minimum filter: cheap for the thick outlines of large pictures
        eroded = ndimage.minimum_filter(crop.view(np.uint8), size=2 * thickness + 1, mode="nearest")
        edge[region] = crop & (eroded == 0)
    return edge


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    point: tuple[int, int],
    color: Color,
    font,
    image_size: tuple[int, int],
    pad: int = 2,
) -> None:
    """Text on a box of the segment colour, centred on point (y, x) and kept inside the image."""
    height, width = image_size
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = x1 - x0, y1 - y0
    left = min(max(point[1] - text_w // 2 - pad, 0), max(width - text_w - 2 * pad, 0))
    top = min(max(point[0] - text_h // 2 - pad, 0), max(height - text_h - 2 * pad, 0))
    draw.rectangle([left, top, left + text_w + 2 * pad - 1, top + text_h + 2 * pad - 1], fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((left + pad - x0, top + pad - y0), text, fill=text_color, font=font)


@lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# ----------------------------------------------------------------------------------------------------
# Colours and names


class _InstancePalette:
    """First instance of a class gets the class colour; the next ones get distinct jittered shades."""

    def __init__(self) -> None:
        self.used: set[Color] = set()
        self.count: dict[int, int] = {}

    def next(self, class_index: int, base: Color) -> Color:
        k = self.count.get(class_index, 0)
        color = base
        while color in self.used:
            k += 1
            rng = np.random.default_rng([abs(class_index), k])
            direction = rng.uniform(-1.0, 1.0, 3)
            shift = direction / max(np.abs(direction).max(), 1e-6) * 70.0
            color = tuple(int(v) for v in np.clip(np.asarray(base) + shift, 0, 255))
        self.count[class_index] = k
        self.used.add(color)
        return color


def _class_info(meta: DatasetMeta | None, class_index: int) -> tuple[str, Color]:
    if meta is not None and 0 <= class_index < meta.num_classes:
        return meta.class_names[class_index], tuple(int(c) for c in meta.colors[class_index])
    return f"class {class_index}", _fallback_color(class_index)


def _fallback_color(index: int) -> Color:
    """Well-spread hues (golden-ratio steps) for classes a catalog does not cover."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _field(item, name: str, default=None):
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} of shape {image.shape}")
    return image


def _check_map(values: np.ndarray, image: np.ndarray, name: str) -> None:
    if values.shape != image.shape[:2]:
        raise ValueError(f"{name} has shape {values.shape}, the image is {image.shape[:2]}")
