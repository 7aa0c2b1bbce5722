"""Multiply-accumulate counts from tensor shapes at a given input shape.

Shapes come from ONNX shape inference on a copy of the model whose inputs are fixed to concrete shapes (with data
propagation, so Reshape targets computed from Shape ops resolve). Declared intermediate shapes are not trusted: all
intermediate value_info is dropped before inference. Where inference cannot tell a needed shape and a sample feed is
given, the shapes are read from one ORT run that exposes just those tensors.

Per node (N = batch, g = group, k = kernel elements):

- Conv:           N * Cout * prod(out spatial) * (Cin / g) * k
- ConvTranspose:  N * Cin * prod(in spatial) * (Cout / g) * k
- Gemm:           M * K * N
- MatMul:         prod(broadcast batch dims) * M * K * N   (1-D operands promoted as numpy does)
- LSTM / GRU / RNN: T * B * D * G * H * (I + H), G = 4 / 3 / 1 gates, D = directions
- the integer forms (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul, MatMulNBits) count like their float ops.

Nodes inside subgraphs (If/Loop bodies) are not counted; ``unknown`` lists nodes whose shapes could not be found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress import mmap_weights

log = logging.getLogger(__name__)

MAC_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN",
    "ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedConv", "FusedMatMul",
}


@dataclass
class MacCount:
    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    by_node: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            return None
    return dims


#: initializers up to this many elements keep their values in the shape-inference stand-in (shape vectors,
#: Resize scales); integer tensors up to this size count as shape data
SHAPE_DATA_MAX_ELEMENTS = 1024


def _valueless(t: onnx.TensorProto) -> bool:
    """Initializers shape inference needs only the shape of: more than ``SHAPE_DATA_MAX_ELEMENTS`` elements (values
    matter for short vectors only: Reshape targets, Resize scales)."""
    return int(np.prod([int(d) for d in t.dims])) > SHAPE_DATA_MAX_ELEMENTS


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Static shapes of every tensor inferable from the given input shapes (initializers included).

    Runs on a weightless stand-in (``mmap_weights.checkable``: initializers that are not short vectors become typed
    graph inputs; never copies a weight). First without data propagation; only if some node output is still not static, again with it
    (exported transformers compute Reshape targets from Shape), on a stand-in without the constant subgraphs whose
    outputs the first run already sized and that cannot be shape data (``_without_constant_subgraphs``): onnx's data
    propagation through a Gather of a codebook by millions of indices (a clustered weight's decode) builds one
    shape dimension per element and took ~9 GB on a 0.27 GB model."""
    m = mmap_weights.checkable(model, strip=_valueless)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    for vi in m.graph.output:  # declared output shapes can be wrong: let inference recompute them
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    first = _inferred(m, data_prop=False)
    shapes, types = _static(first)
    if all(o in shapes for n in m.graph.node for o in n.output if o):
        return shapes
    second, _ = _static(_inferred(_without_constant_subgraphs(m, shapes, types), data_prop=True))
    return {**shapes, **second}


def _inferred(m: onnx.ModelProto, data_prop: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=data_prop)
    except Exception as exc:  # inference is best-effort here
        log.debug("shape inference failed: %s", exc)
        return m


