"""The channel-group walk: state, primitives and the dispatch loop that the op-family rules build on.

The walk visits nodes in topological order (Kahn). Per node it maps the inputs' layouts to the outputs' layouts and
records *unions* (element pairs that must go together), *blocks* (elements that can never go, with a reason) and
edits. Unions are stored as edge arrays ``(a, b)`` (broadcast element arrays compared position by position, equal
pairs dropped) and resolved later by ``connected_components``.

Shared rules used by several op families:

- ``join``: several layouts mapped onto one set of target axes S (the union of their axes) are broadcast over S and
  unioned position by position (residual adds, the virtual product of a MatMul, Concat along a free axis).
- ``contract``: summing over axes R of a layout unions, for every index of the kept axes, all elements along R;
  the result keeps only the non-reduced axes (ReduceSum, the K axis of MatMul(activation, activation)).
- ``const``: the value of a constant, or of a short chain of shape ops (Identity/Cast/Reshape/Squeeze/Unsqueeze/
  Flatten/Transpose) over a constant, which is folded once and remembered (``folded``) so edits can slice it.

An op the rules raise ``Blocked`` for (or that fails with an ordinary error) blocks every channel reaching it and
leaves its outputs without layouts; ops in foreign domains block likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups import edits as rec
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout, expand

log = logging.getLogger("onnxcompress.analyses.channel_groups")

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf", "Exp",
    "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Cast",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh",
    "Atanh", "Not", "IsNaN", "IsInf", "ThresholdedRelu", "Shrink", "CastLike", "Swish",
})  # fmt: skip
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Where", "Clip", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})  # fmt: skip
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
SUM_REDUCTIONS = frozenset({"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
OTHER_REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FOLDABLE = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})


class Blocked(Exception):
    """Raised by an op rule: the channels reaching this node can never be removed (the message is the reason)."""


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` when it is a constant (no folding through ops; see ``WalkerBase.const`` for that)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def present(node: gs.Node, i: int) -> bool:
    """Whether ``node`` has input ``i`` (an optional input left empty counts as absent)."""
    return len(node.inputs) > i and node.inputs[i].name != ""


def toposort(graph: gs.Graph) -> list[gs.Node]:
    """Kahn's algorithm over the main graph (node order of the file breaks ties); O(nodes + edges)."""
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    indeg = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        seen = set()
        for t in n.inputs:
            for p in t.inputs:
                j = index.get(id(p))
                if j is not None and j not in seen:
                    seen.add(j)
                    users[j].append(i)
                    indeg[i] += 1
    ready = [i for i in range(len(nodes)) if indeg[i] == 0]
    ready.reverse()
    order = []
    while ready:
        i = ready.pop()
        order.append(nodes[i])
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):  # a cycle (invalid graph): fall back to file order
        return nodes
    return order


