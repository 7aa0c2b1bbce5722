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


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Static shapes of every tensor inferable from the given input shapes (initializers included)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # no weights needed for shapes? Shape inference with data propagation may need small constant values; keep them.
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
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best-effort here
        log.debug("shape inference failed: %s", exc)
    shapes: dict[str, list[int]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


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
