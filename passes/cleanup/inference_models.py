"""The ModelProtos ``shape_facts`` hands to onnx shape inference (nothing here rewrites the cleanup graph).

* ``export_without_weights``: the graph exported with its large float weights as typed graph inputs (inference
  needs their shapes only; serialising the bytes would cost a copy of the model).
* ``strip_declared_shapes``: every declared value_info, graph-output shape and subgraph I/O shape removed (they can
  be wrong); main-graph input dims of 0 / -1 (some exporters' "unknown") become symbols.
* ``unique_input_symbols``: every non-static main-graph input dim gets its own symbol ``in<i>.<axis>`` (two inputs
  both declared ``batch`` are not evidence of equal sizes).
* ``standard_stand_ins``: a contrib op whose output dims follow a standard op's rule becomes that op
  (``com.microsoft`` DynamicQuantizeLSTM as LSTM).
* ``standalone_branch_model``: an ``If`` branch as a model whose inputs are the outer values it reads, typed with
  the outer facts (small outer constants keep their values, so data propagation sees them).
* ``weights_to_inputs``: large float initializers as typed inputs (data propagation needs only small integers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import all_graphs

if TYPE_CHECKING:  # pragma: no cover
    from .facts import Facts

#: float element types whose large tensors inference needs only the shapes of
FLOAT_TENSOR_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


def export_without_weights(graph: gs.Graph, imports: list) -> onnx.ModelProto:
    """The graph as a ModelProto for inference, its large float weights turned into typed main-graph inputs
    before export (inference needs their shapes only; serialising the bytes would cost a copy of the model)."""
    stand_in: dict[int, gs.Variable] = {}
    swaps: list[tuple[gs.Node, int, gs.Constant]] = []
    for g in all_graphs(graph):
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if not isinstance(t, gs.Constant):
                    continue
                if id(t) not in stand_in:
                    try:
                        big = np.dtype(t.dtype).kind == "f" and int(t._values.nbytes) >= 4096
                    except Exception:
                        big = False
                    if not big:
                        continue
                    stand_in[id(t)] = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))
                swaps.append((node, i, t))
    added: dict[str, onnx.ValueInfoProto] = {}
    try:
        for node, i, t in swaps:
            node.inputs[i] = stand_in[id(t)]
            if t.name not in added:
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
                added[t.name] = onnx.helper.make_tensor_value_info(t.name, elem, list(t.shape))
        model = gs.export_onnx(graph, do_type_check=False, opset_imports=imports)
    finally:
        for node, i, t in swaps:
            node.inputs[i] = t
    declared = {i.name for i in model.graph.input}
    model.graph.input.extend(vi for name, vi in added.items() if name not in declared)
    return model


#: contrib ops whose output shapes follow a standard op's rule: (domain, op) -> (standard op, inputs kept)
_STAND_INS = {("com.microsoft", "DynamicQuantizeLSTM"): ("LSTM", 7)}


def standard_stand_ins(g: onnx.GraphProto) -> None:
    """For inference only: contrib nodes whose shape rule is a standard op's become that op."""
    for node in g.node:
        sub = _STAND_INS.get((node.domain, node.op_type))
        if sub is not None:
            op, keep = sub
            node.op_type, node.domain = op, ""
            del node.input[keep:]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                standard_stand_ins(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sg in attr.graphs:
                    standard_stand_ins(sg)


def standalone_branch_model(
    m: onnx.ModelProto,
    g: onnx.GraphProto,
    template: onnx.ModelProto,
    consts: dict[str, onnx.TensorProto | onnx.ValueInfoProto],
    facts: Facts,
) -> None:
    """``m`` := the branch ``g`` as a model whose inputs are the outer values it reads."""
    reads = _outer_reads(g)
    inits, inputs = [], []
    for name in reads:
        t = consts.get(name)
        if isinstance(t, onnx.TensorProto):
            inits.append(t)
            continue
        if t is not None:
            inputs.append(t)
            continue
        fact = facts.get(name)
        if fact is None or fact.dtype is None:
            return  # an outer value of unknown type: no facts for this branch
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(fact.dtype)
        except Exception:
            return
        shape = None if fact.dims is None else [d if isinstance(d, int) else str(d) for d in fact.dims]
        inputs.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    sub = onnx.GraphProto()
    sub.CopyFrom(g)
    del sub.input[:]
    sub.input.extend(inputs)
    sub.initializer.extend(inits)
    m.ir_version = template.ir_version
    m.opset_import.extend(template.opset_import)
    m.graph.CopyFrom(sub)


def _outer_reads(g: onnx.GraphProto) -> list[str]:
    """Names ``g`` (and the subgraphs below it) read from enclosing scopes, in first-use order."""
    defined = {t.name for t in g.initializer} | {i.name for i in g.input}
    for node in g.node:
        defined.update(o for o in node.output if o)
    out: dict[str, None] = {}
    for node in g.node:
        for i in node.input:
            if i and i not in defined:
                out[i] = None
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for name in _outer_reads(sub):
                    if name not in defined:
                        out[name] = None
    return list(out)


def unique_input_symbols(g: onnx.GraphProto) -> None:
    """Every non-static main-graph input dim gets its own symbol (declared names are not evidence of equality)."""
    for idx, vi in enumerate(g.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.dim_param = f"in{idx}.{j}"


def weights_to_inputs(g: onnx.GraphProto, min_elements: int = 1024) -> None:
    """Large float initializers become typed graph inputs: shape inference needs only their shapes, and data
    propagation only small integer tensors, so the big bytes need not be serialised again."""
    keep, moved = [], []
    declared = {i.name for i in g.input}
    for t in g.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if n >= min_elements and t.data_type in FLOAT_TENSOR_TYPES and t.name not in declared:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if moved:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.input.extend(moved)


def strip_declared_shapes(g: onnx.GraphProto, main: bool) -> None:
    """Remove every declared shape of ``g`` and its subgraphs but the main graph's input dims (``main``); input
    dims of 0 / -1 there become symbols."""
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    for idx, vi in enumerate(g.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        if not main:
            vi.type.tensor_type.ClearField("shape")
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:  # -1 / 0 mean "unknown" in some exporters
                d.dim_param = f"__cleanup_dyn_{idx}_{j}"
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                strip_declared_shapes(attr.g, main=False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    strip_declared_shapes(sub, main=False)
