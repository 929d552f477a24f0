"""What the Predictor accepts as an image, turned into the one format it works on: (H, W, 3) uint8 RGB.

Accepted (each alone, or in a list / tuple, or stacked as a batch):
- a path (str or Path) or a PIL image: read by `load_image` (EXIF orientation, any colour mode);
- a numpy array (H, W, 3), (H, W, 4), (H, W, 1) or (H, W); a batch (B, H, W, 3);
- a torch tensor (3, H, W) / (1, H, W) channels-first (torch's convention) or (H, W, 3) channels-last;
  a batch (B, 3, H, W) or (B, H, W, 3).
Values: uint8 as they are; uint16 divided by 257; float (and bool) arrays/tensors are read on a 0..1
scale when their largest value is at most 1, else on a 0..255 scale, then rounded and clipped to 0..255
(so a float image that is dark on the 0..255 scale, every value <= 1, would be read as 0..1: pass uint8
there). Negative floats are refused: they are a normalised tensor, not an image.
Channels are RGB; `bgr=True` flips (H, W, 3) / (3, H, W) inputs given as BGR (OpenCV's cv2.imread order).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mask2former.data.image_io import ImageReadError, load_image

_CHANNELS = (1, 3, 4)


def is_batch(images) -> bool:
    """True for a list / tuple of images or a stacked 4-D array or tensor; False for one image."""
    if isinstance(images, list | tuple):
        return True
    return isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4


def as_image_list(images) -> list:
    """A batch (list, tuple, 4-D array or tensor) or one image -> a list of single images."""
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return [images]


def to_rgb(image, bgr: bool = False) -> np.ndarray:
    """One image of any accepted kind -> (H, W, 3) uint8 RGB (a new array when converted; never the
    caller's array modified). Raises ImageReadError (a ValueError) with a one-line message."""
    if isinstance(image, str | Path | Image.Image):
        rgb = load_image(image)
        return rgb  # a file or PIL image is RGB by construction: bgr applies to arrays only
    if isinstance(image, torch.Tensor):
        array = _tensor_to_hwc(image)
    elif isinstance(image, np.ndarray):
        array = _numpy_to_hwc(image)
    else:
        kind = type(image).__name__
        raise ImageReadError(
            f"cannot read an image from a {kind}; pass a path, PIL image, numpy array or torch tensor"
        )
    rgb = load_image(_to_uint8(array))
    if bgr:
        rgb = np.ascontiguousarray(rgb[:, :, ::-1])
    return rgb


def to_rgb_list(images: Sequence, bgr: bool = False) -> list[np.ndarray]:
    return [to_rgb(image, bgr) for image in images]


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    values = tensor.detach().cpu()
    # (C, H, W) -> (H, W, C); an ambiguous shape (a 3x3 image, say) is read in torch's own order, C first.
    if values.ndim == 3 and values.shape[0] in _CHANNELS:
        values = values.permute(1, 2, 0)
    if values.dtype == torch.bfloat16 or values.dtype == torch.float16:
        values = values.float()
    return values.numpy()


def _numpy_to_hwc(array: np.ndarray) -> np.ndarray:
    # numpy images are channels-last; a (C, H, W) array is accepted when its last axis cannot be channels.
    if array.ndim == 3 and array.shape[0] in _CHANNELS and array.shape[-1] not in _CHANNELS:
        return array.transpose(1, 2, 0)
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ImageReadError(f"<array>: dtype {array.dtype} is not an image type (uint8, uint16 or float)")
    values = array.astype(np.float32)
    if values.size == 0:
        raise ImageReadError(f"<array>: empty image of shape {array.shape}")
    if not np.isfinite(values).all():
        raise ImageReadError("<array>: NaN or infinite values; pass RGB in 0..1 or 0..255")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise ImageReadError(
            f"<array>: values down to {low:.3g} (a normalised tensor?); pass RGB in 0..1 or 0..255"
        )
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
