"""Running `mask2former serve` for tests: in a thread of the test process, or as a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mask2former.serve.client import ServeClient

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLE = SRC / "mask2former" / "assets" / "example.png"


def loopback_socket() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener


@contextlib.contextmanager
def server_thread(app) -> Iterator[int]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port, yielded) in a thread; stop it on exit."""
    import uvicorn

    listener = loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Poll GET /health until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = ServeClient("127.0.0.1", port, timeout=5)
        try:
            if client.get("/health").status == 200:
                return
        except OSError:
            pass
        finally:
            client.close()
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} not ready within {timeout} s")


def start_cli_server(*flags: str) -> tuple[subprocess.Popen, int]:
    """`python -m mask2former serve --port 0 FLAGS` as a subprocess -> (process, its port) once listening."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "mask2former", "serve", "--host", "127.0.0.1", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        process.kill()
        _, err = process.communicate(timeout=30)
        raise RuntimeError(f"serve did not start: {line!r} {err[-2000:]}")
    return process, int(found.group(1))


def stop(process: subprocess.Popen) -> None:
    """End a server subprocess this test started (if it is still running) and reap it."""
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)
