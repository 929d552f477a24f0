"""Safe reading of pickled checkpoints: data comes back, code never runs."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from mask2former.checkpoints.io import CheckpointError
from mask2former.checkpoints.safe_pickle import load_pickled


class RunsCommand:
    """Unpickling this with a plain pickle.load would run `command` in a shell."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def data_document() -> dict:
    return {
        "model": collections.OrderedDict(
            weight=np.arange(12, dtype=np.float32).reshape(3, 4),
            fortran=np.asfortranarray(np.ones((2, 3), np.float64)),
            index=np.arange(5, dtype=np.int64),
            flags=np.array([True, False]),
            half=np.zeros((2, 2), np.float16),
            scalar=np.float32(0.5),
            zero_dim=np.array(3.0),
        ),
        "__author__": "Detectron2 Model Zoo",
        "numbers": [1, 2.5, complex(1, 2), True, None, 10**30],
        "containers": ({1, 2}, frozenset({"a"}), (1, (2,))),
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"ab"),
    }


def assert_same(actual, expected) -> None:
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)
    elif isinstance(expected, dict):
        assert type(actual) is type(expected) and list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    else:
        assert actual == expected and type(actual) is type(expected)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_and_numpy_arrays_load_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps(data_document(), protocol=protocol))
    assert_same(load_pickled(path), data_document())


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pkl"
    document = {"model": {"w": np.zeros(2, np.float32)}, "x": RunsCommand(f"touch {marker}")}
    path.write_bytes(pickle.dumps(document, protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        load_pickled(path)
    message = str(info.value)
    assert str(path) in message and f"'{os.system.__module__}.system'" in message and "\n" not in message
    assert not marker.exists()
    # the same bytes through a plain pickle.load would have run the command: the test is real
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "payload, name",
    [
        (b"cos\nsystem\n(S'echo hi'\ntR.", "os.system"),  # protocol 0 GLOBAL + REDUCE, written by hand
        (b"c__builtin__\neval\n(S'1+1'\ntR.", "__builtin__.eval"),
        (b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'x'\ntR.", "builtins.getattr"),
        (b"(S'echo hi'\nios\nsystem\n.", "os.system"),  # INST opcode builds through find_class too
        (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93.", "os.system"),
    ],
)
def test_hand_written_pickles_naming_code_are_refused(tmp_path, payload, name):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=f"refusing to unpickle global '{name}'"):
        load_pickled(path)


def test_code_hidden_in_a_numpy_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    array = np.empty(1, dtype=object)
    array[0] = RunsCommand(f"touch {marker}")
    path = tmp_path / "object_array.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": array}}, protocol=2))
    with pytest.raises(CheckpointError, match="system"):
        load_pickled(path)
    assert not marker.exists()


def test_torch_zip_files_use_torchs_restricted_unpickler(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "iteration": 7}, path)
    stored = load_pickled(path)
    assert torch.equal(stored["model"]["w"], torch.arange(3.0)) and stored["iteration"] == 7


def test_malicious_torch_file_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": RunsCommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError) as info:
        load_pickled(path)
    message = str(info.value)
    assert str(path) in message and f"{os.system.__module__}.system" in message and "\n" not in message
    assert not marker.exists()


def test_torch_legacy_format_is_read_by_torch(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(2, 2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_pickled(path)["model"]["w"], torch.ones(2, 2))


def test_persistent_ids_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, str) and obj == "w" else None

    path = tmp_path / "persistent.pkl"
    with open(path, "wb") as handle:
        WithPersistentIds(handle, protocol=2).dump({"model": "w"})
    with pytest.raises(CheckpointError, match="external storage"):
        load_pickled(path)


@pytest.mark.parametrize(
    "content, expected", [(b"\x80\x04\x95garbage", "not a readable pickle"), (b"", "not a")]
)
def test_corrupt_and_missing_files_give_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "broken.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_pickled(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pickled(tmp_path / "absent.pkl")
