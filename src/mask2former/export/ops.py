"""Operator inventory of an ONNX graph: node count per op type and multiply-accumulates of the matrix ops.

MACs are counted for Conv, MatMul, Gemm and Einsum (the mask einsum of the decoder) from tensor shapes given
by ONNX shape inference on a graph whose input shape is fixed (a dynamic graph needs a size). Where
inference cannot follow a shape computation, the remaining shapes are read from one ONNX Runtime run on a
zero input of that size, and the inventory says so.

Also the checks deployment targets care about: no float64 anywhere (ONNX Runtime rejects several double
kernels and accelerators have none) and no ScatterND (data-dependent writes most runtimes lack).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mask2former.export.runtime import ExportError, require

MAC_OPS = ("Conv", "MatMul", "Gemm", "Einsum")
FORBIDDEN_OPS = ("ScatterND",)


@dataclass
class OpInventory:
    """counts: op type -> nodes (subgraphs included); macs: op type -> MACs of its nodes with known shapes."""

    counts: dict[str, int]
    macs: dict[str, int]
    input_shape: list[int | str]
    unknown: dict[str, int] = field(default_factory=dict)  # op type -> nodes whose MACs stay unknown
    probed: int = 0  # tensors whose shapes came from an ONNX Runtime run instead of shape inference

    @property
    def total_nodes(self) -> int:
        return sum(self.counts.values())

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def to_dict(self) -> dict:
        return {
            "input_shape": self.input_shape,
            "counts": dict(self.counts),
            "macs": dict(self.macs),
            "total_nodes": self.total_nodes,
            "total_macs": self.total_macs,
            "unknown_macs": dict(self.unknown),
            "shapes_from_onnxruntime": self.probed,
        }


def load_graph(path: str | Path):
    """Read an .onnx file (one-line error when missing or not ONNX)."""
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model ({type(error).__name__})") from None


def iter_nodes(graph):
    """Every node of a graph and of its subgraphs (If / Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from iter_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from iter_nodes(subgraph)


def op_counts(model) -> dict[str, int]:
    """Op type -> number of nodes, most frequent first."""
    counts = Counter(node.op_type for node in iter_nodes(model.graph))
    return dict(counts.most_common())


def _dims(value_info) -> list[int | str | None]:
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def graph_input_shape(model) -> list[int | str | None]:
    """Shape of the first real graph input (initializers are not inputs), dynamic axes as their names."""
    initializers = {init.name for init in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name not in initializers:
            return _dims(graph_input)
    raise ExportError("the graph has no input")


def fix_input_shape(model, height: int, width: int, batch: int = 1):
    """A copy of `model` whose first input is (batch, C, height, width) with static dims."""
    onnx = require("onnx")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {init.name for init in fixed.graph.initializer}
    graph_input = next(i for i in fixed.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    for axis, value in ((0, batch), (2, height), (3, width)):
        if dims[axis].HasField("dim_value") and dims[axis].dim_value != value:
            raise ExportError(
                f"the graph's input is fixed at {_dims(graph_input)}; give no size or its own size"
            )
        dims[axis].Clear()
        dims[axis].dim_value = value
    return fixed


def _known_shapes(model) -> dict[str, list[int]]:
    """Tensor name -> fully static shape, for every tensor shape inference could resolve."""
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for value_info in list(graph.input) + list(graph.output) + list(graph.value_info):
        dims = _dims(value_info)
        if value_info.type.tensor_type.HasField("shape") and all(isinstance(d, int) for d in dims):
            shapes[value_info.name] = dims
    for node in graph.node:  # Constant nodes carry their shape in the attribute
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = list(attribute.t.dims)
    return shapes


def _probe_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """Shapes of tensors `names` from one ONNX Runtime run on zeros (inputs must be static)."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
    values = session.run(names, {graph_input.name: np.zeros(graph_input.shape, dtype=dtype)})
    return {name: list(value.shape) for name, value in zip(names, values, strict=True)}


def _einsum_macs(equation: str, shapes: list[list[int]]) -> int | None:
    """Product of the sizes of every index letter: one multiply-add per point of the joint index space.
    None for equations with an ellipsis (their letters do not name every axis)."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, shape in zip(inputs, shapes, strict=True):
        if "..." in letters or len(letters) != len(shape):
            return None
        sizes.update(zip(letters, shape, strict=True))
    return int(np.prod(list(sizes.values()), dtype=np.int64))


def node_macs(node, shapes: dict[str, list[int]]) -> int | None:
    """Multiply-accumulates of one Conv / MatMul / Gemm / Einsum node, None when a shape is unknown."""
    needed = [name for name in node.input if name] + [node.output[0]]
    if any(name not in shapes for name in needed):
        return None
    if node.op_type == "Conv":
        weight, output = shapes[node.input[1]], shapes[node.output[0]]
        # every output element sums (C_in / groups) * kernel products; the weight holds exactly that
        return int(np.prod(output, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    if node.op_type in ("MatMul", "Gemm"):
        a_shape = shapes[node.input[0]]
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        inner = a_shape[-2] if trans_a and node.op_type == "Gemm" else a_shape[-1]
        return int(np.prod(shapes[node.output[0]], dtype=np.int64) * inner)
    if node.op_type == "Einsum":
        equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
        return _einsum_macs(equation, [shapes[name] for name in node.input])
    return None


def op_inventory(model, size: tuple[int, int] | None = None, batch: int = 1) -> OpInventory:
    """Counts per op type and MACs of the matrix ops of `model` (a ModelProto) at input `size` (H, W).

    A graph with dynamic height/width needs `size`; a static graph uses its own.
    """
    onnx = require("onnx")
    input_shape = graph_input_shape(model)
    if size is not None:
        model = fix_input_shape(model, size[0], size[1], batch)
    elif not all(isinstance(d, int) for d in input_shape):
        raise ExportError(f"the graph's input shape {input_shape} is dynamic: give a size (H, W) for MACs")
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _known_shapes(inferred)
    mac_nodes = [node for node in inferred.graph.node if node.op_type in MAC_OPS]
    missing = sorted(
        {n for node in mac_nodes for n in [*node.input, node.output[0]] if n and n not in shapes}
    )
    if missing:
        try:
            shapes.update(_probe_shapes(inferred, missing))
        except ExportError:  # no onnxruntime: those nodes stay "unknown" in the inventory
            missing = []
    macs: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    for node in mac_nodes:
        value = node_macs(node, shapes)
        if value is None:
            unknown[node.op_type] += 1
        else:
            macs[node.op_type] += value
    return OpInventory(
        counts=op_counts(model),
        macs=dict(macs),
        input_shape=graph_input_shape(model),
        unknown=dict(unknown),
        probed=len(missing),
    )


def float64_locations(model) -> list[str]:
    """Every place a float64 occurs: initializers, typed values (inputs, outputs, value_info after shape
    inference), Cast targets and tensor-valued attributes. Empty for a clean graph."""
    onnx = require("onnx")
    double = onnx.TensorProto.DOUBLE
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is only there to type more intermediate values; the raw graph still counts
        pass
    graph = model.graph
    found = [f"initializer {init.name}" for init in graph.initializer if init.data_type == double]
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        found += [f"{kind} {v.name}" for v in values if v.type.tensor_type.elem_type == double]
    for node in iter_nodes(graph):
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == double:
                found.append(f"Cast node {node.name or node.output[0]} to double")
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == double:
                found.append(f"{node.op_type} node {node.name or node.output[0]} attribute {attribute.name}")
    return found


def forbidden_ops(model, names: tuple[str, ...] = FORBIDDEN_OPS) -> dict[str, int]:
    """Op types from `names` present in the graph, with their counts."""
    counts = op_counts(model)
    return {name: counts[name] for name in names if name in counts}


def format_table(inventory: OpInventory) -> str:
    """The inventory as a plain-text table: op type, count, GMACs (matrix ops only), share of MACs."""
    total = inventory.total_macs
    lines = [
        f"input shape {inventory.input_shape}",
        f"{'op type':<24} {'count':>7} {'GMAC':>10} {'share':>7}",
    ]
    for op_type, count in inventory.counts.items():
        if op_type in inventory.macs:
            gmacs = inventory.macs[op_type] / 1e9
            share = inventory.macs[op_type] / total if total else 0.0
            lines.append(f"{op_type:<24} {count:>7} {gmacs:>10.3f} {share:>7.1%}")
        else:
            lines.append(f"{op_type:<24} {count:>7} {'':>10} {'':>7}")
    lines.append(f"{'total':<24} {inventory.total_nodes:>7} {total / 1e9:>10.3f}")
    if inventory.unknown:
        missing = ", ".join(f"{n} {op}" for op, n in inventory.unknown.items())
        lines.append(f"MACs unknown for {missing} (shapes not inferable)")
    if inventory.probed:
        lines.append(
            f"{inventory.probed} tensor shapes read from an ONNX Runtime run (not inferable statically)"
        )
    return "\n".join(lines)
