"""COCO run-length encoding in pure numpy, byte-identical to pycocotools' compressed RLE.

A mask is read in column-major (Fortran) order and stored as alternating run lengths, starting with a
run of zeros (of length 0 when the first pixel is set). The compressed string stores each count (from
the fourth on, as the difference to the count two places back) in 5-bit groups, least significant
first, one character per group: value + 48, bit 0x20 set when more groups follow, bit 0x10 of the last
group the sign. This follows rleToString / rleFrString of cocoapi's maskApi.c.

Every function works on whole arrays: run boundaries come from np.flatnonzero on the flattened masks and
the string coding is done for all counts at once, so there is no Python loop over pixels or runs.
"""

from __future__ import annotations

import numpy as np

RLE = dict  # {"size": [H, W], "counts": str}

_MAX_GROUPS = 7  # 7 x 5 bits covers the signed difference of two uint32 counts
_CHUNK_PIXELS = 1 << 25  # masks encoded together per step: ~32M pixels of temporaries


def _fortran_flat(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, W*H) bool, each row the mask read column by column."""
    return np.ascontiguousarray(masks.transpose(0, 2, 1)).reshape(masks.shape[0], -1).astype(bool, copy=False)


def _run_counts(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) bool -> (counts of all masks concatenated (int64), number of counts per mask (N,))."""
    n, length = flat.shape
    # A run starts at every pixel that differs from its predecessor; a virtual 0 precedes pixel 0 so the
    # first run always counts zeros (and has length 0 when the mask starts with a set pixel).
    change = np.empty((n, length), dtype=bool)
    change[:, :1] = flat[:, :1]
    np.not_equal(flat[:, 1:], flat[:, :-1], out=change[:, 1:])
    rows, cols = np.nonzero(change)
    boundaries = rows.astype(np.int64) * length + cols
    # Run edges of all masks on one axis: every mask start, every boundary, the end. A boundary at a
    # mask's first pixel duplicates that mask's start and yields the zero-length leading run.
    edges = np.sort(
        np.concatenate([np.arange(n, dtype=np.int64) * length, boundaries, [n * length]]), kind="stable"
    )
    return np.diff(edges), np.bincount(rows, minlength=n) + 1


def _counts_to_string(counts: np.ndarray) -> bytes:
    """One mask's counts (M,) -> compressed bytes (maskApi.c rleToString)."""
    x = counts.astype(np.int64)
    # Counts from index 3 on are stored as the difference to the count two places back (i > 2 in C).
    if x.size > 3:
        x[3:] = counts[3:].astype(np.int64) - counts[1:-2].astype(np.int64)
    shifts = 5 * np.arange(_MAX_GROUPS, dtype=np.int64)
    groups = (x[:, None] >> shifts) & 0x1F  # (M, G) 5-bit groups, least significant first
    rest = x[:, None] >> (shifts + 5)  # arithmetic shift: what is left after each group
    # Stop after a group when the rest is pure sign extension of that group's top bit.
    more = np.where((groups & 0x10) != 0, rest != -1, rest != 0)
    n_groups = np.argmin(more, axis=1) + 1  # first group with more == False ends the value
    used = np.arange(_MAX_GROUPS)[None, :] < n_groups[:, None]
    chars = groups + 48 + np.where(more & used, 0x20, 0)
    return chars[used].astype(np.uint8).tobytes()


def _string_to_counts(counts: str | bytes) -> np.ndarray:
    """Compressed string -> counts (M,) int64 (maskApi.c rleFrString)."""
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.flatnonzero((c & 0x20) == 0)  # each value ends at a group without the "more" bit
    if last.size == 0 or last[-1] != c.size - 1:
        raise ValueError("RLE counts string is truncated (last character has the continuation bit)")
    first = np.empty_like(last)
    first[0] = 0
    first[1:] = last[:-1] + 1
    group_index = np.arange(c.size) - np.repeat(first, last - first + 1)
    x = np.add.reduceat((c & 0x1F) << (5 * group_index), first)
    negative = (c[last] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * (last - first + 1))), x)
    # Undo the delta coding: from index 3 on, each count adds the count two places back, i.e. running
    # sums along the odd indices from 1 and along the even indices from 2.
    out = x.copy()
    if out.size > 3:
        out[1::2] = np.cumsum(x[1::2])
        out[2::2] = np.cumsum(x[2::2])
    return out


_CHUNK_CHARACTERS = 1 << 18  # compressed strings validated together per step (and thread) by `strings_valid`


