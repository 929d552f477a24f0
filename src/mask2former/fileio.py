"""Files in and out, in one place: atomic writes and the PNG codecs of label and panoptic maps.

Every writer is atomic: it writes a hidden temporary file next to the target (`.NAME.PID.RANDOM.tmp`) and
renames it into place, so a crash or an error never leaves a half-written file, and readers of a folder see
either the old file or the new one. Temporary files are created with mode 0o666 so the umask decides the
permissions, as for any ordinary new file (0644 under umask 022). `remove_stale_temporaries` clears what a
killed process left behind.

PNG readers raise `PngError` (a ValueError) with one line naming the file; callers turn it into their own
error type. The panoptic PNG encodes a segment id as RGB with id = R + 256 G + 256^2 B (panopticapi).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PathLike = str | os.PathLike
# What a truncated, corrupt or oversized PNG raises.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------- atomic writing


def temporary_path(path: PathLike) -> Path:
    """A fresh hidden name beside `path` for its temporary file."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(temp_path) to fill a new temporary file beside `path`, then rename it to `path`.

    The temporary file exists (empty, with the umask's mode) before `write` runs, so writers that open by
    name (torch.save, safetensors, PIL) keep those permissions. On any failure it is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist; create it first")
    temp = temporary_path(path)
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    mode = os.fstat(handle).st_mode & 0o777  # 0o666 less the umask
    os.close(handle)
    try:
        write(temp)
        # Some writers replace the file by one of their own (safetensors creates it 0600): restore the mode.
        if os.stat(temp).st_mode & 0o777 != mode:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def remove_stale_temporaries(folder: PathLike, name: str) -> list[Path]:
    """Remove the temporary files of `folder/name` left by writers that were killed; returns them.

    Only call it where no other process writes `name` at the same time (e.g. a run that owns its folder).
    """
    stale = sorted(Path(folder).glob(f".{name}.*.tmp"))
    for temp in stale:
        temp.unlink(missing_ok=True)
    return stale


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays (common in results) go into JSON as plain numbers and lists."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("ascii")  # pycocotools-style RLE counts
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: PathLike, obj: Any, indent: int | None = None) -> Path:
    """Write obj as JSON (numpy numbers and arrays allowed) atomically."""
    # Serialise before touching the disk: an unserialisable object then fails without any file work.
    data = json.dumps(obj, default=_json_default, indent=indent).encode("utf-8")
    return atomic_write_bytes(path, data + (b"\n" if indent is not None else b""))