def _static(m: onnx.ModelProto) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Static shapes and element types of the value infos, inputs, outputs and initializers of ``m``."""
    shapes: dict[str, list[int]] = {}
    types: dict[str, int] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
        types[t.name] = t.data_type
    return shapes, types


def _is_shape_data(shape: list[int], elem_type: int) -> bool:
    return elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and int(np.prod(shape)) <= \
        SHAPE_DATA_MAX_ELEMENTS


def _without_constant_subgraphs(m: onnx.ModelProto, shapes: dict[str, list[int]],
                                types: dict[str, int]) -> onnx.ModelProto:
    """A copy of stand-in ``m`` whose constant nodes (every input an initializer or another constant node's output,
    no subgraph) with statically sized outputs that are not shape data are removed, their outputs declared as typed
    graph inputs of the sizes the first run found. One pass in topological order: O(nodes)."""
    out = onnx.ModelProto()
    mmap_weights.copy_fields(out, m, ("graph",))
    mmap_weights.copy_fields(out.graph, m.graph, ("node",))
    constant = {t.name for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        if has_subgraph or not all(i == "" or i in constant for i in n.input):
            keep.append(n)
            continue
        constant.update(o for o in n.output if o)
        outs = [o for o in n.output if o]
        if outs and all(o in shapes and o in types and not _is_shape_data(shapes[o], types[o]) for o in outs):
            for o in outs:
                out.graph.input.append(onnx.helper.make_tensor_value_info(o, types[o], shapes[o]))
        else:
            keep.append(n)
    out.graph.node.extend(keep)
    return out


def ort_shapes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Shapes of the named intermediate tensors from one ORT run."""
    from onnxcompress.runtime import Session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    try:
        with Session(m, optimize=False) as s:
            outs = s.run(feed, names)
    except Exception as exc:
        log.debug("ORT shape probe failed: %s", exc)
        return {}
    return {n: list(np.asarray(o).shape) for n, o in zip(names, outs, strict=True)}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_macs(node: onnx.NodeProto, shape) -> int | None:
    op = node.op_type
    ins = list(node.input)
    outs = list(node.output)
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
        x_i, w_i = (0, 3) if op == "QLinearConv" else (0, 1)
        w, y = shape(ins[w_i]), shape(outs[0])
        if w is None or y is None:
            return None
        return int(np.prod(y, dtype=np.int64) * int(np.prod(w[1:], dtype=np.int64)))
    if op == "ConvTranspose":
        x, w = shape(ins[0]), shape(ins[1])
        if x is None or w is None:
            return None
        group = int(_attr(node, "group", 1))
        return int(np.prod(x, dtype=np.int64) * w[1] * int(np.prod(w[2:], dtype=np.int64))) if group else None
    if op == "Gemm":
        a, y = shape(ins[0]), shape(outs[0])
        if a is None or y is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return int(np.prod(y, dtype=np.int64)) * int(k)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a_i = 0
        a, y = shape(ins[a_i]), shape(outs[0])
        if a is None or y is None:
            return None
        k = a[-1] if len(a) >= 1 else 1
        if op == "FusedMatMul" and _attr(node, "transA", 0) and len(a) >= 2:
            k = a[-2]
        return int(np.prod(y, dtype=np.int64)) * int(k)
    if op == "MatMulNBits":
        y = shape(outs[0])
        k = _attr(node, "K", None)
        if y is None or k is None:
            return None
        return int(np.prod(y, dtype=np.int64)) * int(k)
    if op in ("LSTM", "GRU", "RNN"):
        x, w, r = shape(ins[0]), shape(ins[1]), shape(ins[2])
        if x is None or w is None or r is None:
            return None
        layout = int(_attr(node, "layout", 0))
        seq, batch = (x[1], x[0]) if layout else (x[0], x[1])
        directions, gates_h, input_size = w[0], w[1], w[2]
        hidden = r[2]
        return int(seq * batch * directions * gates_h * (input_size + hidden))
    return 0


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
               feed: dict[str, np.ndarray] | None = None) -> MacCount:
    shapes = infer_shapes(model, input_shapes)
    mac_nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]

    def need(n: onnx.NodeProto) -> list[str]:
        return [t for t in list(n.input[:2]) + list(n.output[:1]) if t and t not in shapes]

    missing = sorted({t for n in mac_nodes for t in need(n)})
    if missing and feed is not None:
        shapes.update(ort_shapes(model, missing, feed))
    result = MacCount()
    for i, node in enumerate(mac_nodes):
        macs = _node_macs(node, shapes.get)
        key = node.name or f"{node.op_type}_{i}"
        if macs is None:
            result.unknown.append(key)
            continue
        result.total += macs
        result.by_op[node.op_type] = result.by_op.get(node.op_type, 0) + macs
        result.by_node[key] = macs
    return result
