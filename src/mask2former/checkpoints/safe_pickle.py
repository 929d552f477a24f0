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
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        # protocol 5 pickles rebuild arrays from a buffer instead of _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed = _numpy_array_globals()
    plain = (set, frozenset, dict, list, tuple, bytearray, complex)
    for module in ("builtins", "__builtin__"):  # __builtin__: pickles written by Python 2
        for kind in plain:
            allowed[(module, kind.__name__)] = kind
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # Protocol 2 pickles written by Python 3 store bytes (e.g. array data) as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


_ALLOWED = _allowed_globals()
_WHAT_IS_ALLOWED = "only plain containers, numbers, strings, bytes and numpy arrays are allowed"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals and refuses persistent ids (torch storages)."""

    def __init__(self, file: BinaryIO, source: str):
        # latin1 lets Python 3 read numpy arrays pickled by Python 2 (older detectron2 model zoo files).
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to unpickle global '{module}.{name}' ({_WHAT_IS_ALLOWED})"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: the pickle refers to external storage; not a plain pickle")


def load_restricted_pickle(path: str | Path) -> Any:
    """Unpickle a plain pickle file with `RestrictedUnpickler` (CheckpointError on anything else)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, str(path)).load()
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
