"""The log line `train` prints every --log-every steps when there is no progress bar (--no-progress)."""

from __future__ import annotations

import math


def log_line(record: dict, max_iters: int, started_step: int) -> str:
    """ "step 50/1000  loss 17.46  lr 7.26e-05  2.7 s/it  ETA 42m 10s" from a metrics row."""
    done = record["step"] - started_step
    per_step = record["seconds"] / done if done > 0 else float("nan")
    remaining = per_step * (max_iters - record["step"])
    eta = "?" if not math.isfinite(remaining) else _duration(remaining)
    return (
        f"step {record['step']}/{max_iters}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
        f"{per_step:.2f} s/it  ETA {eta}"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
