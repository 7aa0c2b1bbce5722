"""Computed shapes and symbolic shape values for ``cleanup`` (nothing here rewrites the graph).

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
without dims although its target is known element by element (below), those dims are given to onnx as value_info
and the main graph is inferred once more, with fresh symbol names so no equality carries over by accident.

**Symbolic values** (``sym_values``): small integer tensors (rank <= 1) computed from shapes -- ``Shape``, then
``Gather``/``Slice``/``Concat``/``Unsqueeze``/``Squeeze``/``Reshape``/``Cast``/``Identity`` and integer arithmetic --
are tracked element by element. An element is an ``int``, a dim symbol, or a tuple ``(op, a, b)`` built from them
(commutative operands sorted), so equal elements denote equal runtime values. A value whose elements are all
``int`` is a constant, whatever the runtime input (``Gather(Shape(state), 0)`` with ``state: [2, batch, 128]`` is
2). Casting a dim to int32 keeps its symbol: a tensor dim of 2**31 or more is assumed not to occur.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import all_graphs

log = logging.getLogger(__name__)

Elem = int | str | tuple

_FLOAT_TENSOR_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)
_INT_DTYPES = frozenset({np.dtype(np.int64), np.dtype(np.int32)})
#: outer constants at most this big are copied (with values) into a branch's standalone model
_SMALL_CONST = 4096
#: integer tensors longer than this are not tracked symbolically
_MAX_SYM_LEN = 64


@dataclass(frozen=True)
class Fact:
    """Computed facts about one value: dims (None: rank unknown) and dtype (None: unknown)."""

    dims: tuple[Elem, ...] | None
    dtype: np.dtype | None

    @property
    def static(self) -> tuple[int, ...] | None:
        if self.dims is None or not all(isinstance(d, int) for d in self.dims):
            return None
        return self.dims  # type: ignore[return-value]


@dataclass(frozen=True)
class SymVal:
    """A small integer tensor known element by element (``scalar``: rank 0, else rank 1)."""

    elems: tuple[Elem, ...]
    scalar: bool
    dtype: np.dtype

    @property
    def known(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)

    def array(self) -> np.ndarray:
        arr = np.array(self.elems, dtype=self.dtype)
        return arr.reshape(()) if self.scalar else arr


class Facts(dict):
    """name -> Fact; ``of(tensor)`` also answers for constants."""

    def of(self, t: gs.Tensor) -> Fact | None:
        if isinstance(t, gs.Constant):
            try:
                return Fact(tuple(int(d) for d in t.shape), np.dtype(t.dtype))
            except Exception:
                return None
        return self.get(t.name)


# ------------------------------------------------------------------------------------------------------- facts
def infer_facts(graph: gs.Graph, imports: list) -> Facts:
    """Computed facts for the main graph and every If branch below it (see the module docstring)."""
    facts = Facts()
    try:
        model = _export_without_weights(graph, imports)
    except Exception as exc:
        log.info("cleanup: cannot export for shape inference (%s)", str(exc).splitlines()[0][:200])
        return facts
    _strip_declared_shapes(model.graph, main=True)
    _unique_input_symbols(model.graph)
    _standard_stand_ins(model.graph)
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


def _export_without_weights(graph: gs.Graph, imports: list) -> onnx.ModelProto:
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


def _standard_stand_ins(g: onnx.GraphProto) -> None:
    """For inference only: contrib nodes whose shape rule is a standard op's become that op."""
    for node in g.node:
        sub = _STAND_INS.get((node.domain, node.op_type))
        if sub is not None:
            op, keep = sub
            node.op_type, node.domain = op, ""
            del node.input[keep:]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _standard_stand_ins(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sg in attr.graphs:
                    _standard_stand_ins(sg)


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
        _standalone(m, g, template, consts, facts)
        if not m.HasField("graph"):
            return
    _weights_to_inputs(m.graph)
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
        if n <= _SMALL_CONST or t.data_type not in _FLOAT_TENSOR_TYPES:
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


def _standalone(
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


def _unique_input_symbols(g: onnx.GraphProto) -> None:
    """Every non-static main-graph input dim gets its own symbol (declared names are not evidence of equality)."""
    for idx, vi in enumerate(g.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.dim_param = f"in{idx}.{j}"


def _weights_to_inputs(g: onnx.GraphProto, min_elements: int = 1024) -> None:
    """Large float initializers become typed graph inputs: shape inference needs only their shapes, and data
    propagation only small integer tensors, so the big bytes need not be serialised again."""
    keep, moved = [], []
    declared = {i.name for i in g.input}
    for t in g.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if n >= min_elements and t.data_type in _FLOAT_TENSOR_TYPES and t.name not in declared:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if moved:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.input.extend(moved)


def _strip_declared_shapes(g: onnx.GraphProto, main: bool) -> None:
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
                _strip_declared_shapes(attr.g, main=False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _strip_declared_shapes(sub, main=False)


# ---------------------------------------------------------------------------------------------- symbolic values
def const_ints(t: gs.Tensor) -> np.ndarray | None:
    """Values of a small integer Constant (rank <= 1), else None."""
    if not isinstance(t, gs.Constant):
        return None
    try:
        if np.dtype(t.dtype).kind not in "iu" or len(t.shape) > 1:
            return None
        arr = np.asarray(t.values)
    except Exception:
        return None
    if arr.size > _MAX_SYM_LEN:
        return None
    return arr


def sym_values(graph: gs.Graph, facts: Facts, main_only: bool = False) -> dict[str, SymVal]:
    """name -> SymVal for every small integer value computable from shapes and constants (all graphs)."""
    vals: dict[str, SymVal] = {}
    for g in [graph] if main_only else all_graphs(graph):
        for node in g.nodes:
            if (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if out.is_empty():
                continue
            try:
                res = _sym_node(node, vals, facts)
            except Exception as exc:  # a malformed node: no symbolic value
                log.debug("cleanup: no symbolic value for %s (%s): %s", node.name, node.op, exc)
                res = None
            if res is not None and len(res.elems) <= _MAX_SYM_LEN:
                vals[out.name] = res
    return vals


def sym_of(t: gs.Tensor, vals: dict[str, SymVal]) -> SymVal | None:
    arr = const_ints(t)
    if arr is not None:
        return SymVal(tuple(int(v) for v in arr.reshape(-1)), arr.ndim == 0, arr.dtype)
    if isinstance(t, gs.Constant) or t.is_empty():
        return None
    return vals.get(t.name)


def _ints(sv: SymVal | None) -> list[int] | None:
    if sv is None or not sv.known:
        return None
    return [int(e) for e in sv.elems]


def _sym_node(node: gs.Node, vals: dict[str, SymVal], facts: Facts) -> SymVal | None:
    op = node.op
    ins = node.inputs
    i64 = np.dtype(np.int64)
    if op == "Shape":
        fact = facts.of(ins[0])
        if fact is None or fact.dims is None:
            return None
        rank = len(fact.dims)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        end = rank if end is None else int(end)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return SymVal(tuple(fact.dims[start:end]), False, i64)
    if op == "Size":
        fact = facts.of(ins[0])
        if fact is None or fact.static is None:
            return None
        return SymVal((int(np.prod(fact.static, dtype=np.int64)),), True, i64)
    if op in ("Identity",):
        return sym_of(ins[0], vals)
    if op == "Cast":
        src = sym_of(ins[0], vals)
        to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        if src is None or to not in _INT_DTYPES:
            return None
        if to == np.dtype(np.int32) and src.known and any(abs(int(e)) >= 2**31 for e in src.elems):
            return None
        return SymVal(src.elems, src.scalar, to)
    if op == "Gather":
        data, idx = sym_of(ins[0], vals), _ints(sym_of(ins[1], vals))
        if data is None or data.scalar or idx is None or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        n = len(data.elems)
        if any(not -n <= i < n for i in idx):
            return None
        picked = tuple(data.elems[i] for i in idx)
        scalar = (const_ints(ins[1]) is not None and const_ints(ins[1]).ndim == 0) or (
            ins[1].name in vals and vals[ins[1].name].scalar
        )
        return SymVal(picked, bool(scalar), data.dtype)
    if op == "Slice":
        data = sym_of(ins[0], vals)
        if data is None or data.scalar:
            return None
        if len(ins) < 3 and "starts" in node.attrs:  # opset < 10: attributes
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs.get("axes", [0]))
            steps = [1]
        else:
            starts, ends = _ints(sym_of(ins[1], vals)), _ints(sym_of(ins[2], vals))
            axes = _ints(sym_of(ins[3], vals)) if len(ins) > 3 and not ins[3].is_empty() else [0]
            steps = _ints(sym_of(ins[4], vals)) if len(ins) > 4 and not ins[4].is_empty() else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or len(ends) != 1:
            return None
        if axes not in ([0], [-1]) or len(steps) != 1 or steps[0] == 0:
            return None
        n = len(data.elems)
        idx = range(*slice(starts[0], ends[0], steps[0]).indices(n))
        return SymVal(tuple(data.elems[i] for i in idx), False, data.dtype)
    if op == "Concat":
        parts = [sym_of(t, vals) for t in ins]
        if (
            not parts
            or any(p is None or p.scalar for p in parts)
            or int(node.attrs.get("axis", 0)) not in (0, -1)
        ):
            return None
        return SymVal(tuple(e for p in parts for e in p.elems), False, parts[0].dtype)
    if op == "Unsqueeze":
        src = sym_of(ins[0], vals)
        axes = (
            list(node.attrs["axes"])
            if "axes" in node.attrs
            else (_ints(sym_of(ins[1], vals)) if len(ins) > 1 else None)
        )
        if src is None or not src.scalar or axes not in ([0], [-1]):
            return None
        return SymVal(src.elems, False, src.dtype)
    if op == "Squeeze":
        src = sym_of(ins[0], vals)
        axes = (
            list(node.attrs["axes"])
            if "axes" in node.attrs
            else (_ints(sym_of(ins[1], vals)) if len(ins) > 1 and not ins[1].is_empty() else [0])
        )
        if src is None or src.scalar or len(src.elems) != 1 or axes not in ([0], [-1]):
            return None
        return SymVal(src.elems, True, src.dtype)
    if op == "Reshape":
        src, shape = sym_of(ins[0], vals), _ints(sym_of(ins[1], vals))
        if src is None or shape is None:
            return None
        if shape == [] and len(src.elems) == 1:
            return SymVal(src.elems, True, src.dtype)
        if len(shape) == 1 and shape[0] in (-1, len(src.elems)):
            return SymVal(src.elems, False, src.dtype)
        return None
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        a, b = sym_of(ins[0], vals), sym_of(ins[1], vals)
        if a is None or b is None or a.dtype != b.dtype:
            return None
        la, lb = len(a.elems), len(b.elems)
        if la != lb and 1 not in (la, lb):
            return None
        n = max(la, lb)
        ea = a.elems * n if la == 1 else a.elems
        eb = b.elems * n if lb == 1 else b.elems
        out = tuple(_arith(op, x, y) for x, y in zip(ea, eb, strict=True))
        if any(e is None for e in out):
            return None
        scalar = a.scalar and b.scalar
        if scalar and n != 1:
            return None
        return SymVal(out, scalar, a.dtype)
    return None


_COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min"})


def _arith(op: str, x: Elem, y: Elem) -> Elem | None:
    if isinstance(x, int) and isinstance(y, int):
        if op == "Add":
            return x + y
        if op == "Sub":
            return x - y
        if op == "Mul":
            return x * y
        if op == "Div":
            if y == 0:
                return None
            q = abs(x) // abs(y)  # integer Div truncates toward zero
            return q if (x >= 0) == (y >= 0) else -q
        return max(x, y) if op == "Max" else min(x, y)
    if op == "Mul" and (x == 1 or y == 1):
        return y if x == 1 else x
    if op in ("Add", "Sub") and y == 0:
        return x
    if op == "Add" and x == 0:
        return y
    if op == "Div" and y == 1:
        return x
    if op in _COMMUTATIVE:
        x, y = sorted((x, y), key=repr)
    return (op, x, y)


def dims_equal(a: Elem, b: Elem) -> bool:
    """Provably equal sizes (same int, or the same symbol/expression)."""
    return a == b
