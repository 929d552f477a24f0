"""Builders of hostile files for the fault tests (issue #17), and a CLI runner that watches for tracebacks.

Each builder writes one small file that breaks one rule: a pickle asking for gigabytes in a few bytes, a
COCO JSON with a duplicate id, an RLE whose counts do not add up, a PNG whose header claims 100 megapixels,
a FIFO where an image should be. `run_cli` runs `python -m mask2former` in a subprocess (optionally under
an address-space limit or as an unprivileged user) and returns what a user would see.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
NOBODY = 65534


def run_cli(
    args: list[str],
    address_space: int | None = None,
    as_nobody: bool = False,
    env: dict | None = None,
    timeout: float = 300,
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m mask2former ARGS` in a fresh process.

    address_space: RLIMIT_AS in bytes (an allocation past it fails instead of swapping the machine);
    as_nobody: drop root to uid/gid 65534 so file modes are honoured (tests run as root in CI containers).
    """

    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if as_nobody and os.getuid() == 0:
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    full_env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "mask2former", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        preexec_fn=limit,
        timeout=timeout,
        cwd="/",
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """The error is a single line (no traceback) holding every fragment; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line or "skipped" in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def world_writable_folder(path: Path) -> Path:
    """A folder an unprivileged user can enter and write (pytest's own tmp folders are 0700)."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in [path, *path.parents]:
        if folder == Path("/tmp") or folder == Path("/"):
            break
        os.chmod(folder, os.stat(folder).st_mode | 0o755)
    os.chmod(path, 0o777)
    return path


# ---------------------------------------------------------------- pickles


# GLOBAL module\nname\n, an int argument (BININT, 4 bytes little endian), TUPLE1, REDUCE, STOP.
def _call_with_int(module: str, name: str, value: int) -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"J" + value.to_bytes(4, "little") + b"\x85R."


HUGE = 0x70000000  # 1.8 GB

HOSTILE_PICKLES = {
    "bytearray": _call_with_int("__builtin__", "bytearray", HUGE),
    "bytes": _call_with_int("builtins", "bytes", HUGE),
    "ndarray": _call_with_int("numpy", "ndarray", HUGE),
    "reconstruct": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ"
    + HUGE.to_bytes(4, "little")
    + b"\x85C\x01b\x87R.",
    "long_bytes_field": b"\x80\x04\x8e" + (1 << 33).to_bytes(8, "little") + b"abc.",
    "codec": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.",
}


def write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------- COCO files


def panoptic_files(folder: Path, duplicate_image: bool = False) -> dict[str, Path]:
    """A 2-image COCO panoptic ground truth and a perfect prediction (PNG folders + JSONs)."""
    for sub in ("gt", "pred"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    annotations = []
    for index in range(2):
        ids = np.zeros((8, 8), dtype=np.uint8)
        ids[: 4 + index] = 1
        ids[4 + index :] = 2
        rgb = np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1)
        for sub in ("gt", "pred"):
            Image.fromarray(rgb).save(folder / sub / f"{index}.png")
        segments = [
            {"id": 1, "category_id": 1, "iscrowd": 0, "area": int((ids == 1).sum())},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((ids == 2).sum())},
        ]
        annotations.append({"image_id": index, "file_name": f"{index}.png", "segments_info": segments})
    categories = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]
    gt = {"annotations": list(annotations), "categories": categories}
    if duplicate_image:
        gt["annotations"][1] = {**gt["annotations"][1], "image_id": 0}
    paths = {"gt_json": folder / "gt.json", "pred_json": folder / "pred.json"}
    paths["gt_json"].write_text(json.dumps(gt))
    paths["pred_json"].write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return {**paths, "gt_dir": folder / "gt", "pred_dir": folder / "pred"}


def instance_files(folder: Path, result: dict | None = None, gt_annotations: list | None = None):
    """A COCO instances ground truth of one 4x4 image and a results JSON (one result, overridable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rle = {"size": [4, 4], "counts": [0, 8, 8]}
    gt = {
        "images": [{"id": 1, "height": 4, "width": 4, "file_name": "a.png"}],
        "annotations": gt_annotations
        or [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0, "area": 8}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    base = {"image_id": 1, "category_id": 1, "segmentation": rle, "score": 0.9}
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "pred.json").write_text(json.dumps([{**base, **(result or {})}], allow_nan=True))
    return folder / "pred.json", folder / "gt.json"


# ---------------------------------------------------------------- images


def bomb_png(path: Path, side: int = 12000) -> Path:
    """A PNG of side x side 1-bit pixels: a few kB on disk, past Pillow's bomb warning once decoded."""
    Image.new("1", (side, side)).save(path)
    return path


def truncated_png(path: Path) -> Path:
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def symlink_loop(path: Path) -> Path:
    other = path.with_name(path.name + ".other")
    os.symlink(other, path)
    os.symlink(path, other)
    return path
