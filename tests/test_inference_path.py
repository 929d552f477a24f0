"""The one inference path: the predictor leaves models alone, one loader, one pre/post-processing entry,
kernels chosen by a named switch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mask2former
from mask2former.api import BUNDLED_DIR, resolve_model
from mask2former.checkpoints.io import read_checkpoint, save_checkpoint
from mask2former.cli import flag_error
from mask2former.inference.optimize import has_frozen_batchnorm
from mask2former.inference.postprocess import PostprocessSettings
from mask2former.inference.predictor import Predictor, TorchRunner
from mask2former.modeling.kernels import current_kernels, use_kernels

EXAMPLE = BUNDLED_DIR.parent / "example.png"


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_load_exposes_the_checkpoint_model_unchanged_after_predicting(tmp_path):
    _, checkpoint = read_checkpoint(BUNDLED_DIR)
    predictor = mask2former.load()
    predictor.predict(EXAMPLE)
    assert has_frozen_batchnorm(predictor.model)
    assert_state_equal(predictor.model, checkpoint)
    # ... so it can be saved and loaded again, giving the same predictions.
    save_checkpoint(predictor.model.state_dict(), predictor.config, tmp_path / "again")
    again = mask2former.load(tmp_path / "again")
    first, second = predictor.predict(EXAMPLE), again.predict(EXAMPLE)
    assert (first.id_map == second.id_map).all()


def test_predictor_leaves_a_model_and_config_given_by_the_caller_alone():
    loaded = resolve_model()
    model, config = loaded.model, loaded.config
    state = {key: value.clone() for key, value in model.state_dict().items()}
    input_before = dataclasses.replace(config.input)
    predictor = Predictor(TorchRunner(model), config)
    predictor.set_short_edge(160)
    predictor.predict_batch([EXAMPLE, EXAMPLE], task="instance")
    assert predictor.model is model and not model.training
    assert_state_equal(model, state)
    assert config.input == input_before and predictor.config.input.short_edge == 160
    # The caller's model still trains: gradients reach its parameters.
    model.train()
    images = torch.zeros(1, 3, 64, 64)
    model(images)["pred_logits"].sum().backward()
    assert model.sem_seg_head.predictor.class_embed.weight.grad is not None


def test_runner_without_optimisation_runs_the_model_itself():
    model = resolve_model().model
    runner = TorchRunner(model, optimize=False)
    assert runner.inference_model() is model


def test_one_loader_for_every_source(tmp_path):
    bundled = resolve_model()
    assert bundled.trained and "bundled" in bundled.source
    random = resolve_model(preset="synth-tiny")
    assert not random.trained and "random" in random.source
    with pytest.raises(FileNotFoundError, match=r"^weights nowhere: no such file"):
        resolve_model("nowhere")
    with pytest.raises(ValueError, match="ONNX"):
        resolve_model("model.onnx")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_model(preset="nope")


def test_cli_names_the_flag_for_a_library_error():
    assert str(flag_error(FileNotFoundError("weights x: no such file"))) == "--weights x: no such file"
    assert str(flag_error(ValueError("size 3x3: too small"))) == "--size 3x3: too small"
    assert str(flag_error(ValueError("something else"))) == "something else"


def test_postprocess_settings_follow_the_config():
    config = mask2former.get_preset("synth-tiny")
    panoptic = PostprocessSettings.from_config(config, "panoptic")
    assert panoptic.thing_classes == tuple(config.thing_classes)
    assert panoptic.object_mask_threshold == config.object_mask_threshold
    assert panoptic.top_k == config.test_topk and panoptic.semantic_before_inference
    config.task = "instance"
    assert PostprocessSettings.from_config(config, "instance").thing_classes is None
    assert PostprocessSettings.from_config(config, "instance", top_k=5).top_k == 5


def test_kernel_switch_is_scoped_and_validated():
    assert current_kernels().deform_attn == "auto" and current_kernels().onednn
    with use_kernels(deform_attn="reference", onednn=False):
        assert current_kernels().deform_attn == "reference" and not current_kernels().onednn
        with use_kernels(onednn=True):
            assert current_kernels().deform_attn == "reference" and current_kernels().onednn
    assert current_kernels().deform_attn == "auto" and current_kernels().onednn
    with pytest.raises(ValueError, match="deform_attn"):
        with use_kernels(deform_attn="cuda-magic"):
            pass


def test_reference_kernels_give_the_same_predictions():
    predictor = mask2former.load()
    fast = predictor.predict(EXAMPLE, task="semantic")
    with use_kernels(deform_attn="reference", onednn=False):
        reference = predictor.predict(EXAMPLE, task="semantic")
    assert (fast.class_map == reference.class_map).mean() > 0.999
