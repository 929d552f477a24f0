"""Issue #17, hostile options and paths: every number checked at the CLI, every bad output or input path
named in one line (exit 2, no traceback), pickles and configs refused before they allocate or build."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hostile
import numpy as np
import pytest
import torch

from mask2former.checkpoints.io import CheckpointError, read_config, save_checkpoint
from mask2former.checkpoints.safe_pickle import load_restricted_pickle
from mask2former.cli import main
from mask2former.config import get_preset


def _fails(capsys, args: list[str], *fragments: str) -> str:
    assert main([str(a) for a in args]) == 2
    return hostile.assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--preset", "synth-tiny", "--batch-size", "-2"], ["--batch-size -2", "at least 1"]),
        (["train", "--preset", "synth-tiny", "--iters", "0"], ["--iters 0"]),
        (["train", "--preset", "synth-tiny", "--lr", "nan"], ["--lr nan"]),
        (
            ["train", "--preset", "synth-tiny", "--min-scale", "2", "--max-scale", "1"],
            ["--min-scale 2.0 is above"],
        ),
        (
            ["train", "--preset", "synth-tiny", "--crop-size", "100000"],
            ["--crop-size 100000", "MASK2FORMER_MAX_"],
        ),
        (["train", "--preset", "synth-tiny", "--workers", "-1"], ["--workers -1"]),
        (
            ["export", "--size", "100000x100000", "--out", "OUT/m.onnx"],
            ["--size 100000x100000", "MAX_INPUT_PIXELS"],
        ),
        (["bench", "--preset", "synth-tiny", "--size", "64x64", "--runs", "0"], ["--runs 0"]),
        (["ops", "m.onnx", "--batch-size", "0"], ["--batch-size 0"]),
        (["ops", "m.onnx", "--size", "100000x100000"], ["--size 100000x100000"]),
        (["synth", "OUT/s", "--size", "0x0"], ["--size 0x0"]),
        (["synth", "OUT/s", "--n", "-1"], ["--n -1"]),
        (["predict", "x.png", "--batch-size", "0", "--out", "OUT/p"], ["--batch-size 0"]),
        (["predict", "x.png", "--short-edge", "-5", "--out", "OUT/p"], ["--short-edge -5"]),
    ],
)
def test_numeric_options_are_checked_before_any_work(tmp_path, capsys, args, fragments):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    if args[0] == "train":
        args += ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    _fails(capsys, args, *fragments)


def test_eval_num_classes_and_short_edge_have_limits(tmp_path, capsys):
    files = ["--pred-dir", tmp_path, "--gt-dir", tmp_path]
    _fails(
        capsys,
        ["eval", "--task", "semantic", *files, "--num-classes", "50000"],
        "50,000 classes",
        "MAX_CLASSES",
    )
    hostile.assert_one_line_error(
        hostile.run_cli(
            [
                "predict",
                hostile.SRC / "mask2former/assets/example.png",
                "--short-edge",
                "100000",
                "--out",
                tmp_path / "p",
            ]
        )[2],
        "short edge 100000",
        "MASK2FORMER_MAX_INPUT_PIXELS",
    )


def test_out_that_is_a_file_or_not_writable(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    _fails(capsys, ["export", "--size", "64x64", "--out", tmp_path], f"--out {tmp_path}", "must end in .onnx")
    _fails(capsys, ["export", "--size", "64x64", "--out", afile / "m.onnx"], f"{afile} is not a folder")
    _fails(
        capsys,
        ["convert", hostile.SRC / "mask2former/assets/synth-tiny", afile],
        "exists and is not a folder",
    )
    _fails(
        capsys, ["train", "--preset", "synth-tiny", "--data", tmp_path, "--out", afile], "exists and is not"
    )
    # A folder where files cannot be created: a read-only one, or /sys when the tests run as root (root
    # writes into any folder whatever its mode).
    locked = Path("/sys") if os.getuid() == 0 else tmp_path / "locked"
    if os.getuid() != 0:
        locked.mkdir()
        os.chmod(locked, 0o555)
    _fails(
        capsys,
        ["convert", hostile.SRC / "mask2former/assets/synth-tiny", locked / "out"],
        f"output {locked / 'out'}: cannot write in {locked}",
        "ermission denied",
    )
    _fails(
        capsys, ["predict", "x.png", "--out", locked / "p"], f"--out {locked / 'p'}: cannot write in {locked}"
    )
    _fails(
        capsys, ["eval", "--task", "semantic", "--out", locked / "e"], f"--out {locked / 'e'}: cannot write"
    )


def test_unreadable_image_is_named(tmp_path, monkeypatch):
    from mask2former.data.image_io import ImageReadError, load_image

    secret = tmp_path / "secret.png"
    secret.write_bytes((hostile.SRC / "mask2former/assets/example.png").read_bytes())
    os.chmod(secret, 0o000)
    if os.getuid() == 0:  # root reads any file: let access() answer as it would for a user
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m, **k: False if Path(p) == secret else real_access(p, m, **k)
        )
    with pytest.raises(ImageReadError, match=f"{secret}: permission denied"):
        load_image(secret)


def test_special_files_are_named_as_such(tmp_path):
    from mask2former.data.image_io import ImageReadError, list_images, load_image

    cases = {
        hostile.fifo(tmp_path / "pipe.png"): "FIFO",
        hostile.symlink_loop(tmp_path / "loop.png"): "symbolic link loop",
        Path("/dev/null"): "character device",
        tmp_path: "is a folder",
    }
    for path, what in cases.items():
        with pytest.raises(ImageReadError, match=what):
            load_image(path)
    # named on the command line, they are listed (and then skipped with that reason), not "no such file"
    assert list_images([str(tmp_path / "pipe.png"), str(tmp_path / "loop.png")]) == list(cases)[:2]


def test_image_over_the_pixel_limit_and_bomb_warning(tmp_path):
    bomb = hostile.bomb_png(tmp_path / "bomb.png")
    code, _, err = hostile.run_cli(["predict", bomb, "--out", tmp_path / "p"])
    assert code == 1 and "DecompressionBombWarning" not in err
    hostile.assert_one_line_error(err, str(bomb), "144,000,000 image pixels", "MASK2FORMER_MAX_IMAGE_PIXELS")
    # the documented way to lower (or raise) it
    example = hostile.SRC / "mask2former/assets/example.png"
    code, _, err = hostile.run_cli(
        ["predict", example, "--out", tmp_path / "p2"], env={"MASK2FORMER_MAX_IMAGE_PIXELS": "1000"}
    )
    assert code == 1
    hostile.assert_one_line_error(err, "over the limit of 1,000")


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_within_memory(tmp_path, name):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(hostile.HOSTILE_PICKLES[name])
    # 2.5 GB of address space: torch's import alone needs ~1 GB; the pickles ask for 1.8 GB and more
    code, _, err = hostile.run_cli(["convert", path, tmp_path / "out"], address_space=5 << 29)
    assert code == 2
    hostile.assert_one_line_error(err, str(path))
    assert "MemoryError" not in err


def test_safe_pickles_are_accepted_and_bad_contents_named(tmp_path):
    empty = hostile.write_pickle(
        tmp_path / "p2.pkl", {"model": {"a": np.zeros((0,), np.float32)}}, protocol=2
    )
    assert load_restricted_pickle(empty)["model"]["a"].shape == (0,)
    from mask2former.checkpoints.detectron2 import read_official

    bad = {
        "object": {"model": {"a": np.array(["x", 1], dtype=object)}},
        "str": {"model": {"a": np.array(["x", "y"])}},
        "int key": {"model": {1: np.zeros(3, np.float32)}},
    }
    for what, obj in bad.items():
        path = hostile.write_pickle(tmp_path / f"{what}.pkl", obj)
        with pytest.raises(CheckpointError, match="not of numbers|not a string|no 'model'") as error:
            read_official(path)
        assert str(path) in str(error.value)
    # 1-D weights where the architecture needs 2-D ones
    state = {k: torch.zeros(3) for k in ("backbone.stem.conv1.weight", "backbone.res2.0.conv1.weight")}
    torch.save({"model": state}, tmp_path / "flat.pth")
    code, _, err = hostile.run_cli(["convert", tmp_path / "flat.pth", tmp_path / "out"])
    assert code == 2
    hostile.assert_one_line_error(err, str(tmp_path / "flat.pth"))


def _our_folder(folder: Path, change) -> Path:
    config = get_preset("synth-tiny")
    save_checkpoint({"x": torch.zeros(1)}, config, folder)
    document = json.loads((folder / "config.json").read_text())
    change(document["model"])
    (folder / "config.json").write_text(json.dumps(document))
    return folder


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda m: m["decoder"].update(num_heads=5),
            "decoder.hidden_dim 64 is not divisible by decoder.num_heads 5",
        ),
        (lambda m: m.update(task="depth"), "task 'depth'"),
        (lambda m: m["decoder"].update(num_queries=-3), "decoder.num_queries -3"),
        (
            lambda m: m["pixel_decoder"].update(conv_dim="64"),
            "pixel_decoder.conv_dim '64': must be an integer",
        ),
        (lambda m: m["input"].update(short_edge=0), "input.short_edge 0"),
        (lambda m: m.update(thing_classes=[True]), "thing_classes"),
    ],
)
def test_impossible_config_values_are_refused_when_read(tmp_path, capsys, change, fragment):
    folder = _our_folder(tmp_path / "ours", change)
    with pytest.raises(CheckpointError, match="invalid model config"):
        read_config(folder)
    _fails(capsys, ["convert", folder, tmp_path / "out"], str(folder / "config.json"), fragment)
    assert not (tmp_path / "out").exists()  # nothing invalid copied into a new checkpoint


def test_config_json_that_is_no_json_and_hf_wrong_types(tmp_path, capsys):
    folder = _our_folder(tmp_path / "ours", lambda m: None)
    (folder / "config.json").write_text("{not json")
    _fails(capsys, ["convert", folder, tmp_path / "out"], f"{folder / 'config.json'}: not valid JSON")
    config = get_preset("synth-tiny")
    config.decoder.num_heads = 5
    with pytest.raises(CheckpointError, match="refusing to write an invalid model config"):
        save_checkpoint({"x": torch.zeros(1)}, config, tmp_path / "never")
    hf = tmp_path / "hf"
    hf.mkdir()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "mask2former", "decoder_layers": "ten"}))
    _fails(capsys, ["convert", hf, tmp_path / "out"], str(hf / "config.json"))


def test_onnx_sidecar_that_disagrees_with_its_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from mask2former.api import load_model
    from mask2former.export.onnx import export_onnx
    from mask2former.export.runtime import ExportError, load_onnx_predictor, sidecar_path

    model, config = load_model()
    out = tmp_path / "m.onnx"
    export_onnx(model, config, out, (64, 64), trained=True, source="bundled")
    sidecar = json.loads(sidecar_path(out).read_text())
    sidecar["config"]["class_names"] = sidecar["config"]["class_names"][:-1]
    for key in ("thing_classes", "category_ids", "colors"):
        sidecar["config"][key] = sidecar["config"][key][:-1]
    sidecar_path(out).write_text(json.dumps(sidecar))
    with pytest.raises(ExportError, match=r"m\.onnx\.json: says classes \+ 1 .* 9 but the graph has 10"):
        load_onnx_predictor(out)