def save_image(image: Image.Image | np.ndarray, path: PathLike) -> Path:
    """Write a PIL image or (H, W[, C]) uint8/uint16 array atomically; the format follows the suffix."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image format {path.suffix!r}; use .png or .jpg")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return atomic_write(path, lambda temp: image.save(temp, format=image_format))


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image or (H, W[, C]) uint8/uint16 array as the bytes of a PNG file (for HTTP answers)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: PathLike, array: np.ndarray) -> Path:
    return save_image(array, Path(path))


# ---------------------------------------------------------------- PNG codecs


class PngError(ValueError):
    """A PNG that cannot be read as asked (one line naming the file)."""


@contextlib.contextmanager
def _opened_png(path: Path):
    """Image.open with the pixel limit checked from the header (before decoding) and Pillow's own
    DecompressionBombWarning kept off stderr (the limit says it in one line instead)."""
    from mask2former import limits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
            try:
                limits.IMAGE_PIXELS.check(width * height, f"{path} ({width}x{height})")
            except limits.LimitError as error:
                raise PngError(str(error)) from None
            yield image


def read_png(path: PathLike, mode: str | None = None) -> np.ndarray:
    """Decode a PNG fully -> array ((H, W) or (H, W, C)); `mode` converts first (e.g. "RGB")."""
    path = Path(path)
    try:
        with _opened_png(path) as image:
            return np.asarray(image.convert(mode) if mode else image)
    except PngError:
        raise
    except FileNotFoundError:
        raise PngError(f"{path}: no such file") from None
    except _PIL_ERRORS as error:
        raise PngError(f"{path}: cannot read the PNG ({error})") from None


LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_png(path: PathLike) -> np.ndarray:
    """Single-channel label PNG (8- or 16-bit values, or palette indices) -> (H, W) int32."""
    path = Path(path)
    try:
        with _opened_png(path) as image:
            if image.mode not in LABEL_MODES:
                raise PngError(
                    f"{path}: label PNG has mode {image.mode}; expected one channel of class values"
                )
            return np.asarray(image).astype(np.int32)
    except FileNotFoundError:
        raise PngError(f"{path}: no such file") from None
    except PngError:
        raise
    except _PIL_ERRORS as error:
        raise PngError(f"{path}: cannot read the PNG ({error})") from None


def id2rgb(ids: np.ndarray | int) -> np.ndarray | list[int]:
    """Segment ids (...) -> colours (..., 3) uint8 with id = R + 256 G + 256^2 B; an int gives [R, G, B]."""
    if isinstance(ids, (int, np.integer)):
        value = int(ids)
        return [value % 256, value // 256 % 256, value // 65536 % 256]
    ids = np.asarray(ids)
    ids = ids if ids.dtype.kind in "iu" else ids.astype(np.int64)
    colors = np.empty((*ids.shape, 3), dtype=np.uint8)  # channel by channel: no (..., 3) int64 temporary
    for channel in range(3):
        colors[..., channel] = (ids >> (8 * channel)) & 255
    return colors


def rgb2id(color: np.ndarray | Sequence[int]) -> np.ndarray | int:
    """Colours (..., 3) -> ids (...) int32; a single [R, G, B] gives an int."""
    if not isinstance(color, np.ndarray):
        r, g, b = (int(v) for v in color)
        return r + 256 * g + 65536 * b
    if color.dtype == np.uint8:  # the panoptic PNG case: shifts in place, no int32 copy of all channels
        ids = np.empty(color.shape[:-1], dtype=np.int32)
        ids[...] = color[..., 2]
        ids <<= 8
        ids |= color[..., 1]
        ids <<= 8
        ids |= color[..., 0]
        return ids
    color = color.astype(np.int32)
    return color[..., 0] + 256 * color[..., 1] + 65536 * color[..., 2]


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """COCO panoptic PNG -> (H, W) int32 segment ids (0 = void)."""
    rgb = decode_rgb8_png(Path(path))
    return rgb2id(rgb if rgb is not None else read_png(path, mode="RGB"))


# ---------------------------------------------------------------- fast decoding of 8-bit RGB PNGs

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_rgb8_png(path: Path, out: Callable[[int, int], np.ndarray] | None = None) -> np.ndarray | None:
    """(H, W, 3) uint8 of an 8-bit RGB PNG by imagecodecs (libpng, ~2x faster than PIL, GIL released),
    or None: imagecodecs not installed, another PNG kind, more pixels than PIL allows, or any decoding
    problem. The caller then reads the file with PIL, which gives the same array or the usual error.
    out(height, width), if given, returns the C-contiguous (H, W, 3) uint8 array to decode into (a buffer
    the caller reuses: fresh pages for every image cost as much as the arithmetic after decoding)."""
    try:
        import imagecodecs
    except ImportError:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    # IHDR is the first chunk: width, height (big endian), bit depth, colour type (2 = RGB).
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None  # PIL warns or refuses (decompression bomb): keep its behaviour
    try:
        rgb = imagecodecs.png_decode(data, out=None if out is None else out(height, width))
    except Exception:  # imagecodecs raises its own error types; PIL decides what the file is
        return None
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        return None
    return rgb


def write_panoptic_png(path: PathLike, id_map: np.ndarray) -> Path:
    """(H, W) segment ids -> COCO panoptic PNG, atomically."""
    return write_png(path, id2rgb(id_map))
