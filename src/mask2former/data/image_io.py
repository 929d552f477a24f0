"""Reading images from disk, PIL or numpy into one format: (H, W, 3) uint8 RGB.

Every failure a user can cause (missing file, not an image, truncated data, odd array) becomes an
`ImageReadError` whose message is one line naming the file, so the CLI can print it as is.

Colour handling follows what the official pipeline gets from detectron2's `read_image`: EXIF
orientation applied, then PIL `convert("RGB")`. In particular an alpha channel is dropped, not
composited (a transparent pixel keeps its stored colour), exactly as `convert("RGB")` does. PIL's
conversions would clip 16-bit and float images to 0..255, so those are rescaled here instead.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mask2former import limits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

_GLOB_CHARS = set("*?[")


class ImageReadError(ValueError):
    """An image could not be read; the message is one line that names the file."""


class ImageTooLargeError(ImageReadError):
    """The image declares more pixels than allowed (a decompression bomb, or simply too big)."""


def load_image(
    source: str | Path | bytes | Image.Image | np.ndarray, max_pixels: int | None = None
) -> np.ndarray:
    """Any supported image -> (H, W, 3) uint8 RGB, C-contiguous, EXIF orientation applied.

    Arrays: (H, W, 3) uint8 is returned as is; (H, W) or (H, W, 1) is gray; (H, W, 4) loses its alpha;
    uint16 arrays are divided by 257. Bytes are an encoded file (PNG, JPEG, ...) held in memory.
    Anything else raises ImageReadError. For files and bytes, `max_pixels` bounds width x height as
    read from the header, before any pixel is decoded (ImageTooLargeError above it).
    """
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            check_image_size("<array>", source.shape[1], source.shape[0])
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        check_image_size(name, *source.size)
        return _pil_to_rgb(source, name)
    if isinstance(source, str | Path):
        path = Path(source)
        check_readable_file(path)
        return _decode(path, str(path), max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(io.BytesIO(source), "<uploaded bytes>", max_pixels)
    kind = type(source).__name__
    raise ImageReadError(f"cannot read an image from a {kind}; pass a path, bytes, PIL image or array")


def check_readable_file(path: Path) -> None:
    """ImageReadError naming what `path` is when it is not a regular file that can be opened for reading:
    missing, a symlink loop, a folder, a FIFO (reading one would block), a device, or permission denied."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise ImageReadError(f"{path}: {'broken symbolic link' if dangling else 'file not found'}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageReadError(f"{path}: symbolic link loop") from None
        raise ImageReadError(f"{path}: cannot access ({error.strerror or error})") from None
    kinds = {
        stat.S_ISDIR: "is a folder, not an image file",
        stat.S_ISFIFO: "is a FIFO (named pipe), not an image file",
        stat.S_ISCHR: "is a character device, not an image file",
        stat.S_ISBLK: "is a block device, not an image file",
        stat.S_ISSOCK: "is a socket, not an image file",
    }
    for test, what in kinds.items():
        if test(mode):
            raise ImageReadError(f"{path}: {what}")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"{path}: permission denied")


def check_image_size(name: str | Path, width: int, height: int) -> None:
    """ImageReadError above the image pixel limit (limits.IMAGE_PIXELS), from the header before decoding:
    every later stage (pre-processing, results at full resolution, pictures) grows with the pixel count."""
    try:
        limits.IMAGE_PIXELS.check(width * height, f"{name} ({width}x{height})")
    except limits.LimitError as error:
        raise ImageTooLargeError(str(error)) from None


def _decode(file: Path | io.BytesIO, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode a file or in-memory bytes; the pixel limits (`max_pixels`, the caller's own, and
    limits.IMAGE_PIXELS) are checked from the header before any pixel is decoded."""
    try:
        # Our own limit is checked from the header; Pillow's bomb warning would only repeat it on stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: image of {img.width}x{img.height} = {img.width * img.height} pixels is "
                        f"over the limit of {max_pixels} pixels"
                    )
                check_image_size(name, *img.size)
                # Image.open only parses the header; load() decodes every byte so truncation shows up here.
                img.load()
                return _pil_to_rgb(img, name)
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image file (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image too large to read safely ({_one_line(exc)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(name, exc) from None


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(name, exc) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not make a readable photo unreadable
        pass
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = _high_depth_to_uint8(np.asarray(img), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        # Through RGBA so PIL does not warn about palette transparency; the alpha is then dropped.
        img = img.convert("RGBA")
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageReadError(f"{name}: unsupported colour mode {mode!r} ({_one_line(exc)})") from None
    return np.array(rgb, dtype=np.uint8, copy=True).reshape(rgb.height, rgb.width, 3)


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float gray (H, W) -> uint8 (H, W).

    16-bit divides by 257 (65535 -> 255). Mode "I" is read as 16-bit when it fits 0..65535 (what old
    Pillow gives for 16-bit PNGs), else stretched min..max. Float in 0..1 is scaled by 255, else clipped.
    """
    values = values.astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if mode.startswith("I;16"):
        scaled = values / 257.0
    elif mode == "I":
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 65535:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / max(high - low, 1.0))
    else:
        high = float(values.max()) if values.size else 0.0
        scaled = values * 255.0 if high <= 1.0 else values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    shape = array.shape
    if array.dtype == np.uint16:
        array = np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageReadError(
            f"<array>: dtype {array.dtype} not supported; pass uint8 RGB (0..255) or uint16 values"
        )
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and shape[2] == 3):
        raise ImageReadError(f"<array>: shape {shape} not supported; expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"<array>: empty image of shape {shape}")
    return np.ascontiguousarray(array)


def _decode_error(name: str | Path, exc: BaseException) -> ImageReadError:
    return ImageReadError(f"{name}: cannot decode image, file truncated or corrupt ({_one_line(exc)})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def list_images(inputs: list[str] | str) -> list[Path]:
    """Expand files, folders and glob patterns into a list of image paths (order kept, no duplicates).

    A file is taken whatever its extension (reading it reports a bad one); a folder gives its image files
    (by extension, sorted, not recursive); a pattern gives its matching image files (`**` recurses).
    A missing path among others is kept, so that reading it skips it like a bad file in a folder; when no
    input exists at all (a typo), an image-less folder or a pattern matching no image raises ImageReadError.
    """
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    found: list[Path] = []
    missing: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
            if not images:
                kinds = ", ".join(IMAGE_EXTENSIONS[:4])
                raise ImageReadError(f"{path}: folder has no image files ({kinds}, ...)")
            found.extend(images)
        elif os.path.lexists(path):
            # A named file, a FIFO, a device or a broken/looping link: load_image says what is wrong with it,
            # so such a path is skipped like a bad file in a folder.
            found.append(path)
        elif _GLOB_CHARS & set(text):
            images = sorted(Path(p) for p in glob.glob(text, recursive=True))
            images = [p for p in images if p.is_file() and _is_image_name(p)]
            if not images:
                raise ImageReadError(f"{text}: pattern matches no image files")
            found.extend(images)
        else:
            missing.append(path)
            found.append(path)
    if missing and len(missing) == len(inputs):
        raise ImageReadError(f"{missing[0]}: no such file or folder")
    unique: dict[Path, None] = dict.fromkeys(found)
    return list(unique)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
