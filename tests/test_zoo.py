"""Released weights by name, against a loopback HTTP server serving official-layout checkpoints.

The server (127.0.0.1, a port the OS picks) serves files the tests make: a good plain pickle
{"model": {name: numpy}}, a corrupted one (right length, garbage bytes) and one whose connection drops
half-way through the announced length.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import mask2former
from mask2former.checkpoints import zoo
from mask2former.checkpoints.detectron2 import ours_to_official
from mask2former.checkpoints.io import is_our_format
from mask2former.cli import main
from mask2former.config import get_preset
from mask2former.modeling.build import build_model

NAME = "synth-tiny"  # a release entry the tests add: the real presets' files are hundreds of MB
RELEASE = zoo.Release("synth/panoptic/tiny/model_final_0a1b2c.pkl")


def official_bytes(seed: int = 0) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A synth-tiny checkpoint pickled as the official model zoo does, and the weights it holds."""
    config = get_preset(NAME)
    torch.manual_seed(seed)
    state = build_model(config).state_dict()
    official = ours_to_official(state, config)
    document = {"model": {k: v.numpy() for k, v in official.items()}, "__author__": "test"}
    return pickle.dumps(document, protocol=4), state


class Server:
    """Serves {url path: (bytes, mode)}; mode "full" or "cut" (announces all, sends half, closes)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        files, requests = self.files, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                requests.append(self.path)
                if self.path not in files:
                    self.send_error(404)
                    return
                body, mode = files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "full" else body[: len(body) // 2])
                self.wfile.flush()
                if mode == "cut":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/zoo"

    def serve(self, body: bytes, mode: str = "full") -> None:
        self.files["/zoo/" + RELEASE.path] = (body, mode)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    served = Server()
    monkeypatch.setenv("MASK2FORMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASK2FORMER_ZOO_URL", served.url)
    monkeypatch.delenv("MASK2FORMER_OFFLINE", raising=False)
    monkeypatch.setitem(zoo.RELEASES, NAME, RELEASE)
    yield served
    served.close()


def _raw(tmp_path: Path) -> Path:
    return tmp_path / "home" / "downloads" / NAME / RELEASE.file_name


def test_download_verify_convert_once_and_reuse(server, tmp_path, capsys):
    body, state = official_bytes()
    server.serve(body)
    predictor = mask2former.load(NAME)
    model_state = predictor.runner.model.state_dict() if hasattr(predictor, "runner") else None
    converted = tmp_path / "home" / "models" / NAME
    assert is_our_format(converted) and _raw(tmp_path).read_bytes() == body
    assert not list(_raw(tmp_path).parent.glob("*.part"))
    model, config = mask2former.load_model(NAME)  # the cache: no second request
    assert len(server.requests) == 1
    assert config.class_names == get_preset(NAME).class_names
    loaded = model.state_dict()
    key = "sem_seg_head.predictor.class_embed.weight"
    assert torch.equal(loaded[key], state[key])
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.endswith("num_batches_tracked"))
    assert model_state is None or torch.equal(model_state[key], state[key])
    assert "md5" in capsys.readouterr().err  # the made-up name's md5 prefix differs: reported, not rejected


def test_cut_off_download_leaves_nothing_taken_as_complete(server, tmp_path):
    body, _ = official_bytes()
    server.serve(body, mode="cut")
    with pytest.raises(zoo.ZooError, match="incomplete|interrupted") as error:
        zoo.resolve_weights(NAME, progress=False)
    assert "\n" not in str(error.value)
    folder = _raw(tmp_path).parent
    assert not _raw(tmp_path).exists() and not list(folder.glob("*"))
    server.serve(body)  # the next attempt starts over and succeeds
    assert is_our_format(zoo.resolve_weights(NAME, progress=False))


@pytest.mark.parametrize("corruption", ["garbled header", "html page", "zeroed tail"])
def test_corrupted_download_is_refused_and_deleted(server, tmp_path, corruption):
    """Damage that breaks the file's structure; damage inside array bytes needs a SHA-256 (test below)."""
    body, _ = official_bytes()
    if corruption == "garbled header":
        corrupt = bytes(range(200, 256)) + body[56:]
    elif corruption == "html page":
        corrupt = b"<html><body>503 Service Unavailable</body></html>"
    else:
        corrupt = body[: len(body) - 100] + b"\x00" * 100
    server.serve(corrupt)
    with pytest.raises(zoo.ZooError) as error:
        zoo.resolve_weights(NAME, progress=False)
    assert "\n" not in str(error.value) and "deleted" in str(error.value)
    assert not _raw(tmp_path).exists() and not (tmp_path / "home" / "models" / NAME).exists()


