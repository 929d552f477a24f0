"""Atomic writes (umask permissions, nothing partial, stale temporaries removed) and the PNG codecs."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from mask2former import fileio


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_writer_follows_the_umask(tmp_path, umask_022):
    written = [
        fileio.write_json(tmp_path / "a.json", {"x": 1}),
        fileio.write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8)),
        fileio.save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.jpg"),
        fileio.atomic_write(tmp_path / "a.pt", lambda temp: torch.save({"w": torch.ones(2)}, temp)),
    ]
    assert [mode(path) for path in written] == [0o644] * 4
    os.umask(0o077)
    assert mode(fileio.write_json(tmp_path / "private.json", {})) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = fileio.write_json(tmp_path / "out.json", {"ok": 1})

    def fail(temp):
        temp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, fail)
    assert target.read_text() == '{"ok": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    stale = fileio.temporary_path(tmp_path / "checkpoint.pt")
    stale.write_bytes(b"x" * 100)
    other = fileio.temporary_path(tmp_path / "other.pt")
    other.write_bytes(b"y")
    assert fileio.remove_stale_temporaries(tmp_path, "checkpoint.pt") == [stale]
    assert not stale.exists() and other.exists()


def test_png_codecs_round_trip_and_name_the_file_on_errors(tmp_path):
    ids = np.array([[0, 1], [256, 70000]], np.int64)
    fileio.write_panoptic_png(tmp_path / "p.png", ids)
    np.testing.assert_array_equal(fileio.read_panoptic_png(tmp_path / "p.png"), ids)
    labels = np.array([[0, 3], [255, 7]], np.uint8)
    fileio.write_png(tmp_path / "l.png", labels)
    np.testing.assert_array_equal(fileio.read_label_png(tmp_path / "l.png"), labels)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(fileio.PngError, match=r"bad\.png: cannot read"):
        fileio.read_png(tmp_path / "bad.png")
    with pytest.raises(fileio.PngError, match=r"p\.png: label PNG has mode RGB"):
        fileio.read_label_png(tmp_path / "p.png")
    with pytest.raises(fileio.PngError, match="no such file"):
        fileio.read_panoptic_png(tmp_path / "missing.png")
