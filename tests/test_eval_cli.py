"""`mask2former eval` end to end on files written here: a pass per task and each one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former import rle
from mask2former.cli import main

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0}]


def write_panoptic_png(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def scene(columns: slice, person_id: int, sky_id: int) -> np.ndarray:
    """10x10 sky with a 4x5 person at rows 2-5 and the given columns."""
    ids = np.full((10, 10), sky_id, dtype=np.int64)
    ids[2:6, columns] = person_id
    return ids


@pytest.fixture
def panoptic(tmp_path):
    """Two images: a perfect prediction, and one whose person is shifted right by one column."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt_annotations, pred_annotations = [], []
    for image_id, name, columns in ((1, "a", slice(2, 7)), (2, "b", slice(3, 8))):
        write_panoptic_png(tmp_path / "gt" / f"{name}.png", scene(slice(2, 7), 300000, 65536 + 5))
        write_panoptic_png(tmp_path / "pred" / f"{name}.png", scene(columns, 4, 3))
        gt_annotations.append(
            {
                "image_id": image_id,
                "file_name": f"{name}.png",
                "segments_info": [
                    {"id": 300000, "category_id": 1, "iscrowd": 0},
                    {"id": 65541, "category_id": 7, "iscrowd": 0},
                ],
            }
        )
        pred_annotations.append(
            {
                "image_id": image_id,
                "file_name": f"{name}.png",
                "segments_info": [{"id": 4, "category_id": 1}, {"id": 3, "category_id": 7}],
            }
        )
    gt = {
        "annotations": gt_annotations,
        "categories": CATEGORIES,
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred_annotations}))
    return tmp_path


def panoptic_args(root: Path) -> list[str]:
    return [
        "eval",
        "--task",
        "panoptic",
        "--pred-json",
        str(root / "pred.json"),
        "--pred-dir",
        str(root / "pred"),
        "--gt-json",
        str(root / "gt.json"),
        "--gt-dir",
        str(root / "gt"),
        "--no-progress",
    ]


