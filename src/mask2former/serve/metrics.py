"""Service metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Updated from the event loop and from the inference threads, hence the lock; rendering takes a consistent
snapshot under the same lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = "mask2former"


class Histogram:
    """Cumulative-bucket histogram of one labelled series."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*self.buckets, float("inf")], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            bucket_labels = _join(labels, f'le="{le}"')
            out.append(f"{name}_bucket{{{bucket_labels}}} {running}")
        suffix = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{suffix} {_number(self.sum)}")
        out.append(f"{name}_count{suffix} {self.count}")
        return out


class ServeMetrics:
    """Requests by endpoint and status, /predict latency, batch sizes, queue depth, requests in flight."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, Histogram] = {}
        self._batch_sizes = Histogram(BATCH_BUCKETS)
        self._in_flight = 0
        self.queue_depth = queue_depth

    def request_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def request_finished(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._requests[(endpoint, status)] += 1
            self._latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_run(self, size: int) -> None:
        with self._lock:
            self._batch_sizes.observe(size)

    def requests(self, endpoint: str | None = None) -> dict[int, int]:
        """Count of finished requests by status (of one endpoint, or all)."""
        with self._lock:
            counts: Counter[int] = Counter()
            for (name, status), n in self._requests.items():
                if endpoint is None or name == endpoint:
                    counts[status] += n
            return dict(counts)

    def render(self) -> str:
        """The whole exposition, one metric family after another."""
        with self._lock:
            lines = [
                f"# HELP {PREFIX}_requests_total HTTP requests finished, by endpoint and status code.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                f"# HELP {PREFIX}_request_duration_seconds Time from request start to response, by endpoint.",
                f"# TYPE {PREFIX}_request_duration_seconds histogram",
            ]
            for endpoint, histogram in sorted(self._latency.items()):
                lines += histogram.lines(f"{PREFIX}_request_duration_seconds", f'endpoint="{endpoint}"')
            lines += [
                f"# HELP {PREFIX}_batch_size Images per model forward pass.",
                f"# TYPE {PREFIX}_batch_size histogram",
                *self._batch_sizes.lines(f"{PREFIX}_batch_size", ""),
                f"# HELP {PREFIX}_queue_depth Requests waiting for the model.",
                f"# TYPE {PREFIX}_queue_depth gauge",
                f"{PREFIX}_queue_depth {self.queue_depth()}",
                f"# HELP {PREFIX}_requests_in_flight Requests being handled.",
                f"# TYPE {PREFIX}_requests_in_flight gauge",
                f"{PREFIX}_requests_in_flight {self._in_flight}",
            ]
        return "\n".join(lines) + "\n"


def _join(*parts: str) -> str:
    return ",".join(part for part in parts if part)


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the sample lines (for tests and the load test)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