def strings_valid(strings: list[str], pixels: np.ndarray, workers: int = 1) -> bool:
    """Whether every compressed counts string is one `check` accepts for an RLE of pixels[i] = H x W pixels
    (ASCII in the compressed alphabet, no value over 32 bits, not truncated, counts non-negative, at most
    H x W + 1 of them, adding up to H x W), decided in whole-array passes over chunks of ~256k characters,
    on `workers` threads (numpy releases the GIL). False when any is not (or is empty): `check`
    then names the problem. pixels: (N,) int."""
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1)
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    ends = np.cumsum(lengths)
    if not ends.size:
        return True
    cuts = np.searchsorted(ends, np.arange(_CHUNK_CHARACTERS, int(ends[-1]), _CHUNK_CHARACTERS), side="right")
    bounds = [int(b) for b in np.unique(np.concatenate([[0], cuts, [len(strings)]]))]
    chunks = list(zip(bounds[:-1], bounds[1:], strict=True))

    def valid(chunk: tuple[int, int]) -> bool:
        start, stop = chunk
        return _strings_valid(strings[start:stop], lengths[start:stop], pixels[start:stop])

    if workers <= 1 or len(chunks) == 1:
        return all(map(valid, chunks))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return all(pool.map(valid, chunks))


def _strings_valid(strings: list[str], lengths: np.ndarray, pixels: np.ndarray) -> bool:
    joined = "".join(strings)
    if not lengths.all() or not joined.isascii():
        return False
    c = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    if c.min() < 48 or c.max() > 48 + 63:
        return False
    c = c - np.uint8(48)
    more = c >= 0x20  # a group with the continuation bit: the value goes on in the next character
    string_ends = np.cumsum(lengths) - 1
    if more[string_ends].any():  # truncated: a value runs into the next string
        return False
    payload = (c & 0x1F).astype(np.int64)  # each character's 5 bits
    last = np.flatnonzero(~more)  # the last group of each value
    x = payload[last]
    x = (x ^ 0x10) - 0x10  # the last group carries the sign
    continued = np.flatnonzero(more)  # the other groups of values of several groups (a few percent)
    if continued.size:
        value = np.searchsorted(last, continued)  # the value each of them belongs to
        value_first = np.zeros(last.size, dtype=np.int64)
        value_first[1:] = last[:-1] + 1
        size = last[value] - value_first[value] + 1
        if size.max() > _MAX_GROUPS:  # a value over 32 bits
            return False
        multi = np.unique(value)
        x[multi] <<= 5 * (last[multi] - value_first[multi])
        np.add.at(x, value, payload[continued] << (5 * (continued - value_first[value])))
    values_before = np.searchsorted(last, string_ends, side="right")  # values up to each string's end
    counts = np.diff(values_before, prepend=0)  # values per string
    if (counts > pixels + 1).any():
        return False
    string_first = values_before - counts
    # Undo the delta coding: from position 1 on, a string's decoded value is the running sum of its values
    # two positions apart (odd positions from 1, even ones from 2). Running sums along each global parity,
    # from which every string takes off what came before its own start on that parity.
    decoded = np.empty_like(x)
    for parity in (0, 1):
        part = x[parity::2]
        if part.size == 0:
            continue
        sums = np.cumsum(part)  # sums[t]: values at global indices parity, parity + 2, ..., parity + 2t
        first_kept = string_first + 1 + ((string_first + 1 - parity) & 1)  # position 1 or 2, this parity
        kept_from = (first_kept - parity) // 2
        taken = np.where(kept_from >= 1, sums[np.clip(kept_from - 1, 0, sums.size - 1)], 0)
        per_string = (string_first + counts - parity + 1) // 2 - (string_first - parity + 1) // 2
        decoded[parity::2] = sums - np.repeat(taken, per_string)
    decoded[string_first] = x[string_first]
    if decoded.min() < 0:
        return False
    return bool((np.add.reduceat(decoded, string_first) == pixels).all())