def test_other_architecture_is_refused(server, tmp_path):
    config = get_preset(NAME)
    config.decoder.num_queries = 7
    state = build_model(config).state_dict()
    document = {"model": {k: v.numpy() for k, v in ours_to_official(state, config).items()}}
    server.serve(pickle.dumps(document, protocol=4))
    with pytest.raises(zoo.ZooError, match="does not fit|query"):
        zoo.resolve_weights(NAME, progress=False)


def test_sha256_given_by_the_user(server, tmp_path):
    body, _ = official_bytes()
    server.serve(body)
    wrong = "0" * 64
    with pytest.raises(zoo.ZooError, match="SHA-256"):
        zoo.resolve_weights(f"{NAME}@sha256:{wrong}", progress=False)
    assert not _raw(tmp_path).exists()
    good = hashlib.sha256(body).hexdigest()
    assert is_our_format(zoo.resolve_weights(f"{NAME}@sha256:{good}", progress=False))
    assert is_our_format(zoo.resolve_weights(f"{NAME}@sha256:{good}", progress=False))  # the cache
    with pytest.raises(zoo.ZooError, match="made from a file with SHA-256"):
        zoo.resolve_weights(f"{NAME}@sha256:{wrong}", progress=False)


def test_offline_gives_one_line_saying_what_to_download_and_where(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASK2FORMER_OFFLINE", "1")
    image = Path(mask2former.__file__).parent / "assets" / "example.png"
    assert main(["predict", str(image), "--weights", NAME, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{server.url}/{RELEASE.path}" in err and str(_raw(tmp_path)) in err
    assert server.requests == []
    # a file put there by hand is then used
    body, _ = official_bytes()
    _raw(tmp_path).parent.mkdir(parents=True)
    _raw(tmp_path).write_bytes(body)
    assert main(["predict", str(image), "--weights", NAME, "--out", str(tmp_path / "p")]) == 0


def test_no_network_gives_the_same_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MASK2FORMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASK2FORMER_ZOO_URL", "http://127.0.0.1:9/nothing-listens-here")
    with pytest.raises(zoo.ZooError, match="cannot download .*put it at"):
        zoo.resolve_weights("coco-panoptic-r50", progress=False)


def test_every_release_has_an_official_url_and_presets_lists_them(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MASK2FORMER_ZOO_URL", raising=False)
    monkeypatch.setenv("MASK2FORMER_HOME", str(tmp_path))
    for name in zoo.RELEASES:
        get_preset(name)  # every release is a preset
        assert zoo.release_url(name).startswith("https://dl.fbaipublicfiles.com/maskformer/mask2former/")
    assert zoo.release_url("coco-panoptic-r50").endswith(
        "coco/panoptic/maskformer2_R50_bs16_50ep/model_final_94dc52.pkl"
    )
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("coco-panoptic-r50 "))
    assert row.rstrip().endswith("released")
    assert next(line for line in lines if line.startswith("synth-tiny ")).rstrip().endswith("bundled")


def test_paths_pass_through_and_synth_tiny_is_the_bundled_model(tmp_path):
    assert zoo.resolve_weights(tmp_path) == tmp_path
    assert is_our_format(zoo.resolve_weights("synth-tiny"))
    assert zoo.resolve_weights("no-such-thing.pkl") == Path("no-such-thing.pkl")


def test_hub_id_through_huggingface_hub(tmp_path, monkeypatch):
    """snapshot_download is asked with HF_ENDPOINT; its folder is converted once and reused."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub

    from mask2former.checkpoints.huggingface import write_hf_folder

    config = get_preset(NAME)
    config.pixel_decoder.num_groups = 32  # what transformers supports
    state = build_model(config).state_dict()
    folder = write_hf_folder(state, config, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("MASK2FORMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    path = zoo.resolve_weights("someone/mask2former-tiny")
    assert is_our_format(path) and zoo.resolve_weights("someone/mask2former-tiny") == path
    assert len(calls) == 1 and calls[0][1]["endpoint"] == "http://127.0.0.1:1"
    model, _ = mask2former.load_model("someone/mask2former-tiny")
    key = "sem_seg_head.predictor.query_feat.weight"
    assert np.allclose(model.state_dict()[key].numpy(), state[key].numpy())
