"""What a killed training run leaves behind, cleared at the start of the next one.

A run killed during a save leaves the hidden temporary file of that save (`.checkpoint.pt.PID.RAND.tmp`,
up to the size of a checkpoint); one killed while appending to metrics.jsonl can leave a torn last line,
and one killed between a log line and the next checkpoint leaves rows of steps the resumed run will do
again. `prepare_out_dir` removes the temporaries and keeps only the whole rows up to the resumed step.
"""

from __future__ import annotations

import json
from pathlib import Path

from mask2former.fileio import atomic_write_bytes, remove_stale_temporaries

# Files a run writes in its folder (and in its model/ sub-folder), each through fileio.atomic_write.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "loss.png", "train_config.json")
MODEL_FILES = ("model.safetensors", "config.json")


def remove_stale_files(out_dir: str | Path) -> list[Path]:
    """Remove the temporaries of interrupted saves in out_dir and out_dir/model; returns what was removed."""
    out_dir = Path(out_dir)
    removed = [temp for name in RUN_FILES for temp in remove_stale_temporaries(out_dir, name)]
    if (out_dir / "model").is_dir():
        removed += [
            temp for name in MODEL_FILES for temp in remove_stale_temporaries(out_dir / "model", name)
        ]
    return removed


def repair_metrics(path: str | Path, last_step: int) -> int:
    """Keep the whole JSON rows of metrics.jsonl with step <= last_step; returns how many lines went.

    A torn line (no newline, or not JSON) is what a kill during a write leaves; rows after `last_step` are
    steps the run resumed from `last_step` will log again.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line)
            whole = line.endswith(b"\n") and isinstance(row, dict) and int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            whole = False
        if whole:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
    return dropped


def prepare_out_dir(out_dir: str | Path, step: int) -> None:
    """Clear what an interrupted run left in out_dir before a run (starting or resumed at `step`) writes."""
    remove_stale_files(out_dir)
    repair_metrics(Path(out_dir) / "metrics.jsonl", step)
