"""rle.py against pycocotools (the reference) on random, structured and edge-case masks."""

import numpy as np
import pycocotools.mask as coco_mask
import pytest

from mask2former import rle


def _reference(masks: np.ndarray) -> list[dict]:
    return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # salt and pepper: many short runs
        return rng.random((n, h, w)) < rng.random()
    if kind == 1:  # rectangles: long runs spanning columns
        masks = np.zeros((n, h, w), dtype=bool)
        for m in masks:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        return masks
    return np.cumsum(rng.random((n, h, w)) < 0.05, axis=1) % 2 == 1  # vertical stripes of varied length


def _assert_same(masks: np.ndarray) -> None:
    ours, ref = rle.encode(masks), _reference(masks)
    assert [r["counts"] for r in ours] == [r["counts"].decode("ascii") for r in ref]
    assert [r["size"] for r in ours] == [list(r["size"]) for r in ref]
    np.testing.assert_array_equal(rle.decode(ours), masks.astype(bool))
    np.testing.assert_array_equal(rle.decode(ref), masks.astype(bool))  # bytes counts from pycocotools
    np.testing.assert_array_equal(rle.area(ours), coco_mask.area(ref))
    np.testing.assert_array_equal(rle.to_bbox(ours), coco_mask.toBbox(ref))


@pytest.mark.parametrize("seed", range(8))
def test_random_masks_match_pycocotools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        n, h, w = rng.integers(1, 5), rng.integers(1, 48), rng.integers(1, 48)
        _assert_same(_random_masks(rng, n, h, w))


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (5, 7)])
def test_empty_full_and_thin_masks(shape):
    rng = np.random.default_rng(0)
    h, w = shape
    masks = np.stack([np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.5])
    _assert_same(masks)


def test_large_counts_use_multi_character_values_and_negative_deltas():
    masks = np.zeros((2, 700, 900), dtype=bool)
    masks[0, 3:690, 10:880] = True  # runs of ~687 and ~13 alternate: deltas of both signs
    masks[1, -1, -1] = True  # one leading run of 629,999 zeros
    _assert_same(masks)


def test_single_2d_mask_gives_a_list_of_one_and_first_pixel_set_gives_leading_zero_run():
    mask = np.zeros((4, 3), dtype=bool)
    mask[0, 0] = True
    out = rle.encode(mask)
    assert isinstance(out, list) and len(out) == 1
    assert out[0]["counts"] == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert out[0]["counts"][0] == "0"  # a zero-length run of zeros comes first


def test_no_masks_and_uncompressed_counts():
    assert rle.encode(np.zeros((0, 4, 5), dtype=bool)) == []
    mask = rle.decode({"size": [2, 3], "counts": [1, 2, 3]})  # uncompressed RLE as in iscrowd annotations
    np.testing.assert_array_equal(mask[0], np.array([[0, 1, 0], [1, 0, 0]], dtype=bool))
    assert rle.area({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [2]


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="counts sum"):
        rle.decode({"size": [3, 3], "counts": [1, 2]})
    with pytest.raises(ValueError, match="truncated"):
        rle.decode({"size": [3, 3], "counts": "P"})  # 'P' = 32 + 48: continuation bit, then nothing


def _accepted(counts: str, pixels: int) -> bool:
    try:
        rle.check({"size": [pixels, 1], "counts": counts})
    except ValueError:
        return False
    return True


def _mutated(rng: np.random.Generator, counts: str) -> str:
    chars = list(counts)
    kind = int(rng.integers(5))
    if kind == 0 and chars:  # another character of the alphabet, or just outside it
        chars[int(rng.integers(len(chars)))] = chr(int(rng.integers(46, 114)))
    elif kind == 1:
        chars.insert(int(rng.integers(len(chars) + 1)), chr(int(rng.integers(48, 112))))
    elif kind == 2 and chars:
        del chars[int(rng.integers(len(chars)))]
    elif kind == 3 and len(chars) > 2:
        i = int(rng.integers(len(chars) - 1))
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    else:  # continuation groups: a value over 32 bits, or a string that ends inside a value
        chars += ["o"] * int(rng.integers(9)) + [chr(int(rng.integers(48, 112)))]
    return "".join(chars)


@pytest.mark.parametrize("workers", [1, 2])
def test_strings_valid_agrees_with_check_on_valid_and_broken_strings(monkeypatch, workers):
    monkeypatch.setattr(rle, "_CHUNK_CHARACTERS", 200)  # many chunks, so chunk edges are crossed too
    rng = np.random.default_rng(5)
    cases = []
    for _ in range(60):
        h, w = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        counts = rle.encode(_random_masks(rng, 1, h, w))[0]["counts"]  # long runs: values of several groups
        cases += [(counts, h * w), (_mutated(rng, counts), h * w), (counts, h * w + 1)]
    verdicts = [_accepted(counts, pixels) for counts, pixels in cases]
    assert 0 < sum(verdicts) < len(cases)
    for (counts, pixels), verdict in zip(cases, verdicts, strict=True):
        assert rle.strings_valid([counts], [pixels], workers) == verdict, counts
    valid = [case for case, verdict in zip(cases, verdicts, strict=True) if verdict]
    assert rle.strings_valid([c for c, _ in valid], [p for _, p in valid], workers)
    for _ in range(40):
        picked = rng.choice(len(cases), size=int(rng.integers(2, 30)))
        expected = all(verdicts[i] for i in picked)
        assert (
            rle.strings_valid([cases[i][0] for i in picked], [cases[i][1] for i in picked], workers)
            == expected
        )
    assert not rle.strings_valid([""], [0])  # empty: left to check (which accepts it for 0 pixels)
