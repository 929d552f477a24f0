"""Synthetic scenes in COCO panoptic format: the data the bundled tiny model is trained and tested on.

Each scene fills the background with 1-3 large "stuff" regions split by smooth wavy boundaries and
places 1-6 "thing" shapes on top (later shapes occlude earlier ones). Stuff classes differ by texture
(sky smooth, grass vertical streaks, water horizontal waves, wall bricks) on top of a jittered base
colour; thing classes differ only by shape (circle, square, triangle, star, ring) and get random
colours, so the model has to learn shapes and textures, not a colour lookup.

Layout written by `generate(out_dir, n, seed, size)`:
  out_dir/images/000000.png     RGB image; PNG so there are no JPEG artefacts and bytes are reproducible
  out_dir/panoptic/000000.png   segment ids as RGB (id = R + 256 G + 256^2 B), 0 = void (never used here)
  out_dir/semantic/000000.png   contiguous class index 0..K-1 per pixel (detectron2 sem_seg convention),
                                255 = ignore (never used here)
  out_dir/panoptic.json         COCO panoptic: images, annotations (segments_info), categories
Segment id = category_id * 1000 + k (k = 0 for stuff, 1.. for thing instances). Scene i is drawn from
`numpy.random.default_rng([seed, i])`, so it does not depend on n: same seed -> same bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import uniform_filter1d

from mask2former.data.catalog import DatasetMeta, register_meta
from mask2former.fileio import id2rgb, write_json, write_png

# (category id, name, is thing, display colour). Things come first, as in COCO; the stuff ids leave a
# gap (6..10 unused) so code that assumes "category id = index + 1" fails on this set too.
_CLASSES = [
    (1, "circle", True, (220, 20, 60)),
    (2, "square", True, (0, 0, 230)),
    (3, "triangle", True, (250, 170, 30)),
    (4, "star", True, (255, 77, 255)),
    (5, "ring", True, (0, 226, 252)),
    (11, "sky", False, (70, 130, 180)),
    (12, "grass", False, (152, 251, 152)),
    (13, "water", False, (61, 143, 255)),
    (14, "wall", False, (137, 54, 74)),
]
# Shapes the default set leaves out: `generate(classes=...)` draws them for datasets whose classes differ
# from the bundled model's (the fine-tuning walkthrough of the README).
_EXTRA_CLASSES = [
    (6, "hexagon", True, (119, 11, 32)),
    (7, "cross", True, (0, 128, 0)),
]
THING_SHAPES = [name for _, name, thing, _ in _CLASSES if thing]
STUFF_NAMES = [name for _, name, thing, _ in _CLASSES if not thing]
DEFAULT_CLASSES = [name for _, name, _, _ in _CLASSES]
ALL_CLASSES = DEFAULT_CLASSES + [name for _, name, _, _ in _EXTRA_CLASSES]
# Base colour of each stuff texture; jittered per scene. Sky and water are both blue on purpose.
_STUFF_BASE = {
    "sky": (120, 165, 215),
    "grass": (80, 140, 60),
    "water": (50, 100, 160),
    "wall": (165, 110, 90),
}
_FILE_PATTERN = re.compile(r"^\d{6}\.png$")


def synth_meta(classes: list[str] | None = None) -> DatasetMeta:
    """The synthetic scenes' classes: index k -> name, thing flag, category id, colour.

    `classes`: a subset of ALL_CLASSES (things first, then stuff, in catalogue order); None = the default 9.
    """
    if classes is None:
        chosen = _CLASSES
    else:
        unknown = [name for name in classes if name not in ALL_CLASSES]
        if unknown:
            raise ValueError(f"unknown synthetic classes {unknown}; choose from {', '.join(ALL_CLASSES)}")
        catalogue = sorted(_CLASSES + _EXTRA_CLASSES, key=lambda row: (not row[2], row[0]))
        chosen = [row for row in catalogue if row[1] in classes]
        if not any(thing for _, _, thing, _ in chosen) or all(thing for _, _, thing, _ in chosen):
            raise ValueError("synthetic classes need at least one shape (thing) and one texture (stuff)")
    return DatasetMeta(
        name="synth" if classes is None else "synth-custom",
        class_names=[name for _, name, _, _ in chosen],
        thing_classes=[thing for _, _, thing, _ in chosen],
        category_ids=[cid for cid, _, _, _ in chosen],
        colors=[color for _, _, _, color in chosen],
    )


SYNTH_META = synth_meta()
register_meta("synth", synth_meta)


@dataclass
class Scene:
    """One generated scene.

    image: (H, W, 3) uint8. id_map: (H, W) int64 segment ids. class_map: (H, W) uint8 contiguous classes.
    segments_info: COCO panoptic segments (id, category_id, iscrowd, bbox [x, y, w, h], area).
    """

    image: np.ndarray
    id_map: np.ndarray
    class_map: np.ndarray
    segments_info: list[dict]


# ---------------------------------------------------------------- stuff


def _stuff_layout(rng: np.random.Generator, h: int, w: int, regions: int) -> np.ndarray:
    """(H, W) int region index 0..regions-1: bands along a random direction with wavy boundaries."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ys, xs = ys / max(h - 1, 1), xs / max(w - 1, 1)
    angle = rng.uniform(0, np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    across = -xs * np.sin(angle) + ys * np.cos(angle)
    for _ in range(2):  # two sine waves make the boundaries smooth but not regular
        amplitude, cycles, phase = rng.uniform(0.03, 0.09), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        along = along + amplitude * np.sin(2 * np.pi * cycles * across + phase)
    if regions == 1:
        return np.zeros((h, w), dtype=np.int64)
    # Cuts at jittered quantiles keep every region large whatever the direction.
    fractions = (np.arange(1, regions) + rng.uniform(-0.2, 0.2, regions - 1)) / regions
    cuts = np.quantile(along, fractions)
    return np.searchsorted(cuts, along.ravel()).reshape(h, w)


def _stuff_texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float texture of one stuff class: jittered base colour + its class-specific pattern."""
    scale = min(h, w) / 128.0  # patterns keep their look relative to the image size
    base = np.asarray(_STUFF_BASE[name], dtype=np.float64) + rng.uniform(-25, 25, 3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    if name == "sky":  # smooth: a gentle gradient and almost no noise
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / max(h, w)
        pattern = 30.0 * ramp + rng.normal(0, 2.0, (h, w))
    elif name == "grass":  # vertical streaks: noise averaged along the columns
        length = max(3, int(round(9 * scale)))
        streaks = uniform_filter1d(rng.normal(0, 1, (h, w)), size=length, axis=0, mode="wrap")
        pattern = 22.0 * streaks / max(float(streaks.std()), 1e-6)
    elif name == "water":  # horizontal waves with a slow wobble
        period = rng.uniform(5.0, 8.0) * scale
        wobble = 1.5 * np.sin(2 * np.pi * xs / (rng.uniform(20, 40) * scale) + rng.uniform(0, 2 * np.pi))
        pattern = 28.0 * np.sin(2 * np.pi * ys / period + wobble + rng.uniform(0, 2 * np.pi))
        pattern = pattern + rng.normal(0, 3.0, (h, w))
    elif name == "wall":  # bricks: dark mortar lines, alternate rows shifted by half a brick
        brick_h = rng.uniform(7.0, 10.0) * scale
        brick_w = 2.0 * brick_h
        row = np.floor((ys + rng.uniform(0, brick_h)) / brick_h)
        shifted = xs + (row % 2) * brick_w / 2 + rng.uniform(0, brick_w)
        col = np.floor(shifted / brick_w)
        mortar = ((ys + brick_h) % brick_h < 1.5 * scale) | (shifted % brick_w < 1.5 * scale)
        brick_tone = rng.uniform(-12, 12, (int(row.max()) + 2, int(col.max()) + 2))
        pattern = brick_tone[row.astype(int), col.astype(int)] - 60.0 * mortar + rng.normal(0, 3.0, (h, w))
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    return base[None, None, :] + pattern[:, :, None]


# ---------------------------------------------------------------- things


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(H, W) bool mask of one shape centred at (cx, cy) with circumradius `radius`, rotated by angle."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)

    def disc(r: float, value: int) -> None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)

    if shape == "cross":  # a plus sign: two bars of a third of the width, rotated
        half, arm = radius * 0.8, radius * 0.8 / 3
        outline = [(-arm, -half), (arm, -half), (arm, -arm), (half, -arm), (half, arm), (arm, arm)]
        outline += [(arm, half), (-arm, half), (-arm, arm), (-half, arm), (-half, -arm), (-arm, -arm)]
        cos, sin = np.cos(angle), np.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline], fill=1)
    elif shape == "circle":
        disc(radius * 0.85, 1)  # shrunk so a circle's area is close to a square's
    elif shape == "ring":
        disc(radius * 0.95, 1)
        disc(radius * 0.5, 0)
    else:
        corners, inner = {
            "square": (4, None),
            "triangle": (3, None),
            "star": (5, 0.45),
            "hexagon": (6, None),
        }[shape]
        radii = [radius] * corners if inner is None else [radius, radius * inner] * corners
        steps = len(radii)
        points = [
            (cx + r * np.cos(angle + 2 * np.pi * k / steps), cy + r * np.sin(angle + 2 * np.pi * k / steps))
            for k, r in enumerate(radii)
        ]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    """A saturated, not too dark RGB colour (float, 0..255) from a random hue."""
    hue, sat, val = rng.uniform(0, 6), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0) * 255
    chroma = sat * val
    x = chroma * (1 - abs(hue % 2 - 1))
    sector = [(chroma, x, 0), (x, chroma, 0), (0, chroma, x), (0, x, chroma), (x, 0, chroma), (chroma, 0, x)]
    return np.asarray(sector[int(hue) % 6], dtype=np.float64) + (val - chroma)


# ---------------------------------------------------------------- scenes


def make_scene(
    rng: np.random.Generator, height: int = 128, width: int = 128, meta: DatasetMeta = SYNTH_META
) -> Scene:
    """Draw one scene from rng (see the module docstring) with the classes of `meta` (a `synth_meta`)."""
    thing_shapes = [n for n, thing in zip(meta.class_names, meta.thing_classes, strict=True) if thing]
    stuff_names = [n for n, thing in zip(meta.class_names, meta.thing_classes, strict=True) if not thing]
    h, w = height, width
    side = min(h, w)
    image = np.zeros((h, w, 3), dtype=np.float64)
    class_map = np.zeros((h, w), dtype=np.uint8)
    id_map = np.zeros((h, w), dtype=np.int64)

    regions = int(rng.choice([1, 2, 3], p=[0.15, 0.45, 0.40]))
    regions = min(regions, len(stuff_names))
    layout = _stuff_layout(rng, h, w, regions)
    for region, stuff in enumerate(rng.permutation(len(stuff_names))[:regions]):
        name = stuff_names[int(stuff)]
        inside = layout == region
        image[inside] = _stuff_texture(rng, name, h, w)[inside]
        index = meta.class_names.index(name)
        class_map[inside] = index
        id_map[inside] = meta.category_ids[index] * 1000

    # Place every shape first, then keep those that later shapes leave mostly visible: dropping a shape
    # only uncovers the ones below it, so one pass suffices and no void pixels are ever needed.
    shapes = []
    for _ in range(int(rng.integers(1, 7))):
        name = thing_shapes[int(rng.integers(len(thing_shapes)))]
        radius = rng.uniform(0.09, 0.22) * side
        cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        mask = _shape_mask(name, h, w, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        shapes.append((name, mask, _random_color(rng), rng.uniform(-15, 15, 2)))
    covered = np.zeros((h, w), dtype=bool)
    keep = [False] * len(shapes)
    min_area = max(40, 0.004 * h * w)
    for k in range(len(shapes) - 1, -1, -1):  # from the top shape down
        mask = shapes[k][1]
        if (mask & ~covered).sum() >= max(min_area, 0.5 * mask.sum()):
            keep[k] = True
            covered |= mask
    instance = 0
    for (name, mask, color, shading), kept in zip(shapes, keep, strict=True):
        if not kept:
            continue
        background = image[mask].mean(axis=0)
        for _ in range(10):  # a shape the colour of what lies under it would be invisible
            if np.abs(color - background).sum() >= 120:
                break
            color = _random_color(rng)
        ys, xs = np.nonzero(mask)
        tone = shading[0] * (xs - xs.mean()) / side * 4 + shading[1] * (ys - ys.mean()) / side * 4
        image[ys, xs] = color[None, :] + tone[:, None]
        instance += 1
        index = meta.class_names.index(name)
        class_map[mask] = index
        id_map[mask] = meta.category_ids[index] * 1000 + instance

    image = image + rng.normal(0, 4.0, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(image=image, id_map=id_map, class_map=class_map, segments_info=segments_of(id_map))


def segments_of(id_map: np.ndarray) -> list[dict]:
    """COCO panoptic segments_info of an id map whose ids are category_id * 1000 + k (0 = void)."""
    segments = []
    for segment_id in np.unique(id_map):
        if segment_id == 0:
            continue
        ys, xs = np.nonzero(id_map == segment_id)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append(
            {
                "id": int(segment_id),
                "category_id": int(segment_id) // 1000,
                "iscrowd": 0,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(ys.size),
            }
        )
    return segments


# ---------------------------------------------------------------- writing


def categories_json(meta: DatasetMeta = SYNTH_META) -> list[dict]:
    """The "categories" list of panoptic.json, in contiguous class order."""
    return [
        {
            "id": cid,
            "name": name,
            "supercategory": "thing" if thing else "stuff",
            "isthing": int(thing),
            "color": list(color),
        }
        for cid, name, thing, color in zip(
            meta.category_ids, meta.class_names, meta.thing_classes, meta.colors, strict=True
        )
    ]


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir; a non-empty folder is only reused with overwrite, and only our files are removed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: folder is not empty; choose another folder or pass overwrite")
        for sub in ("images", "panoptic", "semantic"):
            folder = out_dir / sub
            if folder.is_dir():
                for file in folder.iterdir():
                    if _FILE_PATTERN.match(file.name):
                        file.unlink()
        (out_dir / "panoptic.json").unlink(missing_ok=True)
    for sub in ("images", "panoptic", "semantic"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    overwrite: bool = False,
    classes: list[str] | None = None,
) -> dict:
    """Write n scenes of size (H, W) to out_dir (layout in the module docstring); returns panoptic.json.

    `classes`: names from ALL_CLASSES to draw (None: the bundled model's 9). panoptic.json is written
    last, so its presence means the set is complete.
    """
    meta = SYNTH_META if classes is None else synth_meta(classes)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    height, width = size
    if height < 16 or width < 16:
        raise ValueError(f"size {height}x{width} is too small; use at least 16x16")
    out_dir = Path(out_dir)
    _prepare_folder(out_dir, overwrite)
    images, annotations = [], []
    for i in range(n):
        scene = make_scene(np.random.default_rng([seed, i]), height, width, meta)
        name = f"{i:06d}.png"
        write_png(out_dir / "images" / name, scene.image)
        write_png(out_dir / "panoptic" / name, id2rgb(scene.id_map))
        write_png(out_dir / "semantic" / name, scene.class_map)
        images.append({"id": i, "file_name": name, "height": height, "width": width})
        annotations.append({"image_id": i, "file_name": name, "segments_info": scene.segments_info})
    panoptic = {
        "info": {"description": f"mask2former synthetic scenes, seed {seed}, {height}x{width}"},
        "images": images,
        "annotations": annotations,
        "categories": categories_json(meta),
    }
    json_path = out_dir / "panoptic.json"
    write_json(json_path, panoptic)
    return panoptic
