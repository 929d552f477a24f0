"""What `predict` writes loads as it is: thresholds, integer COCO ids, pycocotools, PQ / mIoU round trips."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

import mask2former
from mask2former import rle
from mask2former.cli import main
from mask2former.data.synth import generate
from mask2former.fileio import read_panoptic_png, write_json, write_png

EXAMPLE = Path(mask2former.__file__).parent / "assets" / "example.png"


def _id(i: int) -> int:
    return 1000 + 7 * i  # ground-truth image ids that are not 0..N-1


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """A synth panoptic set with image ids 1000 + 7i, and the same scenes as a COCO instances dataset."""
    root = tmp_path_factory.mktemp("gt")
    panoptic_dir = root / "synth"
    document = generate(panoptic_dir, 4, seed=5)
    for image, annotation in zip(document["images"], document["annotations"], strict=True):
        image["id"] = annotation["image_id"] = _id(image["id"])
    write_json(panoptic_dir / "panoptic.json", document)

    things = {c["id"] for c in document["categories"] if c["isthing"]}
    annotations = []
    for annotation in document["annotations"]:
        id_map = read_panoptic_png(panoptic_dir / "panoptic" / annotation["file_name"])
        for segment in annotation["segments_info"]:
            if segment["category_id"] in things:
                encoded = rle.encode(id_map == segment["id"])[0]
                annotations.append(
                    {
                        "id": 500 + len(annotations),
                        "image_id": annotation["image_id"],
                        "category_id": segment["category_id"],
                        "segmentation": encoded,
                        "area": segment["area"],
                        "bbox": segment["bbox"],
                        "iscrowd": 0,
                    }
                )
    instance_dir = root / "coco"
    (instance_dir / "annotations").mkdir(parents=True)
    (instance_dir / "images").symlink_to(panoptic_dir / "images")
    instances = {
        "images": document["images"],
        "annotations": annotations,
        "categories": document["categories"],
    }
    write_json(instance_dir / "annotations" / "instances_val.json", instances)
    return panoptic_dir, instance_dir


def _run(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def _metric(output: str, row: int = 1) -> float:
    """The first number of a metrics table row of `eval`'s output."""
    return float(output.strip().splitlines()[row].replace("|", " ").split()[1 if row > 1 else 0])


