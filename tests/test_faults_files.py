"""Issue #17, hostile data files and interrupted runs: COCO files that would give a silently wrong score,
garbage RLE, broken dataset files, bad --resume checkpoints, stale temporaries and torn metrics, output
modes under the umask, and memory bounded by the input."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import hostile
import numpy as np
import pytest
import torch
from conftest import synth_data, write_tiny_config
from PIL import Image

from mask2former import rle
from mask2former.cli import main
from mask2former.training.plot import read_metrics
from mask2former.training.recovery import prepare_out_dir


def _fails(capsys, args: list, *fragments: str) -> str:
    assert main([str(a) for a in args]) == 2
    return hostile.assert_one_line_error(capsys.readouterr().err, *fragments)


def _panoptic_args(files: dict) -> list:
    return ["eval", "--task", "panoptic", "--no-progress"] + [
        part
        for key in ("pred_json", "pred_dir", "gt_json", "gt_dir")
        for part in ("--" + key.replace("_", "-"), files[key])
    ]


def test_duplicate_image_ids_in_panoptic_ground_truth(tmp_path, capsys):
    good = hostile.panoptic_files(tmp_path / "good")
    assert main([str(a) for a in _panoptic_args(good)]) == 0
    assert "100.00" in capsys.readouterr().out
    bad = hostile.panoptic_files(tmp_path / "bad", duplicate_image=True)
    _fails(capsys, _panoptic_args(bad), str(bad["gt_json"]), "image_id 0 appears twice")


@pytest.mark.parametrize(
    ("result", "gt_annotations", "fragments"),
    [
        ({"score": float("nan")}, None, ["pred.json: result 0", "score nan"]),
        ({"image_id": [1]}, None, ["pred.json: result 0: image_id [1] is not an integer or string"]),
        ({"segmentation": [[0, 0, 2, 2, 3]]}, None, ["pred.json: result 0", "polygon"]),
        ({"segmentation": {"size": ["4", "4"], "counts": "0"}}, None, ["pred.json", "RLE size ['4', '4']"]),
        ({"segmentation": {"size": [4, 4], "counts": "?" * 5000}}, None, ["pred.json", "RLE counts"]),
        ({"segmentation": {"size": [4, 4], "counts": [3, 20]}}, None, ["pred.json", "counts sum to 23"]),
        (
            None,
            [
                {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]]},
                {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2]]},
            ],
            ["gt.json: annotation id 7 appears twice"],
        ),
    ],
)
def test_instance_files_that_would_give_a_wrong_ap(tmp_path, capsys, result, gt_annotations, fragments):
    pred_json, gt_json = hostile.instance_files(tmp_path, result, gt_annotations)
    _fails(capsys, ["eval", "--task", "instance", "--pred-json", pred_json, "--gt-json", gt_json], *fragments)


def test_string_sizes_in_ground_truth_images(tmp_path, capsys):
    pred_json, gt_json = hostile.instance_files(tmp_path)
    gt = json.loads(gt_json.read_text())
    gt["images"][0]["height"] = "4"
    gt_json.write_text(json.dumps(gt))
    _fails(
        capsys,
        ["eval", "--task", "instance", "--pred-json", pred_json, "--gt-json", gt_json],
        "image 1: height '4'",
    )


def test_rle_check_refuses_garbage_before_decoding():
    good = rle.encode(np.eye(5, dtype=bool))[0]
    assert rle.check(good, (5, 5)).sum() == 25
    for bad, message in [
        ({"size": [5, 5], "counts": "oooooooooooo0"}, "more than 32 bits"),
        ({"size": [5, 5], "counts": [-5, 30]}, "negative count"),
        ({"size": [5, 5], "counts": "!"}, "outside the compressed alphabet"),
        ({"size": [100000, 100000], "counts": [10**10]}, "MASK2FORMER_MAX_IMAGE_PIXELS"),
        ({"size": [5, 5], "counts": [0] * 40}, "40 counts"),
    ]:
        with pytest.raises(ValueError, match=message):
            rle.check(bad)


def test_decompression_bomb_png_in_file_scoring(tmp_path, capsys):
    for sub in ("pred", "gt"):
        (tmp_path / sub).mkdir()
        hostile.bomb_png(tmp_path / sub / "x.png")
    args = ["eval", "--task", "semantic", "--pred-dir", tmp_path / "pred", "--gt-dir", tmp_path / "gt"]
    with _no_warnings():
        _fails(
            capsys, [*args, "--num-classes", "3", "--no-progress"], "x.png (12000x12000)", "over the limit"
        )


class _no_warnings:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [r for r in self.records if "Bomb" in r.category.__name__]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_data(tmp_path_factory.mktemp("synth"), 3)


def test_broken_dataset_files_are_named(data, tmp_path):
    import shutil

    from mask2former.data.datasets import DatasetError, open_dataset

    broken = Path(shutil.copytree(data, tmp_path / "d"))
    dataset = open_dataset(broken)
    image = broken / dataset.image_dir.name / dataset.images[0]["file_name"]
    image.unlink()
    with pytest.raises(DatasetError, match=f"{image}: file not found"):
        dataset[0]
    png = dataset.panoptic_dir / dataset.annotations[1]["file_name"]
    hostile.truncated_png(png)
    with pytest.raises(DatasetError, match=f"{png}: cannot read the PNG"):
        dataset[1]
    png = dataset.panoptic_dir / dataset.annotations[2]["file_name"]
    Image.new("RGB", (3, 3)).save(png)
    with pytest.raises(DatasetError, match=f"{png}: annotation is 3x3"):
        dataset[2]
    document = json.loads(dataset.json_path.read_text())
    document["annotations"][0]["segments_info"][0]["category_id"] = 999
    dataset.json_path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="category_id 999 is not in categories"):
        open_dataset(broken)


def test_train_names_a_missing_image(data, tmp_path, capsys):
    import shutil

    broken = Path(shutil.copytree(data, tmp_path / "d"))
    for image in sorted((broken / "images").glob("*"))[:1]:
        image.unlink()
    config = write_tiny_config(tmp_path / "tiny.json")
    args = ["train", "--config", config, "--data", broken, "--out", tmp_path / "run", "--no-progress"]
    _fails(
        capsys,
        [*args, "--iters", "2", "--batch-size", "3", "--augment", "none", "--num-points", "64"],
        f"--data {broken}",
        "file not found",
    )


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "other architecture", "train_config"])
def test_resume_from_a_bad_checkpoint(data, tmp_path, capsys, kind):
    config = write_tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = out / "checkpoint.pt"
    if kind == "empty":
        checkpoint.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"step": 1, "model": {"w": torch.zeros(1000)}, "optimizer": {}}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    elif kind == "random":
        checkpoint.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        state = {"step": 1, "model": {"w": torch.zeros(3)}, "optimizer": {"state": {}, "param_groups": []}}
        torch.save(state, checkpoint)
    if kind == "train_config":
        (out / "train_config.json").write_text('{"batch_size": ')
    args = [
        "train",
        "--config",
        config,
        "--data",
        data,
        "--out",
        out,
        "--no-progress",
        "--resume",
        "--batch-size",
        "2",
    ]
    fragment = (
        "train_config.json: not a train config" if kind == "train_config" else f"--resume: {checkpoint}"
    )
    _fails(capsys, args, fragment)


def test_stale_temporaries_and_torn_metrics_are_cleared(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    stale = [run / ".checkpoint.pt.123.abcd1234.tmp", run / "model" / ".model.safetensors.9.ffff0000.tmp"]
    for temp in stale:
        temp.write_bytes(b"x" * 100)
    keep = run / ".other.tmp"
    keep.write_bytes(b"x")
    metrics = run / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    metrics.write_text("\n".join(rows) + '\n{"step": 4, "lo')  # killed while writing step 4
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]  # a reader skips the torn line
    prepare_out_dir(run, step=2)  # resumed from the checkpoint of step 2
    assert not any(temp.exists() for temp in stale) and keep.exists()
    assert metrics.read_text() == "\n".join(rows[:2]) + "\n"


def test_written_files_follow_the_umask(tmp_path):
    from mask2former.checkpoints.detectron2 import write_official
    from mask2former.checkpoints.io import save_checkpoint
    from mask2former.config import get_preset
    from mask2former.modeling.build import build_model
    from mask2former.outputs.inputs import InputImage
    from mask2former.training.plot import plot_loss_curve
    from mask2former.training.trainer import _atomic_torch_save
    from mask2former.writers import PredictionWriter

    old = os.umask(0o022)
    try:
        config = get_preset("synth-tiny")
        state = build_model(config).state_dict()
        save_checkpoint(state, config, tmp_path / "ours")
        write_official(state, config, tmp_path / "model.pkl")
        _atomic_torch_save({"step": 1}, tmp_path / "checkpoint.pt")
        plot_loss_curve([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], tmp_path / "loss.png")
        import mask2former

        predictor = mask2former.load()
        prediction = predictor.predict_batch([np.zeros((40, 40, 3), np.uint8)])[0]
        (tmp_path / "pred").mkdir()
        image = InputImage(index=0, path=tmp_path / "a.png", stem="a", file_name="a.png", image_id=1)
        PredictionWriter(tmp_path / "pred", predictor.config, "panoptic").write(image, prediction)
    finally:
        os.umask(old)
    written = [
        tmp_path / "ours" / "model.safetensors",
        tmp_path / "ours" / "config.json",
        tmp_path / "model.pkl",
        tmp_path / "checkpoint.pt",
        tmp_path / "loss.png",
        tmp_path / "pred" / "a.panoptic.png",
        tmp_path / "pred" / "panoptic" / "a.png",
    ]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: "0o644" for path in written
    }


def test_overlay_of_a_long_strip_is_not_enlarged_past_the_limit():
    import mask2former
    from mask2former.inference.predictor import Prediction
    from mask2former.results import PanopticResult
    from mask2former.writers import draw_prediction, meta_from_config

    config = mask2former.load().config
    strip = Prediction(
        np.zeros((30, 40000, 3), np.uint8), PanopticResult(np.zeros((30, 40000), np.int32), []), "panoptic"
    )
    picture = draw_prediction(strip, meta_from_config(config))
    assert picture.size == (40000, 30)  # a factor of 9 would have drawn 360000 x 270
    small = Prediction(
        np.zeros((30, 40, 3), np.uint8), PanopticResult(np.zeros((30, 40), np.int32), []), "panoptic"
    )
    assert draw_prediction(small, meta_from_config(config)).size == (360, 270)


@pytest.mark.slow
def test_predict_on_a_large_photo_stays_within_memory(tmp_path):
    """A 4000x4000 photo: the kept queries' full-size masks (20 x 64 MB, times the temporaries) no longer
    sit in memory together; the whole run fits in 2 GB of address space (torch's import takes ~1.2; the
    code before this bound failed here allocating 448 MB of kept masks)."""
    photo = tmp_path / "big.jpg"
    small = np.asarray(Image.open(hostile.SRC / "mask2former/assets/example.png").convert("RGB"))
    Image.fromarray(small).resize((4000, 4000), Image.NEAREST).save(photo, quality=90)
    code, out, err = hostile.run_cli(
        ["predict", photo, "--out", tmp_path / "p", "--no-picture"], address_space=2 << 30
    )
    assert code == 0, err
    assert "Traceback" not in err and "segments" in out
    ids = np.asarray(Image.open(tmp_path / "p" / "panoptic" / "big.png"))
    assert ids.shape == (4000, 4000, 3) and ids.any()


def test_metrics_reader_is_robust_to_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.0}\n')
    assert [row["loss"] for row in read_metrics(path)] == [2.0, 1.0]
    assert math.isfinite(read_metrics(path)[0]["loss"])
