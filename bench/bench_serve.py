"""Load test of `mask2former serve`: the dynamically batched server against the unbatched one, same run.

    .venv/bin/python bench/bench_serve.py [--clients 16] [--requests 1000] [--max-batch 8] [--max-wait-ms 5]

Starts two servers on 127.0.0.1 (free ports) with the bundled model: batched (--max-batch N) and unbatched
(--max-batch 1 --max-wait-ms 0). Each gets a warm-up, then the same load: K client threads, each on its own
keep-alive connection, send N requests in all; every `--bad-every`-th is a bad upload (cycling: not an image,
truncated, decompression bomb, wrong content type, missing field), the rest are the bundled example images
(panoptic, JSON answer). The load alternates between the servers in `--rounds` rounds so both see the same
machine load (the machine may be shared). Reported per server: throughput, p50/p95/p99 latency of the good
requests, mean batch size (from /metrics), answers by status, dropped connections, the server's RSS after
the warm-up and at the end (growth) and its peak (VmHWM); then the throughput ratio and the targets.
Everything is bounded: `--time-limit` seconds in all, after which clients stop and the servers are stopped
(SIGTERM; their exit codes are reported).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mask2former.serve.client import ServeClient
from mask2former.serve.metrics import parse_samples

ASSETS = Path(__file__).resolve().parents[1] / "src" / "mask2former" / "assets"
IMAGES = {
    "png": [ASSETS / "example.png"],
    "jpg": [ASSETS / "example.jpg"],
    "mix": [ASSETS / "example.png", ASSETS / "example.jpg"],
}


def bad_uploads() -> list[tuple[str, dict]]:
    """(name, ServeClient.predict keyword arguments) of each kind of bad upload."""
    example = IMAGES["png"][0].read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # ~8 kB of PNG, 64 M pixels: over the 40 M limit
    return [
        (
            "not an image",
            dict(data=b"GIF89a? no, plain text", file_name="fake.gif", content_type="image/gif"),
        ),
        ("truncated", dict(data=example[: len(example) // 2])),
        ("decompression bomb", dict(data=bomb.getvalue())),
        ("wrong content type", dict(data=example, multipart=False, content_type="application/json")),
        ("missing field", dict(data=example, field_name="upload")),
    ]


@dataclass
class Server:
    name: str
    flags: list[str]
    process: subprocess.Popen | None = None
    port: int = 0
    statuses: Counter = field(default_factory=Counter)  # (good|bad, status) -> count
    latencies: list[float] = field(default_factory=list)  # seconds, good requests
    dropped: int = 0
    busy_s: float = 0.0  # wall time under load
    requests: int = 0
    rss_start_kb: int = 0
    rss_after_rounds_kb: list[int] = field(default_factory=list)
    batches: tuple[float, float] = (0.0, 0.0)  # batch_size sum, count at the start

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ASSETS.parents[1]), os.environ.get("PYTHONPATH", "")]),
        }
        command = [
            sys.executable,
            "-m",
            "mask2former",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *self.flags,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.process.stdout.readline())
        if not found:
            raise SystemExit(f"{self.name}: the server did not start")
        self.port = int(found.group(1))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ServeClient("127.0.0.1", self.port, timeout=5).get("/health").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name}: not ready within 120 s")

    def status_kb(self, key: str) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))

    def batch_counts(self) -> tuple[float, float]:
        samples = parse_samples(ServeClient("127.0.0.1", self.port).get("/metrics").body.decode())
        return samples["mask2former_batch_size_sum"], samples["mask2former_batch_size_count"]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def run_load(
    server: Server, count: int, clients: int, bad_every: int, deadline: float, good: list[bytes]
) -> None:
    """`count` requests from `clients` threads (one connection each); results into server's counters."""
    bad = bad_uploads()
    lock = threading.Lock()
    next_index = [0]

    def client_loop() -> None:
        client = ServeClient("127.0.0.1", server.port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= count:
                break
            is_bad = bad_every > 0 and index % bad_every == bad_every - 1
            if is_bad:
                kwargs = dict(bad[(index // bad_every) % len(bad)][1])
            else:
                kwargs = dict(data=good[index % len(good)], task="panoptic")
            started = time.perf_counter()
            try:
                reply = client.predict(**kwargs)
            except (OSError, ConnectionError, Exception):  # noqa: BLE001 - any failure to get an answer
                with lock:
                    server.dropped += 1
                client.close()
                client = ServeClient("127.0.0.1", server.port, timeout=60)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                server.statuses[("bad" if is_bad else "good", reply.status)] += 1
                if not is_bad and reply.status == 200:
                    server.latencies.append(elapsed)
        client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.busy_s += time.perf_counter() - started
    server.requests += min(next_index[0], count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="per server, over all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="alternations between the two servers")
    parser.add_argument("--warmup", type=int, default=200, help="requests per server before measuring")
    parser.add_argument("--bad-every", type=int, default=10, help="every N-th request is a bad upload")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--images", choices=list(IMAGES), default="png", help="good uploads: bundled examples"
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    good = [path.read_bytes() for path in IMAGES[args.images]]
    servers = [
        Server("batched", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]),
        Server("unbatched", ["--max-batch", "1", "--max-wait-ms", "0"]),
    ]
    try:
        for server in servers:
            server.start()
            # Every batch size once (1, 2, ... clients): the model meets each batch shape before measuring.
            for clients in range(1, args.max_batch + 1):
                run_load(server, 4 * clients, clients, 0, deadline, good)
            run_load(server, args.warmup, args.clients, args.bad_every, deadline, good)
            server.statuses.clear(), server.latencies.clear()
            server.busy_s, server.requests, server.dropped = 0.0, 0, 0
            server.rss_start_kb = server.status_kb("VmRSS")
            server.batches = server.batch_counts()
        per_round = [
            args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)
        ]
        for round_index, count in enumerate(per_round):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for server in order:
                run_load(server, count, args.clients, args.bad_every, deadline, good)
                server.rss_after_rounds_kb.append(server.status_kb("VmRSS"))
        report = {server.name: summary(server) for server in servers}
    finally:
        codes = {server.name: server.stop() for server in servers if server.process is not None}
    print_report(args, report, codes, timed_out=time.monotonic() > deadline)


def summary(server: Server) -> dict:
    total, count = server.batch_counts()
    latencies = np.array(server.latencies) * 1000
    bad = {status: n for (kind, status), n in server.statuses.items() if kind == "bad"}
    good = {status: n for (kind, status), n in server.statuses.items() if kind == "good"}
    rss_end = server.status_kb("VmRSS")
    return {
        "requests": server.requests,
        "throughput": server.requests / server.busy_s if server.busy_s else 0.0,
        "p50": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p95": float(np.percentile(latencies, 95)) if latencies.size else float("nan"),
        "p99": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "mean_batch": (total - server.batches[0]) / max(count - server.batches[1], 1),
        "good": good,
        "bad": bad,
        "dropped": server.dropped,
        "rss_start_mb": server.rss_start_kb / 1024,
        "rss_end_mb": rss_end / 1024,
        "rss_growth": rss_end / server.rss_start_kb - 1,
        "rss_rounds_mb": [kb / 1024 for kb in server.rss_after_rounds_kb],
        "peak_rss_mb": server.status_kb("VmHWM") / 1024,
    }


def print_report(args, report: dict, codes: dict, timed_out: bool) -> None:
    print(
        f"{args.clients} clients, {args.requests} requests per server in {args.rounds} alternating rounds, "
        f"every {args.bad_every}th a bad upload; good uploads: {args.images} example(s), panoptic JSON"
    )
    columns = ["req/s", "p50 ms", "p95 ms", "p99 ms"]
    print(
        f"{'server':<10} "
        + " ".join(f"{c:>7}" for c in columns)
        + f" {'batch':>6} {'RSS MB start->end (peak)':>26}"
    )
    for name, r in report.items():
        rss = f"{r['rss_start_mb']:.0f}->{r['rss_end_mb']:.0f} ({r['peak_rss_mb']:.0f})"
        print(
            f"{name:<10} {r['throughput']:7.1f} {r['p50']:7.0f} {r['p95']:7.0f} {r['p99']:7.0f} "
            f"{r['mean_batch']:6.2f} {rss:>26}"
        )
    for name, r in report.items():
        print(f"{name}: good uploads by status {r['good']}, bad by status {r['bad']}, dropped {r['dropped']}")
    batched, unbatched = report["batched"], report["unbatched"]
    ratio = batched["throughput"] / unbatched["throughput"] if unbatched["throughput"] else float("nan")
    print(f"throughput batched / unbatched: {ratio:.2f}x")
    checks = {
        "zero 5xx": all(s < 500 for r in report.values() for s in [*r["good"], *r["bad"]]),
        "zero dropped connections": all(r["dropped"] == 0 for r in report.values()),
        "every bad upload a 4xx": all(400 <= s < 500 for r in report.values() for s in r["bad"]),
        "every good upload a 200": all(set(r["good"]) == {200} for r in report.values()),
        "RSS growth < 10%": all(r["rss_growth"] < 0.10 for r in report.values()),
        "batching >= 1.5x": ratio >= 1.5,
        "servers exited 0 on SIGTERM": all(code == 0 for code in codes.values()),
        "finished within the time limit": not timed_out,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for name, r in report.items():
        rounds = " ".join(f"{mb:.0f}" for mb in r["rss_rounds_mb"])
        print(
            f"{name} RSS MB after warm-up {r['rss_start_mb']:.0f}, after each round {rounds}: "
            f"growth {100 * r['rss_growth']:+.1f}%"
        )


if __name__ == "__main__":
    main()
