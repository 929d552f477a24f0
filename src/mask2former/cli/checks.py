"""Checks of command-line values shared by the subcommands: numbers in range and writable outputs.

Every check raises `UserError` with one line naming the flag, so a negative batch size or an output path
that is a file is refused before any work starts (a negative size used to loop forever).
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mask2former.cli import UserError


@dataclass(frozen=True)
class Range:
    """Allowed values of one number: low <= value (low < value when `open_low`), value <= high."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {_show(self.low)} and {_show(self.high)}" + (" (not 0)" if self.open_low else "")
        if self.low is not None:
            return f"greater than {_show(self.low)}" if self.open_low else f"at least {_show(self.low)}"
        return f"at most {_show(self.high)}"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE = Range(0, open_low=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)


def check_number(flag: str, value: float | None, allowed: Range) -> None:
    """UserError "--flag VALUE: must be ..." unless value is None or in range (NaN and inf never are)."""
    if value is not None and not allowed.holds(value):
        raise UserError(f"{flag} {value}: must be {allowed.describe()}")


def check_numbers(values: Mapping[str, float | None], rules: Mapping[str, Range]) -> None:
    """check_number for each flag in `rules` ("--batch-size": Range) with its value in `values`."""
    for flag, allowed in rules.items():
        check_number(flag, values.get(flag), allowed)


def check_args(args, rules: Mapping[str, Range]) -> None:
    """check_number for each flag in `rules`, its value read from the parsed `args` ("--max-batch" ->
    args.max_batch)."""
    check_numbers({flag: getattr(args, flag[2:].replace("-", "_")) for flag in rules}, rules)


def check_ordered(low_flag: str, low: float | None, high_flag: str, high: float | None) -> None:
    if low is not None and high is not None and low > high:
        raise UserError(f"{low_flag} {low} is above {high_flag} {high}")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (None when they can): tried, since root ignores modes."""
    probe = folder / f".mask2former-write-test.{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        return error.strerror or str(error)
    os.unlink(probe)
    if not os.access(folder, os.W_OK):  # not root: honour the mode bits as well
        return os.strerror(errno.EACCES)
    return None


def check_output_folder(flag: str, path: str | os.PathLike) -> Path:
    """An output folder: an existing writable folder, or one that can be created under a writable one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    _check_creatable(flag, path, path)
    return path


def _check_creatable(flag: str, path: Path, folder: Path) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is not a folder")
    why = _probe_writable(existing)
    if why is not None:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({why})")


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """An output file: not a folder, in a folder (existing or creatable) where files can be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"{flag} {path}: exists and is not a regular file")
    _check_creatable(flag, path, path.parent)
    return path


def check_limit(limit, amount: int, subject: str) -> None:
    """limits.Limit.check as a UserError (the message names the flag and the variable that raises it)."""
    from mask2former.limits import LimitError

    try:
        limit.check(amount, subject)
    except LimitError as error:
        raise UserError(str(error)) from None


def check_input_size(flag: str, size: tuple[int, int] | None) -> None:
    """A network input size (H, W) under limits.INPUT_PIXELS (export, bench, ops, synth)."""
    from mask2former import limits

    if size is not None:
        check_limit(limits.INPUT_PIXELS, size[0] * size[1], f"{flag} {size[0]}x{size[1]}")