def check(rle: object, size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate one RLE dict before anything allocates from it -> its counts (M,) int64.

    Refuses (ValueError, one line) a size that is not two non-negative integers (or differs from `size`,
    the image's (H, W)), a size over the image pixel limit, counts that are not a compressed string or a
    list of integers, a string whose values overflow 32 bits, negative counts, more runs than pixels and
    counts that do not add up to H*W. The reference decoder reads such garbage as huge unsigned runs.
    """
    from mask2former import limits

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be an object with 'size' and 'counts'")
    shape = rle["size"]
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in shape)
    ):
        raise ValueError(f"RLE size {shape!r} is not [height, width] of two non-negative integers")
    h, w = int(shape[0]), int(shape[1])
    if size is not None and [h, w] != [int(size[0]), int(size[1])]:
        raise ValueError(f"RLE size {[h, w]} differs from the image's {[int(size[0]), int(size[1])]}")
    limits.IMAGE_PIXELS.check(h * w, f"RLE size {[h, w]}")
    raw = rle["counts"]
    if isinstance(raw, (str, bytes)):
        if isinstance(raw, str) and not raw.isascii():
            raise ValueError("RLE counts string has non-ASCII characters")
        data = np.frombuffer(raw.encode("ascii") if isinstance(raw, str) else raw, dtype=np.uint8)
        if data.size and (data.min() < 48 or data.max() > 48 + 63):
            raise ValueError("RLE counts string has characters outside the compressed alphabet")
        if data.size > 2 * _MAX_GROUPS * (h * w + 1):
            raise ValueError(f"RLE counts string of {data.size} characters is too long for {h}x{w} pixels")
        ends = np.flatnonzero((data.astype(np.int64) - 48) & 0x20 == 0)
        if ends.size and np.diff(np.concatenate([[-1], ends])).max() > _MAX_GROUPS:
            raise ValueError("RLE counts string holds a value of more than 32 bits")
        counts = _string_to_counts(raw)
    elif isinstance(raw, list):
        if len(raw) > h * w + 1:
            raise ValueError(f"RLE has {len(raw)} counts for {h}x{w} pixels")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
            raise ValueError("RLE counts list must hold integers")
        counts = np.asarray(raw, dtype=np.int64) if raw else np.zeros(0, dtype=np.int64)
    else:
        raise ValueError(f"RLE counts must be a string or a list of integers, not {type(raw).__name__}")
    if counts.size and int(counts.min()) < 0:
        raise ValueError(f"RLE has a negative count ({int(counts.min())})")
    if counts.size > h * w + 1:
        raise ValueError(f"RLE has {counts.size} counts for {h}x{w} pixels")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, not height x width = {h * w}")
    return counts


def _as_stack(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks: expected (N, H, W) or (H, W), got shape {masks.shape}")
    return masks


def encode(masks: np.ndarray) -> list[RLE]:
    """(N, H, W) or (H, W) masks (nonzero = set) -> N compressed RLEs {"size": [H, W], "counts": str}.

    A single (H, W) mask also gives a list (of one). `counts` is a str, ready for JSON; pycocotools
    returns the same characters as bytes.
    """
    masks = _as_stack(masks)
    n, h, w = masks.shape
    if n == 0:
        return []
    out = []
    step = max(1, _CHUNK_PIXELS // max(1, h * w))  # bounds the temporary (chunk, H*W) arrays
    for begin in range(0, n, step):
        counts, per_mask = _run_counts(_fortran_flat(masks[begin : begin + step] != 0))
        ends = np.cumsum(per_mask)
        out.extend(
            {"size": [int(h), int(w)], "counts": _counts_to_string(counts[end - m : end]).decode("ascii")}
            for end, m in zip(ends, per_mask, strict=True)
        )
    return out


def _to_list(rles: RLE | list[RLE]) -> list[RLE]:
    return [rles] if isinstance(rles, dict) else list(rles)


def _counts_of(rle: RLE) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return _string_to_counts(counts)
    return np.asarray(counts, dtype=np.int64)  # uncompressed RLE (COCO iscrowd annotations)


def decode(rles: RLE | list[RLE]) -> np.ndarray:
    """RLE dict(s), compressed (str/bytes counts) or uncompressed (list counts) -> (N, H, W) bool."""
    rles = _to_list(rles)
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    h, w = (int(v) for v in rles[0]["size"])
    out = np.empty((len(rles), h, w), dtype=bool)
    for i, rle in enumerate(rles):
        if [int(v) for v in rle["size"]] != [h, w]:
            raise ValueError(f"rles[{i}]: size {rle['size']} differs from rles[0] size {[h, w]}")
        counts = _counts_of(rle)
        if int(counts.sum()) != h * w:
            raise ValueError(f"rles[{i}]: counts sum to {int(counts.sum())}, expected H*W = {h * w}")
        values = (np.arange(counts.size) % 2).astype(bool)  # runs alternate 0, 1, 0, ...
        out[i] = np.repeat(values, counts).reshape(w, h).T
    return out


def area(rles: RLE | list[RLE]) -> np.ndarray:
    """(N,) uint32 number of set pixels (the odd-indexed runs), as pycocotools.mask.area."""
    return np.array([int(_counts_of(r)[1::2].sum()) for r in _to_list(rles)], dtype=np.uint32)


def to_bbox(rles: RLE | list[RLE]) -> np.ndarray:
    """(N, 4) float64 boxes [x, y, width, height] of the set pixels; all zero for empty masks."""
    rles = _to_list(rles)
    boxes = np.zeros((len(rles), 4), dtype=np.float64)
    for i, rle in enumerate(rles):
        h = int(rle["size"][0])
        counts = _counts_of(rle)
        edges = np.cumsum(counts)
        first = edges[0:-1:2]  # flat index of the first pixel of each run of ones
        last = edges[1::2] - 1  # flat index of its last pixel
        keep = edges[1::2] > first  # zero-length runs of ones (only possible in hand-made RLEs)
        first, last = first[keep], last[keep]
        if first.size == 0:
            continue
        x0, y0 = first // h, first % h
        x1, y1 = last // h, last % h
        # A run that wraps into the next column covers the bottom of one column and the top of the next.
        wraps = np.any(x1 > x0)
        ymin = 0 if wraps else min(y0.min(), y1.min())
        ymax = h - 1 if wraps else max(y0.max(), y1.max())
        xmin, xmax = x0.min(), x1.max()
        boxes[i] = [xmin, ymin, xmax - xmin + 1, ymax - ymin + 1]
    return boxes
