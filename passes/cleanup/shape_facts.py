"""Computed shapes for ``cleanup`` (nothing here rewrites the graph).

**Facts** (``infer_facts``): for every value of the main graph and of every ``If`` branch, the dtype and the dims as
*computed* by onnx shape inference with data propagation, never as declared. Before inference every declared
value_info, graph-output shape and subgraph I/O shape is stripped (they can be wrong: ddddocr declares [1, seqlen]
for a [T, 1, C] output). What is trusted:

* a graph input's positive static dims (onnxruntime checks them on every run);
* constants;
* onnx's shape-inference rules.

A dim is an ``int`` (static, > 0) or a *symbol* (``str``). Two equal symbols denote provably equal sizes: every
graph-input dim gets its own symbol (``in<i>.<axis>``, so two inputs both declared ``batch`` are *not* assumed
equal), symbols onnx invents are prefixed with the inference they came from, and a dim onnx leaves blank gets a
symbol unique to that value and axis. Each ``If`` branch is inferred as a standalone model whose inputs are the
outer values it reads, typed with the outer facts (small outer constants keep their values, so data propagation
sees them); Loop/Scan bodies get no facts (their carried values may change shape between iterations). Two aids,
both computed rather than declared: a contrib op whose output dims follow a standard op's rule is inferred as that
op (``com.microsoft`` DynamicQuantizeLSTM as LSTM), and where onnx leaves a Reshape/Expand/ConstantOfShape result
without dims although its target is known element by element (``symbolic_values``), those dims are given to onnx as value_info
and the main graph is inferred once more, with fresh symbol names so no equality carries over by accident.

The models given to onnx are built by ``inference_models``; symbolic values (``symbolic_values``) are what
proves the Reshape/Expand dims above. ``RoundFacts`` holds both for one round of rewrites.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .facts import Elem, Fact, Facts
from .inference_models import (
    FLOAT_TENSOR_TYPES,
    export_without_weights,
    standalone_branch_model,
    standard_stand_ins,
    strip_declared_shapes,
    unique_input_symbols,
    weights_to_inputs,
)
from .symbolic_values import SymVal, sym_of, sym_values

log = logging.getLogger(__name__)


#: outer constants at most this big are copied (with values) into a branch's standalone model
_SMALL_CONST = 4096


class RoundFacts:
    """The computed facts and symbolic values of the graph at the start of one cleanup round (valid by name: the
    rewrites of a round replace values by equal ones)."""

    def __init__(self, graph: gs.Graph, imports: list) -> None:
        self.facts: Facts = infer_facts(graph, imports)
        self.sym: dict[str, SymVal] = sym_values(graph, self.facts)


def infer_facts(graph: gs.Graph, imports: list) -> Facts:
    """Computed facts for the main graph and every If branch below it (see the module docstring)."""
    facts = Facts()
    try:
        model = export_without_weights(graph, imports)
    except Exception as exc:
        log.info("cleanup: cannot export for shape inference (%s)", str(exc).splitlines()[0][:200])
        return facts
    strip_declared_shapes(model.graph, main=True)
    unique_input_symbols(model.graph)
    standard_stand_ins(model.graph)
    known: set[str] = set()
    _infer_one(model.graph, model, imports, {}, facts, "m", known, recurse=False)
    extra = _refined_value_infos(graph, facts, sym_values(graph, facts, main_only=True))
    if extra:
        # onnx leaves some computed Reshape/Expand/ConstantOfShape results without dims (a target mixing known
        # and symbolic elements); give it the dims our symbolic values prove and infer once more
        for vi in extra:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    known.add(d.dim_param)
        model.graph.value_info.extend(extra)
        facts.clear()
        _infer_one(model.graph, model, imports, {}, facts, "m2", known, recurse=True)
    else:
        _recurse_branches(model.graph, model, imports, {}, facts, "m", known)
    return facts


def _refined_value_infos(graph: gs.Graph, facts: Facts, vals: dict[str, SymVal]) -> list[onnx.ValueInfoProto]:
    """value_info for main-graph Reshape/Expand/ConstantOfShape outputs whose dims the symbolic values give
    better than onnx did."""
    out = []
    for node in graph.nodes:
        if node.op not in ("Reshape", "Expand", "ConstantOfShape") or (node.domain or "") not in (
            "",
            "ai.onnx",
        ):
            continue
        if len(node.outputs) != 1 or node.outputs[0].is_empty():
            continue
        y = node.outputs[0]
        have = facts.get(y.name)
        if have is None or have.dtype is None:
            continue
        shape_t = (
            node.inputs[0]
            if node.op == "ConstantOfShape"
            else (node.inputs[1] if len(node.inputs) > 1 else None)
        )
        sv = sym_of(shape_t, vals) if shape_t is not None else None
        if sv is None or sv.scalar:
            continue
        fx = facts.of(node.inputs[0]) if node.op != "ConstantOfShape" else None
        xdims = fx.dims if fx is not None else None
        dims = _target_dims(node, list(sv.elems), xdims)
        if dims is None or not _better(dims, have.dims):
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(have.dtype)
        shape = [d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in dims]
        vi = onnx.helper.make_tensor_value_info(y.name, elem, shape)
        for d, want in zip(vi.type.tensor_type.shape.dim, shape, strict=True):
            if want is None:
                d.Clear()
        out.append(vi)
    return out


def _target_dims(node: gs.Node, elems: list, xdims: tuple | None) -> list | None:
    """Output dims of Reshape/Expand/ConstantOfShape with target ``elems`` (None entries: unknown)."""
    if node.op == "ConstantOfShape":
        return [e if not isinstance(e, tuple) else None for e in elems]
    if node.op == "Expand":
        if xdims is None:
            return None
        r = max(len(xdims), len(elems))
        xs = [1] * (r - len(xdims)) + list(xdims)
        ts = [1] * (r - len(elems)) + list(elems)
        dims = []
        for a, b in zip(xs, ts, strict=True):
            if b == 1:
                dims.append(a)
            elif a == 1 or a == b:
                dims.append(b)
            else:
                dims.append(None)
        return [d if not isinstance(d, tuple) else None for d in dims]
    allowzero = int(node.attrs.get("allowzero", 0))
    dims = []
    for i, e in enumerate(elems):
        if isinstance(e, int) and e == 0 and allowzero == 0:
            dims.append(xdims[i] if xdims is not None and i < len(xdims) else None)
        elif isinstance(e, int) and e < 0:
            dims.append(None)
        else:
            dims.append(e)
    return [d if not isinstance(d, tuple) else None for d in dims]


def _better(ours: list, theirs: tuple | None) -> bool:
    if theirs is None:
        return True
    if len(theirs) != len(ours):
        return False
    for a, b in zip(ours, theirs, strict=True):
        if a is None or a == b:
            continue
        if isinstance(a, int) and not isinstance(b, int):
            return True
        if isinstance(a, str) and isinstance(b, str) and b.startswith("?"):
            return True
    return False


def _infer_one(
    g: onnx.GraphProto,
    template: onnx.ModelProto,
    imports: list,
    consts: dict[str, onnx.TensorProto | onnx.ValueInfoProto],
    facts: Facts,
    tag: str,
    known_syms: set[str],
    recurse: bool = True,
) -> None:
    if g is template.graph:
        m = template  # ours (a fresh export): modified in place
    else:
        m = onnx.ModelProto()
        standalone_branch_model(m, g, template, consts, facts)
        if not m.HasField("graph"):
            return
    weights_to_inputs(m.graph)
    for vi in m.graph.input:
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    known_syms.add(d.dim_param)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        log.info("cleanup: shape inference failed for %s (%s)", tag, str(exc).splitlines()[0][:200])
        return
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name in facts and g is not template.graph:
            continue  # an outer value read by the branch: the outer facts stand
        fact = _fact_of(vi, tag, known_syms)
        if fact is not None:
            facts[vi.name] = fact
    if recurse:
        _recurse_branches(g, template, imports, consts, facts, tag, known_syms)


def _recurse_branches(
    g: onnx.GraphProto,
    template: onnx.ModelProto,
    imports: list,
    consts: dict[str, onnx.TensorProto | onnx.ValueInfoProto],
    facts: Facts,
    tag: str,
    known_syms: set[str],
) -> None:
    inner_consts = dict(consts)
    for t in g.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if n <= _SMALL_CONST or t.data_type not in FLOAT_TENSOR_TYPES:
            inner_consts[t.name] = copy = onnx.TensorProto()
            copy.CopyFrom(t)
        else:
            inner_consts[t.name] = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    k = 0
    for node in g.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                k += 1
                _infer_one(attr.g, template, imports, inner_consts, facts, f"{tag}/{k}", known_syms)


def _fact_of(vi: onnx.ValueInfoProto, tag: str, known_syms: set[str]) -> Fact | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    dtype = None
    if tt.elem_type:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = None
    if not tt.HasField("shape"):
        return Fact(None, dtype)
    dims: list[Elem] = []
    for j, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            p = d.dim_param
            dims.append(p if p in known_syms else f"{tag}:{p}")
        else:
            dims.append(f"?{vi.name}:{j}")
    return Fact(tuple(dims), dtype)
