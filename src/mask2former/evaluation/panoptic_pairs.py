"""Read a (prediction, ground truth) pair of COCO panoptic PNGs straight into pixel counts of id pairs.

What PQ needs from the two PNGs is how many pixels every (ground-truth id, predicted id) pair covers. The
fast path decodes each 8-bit RGB PNG (imagecodecs, GIL released) into a reused buffer and takes the 24-bit
ids with a contiguous copy of the little-endian words that start every 3 bytes, then one mask: no (H, W, 3)
int32 intermediate. One comparison of both id rows with their shifted selves finds the runs of one id pair
along the raster; the rest works on runs. The large arrays are per-thread buffers reused from image to
image (fresh pages for every image cost as much as the arithmetic). Other PNG kinds go through PIL.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from mask2former import fileio
from mask2former.evaluation import EvaluationError

_ID = np.dtype("<u4")  # the little-endian word read at a pixel's first byte: R + 256 G + 65536 B + ...


class _Buffers:
    """One thread's scratch arrays, grown to the largest image seen."""

    def __init__(self) -> None:
        self.rgb = np.zeros(0, dtype=np.uint8)
        self.ids = np.empty((2, 0), dtype=_ID)  # prediction, ground truth
        self.change = np.empty((2, 0), dtype=bool)

    def rgb_for(self, height: int, width: int) -> np.ndarray:
        """(H, W, 3) uint8 view, followed by at least one spare byte (for the last 4-byte read)."""
        size = 3 * height * width
        if self.rgb.size < size + 1:
            self.rgb = np.zeros(size + 1, dtype=np.uint8)
        return self.rgb[:size].reshape(height, width, 3)

    def ids_for(self, pixels: int) -> np.ndarray:
        """(2, N) uint32: the prediction's ids, the ground truth's."""
        if self.ids.shape[1] < pixels:
            self.ids = np.empty((2, pixels), dtype=_ID)
            self.change = np.empty((2, pixels), dtype=bool)
        return self.ids[:, :pixels]


class PanopticPairReader:
    """read(pred_png, gt_png, where) -> the (ground-truth id, predicted id) runs of one image pair.

    Safe to call from several threads at once (each has its own buffers); errors are EvaluationErrors
    naming the file."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _buffers(self) -> _Buffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = _Buffers()
        return buffers

    def read(
        self, pred_png: Path, gt_png: Path, where: tuple[str, str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gt_ids, pred_ids, pixels), each (R,) int64: runs of one id pair along the raster, as
        PanopticEvaluator.pair_statistics takes them. where: names of the prediction and the ground truth
        in a size mismatch error (the files are named in the others)."""
        buffers = self._buffers()
        shape, ids = None, buffers.ids
        for row, path in enumerate((pred_png, gt_png)):  # the prediction first, as errors were reported
            rgb = fileio.decode_rgb8_png(path, out=buffers.rgb_for)
            pil_ids = None if rgb is not None else _read_ids_with_pil(path)
            this_shape = rgb.shape[:2] if rgb is not None else pil_ids.shape
            if shape is None:
                shape = this_shape
                ids = buffers.ids_for(shape[0] * shape[1])
            elif this_shape != shape:
                raise EvaluationError(
                    f"{where[0]}: id map shape {tuple(shape)} differs from {where[1]} "
                    f"shape {tuple(this_shape)}"
                )
            if rgb is not None:
                _ids_of_rgb(buffers.rgb, out=ids[row])
            else:
                ids[row] = pil_ids.reshape(-1)
        return _runs(ids, buffers.change[:, : ids.shape[1]])


def _read_ids_with_pil(path: Path) -> np.ndarray:
    try:
        return fileio.rgb2id(fileio.read_png(path, mode="RGB"))
    except fileio.PngError as error:
        raise EvaluationError(str(error)) from None


def _ids_of_rgb(rgb: np.ndarray, out: np.ndarray) -> None:
    """out (N,) <- R + 256 G + 65536 B of the first N pixels of the packed RGB bytes rgb (3N + 1 or more):
    each id is the little-endian word that starts at its pixel's first byte, less the top byte (the next
    pixel's R). A contiguous copy, then the mask: twice as fast as masking the strided words."""
    words = np.ndarray(out.shape, dtype=_ID, buffer=rgb, strides=(3,))
    out[...] = words
    out &= 0xFFFFFF


def _runs(ids: np.ndarray, change: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of one (prediction, ground truth) id pair along ids (2, N) -> (ground-truth ids,
    predicted ids, run lengths), each (R,) int64. change: (2, N) boolean scratch."""
    pixels = ids.shape[1]
    if pixels == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    change[:, 0] = True
    np.not_equal(ids[:, 1:], ids[:, :-1], out=change[:, 1:])
    np.logical_or(change[0], change[1], out=change[0])
    starts = np.flatnonzero(change[0])
    lengths = np.diff(starts, append=pixels)
    return ids[1, starts].astype(np.int64), ids[0, starts].astype(np.int64), lengths
