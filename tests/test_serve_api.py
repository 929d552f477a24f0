"""`mask2former serve` endpoints with the bundled model: results equal `predict`'s, bad uploads get 4xx."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_helpers import EXAMPLE, server_thread, wait_ready

import mask2former
from mask2former import rle
from mask2former.cli import main
from mask2former.fileio import read_panoptic_png
from mask2former.serve.app import ServeSettings, create_app
from mask2former.serve.client import ServeClient
from mask2former.serve.limits import ServeLimits
from mask2former.serve.metrics import parse_samples

LIMITS = ServeLimits(max_upload_bytes=200_000, max_pixels=4_000_000)


@pytest.fixture(scope="module")
def port():
    with server_thread(create_app(mask2former.load, ServeSettings(max_batch=4, limits=LIMITS))) as port:
        wait_ready(port)
        yield port


@pytest.fixture()
def client(port):
    client = ServeClient("127.0.0.1", port)
    yield client
    client.close()


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """What `mask2former predict` writes for the example image, per task."""
    out = {}
    for task in ("panoptic", "instance", "semantic"):
        folder = tmp_path_factory.mktemp(f"predict-{task}")
        assert main(["predict", str(EXAMPLE), "--task", task, "--out", str(folder)]) == 0
        out[task] = folder
    return out


def _png(reply) -> np.ndarray:
    assert reply.status == 200 and reply.headers["content-type"] == "image/png", reply.body[:200]
    return np.asarray(Image.open(io.BytesIO(reply.body)))


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_results_equal_predict(client, predicted, task):
    data = EXAMPLE.read_bytes()
    folder = predicted[task]
    document = client.predict(data, task=task).json()
    assert document["task"] == task and (document["width"], document["height"]) == (128, 128)
    segments = document["segments"]
    assert segments, "the example scene has segments"
    # The overlay picture is pixel for pixel the one predict saves.
    overlay = _png(client.predict(data, task=task, output="overlay"))
    assert np.array_equal(overlay, np.asarray(Image.open(folder / f"example.{task}.png")))
    masks = rle.decode([s["mask"] for s in segments])  # (N, H, W) bool
    if task == "panoptic":
        ids = read_panoptic_png(folder / "panoptic" / "example.png")
        served = _png(client.predict(data, task=task, output="panoptic_png"))
        assert np.array_equal(served, np.asarray(Image.open(folder / "panoptic" / "example.png")))
        info = json.loads((folder / "panoptic.json").read_text())["annotations"][0]["segments_info"]
        assert [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in segments] == [
            (s["id"], s["category_id"], s["area"], s["bbox"]) for s in info
        ]
        for index, segment in enumerate(segments):
            assert np.array_equal(masks[index], ids == segment["id"])
    elif task == "instance":
        expected = json.loads((folder / "instances.json").read_text())
        assert len(segments) == len(expected)
        for segment, entry in zip(segments, expected, strict=True):
            assert segment["mask"] == entry["segmentation"]
            assert segment["category_id"] == entry["category_id"] and segment["bbox"] == entry["bbox"]
            assert segment["score"] == pytest.approx(entry["score"], abs=1e-6)
            assert segment["area"] == int(rle.area(entry["segmentation"])[0])
    else:
        labels = np.asarray(Image.open(folder / "semantic" / "example.png"))
        assert np.array_equal(_png(client.predict(data, task=task, output="semantic_png")), labels)
        for index, segment in enumerate(segments):
            assert np.array_equal(masks[index], labels == segment["class_id"])  # contiguous indices


def test_raw_bytes_and_threshold(client):
    data = EXAMPLE.read_bytes()
    multipart = client.predict(data, task="instance", threshold=0).json()["segments"]
    raw = client.predict(
        data, multipart=False, content_type="application/octet-stream", task="instance", threshold=0
    )
    assert raw.status == 200 and raw.json()["segments"] == multipart
    kept = client.predict(data, multipart=False, task="instance", threshold=0.5).json()["segments"]
    assert 0 < len(kept) < len(multipart)
    assert kept == [s for s in multipart if s["score"] >= 0.5]
    # without a threshold, as `mask2former predict`: instances below 0.5 dropped
    assert client.predict(data, task="instance").json()["segments"] == kept
    picture = client.predict(data, task="panoptic", threshold=0.5, overlay="true").json()
    assert picture["overlay_png"].startswith("data:image/png;base64,")


def _bomb_png() -> bytes:
    """A 3000x3000 all-black PNG: a few kB on the wire, 9 M pixels (over the 4 M limit) once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "not an image": (dict(data=b"hello, this is text", file_name="notes.png"), 400, "not an image"),
    "truncated": (dict(data=EXAMPLE.read_bytes()[:1500]), 400, "truncated"),
    "empty": (dict(data=b""), 400, "empty"),
    "decompression bomb": (dict(data=_bomb_png()), 413, "over the limit of 4000000 pixels"),
    "too many bytes": (dict(data=b"\x89PNG" + bytes(250_000)), 413, "larger than the limit of 200000 bytes"),
    "wrong content type": (
        dict(data=EXAMPLE.read_bytes(), multipart=False, content_type="text/plain"),
        415,
        "text/plain",
    ),
    "missing field": (
        dict(data=EXAMPLE.read_bytes(), field_name="picture"),
        422,
        "missing the file field 'image'",
    ),
    "unknown task": (dict(data=EXAMPLE.read_bytes(), task="depth"), 400, "task 'depth' unknown"),
    "bad threshold": (dict(data=EXAMPLE.read_bytes(), threshold="high"), 422, "threshold"),
    "png kind of another task": (
        dict(data=EXAMPLE.read_bytes(), task="instance", output="panoptic_png"),
        400,
        "task=panoptic",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_its_4xx_and_the_server_goes_on(port, case):
    kwargs, status, words = BAD_UPLOADS[case]
    client = ServeClient("127.0.0.1", port)
    reply = client.predict(**kwargs)
    assert reply.status == status, reply.body
    error = reply.json()
    assert error["status"] == status and words in error["error"] and "\n" not in error["error"]
    client.close()
    client = ServeClient("127.0.0.1", port)
    assert client.predict(EXAMPLE.read_bytes()).status == 200
    assert client.get("/health").status == 200
    client.close()


def test_info_metrics_and_page(client):
    info = client.get("/info").json()
    assert info["model"] == "synth-tiny" and info["task"] == "panoptic"
    assert [c["name"] for c in info["classes"]][:3] == ["circle", "square", "triangle"]
    assert info["preprocessing"]["short_edge"] == 192 and info["batching"]["max_batch"] == 4
    client.predict(EXAMPLE.read_bytes())
    reply = client.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    samples = parse_samples(reply.body.decode())
    assert samples['mask2former_requests_total{endpoint="/predict",status="200"}'] >= 1
    assert samples["mask2former_batch_size_count"] >= 1
    assert samples['mask2former_request_duration_seconds_count{endpoint="/predict"}'] >= 1
    assert "mask2former_queue_depth" in samples
    page = client.get("/")
    assert page.status == 200 and b'id="segments"' in page.body
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status == 200
