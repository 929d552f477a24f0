"""`mask2former export` / `ops` / `predict --backend onnxruntime` end to end, and their one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mask2former.checkpoints.io import save_checkpoint  # noqa: E402
from mask2former.cli import main  # noqa: E402
from mask2former.config import get_preset  # noqa: E402
from mask2former.modeling.build import build_model  # noqa: E402

DATA = Path(__file__).parent / "data"
IMAGES = [str(DATA / "chelsea.png"), str(DATA / "rocket.jpg")]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random synth-tiny checkpoint and its dynamic ONNX export made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = get_preset("synth-tiny")
    save_checkpoint(build_model(config).state_dict(), config, root / "ckpt")
    out = root / "model.onnx"
    code = main(
        [
            "export",
            "--weights",
            str(root / "ckpt"),
            "--format",
            "onnx",
            "--size",
            "96x128",
            "--dynamic",
            "--out",
            str(out),
            "--image",
            IMAGES[0],
        ]
    )
    assert code == 0
    return root, out


def _files(folder: Path) -> dict[str, Path]:
    # the hidden journal names the weights, which differ; the outputs must not
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and ".predict-journal" not in p.parts)
    return {str(p.relative_to(folder)): p for p in files}


def _predict(root: Path, weights: Path, backend: str, task: str) -> dict[str, Path]:
    out = root / f"{backend}-{task}"
    shutil.rmtree(out, ignore_errors=True)
    code = main(
        [
            "predict",
            *IMAGES,
            "--weights",
            str(weights),
            "--backend",
            backend,
            "--task",
            task,
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--score-threshold",
            "0",  # every candidate: the photos are not synthetic scenes, few instances pass 0.5
        ]
    )
    assert code == 0
    return _files(out)


def test_export_writes_graph_and_sidecar(exported, capsys):
    root, out = exported
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["dynamic"] is True and sidecar["trained"] is True and sidecar["source"].endswith("ckpt")
    assert all(r["max_abs_logits"] <= 1e-4 for r in sidecar["parity"])
    assert sorted(p.name for p in root.iterdir()) == ["ckpt", "model.onnx", "model.onnx.json"]


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_onnxruntime_backend_writes_the_same_files(exported, task):
    root, out = exported
    torch_files = _predict(root, root / "ckpt", "torch", task)
    ort_files = _predict(root, out, "onnxruntime", task)
    assert list(torch_files) == list(ort_files) and len(torch_files) >= 3
    for name, path in torch_files.items():
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(ort_files[name]))), name
        else:
            assert json.loads(path.read_text()) == json.loads(ort_files[name].read_text()), name


@pytest.mark.slow
def test_onnxruntime_backend_instances_match(exported):
    root, out = exported
    torch_files = _predict(root, root / "ckpt", "torch", "instance")
    ort_files = _predict(root, out, "onnxruntime", "instance")
    assert list(torch_files) == list(ort_files)
    ours = json.loads(ort_files["instances.json"].read_text())
    ref = json.loads(torch_files["instances.json"].read_text())
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_ops_cli_json_and_table(exported, capsys):
    _, out = exported
    assert main(["ops", str(out), "--size", "64x96", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["input_shape"] == [1, 3, 64, 96] and report["float64"] == [] and report["forbidden_ops"] == {}
    )
    assert report["counts"]["GridSample"] == 6 and report["total_macs"] > 0
    assert main(["ops", str(out), "--size", "64x96"]) == 0
    table = capsys.readouterr().out
    assert "Conv" in table and "GMAC" in table and "float64 anywhere: no" in table


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--size", "100x128"], "multiples of 32"),
        (["--size", "96x128", "--format", "tflite"], "unknown export format"),
        (["--size", "96x128", "--opset", "11"], "17..20"),
        (["--size", "96"], "expected HxW"),
        ([], "--size HxW is required"),
        (["--size", "96x128", "--weights", "missing/ckpt"], "no such file"),
    ],
)
def test_export_errors_are_one_line(tmp_path, capsys, argv, needle):
    _one_line_error(capsys, ["export", "--out", str(tmp_path / "m.onnx"), *argv], needle)
    assert list(tmp_path.iterdir()) == []


def test_export_out_must_be_onnx(tmp_path, capsys):
    _one_line_error(
        capsys, ["export", "--size", "64x64", "--out", str(tmp_path / "m.pt")], "must end in .onnx"
    )


def test_missing_onnxruntime_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    _one_line_error(
        capsys,
        ["export", "--size", "64x64", "--out", str(tmp_path / "m.onnx")],
        'pip install "mask2former[onnx]"',
    )


def test_ops_and_predict_errors_are_one_line(exported, tmp_path, capsys):
    _, out = exported
    _one_line_error(capsys, ["ops", str(out)], "--size")
    _one_line_error(capsys, ["ops", str(tmp_path / "none.onnx")], "no such ONNX file")
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(out, lonely)  # a graph without its sidecar
    _one_line_error(
        capsys, ["predict", IMAGES[0], "--weights", str(lonely), "--out", str(tmp_path / "p")], "no sidecar"
    )
