"""Symbolic values of small integer tensors for ``cleanup`` (nothing here rewrites the graph).

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
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import all_graphs

from .facts import Elem

if TYPE_CHECKING:  # pragma: no cover
    from .facts import Facts

log = logging.getLogger(__name__)



_INT_DTYPES = frozenset({np.dtype(np.int64), np.dtype(np.int32)})
#: integer tensors longer than this are not tracked symbolically
_MAX_SYM_LEN = 64


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
    """The symbolic value of ``t``: a small integer constant's values, else what ``sym_values`` found (or None)."""
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
