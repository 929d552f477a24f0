"""Dynamic batching under concurrency, the queue bound, the per-request timeout and /health while loading.

The model's runner is gated by an event so the tests decide when a batch may finish: requests then pile up
deterministically, with no timing assumptions.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import EXAMPLE, server_thread, wait_ready

import mask2former
from mask2former.data.image_io import load_image
from mask2former.fileio import encode_png
from mask2former.inference.predictor import Predictor
from mask2former.serve.app import ServeSettings, create_app
from mask2former.serve.client import ServeClient
from mask2former.serve.limits import ServeLimits
from mask2former.serve.metrics import parse_samples


@pytest.fixture(scope="module")
def real():
    return mask2former.load()


def gated(real: Predictor, gate: threading.Event) -> Predictor:
    """The same model, whose forward passes wait for `gate`."""

    def runner(images):
        assert gate.wait(timeout=60), "test gate never opened"
        return real.runner(images)

    return Predictor(runner, real.config, source=real.source)


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _post(port: int, data: bytes, **params):
    client = ServeClient("127.0.0.1", port)
    try:
        return client.predict(data, **params)
    finally:
        client.close()


def _images() -> list[np.ndarray]:
    """Six different scenes of one size (so a batch needs no extra padding)."""
    example = load_image(EXAMPLE)
    turns = [np.rot90(example, k) for k in range(4)]
    return [np.ascontiguousarray(a) for a in [*turns, example[:, ::-1], example[::-1]]]


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_result(real):
    images = _images()
    expected = [real.predict(image, "panoptic") for image in images]
    gate = threading.Event()
    settings = ServeSettings(max_batch=3, max_wait_ms=2000)
    app = create_app(lambda: gated(real, gate), settings)
    with server_thread(app) as port, ThreadPoolExecutor(len(images)) as pool:
        wait_ready(port)
        service = app.state.service
        replies = [pool.submit(_post, port, encode_png(image), task="panoptic") for image in images]
        # The first batch (3 requests) is held in the model; the other 3 wait in the queue.
        _wait_for(lambda: service.batcher.depth == 3, "3 queued requests")
        gate.set()
        documents = [reply.result().json() for reply in replies]
        samples = parse_samples(ServeClient("127.0.0.1", port).get("/metrics").body.decode())
    assert samples["mask2former_batch_size_count"] == 2
    assert samples["mask2former_batch_size_sum"] == 6
    for document, result in zip(documents, expected, strict=True):
        got = [(s["id"], s["class_id"], s["area"]) for s in document["segments"]]
        assert got == [(s.id, s.category_id, s.area) for s in result.segments]
    # the six scenes differ, so a mix-up between requests would show
    assert len({tuple(tuple(s["bbox"]) for s in d["segments"]) for d in documents}) == len(images)


def test_full_queue_answers_503_with_retry_after(real):
    gate = threading.Event()
    settings = ServeSettings(max_batch=1, max_wait_ms=0, limits=ServeLimits(max_queue=2))
    app = create_app(lambda: gated(real, gate), settings)
    data = EXAMPLE.read_bytes()
    with server_thread(app) as port, ThreadPoolExecutor(3) as pool:
        wait_ready(port)
        service = app.state.service
        first = pool.submit(_post, port, data)
        _wait_for(
            lambda: service.metrics.requests() == {200: 1} and service.batcher.depth == 0, "a running batch"
        )
        queued = [pool.submit(_post, port, data) for _ in range(2)]
        _wait_for(lambda: service.batcher.depth == 2, "2 queued requests")
        refused = _post(port, data)
        gate.set()
        statuses = [first.result().status] + [q.result().status for q in queued]
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert "already waiting" in refused.json()["error"]
    assert statuses == [200, 200, 200]


def test_request_over_its_timeout_gets_504_and_the_server_goes_on(real):
    gate = threading.Event()
    settings = ServeSettings(max_batch=1, max_wait_ms=0, limits=ServeLimits(timeout_s=0.3))
    app = create_app(lambda: gated(real, gate), settings)
    with server_thread(app) as port:
        wait_ready(port)
        reply = _post(port, EXAMPLE.read_bytes())
        gate.set()
        after = _post(port, EXAMPLE.read_bytes())
    assert reply.status == 504 and "timeout of 0.3 s" in reply.json()["error"]
    assert after.status == 200


def test_health_is_503_until_the_model_is_loaded(real):
    loaded = threading.Event()

    def slow_load():
        assert loaded.wait(timeout=60)
        return real

    app = create_app(slow_load, ServeSettings())
    with server_thread(app) as port:
        client = ServeClient("127.0.0.1", port)
        before = client.get("/health")
        early = client.predict(EXAMPLE.read_bytes())
        loaded.set()
        wait_ready(port)
        after = client.get("/health")
        client.close()
    assert (
        before.status == 503 and before.headers["retry-after"] == "1" and "loading" in before.json()["error"]
    )
    assert early.status == 503
    assert after.status == 200 and after.json()["model"] == "synth-tiny"


def test_health_reports_a_model_that_failed_to_load():
    errors = []

    def broken():
        raise ValueError("weights/model.safetensors: not a checkpoint")

    app = create_app(broken, ServeSettings(), on_load_error=errors.append)
    with server_thread(app) as port:
        client = ServeClient("127.0.0.1", port)
        _wait_for(lambda: errors, "the load error")
        reply = client.get("/health")
        client.close()
    assert reply.status == 503 and "not a checkpoint" in reply.json()["error"]
    assert "retry-after" not in reply.headers
