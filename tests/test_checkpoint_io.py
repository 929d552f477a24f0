import pytest
import torch
from torch import nn

from mask2former.checkpoints.io import (
    CheckpointError,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from mask2former.config import get_preset


class Small(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
        self.register_buffer("relative_position_index", torch.arange(3))


def test_save_and_read_round_trip(tmp_path):
    model = Small()
    config = get_preset("synth-tiny")
    save_checkpoint(model.state_dict(), config, tmp_path / "ckpt")
    read_config, state = read_checkpoint(tmp_path / "ckpt")
    assert read_config == config
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp files left


def test_strict_loading_reports_every_problem():
    model = Small()
    state = Small(width=5).state_dict()
    state["encoder.2.weight"] = torch.zeros(1)
    del state["encoder.0.bias"]
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, state, "some.pth")
    message = str(info.value)
    assert "some.pth" in message and "\n" not in message
    assert "missing 1 keys: encoder.0.bias" in message
    assert "unexpected 1 keys: encoder.2.weight" in message
    assert "encoder.0.weight (5, 3) vs model (4, 3)" in message


def test_derived_buffers_may_be_absent():
    model = Small()
    state = {k: v for k, v in Small().state_dict().items() if k != "relative_position_index"}
    load_state_dict_strict(model, state, "x")
    assert torch.equal(model.encoder[0].weight, state["encoder.0.weight"])


def test_corrupt_weights_give_one_line_error(tmp_path):
    save_checkpoint(Small().state_dict(), get_preset("synth-tiny"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        read_checkpoint(tmp_path)
