"""`--backbone-weights`: ImageNet backbone files in each layout, made here from a random backbone.

Each test writes the backbone of model A in a foreign layout (names as torchvision / detectron2's
convert-torchvision-to-d2 / Microsoft's Swin / timm's Swin write them, with their classification heads and
derived buffers), loads it into model B and checks B's backbone equals A's.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import synth_data, tiny_model_config
from safetensors.torch import save_file

from mask2former.checkpoints.backbone_weights import load_backbone_weights
from mask2former.checkpoints.io import CheckpointError
from mask2former.cli import main
from mask2former.modeling.build import build_model


def resnet_config():
    return tiny_model_config()


def swin_config():
    config = tiny_model_config()
    bb = config.backbone
    bb.kind, bb.embed_dim, bb.depths, bb.num_heads, bb.window_size = "swin", 16, (2, 2, 2, 2), (1, 2, 2, 4), 7
    return config


def _backbone(config, seed):
    torch.manual_seed(seed)
    return build_model(config).backbone.state_dict()


def _torchvision_names(ours: dict) -> dict:
    out = {}
    for key, value in ours.items():
        key = key.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
        key = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
        key = key.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
        key = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", key)
        out[key] = value.clone()
        if key.endswith("running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    out["fc.weight"], out["fc.bias"] = torch.randn(5, 32), torch.randn(5)
    return out


def _timm_names(ours: dict) -> dict:
    shift = lambda m: f"layers.{int(m.group(1)) + 1}.downsample."  # noqa: E731
    return {re.sub(r"^layers\.(\d+)\.downsample\.", shift, k): v.clone() for k, v in ours.items()}


def _swin_extras(state: dict, head: str) -> dict:
    state = {k: v for k, v in state.items() if not re.match(r"norm\d\.", k)}
    state[f"{head}.weight"], state[f"{head}.bias"] = torch.randn(10, 128), torch.randn(10)
    state["norm.weight"], state["norm.bias"] = torch.ones(128), torch.zeros(128)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    return state


def write_layout(ours: dict, layout: str, folder: Path) -> Path:
    """Our backbone state dict written as `layout`'s file would be."""
    if layout == "torchvision":
        path = folder / "resnet.pth"
        torch.save(_torchvision_names(ours), path)
    elif layout == "detectron2":  # what convert-torchvision-to-d2 makes of the torchvision names
        tv = _torchvision_names(ours)
        d2 = {}
        for key, value in tv.items():
            key = key if "layer" in key else "stem." + key
            key = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
            key = re.sub(r"bn(\d)", r"conv\1.norm", key)
            key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
            d2[key] = value.numpy()
        path = folder / "R-50.pkl"
        document = {"model": d2, "__author__": "torchvision", "matching_heuristics": True}
        path.write_bytes(pickle.dumps(document, protocol=2))
    elif layout == "swin-microsoft":
        path = folder / "swin_tiny_patch4_window7_224.pth"
        torch.save({"model": _swin_extras(dict(ours), "head")}, path)
    else:
        path = folder / "model.safetensors"
        state = _swin_extras(_timm_names(ours), "head.fc")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "layout, make_config",
    [
        ("torchvision", resnet_config),
        ("detectron2", resnet_config),
        ("swin-microsoft", swin_config),
        ("swin-timm", swin_config),
    ],
)
def test_each_layout_maps_exactly_onto_our_backbone(layout, make_config, tmp_path):
    config = make_config()
    source = _backbone(config, seed=1)
    path = write_layout(source, layout, tmp_path)
    torch.manual_seed(2)
    model = build_model(config)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = load_backbone_weights(model, path)
    assert report.layout == layout
    loaded = model.backbone.state_dict()
    swin_output_norms = [k for k in loaded if re.match(r"norm\d\.", k)]
    for key, value in loaded.items():
        if key in swin_output_norms or key.endswith("relative_position_index"):
            continue
        assert torch.equal(value, source[key]), key
    assert report.new == sorted(swin_output_norms)
    assert any(k.startswith(("fc.", "stem.fc.", "head.")) for k in report.dropped)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in head_before.items())  # only the backbone changed
    assert f"({layout} layout)" in report.summary()


def test_wrong_depth_is_refused_in_one_line(tmp_path):
    source = _backbone(resnet_config(), seed=1)
    path = write_layout(source, "torchvision", tmp_path)
    deeper = resnet_config()
    deeper.backbone.layers = (1, 1, 3, 1)
    with pytest.raises(CheckpointError, match="missing 1?\\d* keys: res4.2") as error:
        load_backbone_weights(build_model(deeper), path)
    assert "\n" not in str(error.value)


def test_caffe2_names_and_whole_models_are_refused(tmp_path):
    msra = tmp_path / "R-50-msra.pkl"
    msra.write_bytes(pickle.dumps({"model": {"conv1_w": torch.zeros(1).numpy()}}))
    with pytest.raises(CheckpointError, match="MSRA/Caffe2"):
        load_backbone_weights(build_model(resnet_config()), msra)
    whole = tmp_path / "whole.pth"
    torch.save({"backbone.stem.conv1.weight": torch.zeros(1)}, whole)
    with pytest.raises(CheckpointError, match="train --init"):
        load_backbone_weights(build_model(resnet_config()), whole)


def test_train_cli_backbone_weights_prints_the_report(tmp_path, capsys):
    import json

    config = resnet_config()
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(config.to_dict()))
    path = write_layout(_backbone(config, seed=1), "detectron2", tmp_path)
    data = synth_data(tmp_path / "data", 2)
    args = ["train", "--config", str(config_path), "--data", str(data), "--out", str(tmp_path / "run")]
    args += ["--backbone-weights", str(path), "--iters", "1", "--batch-size", "1", "--augment", "none"]
    assert main([*args, "--num-points", "64", "--no-progress"]) == 0
    assert "backbone weights: " in capsys.readouterr().out
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    args[args.index(str(path))] = str(bad)
    assert main([*args, "--num-points", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mask2former train: error: --backbone-weights") and len(err.splitlines()) == 1