def test_panoptic_pass_prints_a_table_and_writes_metrics(panoptic, capsys):
    out = panoptic / "out"
    assert main([*panoptic_args(panoptic)[:-1], "--out", str(out), "--per-class"]) == 0
    printed = capsys.readouterr().out
    assert "Things" in printed and "person" in printed and "metrics.json" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    # Person IoUs 1 and 16/24; sky IoUs 1 and 76/84 (see test_eval_panoptic's shifted-person case).
    assert metrics["task"] == "panoptic"
    assert metrics["PQ_th"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics["PQ_st"] == pytest.approx(100 * (1 + 19 / 21) / 2)
    assert metrics["PQ"] == pytest.approx((metrics["PQ_th"] + metrics["PQ_st"]) / 2)
    assert metrics["RQ"] == 100.0
    assert metrics["per_class"]["1"]["TP"] == 2 and metrics["images"] == 2
    assert {p.name for p in out.iterdir()} == {"metrics.json"}  # no temporary file left behind


def test_semantic_pass_with_an_absent_class_written_as_null(tmp_path, capsys):
    for name in ("gt", "pred"):
        (tmp_path / name).mkdir()
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]], dtype=np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt" / "x.png")
    Image.fromarray(pred).save(tmp_path / "pred" / "x.png")
    args = [
        "eval",
        "--task",
        "semantic",
        "--pred-dir",
        str(tmp_path / "pred"),
        "--gt-dir",
        str(tmp_path / "gt"),
        "--num-classes",
        "3",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    assert metrics["pACC"] == pytest.approx(100 * 5 / 7)
    assert metrics["per_class"]["2"]["IoU"] is None  # NaN: no ground-truth pixel of class 2
    assert "mIoU" in capsys.readouterr().out


def instance_files(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:12, 3:15] = True
    gt = {
        "images": [{"id": 5, "height": 20, "width": 30}],
        "categories": [{"id": 3, "name": "cup"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 3,
                "iscrowd": 0,
                "area": 120.0,
                "bbox": [3, 2, 12, 10],
                "segmentation": [[3, 2, 15, 2, 15, 12, 3, 12]],
            }
        ],
    }
    results = [
        {"image_id": 5, "category_id": 3, "score": 0.9, "segmentation": rle.encode(mask)[0]},
        {"image_id": 5, "category_id": 3, "score": 0.5, "segmentation": rle.encode(~mask)[0]},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(results))
    return tmp_path / "pred.json", tmp_path / "gt.json", results


def test_instance_pass(tmp_path):
    pytest.importorskip("pycocotools")
    pred_json, gt_json, _ = instance_files(tmp_path)
    args = [
        "eval",
        "--task",
        "instance",
        "--pred-json",
        str(pred_json),
        "--gt-json",
        str(gt_json),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["APs"] is not None
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}


# ------------------------------------------------------------------ one-line errors


def _break_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


PANOPTIC_ERRORS = {
    "missing prediction PNG": (lambda r: (r / "pred" / "b.png").unlink(), "pred/b.png: no such file"),
    "corrupt prediction PNG": (
        lambda r: (r / "pred" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
        "pred/b.png: cannot read the PNG",
    ),
    "missing ground-truth PNG": (lambda r: (r / "gt" / "a.png").unlink(), "gt/a.png: no such file"),
    "corrupt prediction JSON": (lambda r: (r / "pred.json").write_text("{"), "pred.json: not valid JSON"),
    "JSON segment not in PNG": (
        lambda r: _break_json(
            r / "pred.json",
            lambda o: o["annotations"][1]["segments_info"].append({"id": 77, "category_id": 1}),
        ),
        "pred/b.png (image_id 2, segments_info in pred.json): segment id 77 is in segments_info but not in",
    ),
    "PNG segment not in JSON": (
        lambda r: _break_json(r / "pred.json", lambda o: o["annotations"][1]["segments_info"].pop(0)),
        "pred/b.png (image_id 2, segments_info in pred.json): segment id 4 is in the id map but not in",
    ),
    "ground-truth PNG segment not in JSON": (
        lambda r: _break_json(r / "gt.json", lambda o: o["annotations"][0]["segments_info"].pop(1)),
        "gt/a.png (image_id 1, segments_info in gt.json): segment id 65541 is in the id map",
    ),
    "unknown category": (
        lambda r: _break_json(
            r / "pred.json", lambda o: o["annotations"][0]["segments_info"][0].update(category_id=99)
        ),
        "pred/a.png (image_id 1, segments_info in pred.json): segment id 4 has category_id 99, unknown",
    ),
    "segment id twice in a prediction (hotcoco would take it)": (
        lambda r: _break_json(
            r / "pred.json",
            lambda o: o["annotations"][1]["segments_info"].append({"id": 4, "category_id": 7}),
        ),
        "pred.json: image_id 2: segment id 4 appears twice",
    ),
    "no prediction for an image": (
        lambda r: _break_json(r / "pred.json", lambda o: o["annotations"].pop(1)),
        "pred.json: no prediction for image_id 2",
    ),
}


@pytest.mark.parametrize("case", list(PANOPTIC_ERRORS))
def test_panoptic_errors_are_one_line_naming_the_file_and_id(panoptic, capsys, case):
    breaking, expected = PANOPTIC_ERRORS[case]
    breaking(panoptic)
    # The ground truth's JSON-vs-PNG check is the reference engine's; hotcoco (auto) follows panopticapi.
    engine = ["--engine", "reference"] if case.startswith("ground-truth PNG") else []
    assert main(panoptic_args(panoptic) + engine) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("mask2former eval: error: ")
    assert expected in error


def test_ground_truth_that_disagrees_with_its_png_is_scored_by_hotcoco_as_panopticapi(panoptic, capsys):
    _break_json(panoptic / "gt.json", lambda o: o["annotations"][0]["segments_info"].pop(1))  # sky unlisted
    assert main([*panoptic_args(panoptic), "--engine", "hotcoco", "--out", str(panoptic / "out")]) == 0
    metrics = json.loads((panoptic / "out" / "metrics.json").read_text())
    # Image a's sky id is no longer listed: panopticapi skips it when matching and it is not VOID, so image
    # a's predicted sky is a false positive; image b's sky still matches.
    assert (metrics["per_class"]["7"]["TP"], metrics["per_class"]["7"]["FP"]) == (1, 1)
    assert main([*panoptic_args(panoptic), "--engine", "reference"]) == 2
    assert "segment id 65541 is in the id map but not in segments_info" in capsys.readouterr().err


def test_semantic_label_out_of_range_and_missing_prediction(tmp_path, capsys):
    for name in ("gt", "pred"):
        (tmp_path / name).mkdir()
    Image.fromarray(np.array([[0, 1], [255, 2]], dtype=np.uint8)).save(tmp_path / "gt" / "x.png")
    Image.fromarray(np.array([[0, 7], [2, 2]], dtype=np.uint8)).save(tmp_path / "pred" / "x.png")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "gt" / "y.png")
    args = [
        "eval",
        "--task",
        "semantic",
        "--pred-dir",
        str(tmp_path / "pred"),
        "--gt-dir",
        str(tmp_path / "gt"),
        "--num-classes",
        "3",
        "--no-progress",
    ]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert (
        "pred/x.png: label 7 is neither a class (0..2) nor the ignore label 255" in error
        and "\n" not in error
    )
    Image.fromarray(np.array([[0, 1], [2, 2]], dtype=np.uint8)).save(tmp_path / "pred" / "x.png")
    assert main(args) == 2
    assert "pred/y.png: no such file" in capsys.readouterr().err


def test_instance_errors(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    pred_json, gt_json, results = instance_files(tmp_path)
    pred_json.write_text(json.dumps([{**results[0], "image_id": 99}]))
    args = ["eval", "--task", "instance", "--pred-json", str(pred_json), "--gt-json", str(gt_json)]
    assert main(args) == 2
    assert "pred.json: result 0: image_id 99 is not in the ground truth images" in capsys.readouterr().err
    gt_json.unlink()
    assert main(args) == 2
    assert "gt.json: no such file" in capsys.readouterr().err


def test_argument_errors_and_a_folder_that_is_no_dataset(tmp_path, capsys):
    assert main(["eval", "--task", "panoptic", "--pred-json", "p.json"]) == 2
    assert "needs --pred-dir, --gt-json, --gt-dir" in capsys.readouterr().err
    assert main(["eval", "--task", "semantic", "--weights", "w.pth", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--data {tmp_path}" in err[0] and "unknown dataset layout" in err[0]


@pytest.mark.parametrize("engine", ["reference", "pycocotools"])  # pycocotools: the former name
def test_instance_reference_engine(tmp_path, engine):
    pred_json, gt_json, _ = instance_files(tmp_path)
    args = ["eval", "--task", "instance", "--pred-json", str(pred_json), "--gt-json", str(gt_json)]
    assert main([*args, "--engine", engine, "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["AP50"] == pytest.approx(100.0)