@pytest.mark.slow
def test_score_threshold_changes_the_instance_count(tmp_path):
    predictor = mask2former.load()
    default = predictor.predict(EXAMPLE, "instance")
    everything = predictor.predict(EXAMPLE, "instance", score_threshold=0.0)
    assert len(everything.scores) > 50 and 0 < len(default.scores) < 10  # 91 candidates, 5 above 0.5
    assert (default.scores >= 0.5).all()
    counts = {}
    for threshold in ("0.5", "0"):
        out = tmp_path / threshold
        _run("predict", str(EXAMPLE), "--task", "instance", "--score-threshold", threshold, "--out", str(out))
        counts[threshold] = len(json.loads((out / "instances.json").read_text()))
    assert counts["0"] == len(everything.scores) and counts["0.5"] == len(default.scores)
    strict = predictor.predict(EXAMPLE, "panoptic", object_mask_threshold=0.998)
    assert len(strict.segments) < len(predictor.predict(EXAMPLE, "panoptic").segments)
    with pytest.raises(ValueError, match="score_threshold 1.5"):
        predictor.predict(EXAMPLE, "instance", score_threshold=1.5)
    assert main(["predict", str(EXAMPLE), "--score-threshold", "2", "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.slow
def test_instances_load_with_pycocotools_against_the_ground_truth(datasets, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _, coco_dir = datasets
    gt_json = coco_dir / "annotations" / "instances_val.json"
    out = tmp_path / "pred"
    # the dataset folder as input: its ids, unthresholded so the AP equals `eval --data`
    _run("predict", str(coco_dir), "--task", "instance", "--score-threshold", "0", "--out", str(out))
    results = json.loads((out / "instances.json").read_text())
    assert {r["image_id"] for r in results} == {_id(i) for i in range(4)}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        evaluation = COCOeval(gt, gt.loadRes(str(out / "instances.json")), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap = 100 * evaluation.stats[0]
    assert ap > 50
    ours = _run("eval", "--data", str(coco_dir), "--task", "instance", "--no-progress")
    assert float(ours.strip().splitlines()[-2].split()[0]) == pytest.approx(ap, abs=0.01)
    files = _run(
        "eval", "--task", "instance", "--pred-json", str(out / "instances.json"), "--gt-json", str(gt_json)
    )
    assert float(files.strip().splitlines()[1].split()[0]) == pytest.approx(ap, abs=0.01)

    # images named on the command line take the ids of --gt-json by file name
    out2 = tmp_path / "pred2"
    images = sorted((coco_dir / "images").iterdir())
    _run(
        "predict",
        str(images[2]),
        str(images[0]),
        "--gt-json",
        str(gt_json),
        "--task",
        "instance",
        "--out",
        str(out2),
    )
    assert {r["image_id"] for r in json.loads((out2 / "instances.json").read_text())} <= {_id(0), _id(2)}

    # the COCO dataset export: images, categories, annotations with scores and RLE masks
    with contextlib.redirect_stdout(io.StringIO()):
        exported = COCO(str(out / "coco_dataset.json"))
    assert sorted(exported.getImgIds()) == [_id(i) for i in range(4)]
    assert len(exported.getAnnIds()) == len(results)
    first = exported.loadAnns(exported.getAnnIds()[0])[0]
    assert {"score", "area", "bbox", "iscrowd"} <= set(first) and exported.annToMask(first).any()
    assert {c["id"] for c in exported.loadCats(exported.getCatIds())} == {1, 2, 3, 4, 5, 11, 12, 13, 14}


def test_inputs_outside_the_ground_truth_are_refused(datasets, tmp_path, capsys):
    _, coco_dir = datasets
    gt_json = coco_dir / "annotations" / "instances_val.json"
    assert main(["predict", str(EXAMPLE), "--gt-json", str(gt_json), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"--gt-json {gt_json}: has no image named example.png ({EXAMPLE})"
    )


def test_panoptic_files_score_against_the_dataset_as_eval_data_does(datasets, tmp_path):
    synth_dir, _ = datasets
    out = tmp_path / "pred"
    _run("predict", str(synth_dir), "--task", "panoptic", "--no-picture", "--out", str(out))
    document = json.loads((out / "panoptic.json").read_text())
    assert [a["image_id"] for a in document["annotations"]] == [_id(i) for i in range(4)]
    assert [i["id"] for i in document["images"]] == [_id(i) for i in range(4)]
    files = _run(
        *("eval", "--task", "panoptic", "--pred-json", str(out / "panoptic.json"), "--pred-dir"),
        *(
            str(out / "panoptic"),
            "--gt-json",
            str(synth_dir / "panoptic.json"),
            "--gt-dir",
            str(synth_dir / "panoptic"),
        ),
    )
    model = _run("eval", "--data", str(synth_dir), "--task", "panoptic", "--no-progress")
    assert _metric(files, 2) == _metric(model.split("\n", 1)[1], 2) > 50  # the "All" PQ row


def test_semantic_pngs_round_trip_and_mismatched_labels_are_named(datasets, tmp_path, capsys):
    synth_dir, _ = datasets
    out = tmp_path / "pred"
    _run("predict", str(synth_dir), "--task", "semantic", "--no-picture", "--out", str(out))
    classes = json.loads((out / "semantic.json").read_text())["classes"]
    assert [c["index"] for c in classes] == list(range(9)) and classes[5]["id"] == 11
    common = ["eval", "--task", "semantic", "--gt-dir", str(synth_dir / "semantic")]
    files = _run(*common, "--pred-dir", str(out / "semantic"), "--num-classes", "9")
    model = _run("eval", "--data", str(synth_dir), "--task", "semantic", "--no-progress")
    assert _metric(files) == _metric(model.split("\n", 1)[1]) > 50  # mIoU

    # the same predictions written as dataset category ids (1..5, 11..14): named, never a silent 0.00
    ids = np.array([c["id"] for c in classes])
    renamed = tmp_path / "ids"
    renamed.mkdir()
    for png in (out / "semantic").iterdir():
        from PIL import Image

        write_png(renamed / png.name, ids[np.asarray(Image.open(png))].astype(np.uint8))
    capsys.readouterr()
    assert main([*common, "--pred-dir", str(renamed), "--num-classes", "9"]) == 2
    assert "label 11 is neither a class" in capsys.readouterr().err
    code = main([*common, "--pred-dir", str(renamed), "--num-classes", "15"])
    captured = capsys.readouterr()
    assert code == 2 or "labels look renamed" in captured.err, captured
    shifted = tmp_path / "shifted"  # no pixel agrees at all: an error
    shifted.mkdir()
    for png in (synth_dir / "semantic").iterdir():
        write_png(shifted / png.name, ((np.asarray(Image.open(png)) + 1) % 9).astype(np.uint8))
    assert main([*common, "--pred-dir", str(shifted), "--num-classes", "9"]) == 2
    assert "no pixel agrees" in capsys.readouterr().err
