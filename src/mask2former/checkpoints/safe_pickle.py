"""Read pickled checkpoints (.pkl, .pth) without ever running code that the file asks for.

Unpickling calls whatever global the file names (`os.system` included), so a checkpoint from the internet
is untrusted input. Two readers, both refusing anything but data:

- torch files (zip format, or torch's legacy format) go through `torch.load(weights_only=True)`, torch's own
  restricted unpickler, which only rebuilds tensors and plain containers;
- plain pickles (detectron2's `model_final_*.pkl`: {"model": {name: numpy array}, "__author__": ...}) go
  through `RestrictedUnpickler`, whose allow-list holds plain containers, numbers, strings, bytes and the few
  numpy functions that rebuild arrays, dtypes and scalars.

A refused global is reported as one line naming the file and the global.
"""

from __future__ import annotations

import codecs
import collections
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mask2former.checkpoints.io import CheckpointError

__all__ = ["RestrictedUnpickler", "load_pickled", "load_restricted_pickle", "load_torch_file"]


def _numpy_array_globals() -> dict[tuple[str, str], Any]:
    """numpy's array/scalar/dtype rebuilders under both the numpy 1 and numpy 2 module names."""
    try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either, depending on who wrote them
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # ndarray and _reconstruct: _sized_constructors
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        # protocol 5 pickles rebuild arrays from a buffer instead of _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed = _numpy_array_globals()
    plain = (set, frozenset, dict, list, tuple, complex)  # bytearray/bytes: _sized_constructors
    for module in ("builtins", "__builtin__"):  # __builtin__: pickles written by Python 2
        for kind in plain:
            allowed[(module, kind.__name__)] = kind
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # Protocol 2 pickles written by Python 3 store bytes (e.g. array data) as _codecs.encode(text, "latin1"),
    # allowed (latin1 only) among the sized constructors.
    return allowed


_ALLOWED = _allowed_globals()
try:
    from numpy._core.multiarray import _reconstruct as _RECONSTRUCT
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct as _RECONSTRUCT
_WHAT_IS_ALLOWED = "only plain containers, numbers, strings, bytes and numpy arrays are allowed"


class _Budget:
    """Bytes the allow-listed constructors may still allocate from sizes written in the file.

    A real pickle carries the data of its arrays, so what its constructors allocate is bounded by the file's
    size; a hostile one writes `bytearray(2_300_000_000)` in 57 bytes. Each sized allocation is charged
    here and refused once the total would pass the file's size (plus a small allowance).
    """

    SLACK = 1 << 20

    def __init__(self, source: str, file_size: int):
        self.source = source
        self.left = file_size + self.SLACK

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or nbytes > self.left:
            raise CheckpointError(
                f"{self.source}: the pickle asks for {what} of {nbytes:,} bytes, more than the file holds"
            )
        self.left -= nbytes


def _array_bytes(shape: Any, dtype: Any) -> int:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return -1
    return math.prod(dims) * np.dtype(dtype).itemsize


