"""`mask2former convert` end to end: detection of the source format, every direction, one-line errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mask2former.checkpoints.detectron2 import write_official
from mask2former.checkpoints.io import read_checkpoint, save_checkpoint
from mask2former.checkpoints.safe_pickle import load_pickled
from mask2former.cli import main
from mask2former.config import get_preset
from mask2former.modeling.build import build_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random synth-tiny model saved in our format and as an official .pkl."""
    root = tmp_path_factory.mktemp("convert-cli")
    config = get_preset("synth-tiny")
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    save_checkpoint(state, config, root / "ours")
    write_official(state, config, root / "model_final.pkl")
    return root, config, state


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_weights(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_detectron2_pkl_to_ours(source, tmp_path, capsys):
    root, config, state = source
    code, out, _ = run_cli([root / "model_final.pkl", tmp_path / "out"], capsys)
    assert code == 0
    assert "read detectron2 checkpoint" in out and "criterion.empty_weight" in out and "wrote ours" in out
    read_config, read_state = read_checkpoint(tmp_path / "out")
    assert read_config == config  # 9 classes + matching head: the synth-tiny preset
    assert_same_weights(read_state, state)


def test_ours_to_detectron2_pth_and_back(source, tmp_path, capsys):
    root, config, state = source
    code, out, _ = run_cli([root / "ours", tmp_path / "model.pth", "--to", "detectron2"], capsys)
    assert code == 0 and "read ours checkpoint" in out
    stored = load_pickled(tmp_path / "model.pth")
    assert stored["__author__"] == "mask2former" and "criterion.empty_weight" in stored["model"]
    code, _, _ = run_cli([tmp_path / "model.pth", tmp_path / "back", "--from", "detectron2"], capsys)
    assert code == 0
    assert_same_weights(read_checkpoint(tmp_path / "back")[1], state)


def test_ours_to_hf_and_back(tmp_path, capsys):
    config = get_preset("synth-tiny")
    config.pixel_decoder.num_groups = 32  # transformers hard-codes GroupNorm(32)
    torch.manual_seed(1)
    state = build_model(config).state_dict()
    save_checkpoint(state, config, tmp_path / "ours")
    code, out, _ = run_cli([tmp_path / "ours", tmp_path / "hf", "--to", "hf"], capsys)
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file()
    code, out, _ = run_cli([tmp_path / "hf", tmp_path / "back"], capsys)  # detected as hf
    assert code == 0 and "read hf checkpoint" in out
    back_config, back_state = read_checkpoint(tmp_path / "back")
    assert back_config.class_names == config.class_names
    assert_same_weights(back_state, state)


def test_export_to_hf_of_a_config_hf_cannot_represent_is_one_line(source, tmp_path, capsys):
    root, _, _ = source
    code, _, err = run_cli([root / "ours", tmp_path / "hf", "--to", "hf"], capsys)
    assert code == 2 and "GroupNorm with 8 groups" in err and err.count("\n") == 1


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class RunsCommand:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(1)}, "x": RunsCommand()}, protocol=2))
    code, out, err = run_cli([path, tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert str(path) in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{root}/absent.pkl", "{tmp}/out"], "no such file"),
        (["{root}/ours", "{tmp}/model.bin", "--to", "detectron2"], "must end with .pkl or .pth"),
        (["{root}/model_final.pkl", "{tmp}/out", "--preset", "nope"], "unknown preset 'nope'"),
        (["{root}/ours", "{root}/ours"], "overwrite the input"),
        (["{root}/model_final.pkl", "{tmp}/out", "--from", "hf"], "not a Hugging Face Mask2Former folder"),
    ],
)
def test_user_errors_are_one_line(source, tmp_path, capsys, args, expected):
    root, _, _ = source
    args = [a.format(root=root, tmp=tmp_path) for a in args]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and expected in err and err.count("\n") == 1


def test_predict_accepts_a_detectron2_file_as_weights(source, tmp_path, capsys):
    root, _, _ = source
    image = Path(__file__).parent / "data" / "chelsea.png"
    args = [str(image), "--weights", str(root / "model_final.pkl"), "--out", str(tmp_path), "--no-picture"]
    assert main(["predict", *args, "--task", "semantic"]) == 0


def test_entry_point_help_lists_convert():
    result = subprocess.run(
        [sys.executable, "-m", "mask2former", "convert", "--help"], capture_output=True, text=True, check=True
    )
    assert "--from" in result.stdout and "--to" in result.stdout and "--preset" in result.stdout
