"""Test-time pre-processing: an RGB image -> a normalised, padded (1, 3, Hp, Wp) tensor.

Two modes:
- "official": what Mask2Former's evaluation does through detectron2: ResizeShortestEdge (PIL bilinear
  on the uint8 image), normalise with the ImageNet mean/std on 0..255 RGB, then pad bottom/right with
  zeros (after normalisation) to a multiple of `size_divisibility`.
- "deploy": a fixed (H, W) resize, needed by fixed-shape exports. The resize is torch
  `F.interpolate(bilinear, align_corners=False, antialias=False)` on the float image because that is
  the op an exported graph can contain (ONNX Resize), so eager and exported runs see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mask2former.config import PIXEL_MEAN, PIXEL_STD, InputConfig
from mask2former.data.image_io import load_image
from mask2former.inference.postprocess import ImageGeometry


@dataclass
class PreprocessedImage:
    """One image ready for the model.

    tensor: (1, 3, Hp, Wp) normalised RGB, zero padding bottom/right.
    image_size: (h, w) of the resized image inside the tensor (the valid region).
    original_size: (H, W) of the input image, the size results are returned at.
    """

    tensor: torch.Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]

    def geometry(self, padded_size: tuple[int, int] | None = None) -> ImageGeometry:
        """Where this image sits in a batch padded to `padded_size` (default: its own tensor's size)."""
        padded = tuple(padded_size) if padded_size is not None else tuple(self.tensor.shape[-2:])
        return ImageGeometry(padded, tuple(self.image_size), tuple(self.original_size))


def shortest_edge_size(
    height: int, width: int, short_edge: int = 800, max_size: int = 1333
) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output (new_h, new_w) for an (height, width) image.

    The short side becomes `short_edge` unless the long side would exceed `max_size`, then the long side
    becomes `max_size`; sides are rounded half up. Unlike detectron2 a side never rounds to 0 (a 1x4000
    image would): it is kept at least 1 pixel.
    """
    scale = short_edge / min(height, width)
    if height < width:
        new_h, new_w = float(short_edge), scale * width
    else:
        new_h, new_w = scale * height, float(short_edge)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float RGB in 0..255 -> (image - PIXEL_MEAN) / PIXEL_STD, same shape and dtype."""
    mean = torch.tensor(PIXEL_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image - mean) / std


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return load_image(image)


def _to_nchw_float(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in 0..255."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")  # torch warns on read-only arrays (PIL's np.asarray gives one)
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float()


def preprocess_deploy(
    image, size: tuple[int, int] = (1024, 1024), dtype: torch.dtype = torch.float32
) -> PreprocessedImage:
    """Image (anything `load_image` reads) -> exactly (1, 3, size[0], size[1]), aspect ratio not kept.

    The whole tensor is image (no padding), so image_size == size.
    """
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"deploy size must be two positive integers (H, W), got {tuple(size)}")
    rgb = _as_rgb(image)
    pixels = _to_nchw_float(rgb)
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(
            pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=False
        )
    tensor = normalize(pixels).to(dtype)
    return PreprocessedImage(tensor=tensor, image_size=(height, width), original_size=rgb.shape[:2])


def preprocess_official(
    image,
    short_edge: int = 800,
    max_size: int = 1333,
    size_divisibility: int = 32,
    dtype: torch.dtype = torch.float32,
) -> PreprocessedImage:
    """Image -> (1, 3, Hp, Wp) with the official test-time resize, Hp and Wp multiples of size_divisibility.

    The resize is PIL bilinear on uint8, as detectron2's ResizeTransform does for uint8 images.
    """
    if short_edge < 1 or max_size < 1:
        raise ValueError(f"short_edge and max_size must be positive, got {short_edge} and {max_size}")
    rgb = _as_rgb(image)
    new_h, new_w = shortest_edge_size(rgb.shape[0], rgb.shape[1], short_edge, max_size)
    if (new_h, new_w) != rgb.shape[:2]:
        resized = Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR)
        rgb_resized = np.asarray(resized)
    else:
        rgb_resized = rgb
    tensor = pad_batch([normalize(_to_nchw_float(rgb_resized))], size_divisibility).to(dtype)
    return PreprocessedImage(tensor=tensor, image_size=(new_h, new_w), original_size=rgb.shape[:2])


def preprocess(image, mode: str = "official", **kwargs) -> PreprocessedImage:
    """Dispatch to `preprocess_official` (mode "official") or `preprocess_deploy` (mode "deploy")."""
    if mode == "official":
        return preprocess_official(image, **kwargs)
    if mode == "deploy":
        return preprocess_deploy(image, **kwargs)
    raise ValueError(f"unknown pre-processing mode {mode!r}; expected 'official' or 'deploy'")


def preprocess_for(config: InputConfig, image) -> PreprocessedImage:
    """`image` pre-processed as a model's InputConfig says (deploy or official mode): the one
    pre-processing entry of the predictor, export parity, the benchmarks and the server."""
    if config.mode == "deploy":
        if config.size is None:
            raise ValueError("input.size: deploy pre-processing needs a fixed (H, W) size")
        return preprocess_deploy(image, size=tuple(config.size))
    if config.mode != "official":
        raise ValueError(f"input.mode: unknown mode {config.mode!r}; expected official or deploy")
    return preprocess_official(
        image,
        short_edge=config.short_edge,
        max_size=config.max_size,
        size_divisibility=config.size_divisibility,
    )


def pad_batch(tensors: list[torch.Tensor], size_divisibility: int = 32) -> torch.Tensor:
    """[(1, 3, h_i, w_i)] -> (B, 3, Hmax, Wmax), zeros bottom/right, sides rounded up to size_divisibility.

    Zero is the padding value after normalisation, as detectron2's ImageList; size_divisibility <= 1
    pads to the largest image only.
    """
    if not tensors:
        raise ValueError("pad_batch needs at least one image tensor")
    for tensor in tensors:
        if tensor.dim() != 4 or tensor.shape[0] != 1:
            raise ValueError(f"pad_batch expects (1, C, H, W) tensors, got shape {tuple(tensor.shape)}")
    if len({(t.shape[1], t.dtype, t.device) for t in tensors}) > 1:
        raise ValueError("pad_batch: all tensors must share channels, dtype and device")
    max_h = max(t.shape[-2] for t in tensors)
    max_w = max(t.shape[-1] for t in tensors)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    first = tensors[0]
    batch = first.new_zeros((len(tensors), first.shape[1], max_h, max_w))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[-2], : tensor.shape[-1]] = tensor[0]
    return batch
