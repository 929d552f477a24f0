"""Interleaved timing shared by the bench scripts: every contender runs once per round, A B C A B C ..., so
load from other processes on a shared machine hits all alike; min / median / max per contender."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each callable over `repeats` interleaved rounds, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float], scale: float = 1e3) -> str:
    """'min / median / max' of `values` times `scale` (ms by default)."""
    return f"{min(values) * scale:.0f} / {statistics.median(values) * scale:.0f} / {max(values) * scale:.0f}"


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow / fast (each round's two runs saw the same machine load)."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))
