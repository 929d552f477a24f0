"""Predict over many images into one output folder: journaled, resumable, sharded over a torchrun group.

Rank 0 takes the folder's lock, checks it (`journal.prepare`) and lists the images not done yet; rank r
predicts pending images r, r + N, r + 2N, ... and journals each one; rank 0 merges the journal into the
whole-folder files every so often and, after a barrier, once more at the end. The merged files list
images in input order, so they are the same for any number of processes or interruptions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mask2former.outputs.inputs import InputImage
from mask2former.outputs.journal import FolderError, Journal, OutputLock, prepare
from mask2former.writers import PredictionWriter


@dataclass
class FolderSummary:
    total: int  # images of the run
    done_before: int  # finished by an earlier, interrupted run (skipped)
    done: int = 0  # finished now, over all processes
    failed: list[str] = field(default_factory=list)  # one line per unreadable image
    interrupted: bool = False


class MergeSchedule:
    """When to rewrite the whole-folder files: every `every` images, but never spending more than a sixth
    of the time merging (the merge grows with the folder, the images do not)."""

    def __init__(self, every: int):
        self.every = every
        self.since = 0
        self.last_end = time.perf_counter()
        self.last_cost = 0.0

    def image_done(self) -> bool:
        self.since += 1
        return self.since >= self.every and time.perf_counter() - self.last_end >= 5 * self.last_cost

    def merged(self, started: float) -> None:
        self.since = 0
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - started


def _broadcast(value, rank: int, world_size: int):
    """Rank 0's `value` on every rank."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def predict_folder(
    predictor,
    images: Sequence[InputImage],
    writer: PredictionWriter,
    run: dict,
    *,
    batch_size: int = 1,
    thresholds: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    merge_every: int = 50,
    log: Callable[[str], None] = print,
    progress: bool = True,
    device: str = "cpu",
) -> FolderSummary | None:
    """Predict `images` into `writer.out_dir`; rank 0 returns the summary, other ranks None.

    `run` describes the run for the journal (a resume must match it). Raises FolderError (one line
    starting with "out DIR:") when the folder is locked by another run or holds another run's results.
    On Ctrl-C (KeyboardInterrupt) rank 0 merges the images finished so far and the summary comes back
    with `interrupted` set; a rerun with `resume` continues.
    """
    from mask2former.training import distributed

    rank, world_size = distributed.init_from_environment(device)
    out_dir = writer.out_dir
    lock = OutputLock(out_dir)
    journal = Journal(out_dir)
    try:
        problem, pending = None, []
        if rank == 0:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                journal = prepare(out_dir, run, resume, overwrite)
                done = journal.done()
                pending = [image.index for image in images if image.index not in done]
            except FolderError as error:
                problem = str(error)
            except OSError as error:
                problem = f"out {out_dir}: cannot write there ({error.strerror or error})"
        problem, pending = _broadcast((problem, pending), rank, world_size)
        if problem is not None:
            raise FolderError(problem)
        summary = FolderSummary(total=len(images), done_before=len(images) - len(pending))
        if rank == 0 and summary.done_before:
            log(f"skipping {summary.done_before} images finished by the earlier run")
        mine = [images[i] for i in pending[rank::world_size]]
        try:
            schedule = MergeSchedule(merge_every) if rank == 0 else None
            _predict_shard(
                predictor,
                mine,
                writer,
                journal,
                summary,
                batch_size,
                thresholds or {},
                schedule,
                progress and rank == 0,
            )
        except KeyboardInterrupt:
            summary.interrupted = True
        if summary.interrupted:
            if rank == 0:
                writer.merge(journal.records())
            return summary if rank == 0 else None
        distributed.barrier()
        if world_size > 1:
            import torch.distributed as dist

            shards: list = [None] * world_size
            dist.all_gather_object(shards, (summary.done, summary.failed))
            summary.done = sum(done for done, _ in shards)
            summary.failed = [line for _, failed in shards for line in failed]
        if rank != 0:
            return None
        wanted = {image.index for image in images}
        writer.merge(r for r in journal.records() if r["index"] in wanted)
        return summary
    finally:
        lock.release()
        distributed.cleanup()


def _predict_shard(
    predictor,
    images: Sequence[InputImage],
    writer: PredictionWriter,
    journal: Journal,
    summary: FolderSummary,
    batch_size: int,
    thresholds: dict,
    schedule: MergeSchedule | None,
    progress: bool,
) -> None:
    from tqdm import tqdm

    from mask2former.data.image_io import ImageReadError, load_image

    bar = tqdm(total=len(images), unit="img", disable=not progress or len(images) <= 1, file=sys.stderr)
    try:
        for start in range(0, len(images), batch_size):
            loaded = []
            for image in images[start : start + batch_size]:
                try:
                    loaded.append((image, load_image(image.path)))
                except ImageReadError as error:
                    summary.failed.append(str(error))
                    tqdm.write(f"mask2former predict: skipped: {error}", file=sys.stderr)
                    bar.update(1)
            if not loaded:
                continue
            predictions = predictor.predict_batch([array for _, array in loaded], writer.task, **thresholds)
            for (image, _), prediction in zip(loaded, predictions, strict=True):
                record = writer.write(image, prediction)
                journal.add(record)
                summary.done += 1
                bar.update(1)
                shown = record["files"][-1] if record["files"] else writer.task
                tqdm.write(f"{image.path}: {prediction.summary()} -> {Path(writer.out_dir) / shown}")
                if schedule is not None and schedule.image_done():
                    started = time.perf_counter()
                    writer.merge(journal.records())
                    schedule.merged(started)
    finally:
        bar.close()