class WalkerBase:
    """State of one walk and the primitives every op rule uses; ``op_<Type>`` methods come from the rule mixins."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[int]]):
        self.graph = graph
        self.shapes = shapes
        self.opset = graph.opset or 13
        self.sizes: list[int] = []
        self.alloc_owner: list[str] = []
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.layouts: dict[str, Layout] = {}
        self.slices: list[rec.ConstSlice] = []
        self.shape_edits: list[rec.ShapeEdit] = []
        self.range_edits: list[rec.RangeEdit] = []
        self.split_edits: list[rec.SplitEdit] = []
        self.group_edits: list[rec.GroupAttrEdit] = []
        self.mac_terms: list[rec.MacTerm] = []
        self.total_macs = 0
        self.producer_blocks: set[int] = set()
        self.folded: dict[str, np.ndarray] = {}
        self.ties: list[tuple[AxisSpec, AxisSpec, str]] = []
        self.n = 0

    # ------------------------------------------------------------------------------------------ primitives
    def fresh(self, size: int, owner: str, producer: bool = True) -> np.ndarray:
        el = np.arange(self.n, self.n + size, dtype=np.int64)
        if producer:
            self.producer_blocks.add(len(self.sizes))
        self.sizes.append(size)
        self.alloc_owner.append(owner)
        self.n += size
        return el

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        diff = a != b
        if diff.any():
            self.edges_a.append(a[diff])
            self.edges_b.append(b[diff])

    def block(self, el: np.ndarray, reason: str) -> None:
        self.blocks.append((np.unique(el), reason))

    def shape(self, t: gs.Tensor) -> list[int] | None:
        if isinstance(t, gs.Constant):
            return list(np.asarray(t.values).shape)
        return self.shapes.get(t.name)

    def const(self, t: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        """The value of a constant, or of a small chain of shape ops over constants (Reshape(bias, [1,C,1,1]))."""
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if not t.name or not t.inputs or depth > 6:
            return None
        if t.name in self.folded:
            return self.folded[t.name]
        p = t.inputs[0]
        if p.op not in _FOLDABLE or len(p.outputs) != 1:
            return None
        vals = [self.const(x, depth + 1) if x.name else None for x in p.inputs]
        x = vals[0]
        if x is None:
            return None
        try:
            if p.op in ("Identity", "Cast"):
                out = x if p.op == "Identity" else x.astype(onnx.helper.tensor_dtype_to_np_dtype(p.attrs["to"]))
            elif p.op == "Transpose":
                out = np.transpose(x, p.attrs.get("perm"))
            else:  # Reshape, Unsqueeze, Squeeze, Flatten: the output shape says it all
                shp = self.shape(p.outputs[0])
                if shp is None:
                    return None
                out = x.reshape(shp)
        except (ValueError, KeyError, TypeError):
            return None
        self.folded[t.name] = out
        return out

    def input_const(self, node: gs.Node, i: int) -> np.ndarray | None:
        """``const`` of input ``i``; None when the input is absent."""
        return self.const(node.inputs[i]) if present(node, i) else None

    def const_vector(self, node: gs.Node, i: int, reason: str) -> np.ndarray:
        """Input ``i`` as a flat constant; blocks with ``reason`` when it is absent or not a (folded) constant."""
        c = self.input_const(node, i)
        if c is None:
            raise Blocked(reason)
        return c.reshape(-1)

    def lay(self, t: gs.Tensor) -> Layout | None:
        return self.layouts.get(t.name) if t.name else None

    def set(self, t: gs.Tensor, lay: Layout | None) -> None:
        if lay is not None and t.name:
            self.layouts[t.name] = lay

    def data_input(self, node: gs.Node) -> tuple[Layout, list[int]] | None:
        """Layout and shape of input 0; None when it carries no channels; blocks when its shape is unknown."""
        lay = self.lay(node.inputs[0])
        if lay is None:
            return None
        shp = self.shape(node.inputs[0])
        if shp is None:
            raise Blocked(f"{node.op}: input shape unknown")
        return lay, shp

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            lay = self.lay(t)
            if lay is not None:
                self.block(lay.el, reason)

    def attr(self, node: gs.Node, name: str, default: Any = None) -> Any:
        return node.attrs.get(name, default)

    def macs(self, node: gs.Node, factors: list[np.ndarray]) -> None:
        m = self.node_macs(node)
        if factors and m:
            self.mac_terms.append(rec.MacTerm(node, m, factors))

    def node_macs(self, node: gs.Node) -> int:
        op = node.op
        try:
            if op == "Conv":
                y, w = self.shape(node.outputs[0]), self.shape(node.inputs[1])
                return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
            if op == "ConvTranspose":
                x, w = self.shape(node.inputs[0]), self.shape(node.inputs[1])
                return int(np.prod(x, dtype=np.int64) * w[1] * np.prod(w[2:], dtype=np.int64))
            if op == "Gemm":
                a, y = self.shape(node.inputs[0]), self.shape(node.outputs[0])
                k = a[0] if self.attr(node, "transA", 0) else a[-1]
                return int(np.prod(y, dtype=np.int64) * k)
            if op == "MatMul":
                a, y = self.shape(node.inputs[0]), self.shape(node.outputs[0])
                return int(np.prod(y, dtype=np.int64) * a[-1])
        except (TypeError, IndexError):
            return 0
        return 0

    # ------------------------------------------------------------------------------------------ shared rules
    def place(self, lay: Layout, shp: list[int], to: Callable[[int], int], dims: Sequence[int] | dict, reason: str
              ) -> Layout | None:
        """``lay`` (of an input with shape ``shp``) on target axes ``to(axis)``; blocks with ``reason`` (and gives
        None) when a channel axis is broadcast, i.e. its extent differs from the target's ``dims``."""
        axes = tuple(to(a) for a in lay.axes)
        if any(shp[a] != dims[z] for a, z in zip(lay.axes, axes, strict=True)):
            self.block(lay.el, reason)
            return None
        return Layout(axes, lay.el)

    def join(self, mapped: list[Layout], dims: Sequence[int] | dict) -> Layout:
        """Layouts on a common frame broadcast over the union of their axes and unioned position by position."""
        s = tuple(sorted(set().union(*[m.axes for m in mapped])))
        base = expand(mapped[0].el, mapped[0].axes, s, dims)
        for m in mapped[1:]:
            self.union(base, expand(m.el, m.axes, s, dims))
        return Layout(s, np.ascontiguousarray(base))

    def contract(self, lay: Layout, red: set[int]) -> Layout | None:
        """Sum over ``red``: elements along a reduced axis merge when the layout keeps other axes."""
        hit = [a for a in lay.axes if a in red]
        if not hit:
            return lay
        rest = [a for a in lay.axes if a not in red]
        if not rest:
            return None
        rest_pos = [lay.axes.index(a) for a in rest]
        hit_pos = [lay.axes.index(a) for a in hit]
        arr = np.transpose(lay.el, rest_pos + hit_pos)
        rows = arr.reshape(int(np.prod(arr.shape[: len(rest)])), -1)
        self.union(rows[:, :1], rows)
        return Layout(tuple(rest), np.ascontiguousarray(rows[:, 0].reshape(arr.shape[: len(rest)])))

    # ------------------------------------------------------------------------------------------ the walk
    def dispatch(self, node: gs.Node, has_layout: bool) -> None:
        op = node.op
        handler: Callable[[gs.Node], None] | None = getattr(self, f"op_{op}", None)
        if node.domain not in (None, "", "ai.onnx"):
            if has_layout:
                self.block_inputs(node, f"{op} ({node.domain}) not understood")
        elif handler is not None:
            handler(node)
        elif op in UNARY_OPS:
            self.op_unary(node)
        elif op in BROADCAST_OPS:
            self.op_broadcast(node)
        elif op in POOL_OPS:
            self.op_pool(node)
        elif op in SUM_REDUCTIONS or op in OTHER_REDUCTIONS:
            self.op_reduce(node)
        elif op not in SHAPE_ONLY_OPS and has_layout:
            self.block_inputs(node, f"{op} not understood")

    def give_up(self, node: gs.Node, reason: str) -> None:
        """Block every channel reaching ``node``; its outputs carry none."""
        self.block_inputs(node, reason)
        for t in node.outputs:
            self.layouts.pop(t.name, None)

    def run(self) -> None:
        for node in toposort(self.graph):
            op = node.op
            has_layout = any(self.lay(t) is not None for t in node.inputs)
            if op in WEIGHTED_OPS:
                self.total_macs += self.node_macs(node)
            try:
                self.dispatch(node, has_layout)
            except Blocked as exc:
                self.give_up(node, str(exc))
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                log.debug("channel groups: %s %s: %s", op, node.name, exc)
                self.give_up(node, f"{op} could not be analysed ({type(exc).__name__})")
        main_ids = {id(n) for n in self.graph.nodes}
        for t in self.graph.outputs:
            lay = self.lay(t)
            if lay is not None:
                self.block(lay.el, f"reaches graph output {t.name}")
        tensors = self.graph.tensors()
        for name, lay in self.layouts.items():
            t = tensors.get(name)
            if t is not None and any(id(c) not in main_ids for c in t.outputs):
                self.block(lay.el, f"{name} is read inside a subgraph")

    # implemented by the rule mixins
    op_unary: Callable[[gs.Node], None]
    op_broadcast: Callable[[gs.Node], None]
    op_pool: Callable[[gs.Node], None]
    op_reduce: Callable[[gs.Node], None]
