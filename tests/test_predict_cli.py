"""End-to-end `mask2former predict` on real photos, every task, with bad files mixed in."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former.cli import main
from mask2former.fileio import read_panoptic_png

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DATA / "chelsea.png", folder / "chelsea.png")
    shutil.copy(DATA / "rocket.jpg", folder / "rocket.jpg")
    (folder / "notes.png").write_text("not an image")
    data = (DATA / "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return folder


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_predict_writes_pictures_and_standard_files(inputs, tmp_path, capsys, task):
    out = tmp_path / "out"
    code = main(["predict", str(inputs), "--out", str(out), "--task", task, "--preset", "synth-tiny"])
    captured = capsys.readouterr()
    assert code == 1  # two bad files were skipped
    errors = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(errors) == 2
    assert any("notes.png" in line for line in errors) and any("truncated.jpg" in line for line in errors)
    assert "RANDOMLY INITIALISED" in captured.out
    for stem, source in [("chelsea", "chelsea.png"), ("rocket", "rocket.jpg")]:
        picture = Image.open(out / f"{stem}.{task}.png")
        assert picture.size == Image.open(DATA / source).size
    if task == "panoptic":
        document = json.loads((out / "panoptic.json").read_text())
        assert {a["file_name"] for a in document["annotations"]} == {"chelsea.png", "rocket.png"}
        assert {i["file_name"] for i in document["images"]} == {"chelsea.png", "rocket.jpg"}
        assert len(document["categories"]) == 9
        ids = read_panoptic_png(out / "panoptic" / "chelsea.png")
        assert ids.shape == (300, 451)
        listed = {s["id"] for s in document["annotations"][0]["segments_info"]}
        assert set(np.unique(ids)) - {0} <= listed | {
            s["id"] for s in document["annotations"][1]["segments_info"]
        }
    elif task == "semantic":
        labels = np.asarray(Image.open(out / "semantic" / "rocket.png"))
        assert labels.shape == (427, 640)
    else:
        results = json.loads((out / "instances.json").read_text())
        assert all({"image_id", "category_id", "segmentation", "score", "bbox"} <= set(r) for r in results)
    assert not list(out.rglob("*.tmp")) and not (out / ".predict.lock").exists()  # no temp files, no lock


def test_predict_glob_and_batch(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(inputs / "*.png"),
            str(inputs / "rocket.jpg"),
            "--out",
            str(out),
            "--preset",
            "synth-tiny",
            "--batch-size",
            "2",
            "--no-picture",
        ]
    )
    assert code == 1  # notes.png matched the glob and is not an image
    assert (out / "panoptic" / "chelsea.png").exists() and (out / "panoptic" / "rocket.png").exists()
    assert "segmented 2 of 3 images" in capsys.readouterr().out


def test_predict_user_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.jpg"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jpg" in err[0]
    # a missing path among good ones is skipped with one line, like a bad file in a folder
    code = main(
        [
            "predict",
            str(DATA / "chelsea.png"),
            str(tmp_path / "gone.jpg"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "gone.jpg" in err[0] and "skipped" in err[0]
    assert (
        main(
            [
                "predict",
                str(DATA / "chelsea.png"),
                "--weights",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err
    assert (
        main(["predict", str(DATA / "chelsea.png"), "--preset", "no-such-preset", "--out", str(tmp_path)])
        == 2
    )
    assert "known presets" in capsys.readouterr().err


def test_presets_command_lists_required_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ["coco-panoptic-r50", "coco-panoptic-swin-l", "coco-instance-r50", "ade20k-semantic-swin-t"]:
        assert name in out


def test_pictures_of_small_images_are_enlarged_by_an_integer_factor(tmp_path):
    small = tmp_path / "small.png"
    Image.open(DATA / "rocket.jpg").resize((100, 60)).save(small)
    out = tmp_path / "out"
    assert main(["predict", str(small), "--out", str(out), "--preset", "synth-tiny"]) == 0
    assert Image.open(out / "small.panoptic.png").size == (500, 300)  # ceil(256 / 60) = 5
    assert read_panoptic_png(out / "panoptic" / "small.png").shape == (60, 100)  # results keep the image size
