"""The state of a `predict` output folder: one run at a time, a journal of finished images, resume.

  DIR/.predict.lock                      held (flock) by the run writing DIR; the OS releases it when that
                                         process dies, even by SIGKILL, so a stale lock is simply taken over
  DIR/.predict-journal/run.json          what the run is (task, input list, model, thresholds, pictures)
  DIR/.predict-journal/images/N.json     one record per finished image (its ids, segments / instances and
                                         the files it wrote), written after those files

The whole-folder files (panoptic.json, instances.json, ...) are merged from the records, so an
interrupted run loses no finished image and a resumed run skips them. A folder holding another run's
results is never written into unless the caller resumes that same run or asks to overwrite it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from mask2former.fileio import remove_stale_temporaries, write_json
from mask2former.writers import WHOLE_FOLDER_FILES

LOCK = ".predict.lock"
JOURNAL = ".predict-journal"
TASKS = ("semantic", "panoptic", "instance")


class FolderError(ValueError):
    """An output folder that cannot be used as asked; one line starting with "out DIR:"."""


class OutputLock:
    """An exclusive, non-blocking lock on DIR/.predict.lock; the file names the holder for error messages."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK
        self._file = None

    def acquire(self) -> None:
        """Take the lock, or raise FolderError naming the process that holds it."""
        import fcntl

        while True:
            file = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise FolderError(
                    f"out {self.out_dir}: another predict ({holder}) is writing there; "
                    "wait for it to finish or choose another --out"
                ) from None
            # The holder may have removed the file between our open and our flock: lock the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


class Journal:
    """Per-image records of a run in DIR/.predict-journal (read once each, then cached)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / JOURNAL
        self.images_dir = self.folder / "images"
        self._records: dict[str, dict] = {}

    def read_run(self) -> dict | None:
        try:
            return json.loads((self.folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def start(self, run: dict) -> None:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "run.json", run, indent=1)

    def add(self, record: dict) -> None:
        """Record a finished image (after its files are written); atomic, so a kill leaves none or all."""
        name = f"{record['index']:09d}.json"
        write_json(self.images_dir / name, record)
        self._records[name] = record

    def records(self) -> list[dict]:
        """Every finished image's record, from this process and any other (ranks, earlier runs)."""
        try:
            names = sorted(
                entry.name for entry in os.scandir(self.images_dir) if entry.name.endswith(".json")
            )
        except FileNotFoundError:
            return []
        for name in names:
            if name not in self._records:
                try:
                    self._records[name] = json.loads((self.images_dir / name).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # unreadable: the image is done again
        return [self._records[name] for name in names if name in self._records]

    def done(self) -> set[int]:
        """Indices of images whose record exists and whose files are all present."""
        return {
            record["index"]
            for record in self.records()
            if all((self.out_dir / name).is_file() for name in record.get("files", []))
        }


def existing_outputs(out_dir: Path) -> list[str]:
    """What an earlier run left in out_dir (names for the refusal message); empty for a fresh folder."""
    out_dir = Path(out_dir)
    found = [name for names in WHOLE_FOLDER_FILES.values() for name in names if (out_dir / name).is_file()]
    for sub in ("panoptic", "semantic"):
        count = len(list((out_dir / sub).glob("*.png"))) if (out_dir / sub).is_dir() else 0
        if count:
            found.append(f"{sub}/ ({count} PNGs)")
    pictures = len(_pictures(out_dir))
    if pictures:
        found.append(f"{pictures} pictures")
    return found + ([JOURNAL] if (out_dir / JOURNAL).is_dir() else [])


def _pictures(out_dir: Path) -> list[Path]:
    return [p for task in TASKS for p in out_dir.glob(f"*.{task}.png")]


def remove_outputs(out_dir: Path) -> None:
    """Delete what predict writes in out_dir (and nothing else): for --overwrite."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / JOURNAL, ignore_errors=True)
    for names in WHOLE_FOLDER_FILES.values():
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
    for sub in ("panoptic", "semantic"):
        if (out_dir / sub).is_dir():
            for png in (out_dir / sub).glob("*.png"):
                png.unlink()
            if not any((out_dir / sub).iterdir()):
                (out_dir / sub).rmdir()
    for picture in _pictures(out_dir):
        picture.unlink()


def remove_temporaries(out_dir: Path) -> int:
    """Remove temporary files an interrupted run left (call with the lock held); returns how many."""
    folders: Iterable[Path] = (out_dir, out_dir / "panoptic", out_dir / "semantic", out_dir / JOURNAL)
    removed = sum(len(remove_stale_temporaries(f, "*")) for f in folders if f.is_dir())
    if (out_dir / JOURNAL / "images").is_dir():
        removed += len(remove_stale_temporaries(out_dir / JOURNAL / "images", "*"))
    return removed


def prepare(out_dir: Path, run: dict, resume: bool, overwrite: bool) -> Journal:
    """Make out_dir ready for `run` (the lock must be held): refuse another run's results unless resuming
    that same run (`resume`) or replacing it (`overwrite`); clear temporaries; write run.json."""
    out_dir = Path(out_dir)
    journal = Journal(out_dir)
    if overwrite:
        remove_outputs(out_dir)
    found = existing_outputs(out_dir)
    if found and not resume:
        listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise FolderError(
            f"out {out_dir}: holds the results of an earlier run ({listed}); "
            "pass --resume to continue that run or --overwrite to replace it"
        )
    if found:
        previous = journal.read_run()
        if previous is None:
            raise FolderError(
                f"out {out_dir}: has results but no journal of a run to resume; "
                "pass --overwrite to replace them"
            )
        for key, value in run.items():
            if previous.get(key) != value:
                raise FolderError(
                    f"out {out_dir}: the run to resume had {key} {previous.get(key)!r}, this one {value!r}; "
                    "repeat its arguments and inputs, or pass --overwrite"
                )
    remove_temporaries(out_dir)
    journal.start(run)
    return journal
