"""`mask2former serve` as a command: flags, missing extra, SIGTERM draining in-flight requests."""

from __future__ import annotations

import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import EXAMPLE, start_cli_server, stop, wait_ready

from mask2former.cli import main
from mask2former.serve.client import ServeClient
from mask2former.serve.metrics import parse_samples


def test_without_the_extra_serve_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[serve]"' in err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
        (["--timeout", "0"], "--timeout 0"),
        (["--port", "70000"], "--port 70000: must be 0..65535"),
        (["--weights", "no/such/model"], "--weights no/such/model: no such file"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, flags, words):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_busy_port_is_a_one_line_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen" in capsys.readouterr().err


def test_weights_that_fail_to_load_stop_the_server_with_exit_2(tmp_path):
    broken = tmp_path / "model.pth"
    broken.write_bytes(b"not a checkpoint")
    process, _ = start_cli_server("--weights", str(broken))
    try:
        code = process.wait(timeout=120)
        err = process.stderr.read()
    finally:
        stop(process)
    assert code == 2
    assert "mask2former serve: error: the model could not be loaded" in err and "model.pth" in err


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0():
    # Requests wait up to 1.5 s for batch mates, so they are in flight when SIGTERM arrives.
    process, port = start_cli_server("--max-batch", "8", "--max-wait-ms", "1500")
    try:
        wait_ready(port)

        def post():
            client = ServeClient("127.0.0.1", port)
            try:
                return client.predict(EXAMPLE.read_bytes())
            finally:
                client.close()

        with ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(post) for _ in range(3)]
            deadline = time.monotonic() + 30
            while True:
                metrics = parse_samples(ServeClient("127.0.0.1", port).get("/metrics").body.decode())
                if metrics["mask2former_queue_depth"] == 3:
                    break
                assert time.monotonic() < deadline, "requests never queued"
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            answers = [reply.result(timeout=60) for reply in replies]
        code = process.wait(timeout=60)
        err = process.stderr.read()
    finally:
        stop(process)
    assert [a.status for a in answers] == [200, 200, 200]
    assert all(a.json()["segments"] for a in answers)
    assert code == 0, err[-2000:]
    assert "Shutting down" in err and "mask2former serve: stopped" in err
