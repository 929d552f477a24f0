"""Training defaults per preset, --no-progress log lines, --val-data evaluation, labelled plots."""

from __future__ import annotations

import json

import pytest
from conftest import synth_data, write_tiny_config
from PIL import Image

from mask2former.cli import build_parser, main
from mask2former.training.plot import _log_ticks, nice_ticks, plot_loss_curve, read_metrics
from mask2former.training.progress import log_line
from mask2former.training.recipes import recipe_for
from mask2former.training.train_config import TrainConfig


def test_recipes_follow_the_official_configs_and_the_bundled_model():
    coco = recipe_for("coco-panoptic-r50")
    assert (coco.max_iters, coco.milestones, coco.schedule) == (368750, (327778, 355092), "step")
    assert (coco.crop_size, coco.min_scale, coco.max_scale, coco.batch_size) == (1024, 0.1, 2.0, 16)
    assert recipe_for("coco-instance-swin-l").max_iters == 737500
    ade = recipe_for("ade20k-semantic-r50")
    assert (ade.max_iters, ade.schedule, ade.augment, ade.crop_size) == (160000, "poly", "multiscale", 512)
    assert recipe_for("ade20k-semantic-swin-l").crop_size == 640
    tiny = recipe_for("synth-tiny")  # the README's stage-1 command of the bundled model
    assert (tiny.batch_size, tiny.lr, tiny.backbone_multiplier, tiny.backbone_norm) == (8, 4e-4, 1.0, "bn")
    assert (tiny.crop_size, tiny.min_scale, tiny.max_scale, tiny.num_points) == (128, 0.6, 1.4, 1024)
    assert recipe_for("custom") == TrainConfig()


def test_help_shows_the_defaults_per_preset(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: no wrapping inside "synth-tiny"
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    assert "default=None" not in text and "None" not in text
    flat = " ".join(text.split())
    assert "COCO 368750" in flat and "synth-tiny 13500" in flat and "synth-tiny 0.0004" in flat


def test_log_line_has_step_loss_lr_and_eta():
    line = log_line({"step": 50, "loss": 17.4567, "lr": 7.26e-05, "seconds": 25.0}, 1000, 0)
    assert line == "step 50/1000  loss 17.4567  lr 7.26e-05  0.50 s/it  ETA 7m 55s"
    assert "ETA 1h 23m" in log_line({"step": 10, "loss": 1.0, "lr": 1.0, "seconds": 10.0}, 5000, 0)


@pytest.mark.parametrize("low, high", [(17.1, 17.3), (0.5, 0.52), (3.0, 3000.0), (1e-9, 1.0)])
def test_axes_are_labelled_at_any_range(low, high):
    import math

    ticks = _log_ticks(math.log10(low), math.log10(high))
    assert len(ticks) >= 2 and all(low * 0.999 <= t <= high * 1.001 for t in ticks)
    linear = nice_ticks(low, high)
    assert len(linear) >= 2 and all(low - 1e-12 <= t <= high + 1e-12 for t in linear)


def test_plot_has_a_validation_panel_when_rows_have_figures(tmp_path):
    rows = [{"step": s, "loss": 20 - s / 100} for s in range(10, 101, 10)]
    plot_loss_curve(rows, tmp_path / "a.png")
    rows += [{"step": 50, "val_PQ": 40.0, "val_mIoU": 55.0}, {"step": 100, "val_PQ": 45.5, "val_mIoU": 60.0}]
    plot_loss_curve(rows, tmp_path / "b.png")
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (640, 360) and b.size == (640, 600)
        assert b.crop((0, 360, 640, 600)).getcolors(100000) != [(640 * 240, (255, 255, 255))]


def test_read_metrics_merges_the_rows_of_one_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 5, "loss": 2.0}\n{"step": 5, "val_PQ": 30.0}\n{"step": 5, "loss": 1.5}\n')
    assert read_metrics(path) == [{"step": 5, "loss": 1.5, "val_PQ": 30.0}]


@pytest.mark.slow
def test_train_no_progress_logs_and_validates_keeping_the_best(tmp_path, capsys):
    config = write_tiny_config(tmp_path / "tiny.json")
    document = json.loads(config.read_text())
    document["input"] |= {"short_edge": 64, "max_size": 64}  # the scenes' own size: a fast validation
    config.write_text(json.dumps(document))
    data = synth_data(tmp_path / "data", 2)
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--iters", "4", "--batch-size", "1", "--augment", "none", "--num-points", "64", "--lr", "1e-3"]
    args += ["--log-every", "2", "--val-data", str(data), "--eval-every", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 2/4  loss " in printed and "step 4/4  loss " in printed and " ETA " in printed
    assert "step 2: validation PQ " in printed and "mIoU " in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert all("val_PQ" in r and "val_mIoU" in r and "loss" in r for r in rows)
    best = json.loads((out / "model-best" / "config.json").read_text())
    assert best["val_PQ"] == max(r["val_PQ"] for r in rows)
    assert (out / "model" / "model.safetensors").is_file()
    with Image.open(out / "loss.png") as picture:
        assert picture.size == (640, 600)


def test_val_data_with_other_classes_is_refused(tmp_path, capsys):
    from mask2former.data.synth import generate

    config = write_tiny_config(tmp_path / "tiny.json")
    data = synth_data(tmp_path / "data", 2)
    other = tmp_path / "other"
    generate(other, 2, seed=0, size=(64, 64), classes=["circle", "sky"])
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*args, "--val-data", str(other), "--no-progress"]) == 2
    assert "--val-data" in capsys.readouterr().err
