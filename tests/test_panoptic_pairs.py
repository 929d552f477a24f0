"""The fast panoptic PNG pair reader: the pixel counts of every (ground truth, prediction) id pair equal a
direct count of the decoded maps, for 24-bit ids, odd and changing sizes (reused buffers), PNG kinds that go
through PIL, and one-pixel images; a size mismatch is a one-line error naming both files."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former import fileio
from mask2former.evaluation import EvaluationError
from mask2former.evaluation.panoptic_pairs import PanopticPairReader


def id_map(rng, h: int, w: int) -> np.ndarray:
    """Rectangles of random 24-bit ids on VOID, with some single-pixel noise (short runs)."""
    ids = np.zeros((h, w), dtype=np.int64)
    for _ in range(6):
        r, c = rng.integers(0, h), rng.integers(0, w)
        ids[r : r + rng.integers(1, h + 1), c : c + rng.integers(1, w + 1)] = rng.integers(1, 2**24)
    noise = rng.random((h, w)) < 0.02
    ids[noise] = rng.integers(0, 2**24, size=int(noise.sum()))
    return ids


def pair_counts(gt_ids, pred_ids, pixels) -> Counter:
    counts: Counter = Counter()
    for g, p, n in zip(gt_ids.tolist(), pred_ids.tolist(), pixels.tolist(), strict=True):
        counts[(g, p)] += n
    return counts


def direct_counts(gt: np.ndarray, pred: np.ndarray) -> Counter:
    return Counter(zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True))


def write(path: Path, ids: np.ndarray, mode: str = "RGB") -> None:
    image = Image.fromarray(fileio.id2rgb(ids))
    (image.convert(mode) if mode != "RGB" else image).save(path)


@pytest.mark.parametrize("pred_mode", ["RGB", "RGBA"])  # RGBA: the prediction is read by PIL
def test_counts_equal_a_direct_count_across_sizes_and_readers(tmp_path, pred_mode):
    rng = np.random.default_rng(0)
    reader = PanopticPairReader()
    for i, (h, w) in enumerate([(37, 53), (5, 7), (1, 1), (1, 9), (64, 48), (37, 53)]):
        gt, pred = id_map(rng, h, w), id_map(rng, h, w)
        write(tmp_path / f"gt{i}.png", gt)
        write(tmp_path / f"pred{i}.png", pred, pred_mode)
        runs = reader.read(tmp_path / f"pred{i}.png", tmp_path / f"gt{i}.png", ("pred", "gt"))
        assert all(a.dtype == np.int64 and a.shape == runs[0].shape for a in runs)
        assert pair_counts(*runs) == direct_counts(gt, pred), (h, w)
        assert int(runs[2].sum()) == h * w


def test_threads_get_their_own_buffers(tmp_path):
    rng = np.random.default_rng(1)
    maps = [(id_map(rng, 30 + i, 40 - i), id_map(rng, 30 + i, 40 - i)) for i in range(6)]
    for i, (gt, pred) in enumerate(maps):
        write(tmp_path / f"gt{i}.png", gt)
        write(tmp_path / f"pred{i}.png", pred)
    reader, wrong = PanopticPairReader(), []

    def work(offset: int) -> None:
        for k in range(30):
            i = (k + offset) % len(maps)
            runs = reader.read(tmp_path / f"pred{i}.png", tmp_path / f"gt{i}.png", ("pred", "gt"))
            if pair_counts(*runs) != direct_counts(*maps[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_size_mismatch_and_unreadable_files_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(2)
    write(tmp_path / "gt.png", id_map(rng, 8, 9))
    write(tmp_path / "pred.png", id_map(rng, 9, 8))
    reader = PanopticPairReader()
    with pytest.raises(
        EvaluationError, match=r"^pred A: id map shape \(9, 8\) differs from gt B shape \(8, 9\)$"
    ):
        reader.read(tmp_path / "pred.png", tmp_path / "gt.png", ("pred A", "gt B"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match=r"bad.png: cannot read the PNG"):
        reader.read(tmp_path / "bad.png", tmp_path / "gt.png", ("pred", "gt"))
    with pytest.raises(EvaluationError, match=r"missing.png: no such file"):
        reader.read(tmp_path / "pred.png", tmp_path / "missing.png", ("pred", "gt"))