def _sized_constructors(budget: _Budget) -> dict[tuple[str, str], Any]:
    """bytearray / bytes / ndarray / _reconstruct / _codecs.encode, each checking what it would allocate."""

    def sized_bytes(kind: type):
        def build(*args):
            if args and isinstance(args[0], int):  # bytes(n) / bytearray(n): n zero bytes
                budget.charge(args[0], kind.__name__)
            return kind(*args)

        return build

    def ndarray(shape=(), dtype=float, *args, **kwargs):
        budget.charge(_array_bytes(shape, dtype), "an array")
        return np.ndarray(shape, dtype, *args, **kwargs)

    def reconstruct(subtype, shape, dtype):
        if subtype is not ndarray:  # find_class gives our ndarray for numpy.ndarray
            raise CheckpointError(f"{budget.source}: the pickle rebuilds an array of an unknown type")
        budget.charge(_array_bytes(shape, np.uint8 if isinstance(dtype, bytes) else dtype), "an array")
        return _RECONSTRUCT(np.ndarray, shape, dtype)

    def encode(text, encoding="utf-8", errors="strict"):
        if str(encoding).lower().replace("-", "") != "latin1":  # what protocol 2 writes bytes with
            raise CheckpointError(f"{budget.source}: the pickle asks for a '{encoding}' codec")
        return codecs.encode(text, "latin1", errors)

    built = {}
    for module in ("builtins", "__builtin__"):
        built[(module, "bytearray")] = sized_bytes(bytearray)
        # Protocol 2 pickles written by Python 3 store empty bytes as bytes() (e.g. an empty array's data).
        built[(module, "bytes")] = sized_bytes(bytes)
    for core in ("numpy.core", "numpy._core"):
        built[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    built[("numpy", "ndarray")] = ndarray
    built[("_codecs", "encode")] = encode
    return built


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that resolves only allow-listed globals and refuses persistent ids (torch storages).

    Constructors that allocate from a size in the file are bounded by the file's size (`file_size`). It
    is pickle's Python unpickler: the C one allocates the buffer a length field announces (8 bytes can
    say 8 GB) before reading, where this one reads what the file holds (`_Clamped`) and finds it short.
    Arrays are read as whole byte strings, so the Python loop runs per object, not per byte."""

    def __init__(self, file: BinaryIO, source: str, file_size: int | None = None):
        # latin1 lets Python 3 read numpy arrays pickled by Python 2 (older detectron2 model zoo files).
        super().__init__(file, encoding="latin1")
        self.source = source
        if file_size is None:
            file_size = os.fstat(file.fileno()).st_size if hasattr(file, "fileno") else 0
        self.sized = _sized_constructors(_Budget(source, file_size))

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.sized:
            return self.sized[(module, name)]
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to unpickle global '{module}.{name}' ({_WHAT_IS_ALLOWED})"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: the pickle refers to external storage; not a plain pickle")


class _Clamped:
    """A binary file whose read(n) never asks for more than is left: a length field of 2 GB in a 57-byte
    file would otherwise make the unpickler allocate its buffer before finding the file short."""

    def __init__(self, handle: BinaryIO, size: int):
        self.handle, self.size = handle, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.handle.tell())
        return self.handle.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, buffer) -> int:
        return self.handle.readinto(buffer)

    def readline(self, limit: int = -1) -> bytes:
        return self.handle.readline(limit)

    def peek(self, n: int = 0) -> bytes:
        return self.handle.peek(n)


def load_restricted_pickle(path: str | Path) -> Any:
    """Unpickle a plain pickle file with `RestrictedUnpickler` (CheckpointError on anything else)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return RestrictedUnpickler(_Clamped(handle, size), str(path), size).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # truncated or corrupt pickles raise a variety of errors
        raise CheckpointError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None


def load_torch_file(path: str | Path) -> Any:
    """torch.load with torch's restricted unpickler (weights_only=True), tensors mapped to the CPU."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as error:
        # torch's message is several paragraphs; keep the one fact that matters: the refused global.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"global '{found.group(1)}'" if found else "an object"
        raise CheckpointError(
            f"{path}: refusing to unpickle {what} (torch.load(weights_only=True) allows only tensors and "
            "plain containers)"
        ) from None
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable torch file ({type(error).__name__}: {first_line})"
        ) from None


def load_pickled(path: str | Path) -> Any:
    """The object stored in a .pkl/.pth/.pt file, read without running code from it.

    Torch zip files and torch's legacy format are read by torch.load(weights_only=True); any other file
    is taken as a plain pickle and read by `RestrictedUnpickler`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        return load_torch_file(path)
    obj = load_restricted_pickle(path)
    # torch's legacy (pre-1.6) format starts with a pickled magic number, then more pickles.
    if isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER:
        return load_torch_file(path)
    return obj
