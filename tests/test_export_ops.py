"""Operator inventory: exact MACs on hand-built graphs, float64 / ScatterND detection, and the inventory of
an exported synth-tiny graph (no double, no ScatterND, one GridSample per level per encoder layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mask2former.config import get_preset  # noqa: E402
from mask2former.export.onnx import export_onnx  # noqa: E402
from mask2former.export.ops import (  # noqa: E402
    _einsum_macs,
    float64_locations,
    forbidden_ops,
    format_table,
    op_inventory,
)
from mask2former.export.runtime import ExportError  # noqa: E402
from mask2former.modeling.build import build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def matrix_graph(height="H", width="W", double=False):
    """x (1, 3, H, W) -> Conv 3x3 (8 out, groups 1) -> flatten -> MatMul (8x16) -> Gemm -> Einsum."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["flat"]),  # (1, 8, H, W) -> (8, H*W)
        helper.make_node("Transpose", ["flat"], ["t"], perm=[1, 0]),  # (H*W, 8)
        helper.make_node("MatMul", ["t", "m"], ["mm"]),  # (H*W, 16)
        helper.make_node("Gemm", ["mm", "g"], ["gm"], transB=1),  # g (4, 16) -> (H*W, 4)
        helper.make_node("Einsum", ["gm", "e"], ["y"], equation="nk,kj->nj"),  # e (4, 5)
    ]
    initializers = [
        _init("w", (8, 3, 3, 3)),
        numpy_helper.from_array(np.array([8, -1], dtype=np.int64), "shape"),
        _init("m", (8, 16)),
        _init("g", (4, 16), np.float64 if double else np.float32),
        _init("e", (4, 5)),
    ]
    if double:
        nodes.append(helper.make_node("Cast", ["y"], ["y64"], to=TensorProto.DOUBLE))
    graph = helper.make_graph(
        nodes,
        "matrix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_macs_of_each_matrix_op_are_exact():
    inventory = op_inventory(matrix_graph(), size=(6, 10))
    pixels = 6 * 10
    assert inventory.macs == {
        "Conv": pixels * 8 * 3 * 3 * 3,
        "MatMul": pixels * 8 * 16,
        "Gemm": pixels * 16 * 4,
        "Einsum": pixels * 4 * 5,
    }
    assert inventory.counts["Conv"] == 1 and inventory.total_nodes == 6
    assert inventory.unknown == {} and inventory.input_shape == [1, 3, 6, 10]
    table = format_table(inventory)
    assert "Conv" in table and "total" in table


def test_einsum_with_ellipsis_is_left_unknown():
    assert _einsum_macs("bqc,bchw->bqhw", [[1, 2, 3], [1, 3, 4, 5]]) == 2 * 3 * 4 * 5
    assert _einsum_macs("...c,...c->...", [[2, 3], [2, 3]]) is None


def test_dynamic_graph_needs_a_size_and_static_graph_keeps_its_own():
    with pytest.raises(ExportError, match="a size"):
        op_inventory(matrix_graph())
    static = op_inventory(matrix_graph(4, 4))
    assert static.macs["Conv"] == 16 * 8 * 27
    with pytest.raises(ExportError, match="fixed at"):
        op_inventory(matrix_graph(4, 4), size=(8, 8))


def test_float64_is_found_in_initializers_and_casts():
    assert float64_locations(matrix_graph()) == []
    found = float64_locations(matrix_graph(double=True))
    assert any(place.startswith("initializer g") for place in found)
    assert any("Cast" in place for place in found)


def test_forbidden_ops_reports_scatternd():
    graph = helper.make_graph(
        [helper.make_node("ScatterND", ["x", "i", "u"], ["y"])],
        "scatter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array([[1]], dtype=np.int64), "i"), _init("u", (1,))],
    )
    assert forbidden_ops(helper.make_model(graph)) == {"ScatterND": 1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = get_preset("synth-tiny")
    model = build_model(config).eval()
    out = tmp_path_factory.mktemp("ops") / "fixed.onnx"
    export_onnx(model, config, out, (64, 96), log=lambda _: None)
    return onnx.load(str(out)), model, config


def test_exported_graph_inventory(exported):
    graph, model, config = exported
    assert forbidden_ops(graph) == {}
    assert float64_locations(graph) == []
    inventory = op_inventory(graph)
    counts = inventory.counts
    # The deformable attention samples each level with one grid_sample per encoder layer.
    levels = 3
    assert counts.get("GridSample", 0) == levels * config.pixel_decoder.num_encoder_layers
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert counts["Conv"] == convs
    assert inventory.unknown == {} and inventory.macs["Conv"] > 0 and inventory.macs["MatMul"] > 0
    # the decoder's final full-resolution mask einsum alone: Q x mask_dim x (H/4 x W/4)
    assert inventory.macs.get("Einsum", 0) + inventory.macs.get("MatMul", 0) >= (
        config.decoder.num_queries * config.pixel_decoder.mask_dim * 16 * 24
    )


def test_dynamic_inventory_scales_with_size(tmp_path):
    torch.manual_seed(0)
    config = get_preset("synth-tiny")
    model = build_model(config).eval()
    out = tmp_path / "dynamic.onnx"
    export_onnx(model, config, out, (64, 64), dynamic=True, log=lambda _: None)
    graph = onnx.load(str(out))
    small, large = op_inventory(graph, size=(64, 64)), op_inventory(graph, size=(128, 128))
    assert small.counts == large.counts
    # the backbone convolutions scale with the pixels exactly
    assert large.macs["Conv"] == 4 * small.macs["Conv"]
