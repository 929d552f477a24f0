"""Training augmentations of the official recipes, on numpy arrays with an explicit random generator.

Every augmentation is a callable `aug(image, masks, labels, rng=None) -> (image, masks, labels)`:
image (H, W, 3) uint8 RGB, masks (N, H, W) bool, labels (N,) int64. Without `rng` the augmentation draws
from its own generator (seeded at construction). Geometry follows detectron2: images resized with PIL
bilinear, masks with nearest; padding goes bottom/right; masks that end up empty are dropped (with their
labels) unless drop_empty=False.

- `LargeScaleJitter`: COCO recipe (coco_panoptic_lsj / coco_instance_lsj mappers): horizontal flip,
  ResizeScale (scale the target box by U(0.1, 2.0), fit the image inside it keeping the aspect ratio),
  FixedSizeCrop (random crop to size x size, then pad to it: image 128, masks 0).
- `ShortestEdgeMultiScale`: ADE20K recipe (mask_former_semantic mapper): ResizeShortestEdge (short edge
  chosen from int(0.1 * 512 * x) for x in 5..20, long edge <= 2048), random 512x512 crop with the
  category-area constraint, SSD colour jitter, horizontal flip, pad to the crop size (image 128, masks 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------- geometric primitives


def _nearest_indices(size_out: int, size_in: int) -> np.ndarray:
    """Source index of each output pixel by pixel centres: floor((i + 0.5) * size_in / size_out)."""
    return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def resize(
    image: np.ndarray,
    masks: np.ndarray,
    height: int,
    width: int,
    window: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) bilinear (PIL, as detectron2's ResizeTransform), masks (N, H, W) nearest.

    window (top, left, h, w) crops the resized result; masks are then only gathered inside it, which
    keeps memory bounded when LSJ upscales many masks 2x before cropping.
    """
    h, w = image.shape[:2]
    top, left, crop_h, crop_w = window if window is not None else (0, 0, height, width)
    if (h, w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    rows = _nearest_indices(height, h)[top : top + crop_h]
    cols = _nearest_indices(width, w)[left : left + crop_w]
    return image[top : top + crop_h, left : left + crop_w], masks[:, rows][:, :, cols]


def crop(image: np.ndarray, masks: np.ndarray, top: int, left: int, height: int, width: int):
    """Cut the window [top, top + height) x [left, left + width) (clipped to the image)."""
    return image[top : top + height, left : left + width], masks[:, top : top + height, left : left + width]


def pad(image: np.ndarray, masks: np.ndarray, height: int, width: int, image_value: int = 128):
    """Pad bottom/right up to (height, width): the image with image_value, masks with 0 (no object)."""
    h, w = image.shape[:2]
    if h >= height and w >= width:
        return image, masks
    out_image = np.full((max(h, height), max(w, width), 3), image_value, dtype=image.dtype)
    out_image[:h, :w] = image
    out_masks = np.zeros((masks.shape[0], max(h, height), max(w, width)), dtype=bool)
    out_masks[:, :h, :w] = masks
    return out_image, out_masks


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image[:, ::-1], masks[:, :, ::-1]


def drop_empty(masks: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove masks with no pixel left (and their labels)."""
    keep = masks.reshape(masks.shape[0], -1).any(axis=1)
    return masks[keep], labels[keep]


# ---------------------------------------------------------------- colour


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB 0..255 -> (..., 3) hue in degrees [0, 360), saturation 0..1, value 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    hue = np.where(value == r, (g - b) / safe, hue)
    hue = np.where(chroma > 0, (hue * 60.0) % 360.0, 0.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    chroma = value * saturation
    sector = hue / 60.0
    x = chroma * (1 - np.abs(sector % 2 - 1))
    zero = np.zeros_like(chroma)
    index = np.floor(sector).astype(np.int64) % 6
    choices = [
        (chroma, x, zero),
        (x, chroma, zero),
        (zero, chroma, x),
        (zero, x, chroma),
        (x, zero, chroma),
        (chroma, zero, x),
    ]
    out = np.zeros(hsv.shape, dtype=np.float64)
    for k, channels in enumerate(choices):
        where = index == k
        for c in range(3):
            out[..., c][where] = channels[c][where]
    return out + (value - chroma)[..., None]


class ColorAugSSD:
    """SSD photometric distortion with the official magnitudes (detectron2 ColorAugSSDTransform).

    Each step applies with probability 1/2: brightness + U(-32, 32); then in random order either
    (contrast, saturation, hue) or (saturation, hue, contrast); contrast x U(0.5, 1.5), saturation x
    U(0.5, 1.5), hue + an integer in [-18, 18] OpenCV units (2 degrees each). Values are clipped to
    0..255 and truncated to uint8 after every step, as the official code does. Difference: HSV here is
    computed in float, without OpenCV's uint8 HSV round trip.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta, self.contrast, self.saturation, self.hue_delta = (
            brightness_delta,
            contrast,
            saturation,
            hue_delta,
        )

    @staticmethod
    def _to_uint8(values: np.ndarray) -> np.ndarray:
        return np.clip(values, 0, 255).astype(np.uint8)

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return self._to_uint8(image.astype(np.float32) * rng.uniform(*self.contrast))
        return image

    def _saturation(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = _rgb_to_hsv(image.astype(np.float64))
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*self.saturation), 0.0, 1.0)
            return self._to_uint8(_hsv_to_rgb(hsv))
        return image

    def _hue(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = _rgb_to_hsv(image.astype(np.float64))
            # OpenCV stores hue in 2-degree units; the official delta is in those units, both ends included.
            shift = 2.0 * int(rng.integers(-self.hue_delta, self.hue_delta + 1))
            hsv[..., 0] = (hsv[..., 0] + shift) % 360.0
            return self._to_uint8(_hsv_to_rgb(hsv))
        return image

    def image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W, 3) uint8 jittered."""
        if rng.integers(2):
            delta = rng.uniform(-self.brightness_delta, self.brightness_delta)
            image = self._to_uint8(image.astype(np.float32) + delta)
        if rng.integers(2):
            image = self._hue(self._saturation(self._contrast(image, rng), rng), rng)
        else:
            image = self._contrast(self._hue(self._saturation(image, rng), rng), rng)
        return image

    def __call__(self, image, masks, labels, rng: np.random.Generator | None = None) -> Arrays:
        return self.image(image, rng if rng is not None else np.random.default_rng()), masks, labels


# ---------------------------------------------------------------- recipes


class _Augmentation:
    def __init__(self, seed: int | None):
        self.rng = np.random.default_rng(seed)

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None
    ) -> Arrays:
        masks = np.asarray(masks, dtype=bool).reshape(-1, *image.shape[:2])
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        return self.apply(image, masks, labels, rng if rng is not None else self.rng)

    def apply(self, image, masks, labels, rng: np.random.Generator) -> Arrays:
        raise NotImplementedError


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class LargeScaleJitter(_Augmentation):
    """COCO large-scale jitter; output is always (size, size) (or (H, W) for a pair).

    Flip (p = 0.5) -> resize so the image fits in (scale * size) with scale ~ U(min_scale, max_scale)
    -> random crop of size (one uniform offset fraction shared by both axes, as FixedSizeCrop) -> pad
    bottom/right (image `image_pad`, masks 0).
    """

    def __init__(
        self,
        size: int | Sequence[int] = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        flip: bool = True,
        image_pad: int = 128,
        drop_empty: bool = True,
        seed: int | None = None,
    ):
        super().__init__(seed)
        self.size, self.min_scale, self.max_scale = _pair(size), min_scale, max_scale
        self.flip, self.image_pad, self.drop_empty = flip, image_pad, drop_empty

    def apply(self, image, masks, labels, rng):
        if self.flip and rng.uniform() < 0.5:
            image, masks = hflip(image, masks)
        h, w = image.shape[:2]
        target_h, target_w = self.size
        scale = rng.uniform(self.min_scale, self.max_scale)
        factor = min(target_h * scale / h, target_w * scale / w)
        new_h, new_w = max(1, int(np.round(h * factor))), max(1, int(np.round(w * factor)))
        fraction = rng.uniform(0.0, 1.0)
        top = int(np.round(max(new_h - target_h, 0) * fraction))
        left = int(np.round(max(new_w - target_w, 0) * fraction))
        window = (top, left, min(target_h, new_h), min(target_w, new_w))
        image, masks = resize(image, masks, new_h, new_w, window)
        image, masks = pad(image, masks, target_h, target_w, self.image_pad)
        if self.drop_empty:
            masks, labels = drop_empty(masks, labels)
        return np.ascontiguousarray(image), np.ascontiguousarray(masks), labels


class ShortestEdgeMultiScale(_Augmentation):
    """ADE20K semantic recipe; output (crop_h, crop_w) when pad_to_crop, else at most that.

    cat_max_ratio < 1 re-draws the crop (up to 10 times) until no class covers that fraction or more of
    the labelled pixels and at least two classes are present (RandomCrop_CategoryAreaConstraint).
    """

    def __init__(
        self,
        short_edges: Sequence[int] = tuple(int(0.1 * 512 * x) for x in range(5, 21)),
        max_size: int = 2048,
        crop: tuple[int, int] | None = (512, 512),
        cat_max_ratio: float = 1.0,
        color_jitter: bool = True,
        flip: bool = True,
        pad_to_crop: bool = True,
        image_pad: int = 128,
        drop_empty: bool = True,
        seed: int | None = None,
    ):
        super().__init__(seed)
        self.short_edges, self.max_size = list(short_edges), max_size
        self.crop = None if crop is None else _pair(crop)
        self.cat_max_ratio, self.flip, self.pad_to_crop = cat_max_ratio, flip, pad_to_crop
        self.color = ColorAugSSD() if color_jitter else None
        self.image_pad, self.drop_empty = image_pad, drop_empty

    def resized_size(self, h: int, w: int, short: int) -> tuple[int, int]:
        """ResizeShortestEdge: short side -> `short`, long side capped at max_size, rounded half up."""
        scale = short / min(h, w)
        new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
        if max(new_h, new_w) > self.max_size:
            cap = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * cap, new_w * cap
        return int(new_h + 0.5), int(new_w + 0.5)

    def _crop_window(self, masks, labels, h, w, rng) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.crop[0], h), min(self.crop[1], w)
        for _ in range(10 if self.cat_max_ratio < 1.0 else 1):
            top, left = int(rng.integers(h - crop_h + 1)), int(rng.integers(w - crop_w + 1))
            if self.cat_max_ratio >= 1.0:
                break
            window = (
                masks[:, top : top + crop_h, left : left + crop_w].reshape(masks.shape[0], -1).sum(axis=1)
            )
            per_class = np.bincount(labels, weights=window) if labels.size else np.zeros(0)
            per_class = per_class[per_class > 0]
            if per_class.size > 1 and per_class.max() < per_class.sum() * self.cat_max_ratio:
                break
        return top, left, crop_h, crop_w

    def apply(self, image, masks, labels, rng):
        h, w = image.shape[:2]
        short = int(self.short_edges[int(rng.integers(len(self.short_edges)))])
        new_h, new_w = self.resized_size(h, w, short)
        if self.crop is None:
            image, masks = resize(image, masks, new_h, new_w)
        elif self.cat_max_ratio < 1.0:  # the constraint looks at the resized masks
            image, masks = resize(image, masks, new_h, new_w)
            image, masks = crop(image, masks, *self._crop_window(masks, labels, new_h, new_w, rng))
        else:
            window = self._crop_window(None, labels, new_h, new_w, rng)
            image, masks = resize(image, masks, new_h, new_w, window)
        if self.color is not None:
            image = self.color.image(image, rng)
        if self.flip and rng.uniform() < 0.5:
            image, masks = hflip(image, masks)
        if self.crop is not None and self.pad_to_crop:
            image, masks = pad(image, masks, *self.crop, image_value=self.image_pad)
        if self.drop_empty:
            masks, labels = drop_empty(masks, labels)
        return np.ascontiguousarray(image), np.ascontiguousarray(masks), labels


class Compose:
    """Apply augmentations in order, all drawing from the same generator."""

    def __init__(self, augmentations: Sequence, seed: int | None = None):
        self.augmentations = list(augmentations)
        self.rng = np.random.default_rng(seed)

    def __call__(self, image, masks, labels, rng: np.random.Generator | None = None) -> Arrays:
        rng = rng if rng is not None else self.rng
        for augmentation in self.augmentations:
            image, masks, labels = augmentation(image, masks, labels, rng=rng)
        return image, masks, labels
