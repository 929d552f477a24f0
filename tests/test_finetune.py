"""Fine-tuning to new classes: shared class rows carried over, new rows fresh, everything else equal."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model_config

from mask2former.checkpoints.finetune import CLASS_HEAD, adapt_class_head, load_for_finetuning
from mask2former.checkpoints.io import CheckpointError, save_checkpoint
from mask2former.cli import main
from mask2former.data.synth import generate, synth_meta
from mask2former.modeling.build import build_model

NEW_CLASSES = ["circle", "ring", "hexagon", "cross", "sky", "water", "wall"]


def _source():
    config = tiny_model_config()
    torch.manual_seed(1)
    return config, build_model(config).state_dict()


def _target_config(classes=NEW_CLASSES):
    config = tiny_model_config()
    meta = synth_meta(classes)
    config.class_names, config.thing_classes = list(meta.class_names), list(meta.thing_classes)
    config.category_ids, config.colors = list(meta.category_ids), list(meta.colors)
    return config


def test_shared_rows_equal_the_source_new_rows_fresh_everything_else_equal():
    source_config, source_state = _source()
    before = {k: v.clone() for k, v in source_state.items()}
    target_config = _target_config()
    torch.manual_seed(2)
    model = build_model(target_config)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_for_finetuning(model, target_config, source_state, source_config)

    state = model.state_dict()
    for suffix in ("weight", "bias"):
        key = f"{CLASS_HEAD}.{suffix}"
        assert state[key].shape[0] == len(NEW_CLASSES) + 1
        for k, name in enumerate(NEW_CLASSES):
            if name in source_config.class_names:
                assert torch.equal(state[key][k], source_state[key][source_config.class_names.index(name)])
            else:
                assert torch.equal(state[key][k], fresh[key][k])
                assert not torch.equal(state[key][k], source_state[key][k])
        assert torch.equal(state[key][-1], source_state[key][-1])  # no object
    others = [k for k in state if not k.startswith(CLASS_HEAD)]
    assert others and all(torch.equal(state[k], source_state[k]) for k in others)
    assert all(torch.equal(before[k], source_state[k]) for k in before)  # the caller's dict untouched
    assert report.carried_over == ["circle", "ring", "sky", "water", "wall"]
    assert report.reinitialised == ["hexagon", "cross"]
    assert report.dropped == ["square", "triangle", "star", "grass"]
    assert "carried over for 5 classes" in report.summary()


def test_same_classes_load_everything():
    config, state = _source()
    _, report = adapt_class_head(state, config.class_names, state, list(config.class_names))
    assert report.same_classes and "all loaded" in report.summary()


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: setattr(c.decoder, "num_queries", 12), "10 queries vs 12"),
        (lambda c: setattr(c.backbone, "layers", (1, 1, 1, 1)), "another backbone"),
    ],
)
def test_other_architecture_is_refused_in_one_line(change, expected):
    source_config, source_state = _source()
    target_config = _target_config()
    change(target_config)
    model = build_model(target_config)
    with pytest.raises(CheckpointError, match=expected) as error:
        load_for_finetuning(model, target_config, source_state, source_config)
    assert "\n" not in str(error.value)


def test_train_cli_init_with_other_classes_reports_and_carries_over(tmp_path, capsys):
    source_config, source_state = _source()
    weights = save_checkpoint(source_state, source_config, tmp_path / "source")
    data = tmp_path / "data"
    generate(data, 3, seed=0, size=(64, 64), classes=NEW_CLASSES)
    out = tmp_path / "run"
    args = ["train", "--init", str(weights), "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--iters", "1", "--batch-size", "1", "--augment", "none", "--num-points", "64", "--lr", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "re-initialised for 2 (hexagon, cross)" in printed
    from mask2former.checkpoints.io import read_checkpoint

    config, state = read_checkpoint(out / "model")
    assert config.class_names == NEW_CLASSES
    row = state[f"{CLASS_HEAD}.weight"][NEW_CLASSES.index("ring")]
    assert torch.allclose(row, source_state[f"{CLASS_HEAD}.weight"][source_config.class_names.index("ring")])


def test_train_cli_refuses_other_queries_in_one_line(tmp_path, capsys):
    source_config, source_state = _source()
    weights = save_checkpoint(source_state, source_config, tmp_path / "source")
    other = copy.deepcopy(source_config)
    other.decoder.num_queries = 12
    config_path = tmp_path / "other.json"
    import json

    config_path.write_text(json.dumps(other.to_dict()))
    data = tmp_path / "data"
    generate(data, 2, seed=0, size=(64, 64), classes=NEW_CLASSES)
    args = ["train", "--config", str(config_path), "--init", str(weights), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "run"), "--no-progress", "--batch-size", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "10 queries vs 12" in err and len(err.splitlines()) == 1
