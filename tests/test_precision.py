"""Inference precision (--dtype / load(dtype=)): bf16 and fp16 run end to end and agree with fp32, the
caller's model keeps its keys and dtype, and a CPU without native support gets one line."""

from __future__ import annotations

import json

import pytest
import torch

import mask2former
from mask2former.api import BUNDLED_DIR
from mask2former.checkpoints.io import read_checkpoint
from mask2former.cli import main
from mask2former.data.image_io import load_image
from mask2former.inference.postprocess import PostprocessSettings, postprocess
from mask2former.inference.precision import check_supported, cpu_supports, resolve_dtype
from mask2former.inference.preprocess import preprocess_for
from mask2former.modeling.transformer_decoder import MASK_VALUE

EXAMPLE = BUNDLED_DIR.parent / "example.png"
HALF_DTYPES = ("bf16", "fp16")


def native(name: str) -> bool:
    return cpu_supports(resolve_dtype(name))


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(None) is torch.float32 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match=r"^dtype 'int4': expected one of fp32, bf16, fp16"):
        resolve_dtype("int4")


def test_a_cpu_without_native_support_gets_one_line():
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=r"^dtype (bf16|fp16): this CPU has no native") as error:
            check_supported(dtype, "cpu", cpu_flags_override=frozenset({"avx2", "fma"}))
        assert "\n" not in str(error.value)
    check_supported(torch.bfloat16, "cpu", cpu_flags_override=frozenset({"avx512_bf16"}))
    check_supported(torch.float32, "cpu", cpu_flags_override=frozenset())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_converted_model_runs_directly(dtype):
    # model.half() used to crash in the pixel decoder (float32 inputs against half weights).
    model = mask2former.build("synth-tiny", seed=0).to(dtype)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert out["pred_masks"].dtype == dtype and out["pred_logits"].isfinite().all()
    assert torch.finfo(torch.float16).min < MASK_VALUE  # the attention mask is representable in fp16


@pytest.mark.slow
@pytest.mark.parametrize("name", HALF_DTYPES)
def test_load_with_dtype_agrees_with_fp32_and_keeps_the_checkpoint(name):
    if not native(name):
        with pytest.raises(ValueError, match=f"^dtype {name}: this CPU has no native"):
            mask2former.load(dtype=name)
        return
    _, checkpoint = read_checkpoint(BUNDLED_DIR)
    reference, predictor = mask2former.load(), mask2former.load(dtype=name)
    # The caller's model keeps its keys and float32 weights; only the private copy is converted.
    assert sorted(predictor.model.state_dict()) == sorted(checkpoint)
    assert all(value.dtype == checkpoint[key].dtype for key, value in predictor.model.state_dict().items())
    assert next(predictor.runner.inference_model().parameters()).dtype == resolve_dtype(name)
    item = preprocess_for(predictor.config.input, load_image(EXAMPLE))
    expected, got = reference.runner(item.tensor), predictor.runner(item.tensor)
    assert got["pred_masks"].dtype == torch.float32  # post-processing runs in float32
    # Stated tolerances: mask logits on the same side of 0 for >= 99% of entries, the same class argmax for
    # every query, and >= 99% of pixels with the same semantic label.
    same_sign = ((got["pred_masks"] > 0) == (expected["pred_masks"] > 0)).float().mean()
    assert same_sign >= 0.99
    assert torch.equal(got["pred_logits"].argmax(-1), expected["pred_logits"].argmax(-1))
    settings = PostprocessSettings.from_config(predictor.config, "semantic")
    labels = [postprocess(o, 0, "semantic", settings, item.geometry()).class_map for o in (expected, got)]
    assert (labels[0] == labels[1]).mean() >= 0.99


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes") / "val"
    assert main(["synth", str(folder), "--n", "4", "--seed", "2"]) == 0
    return folder


def evaluate(scenes, out, extra) -> dict:
    args = ["eval", "--data", str(scenes), "--task", "panoptic", "--out", str(out), "--no-progress"]
    assert main(args + extra) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", HALF_DTYPES)
def test_predict_and_eval_with_dtype(tmp_path, scenes, capsys, name):
    if not native(name):
        assert main(["predict", str(EXAMPLE), "--dtype", name, "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip().startswith(f"mask2former: --dtype {name}:")
        return
    assert main(["predict", str(EXAMPLE), "--dtype", name, "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "example.panoptic.png").is_file()
    fp32 = evaluate(scenes, tmp_path / "fp32", [])
    half = evaluate(scenes, tmp_path / name, ["--dtype", name])
    # Stated tolerance on 4 scenes: PQ within 2 points (the 200-scene bench gives the 0.5 figure).
    assert abs(fp32["PQ"] - half["PQ"]) <= 2.0, (fp32["PQ"], half["PQ"])


@pytest.mark.slow
def test_onnx_graph_refuses_another_dtype(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    graph = tmp_path / "model.onnx"
    assert main(["export", "--size", "64x64", "--out", str(graph)]) == 0
    capsys.readouterr()
    assert (
        main(["predict", str(EXAMPLE), "--weights", str(graph), "--dtype", "fp16", "--out", str(tmp_path)])
        == 2
    )
    assert "--dtype float16" in capsys.readouterr().err
