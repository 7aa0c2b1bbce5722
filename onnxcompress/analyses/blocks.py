"""Removable units: the parts of a graph that can be bypassed as a whole (``prune-layers``; ``onnxcompress inspect``).

A unit is a pair of tensors (entry x, exit y) of equal shape and type with x upstream of y; *bypassing* it makes
every consumer of y read x (y := x), and the unit's nodes are the ones that die then (``blocks_graph``: local dead
propagation, O(unit) each). Kinds, each found by one linear walk over the main graph in topological order:

- ``residual``: y = Add(x, b) where x feeds the branch b (some consumer of x dies with the bypass) and x, b, y have
  the same static shape (no broadcast): y := x is the skip path exactly (ResNet, MobileNetV2/V3 inverted residuals,
  YOLOv8 C2f bottlenecks with shortcut, SVTR/ViT blocks). Role ``attention`` when the branch holds a Softmax or a
  MatMul of two activations, ``ffn`` when it holds >= 2 weighted MatMul/Gemm/Conv and no attention, else ``block``
  (which needs one weighted op: a branch of elementwise ops alone is part of an activation, tanh-GELU's
  x + 0.044715 x^3, whose bypass removes no layer and no MACs).
  An Add of two activations that is neither is listed as not removable with the reason (broadcast or a projection
  shortcut: no identity skip; parallel branches: no operand feeds the other).
- ``transformer``: an attention residual A followed by an FFN residual F whose entry is A's exit, directly (pre-LN:
  h' = h + Attn(LN(h)), F's entry = h') or through a normalisation tail (post-LN, BERT: h' = LN(h + Attn(h)); the
  tail is a LayerNormalization or its decomposed form ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, found as the first tensor
  where all paths from A's exit meet again). The layer is (A's entry, F's exit or the tensor after F's
  normalisation tail): the whole layer between two hidden states is bypassed. Its A and F are then listed as kinds
  ``attention`` and ``ffn`` (sub-block units, each a valid bypass too: pre-LN h' := h; post-LN
  LN(h + Attn(h)) -> LN(h)).
- ``stage``: a layer of a plain chain: from the input of a weighted op (Conv/ConvTranspose/Gemm/MatMul with a
  constant weight) through the single-entry single-exit hops after it (BN, activations, x * sigmoid(x), pooling
  ...) towards the input of the next weighted op, a graph output or a fork; the exit is the last tensor of that walk
  with the entry's shape. Nothing in between may be read from outside (a projection whose output meets another
  activation, like attention's Q, is not a layer of a chain), and a stage holds no residual unit.
- ``noop``: layers that return their input, proved by value (``blocks_noops``); exact.

Anything else is not removable; candidates that looked like a unit but fail a rule are listed with the reason.
Nodes inside If/Loop/Scan bodies are not analysed (a tensor read there keeps its producer alive).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.blocks_graph import GraphIndex
from onnxcompress.analyses.blocks_noops import find_noops
from onnxcompress.analyses.channel_groups import toposort
from onnxcompress.context import PassContext

log = logging.getLogger(__name__)

KINDS = ("residual", "transformer", "attention", "ffn", "stage", "noop")
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Sub", "Pow", "Add", "Sqrt",
                      "Div", "Mul", "Cast", "Reciprocal"})
#: nodes a local convergence walk (normalisation tail, stage hop) may cover
HOP_LIMIT = 16


@dataclass
class Unit:
    id: int
    kind: str  # residual | transformer | attention | ffn | stage | noop
    role: str  # attention / ffn / block (residual); pre-LN / post-LN (transformer); the rule (noop); "" (stage)
    entry: str  # x: the tensor consumers of ``exit`` read after the bypass
    exit: str  # y
    nodes: list[str]  # nodes removed with the unit
    ops: dict[str, int]  # op type -> count among them
    params: int  # weight elements only the unit's nodes read
    reason: str  # why it can go
    parent: int | None = None  # the transformer layer a sub-block belongs to
    exact: bool = False  # bypassing it leaves the outputs unchanged (noop)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removable"] = True
        return d


@dataclass
class RemovableUnits:
    units: list[Unit]
    rejected: list[dict[str, str]] = field(default_factory=list)  # candidates that fail a rule: where, kind, reason
    nodes: int = 0

    def of_kinds(self, kinds: tuple[str, ...] | list[str]) -> list[Unit]:
        return [u for u in self.units if u.kind in kinds]

    def by_key(self) -> dict[tuple[str, str, str], Unit]:
        return {(u.kind, u.entry, u.exit): u for u in self.units}


# ------------------------------------------------------------------------------------------------ detection
def find_units(graph: gs.Graph, shapes: dict[str, list[int]], dtypes: dict[str, int] | None = None) -> RemovableUnits:
    """Every removable unit of ``graph`` at the given static shapes (and element types, for the Cast rule)."""
    ix = GraphIndex(graph, toposort(graph))
    dtypes = dtypes or {}
    found: list[Unit] = []
    rejected: list[dict[str, str]] = []
    residuals = _residuals(ix, shapes, found, rejected)
    _transformers(ix, shapes, residuals, found, rejected)
    seen = {(u.entry, u.exit) for u in found}
    for rule, x, y in find_noops(ix, shapes, dtypes, static=_static_inputs(graph)):
        if (x, y) not in seen:
            u = _unit(ix, "noop", rule, x, y, f"{rule}: returns its input exactly")
            if u is not None:
                u.exact = True
                found.append(u)
                seen.add((x, y))
    residual_exits = {ix.producer[u.exit] for u in residuals}
    for x, y in _stages(ix, shapes):
        if (x, y) in seen:
            continue
        u = _unit(ix, "stage", "", x, y, "a chain layer whose input and output shapes match")
        if u is not None and not residual_exits.intersection(ix.index[id(n)] for n in _nodes(ix, u)):
            found.append(u)
            seen.add((x, y))
    if any(True for n in ix.nodes for _ in n.subgraphs()):
        rejected.append({"where": "subgraphs", "kind": "any", "reason": "nodes inside If/Loop/Scan bodies are not "
                                                                         "analysed"})
    found.sort(key=lambda u: (ix.producer.get(u.exit, -1), KINDS.index(u.kind)))
    old_to_new = {id(u): k for k, u in enumerate(found)}
    parents = {u.id: old_to_new[id(u)] for u in found}
    for k, u in enumerate(found):
        u.id = k
    for u in found:
        if u.parent is not None:
            u.parent = parents.get(u.parent)
    return RemovableUnits(found, rejected, len(ix.nodes))


def _static_inputs(graph: gs.Graph) -> bool:
    """Whether every graph input has a fully static shape (then the analysed shapes are the only shapes)."""
    return all(t.shape is not None and all(isinstance(d, int) and d > 0 for d in t.shape) for t in graph.inputs)


def _nodes(ix: GraphIndex, u: Unit) -> list[gs.Node]:
    """The unit's nodes, found again by index (``Unit.nodes`` holds names, and unnamed nodes all share "": matched
    by name, every unnamed node of the graph counted as the unit's)."""
    return [ix.nodes[i] for i in ix.dead_set(u.exit, u.entry) or []]


def _unit(ix: GraphIndex, kind: str, role: str, x: str, y: str, reason: str,
          dead: list[int] | None = None) -> Unit | None:
    dead = dead if dead is not None else ix.dead_set(y, x)
    if not dead:
        return None
    dset = set(dead)
    ops: dict[str, int] = {}
    params = 0
    seen: set[int] = set()
    for i in dead:
        n = ix.nodes[i]
        ops[n.op] = ops.get(n.op, 0) + 1
        for t in n.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                if all(ix.index.get(id(c)) in dset for c in t.outputs):
                    params += int(t.values.size)
    return Unit(-1, kind, role, x, y, [ix.nodes[i].name for i in dead], ops, params, reason)


def _same(shapes: dict[str, list[int]], *names: str) -> bool:
    first = shapes.get(names[0])
    return first is not None and all(isinstance(d, int) and d > 0 for d in first) and all(
        shapes.get(n) == first for n in names[1:])


def _residuals(ix: GraphIndex, shapes: dict[str, list[int]], found: list[Unit],
               rejected: list[dict[str, str]]) -> list[Unit]:
    out = []
    for i, node in enumerate(ix.nodes):
        if node.op != "Add" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        a, b = node.inputs
        if not (isinstance(a, gs.Variable) and isinstance(b, gs.Variable)) or a is b:
            continue
        y = node.outputs[0].name
        if a.name not in ix.producer and b.name not in ix.producer:
            continue
        if not _same(shapes, a.name, b.name, y):
            if a.name in ix.producer and b.name in ix.producer and ix.producer.get(a.name) != ix.producer.get(b.name):
                rejected.append({"where": y, "kind": "residual", "reason": "operands differ in shape (broadcast or "
                                                                          "projection shortcut: no identity skip)"})
            continue
        unit = None
        for x, br in ((a, b), (b, a)):
            px, pb = ix.producer.get(x.name, -1), ix.producer.get(br.name, -1)
            if pb <= px:
                continue
            dead = ix.dead_set(y, x.name)
            if dead is None:
                continue
            dset = set(dead)
            if any(c in dset for c in ix.consumers(x.name) if c != i):
                unit = _unit(ix, "residual", "", x.name, y, "y = x + f(x): bypass to the skip input", dead)
                break
        if unit is None:
            rejected.append({"where": y, "kind": "residual", "reason": "no operand feeds the other (parallel "
                                                                      "branches: no skip path)"})
            continue
        unit.role = _role(unit.ops, ix, unit)
        if unit.role == "block" and not any(_weighted(n) for n in _nodes(ix, unit)):
            rejected.append({"where": y, "kind": "residual", "reason": "the branch holds no layer (no weighted op, no "
                                                                      "attention): part of an activation such as "
                                                                      "tanh-GELU's x + 0.044715 x^3"})
            continue
        unit.reason = f"y = x + f(x), f = {unit.role}: bypass to the skip input"
        out.append(unit)
        found.append(unit)
    return out


def _role(ops: dict[str, int], ix: GraphIndex, u: Unit) -> str:
    nodes = _nodes(ix, u)
    if "Softmax" in ops or any(n.op == "MatMul" and all(isinstance(t, gs.Variable) for t in n.inputs[:2])
                               for n in nodes):
        return "attention"
    weighted = sum(1 for n in nodes if n.op in WEIGHTED and len(n.inputs) > 1 and isinstance(n.inputs[1],
                                                                                               gs.Constant))
    return "ffn" if weighted >= 2 and ops.get("Conv", 0) == 0 else "block"


def converge(ix: GraphIndex, start: str, allowed: frozenset[str] | None = None, limit: int = HOP_LIMIT,
             last: bool = False) -> tuple[str, list[int]] | None:
    """The first tensor z after ``start`` where every path from it meets again (a local post-dominator), with the
    nodes between; every node covered reads only ``start``, tensors produced inside, and constants. ``allowed``:
    the op types the walk may cover. None when there is no such z within ``limit`` nodes. ``last``: walk on while
    the rules hold and return the last such z (a decomposed LayerNorm meets again after its Sub, and at its end)."""
    if start in ix.graph_outputs:
        return None
    t0 = ix.tensors.get(start)
    if t0 is None or not t0.outputs or any(id(c) not in ix.index for c in t0.outputs):
        return None
    produced = {start}
    pending: dict[str, int] = {start: len(t0.outputs)}  # live tensor -> consumer edges not yet covered
    heap = sorted({ix.index[id(c)] for c in t0.outputs})
    covered: list[int] = []
    queued = set(heap)
    best: tuple[str, list[int]] | None = None
    while heap and len(covered) < limit:
        i = heapq.heappop(heap)
        n = ix.nodes[i]
        if (allowed is not None and n.op not in allowed) or any(True for _ in n.subgraphs()):
            return best
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name not in produced:
                return best
        for t in n.inputs:
            if t.name in pending:  # graph outputs keep one pending edge: a walk never passes them
                pending[t.name] -= 1
                if pending[t.name] == 0:
                    del pending[t.name]
        covered.append(i)
        for t in n.outputs:
            users = list(t.outputs)
            out = t.name in ix.graph_outputs  # a graph output is a valid meeting point, never covered past
            if not users and not out:
                continue
            if any(id(c) not in ix.index for c in users):
                return best
            produced.add(t.name)
            pending[t.name] = len(users) + (1 if out else 0)
        if len(pending) == 1 and start not in pending:  # every path from start meets here
            best = next(iter(pending)), list(covered)
            if not last:
                return best
        for t in n.outputs:
            for c in t.outputs:
                j = ix.index[id(c)]
                if j not in queued:
                    queued.add(j)
                    heapq.heappush(heap, j)
    return best


def _transformers(ix: GraphIndex, shapes: dict[str, list[int]], residuals: list[Unit], found: list[Unit],
                  rejected: list[dict[str, str]]) -> None:
    ffn_by_entry = {u.entry: u for u in residuals if u.role == "ffn"}
    for a in residuals:
        if a.role != "attention":
            continue
        h = _after_norm(ix, a.exit)
        f = ffn_by_entry.get(h)
        if f is None:
            rejected.append({"where": a.exit, "kind": "transformer", "reason": "attention block not followed by an "
                                                                               "FFN block: not a whole layer"})
            continue
        post = h != a.exit
        y = _after_norm(ix, f.exit) if post else f.exit  # pre-LN: a final LayerNorm is not part of the layer
        if not _same(shapes, a.entry, y):
            continue
        dead = ix.dead_set(y, a.entry)
        if dead is None or not set(a.nodes) | set(f.nodes) <= {ix.nodes[i].name for i in dead}:
            rejected.append({"where": y, "kind": "transformer", "reason": "the layer's nodes are read outside it"})
            continue
        layer = _unit(ix, "transformer", "post-LN" if post else "pre-LN", a.entry, y,
                      ("post-LN" if post else "pre-LN") + " encoder layer: attention + FFN between two hidden "
                      "states; bypass to the layer input", dead)
        if layer is None:
            continue
        layer.id = len(found) + 10_000_000  # temporary id for the parent link (renumbered in find_units)
        found.append(layer)
        for sub, kind in ((a, "attention"), (f, "ffn")):
            sub.kind = kind
            sub.parent = layer.id
            sub.reason = (f"{kind} sub-block of a {layer.role} layer: bypass "
                          + ("h + f(h) -> h" if not post else "LN(h + f(h)) -> LN(h)"))
            sub.id = -1


def _after_norm(ix: GraphIndex, t: str) -> str:
    """The tensor after ``t``'s normalisation tail (post-LN), else ``t`` itself."""
    hop = converge(ix, t, NORM_OPS, last=True)
    return hop[0] if hop is not None else t


def _weighted(n: gs.Node) -> bool:
    return n.op in WEIGHTED and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant) and isinstance(
        n.inputs[0], gs.Variable)


def _stages(ix: GraphIndex, shapes: dict[str, list[int]]) -> list[tuple[str, str]]:
    """(entry, exit) of every stage: from a weighted op's input through single-entry single-exit hops without a
    weighted op up to the next weighted op's input."""
    out = []
    for node in ix.nodes:
        if not _weighted(node) or len(node.outputs) != 1:
            continue
        x = node.inputs[0].name
        # the weighted op's other inputs must be constants (no second activation)
        if any(isinstance(t, gs.Variable) for t in node.inputs[1:] if t.name):
            continue
        z = node.outputs[0].name
        last = z if _same(shapes, x, z) else None  # the last tensor of the walk with x's shape
        covered = 1
        clean = False  # the walk ended where a layer ends: before a weighted op, at a graph output or a fork
        while covered < HOP_LIMIT:
            t = ix.tensors.get(z)
            if t is None or z in ix.graph_outputs or not t.outputs:
                clean = True
                break
            if len(t.outputs) == 1 and id(t.outputs[0]) in ix.index and _weighted(t.outputs[0]):
                clean = True
                break
            hop = converge(ix, z)
            if hop is None or any(_weighted(ix.nodes[i]) for i in hop[1]):
                clean = hop is not None or len(t.outputs) > 1
                break
            z, covered = hop[0], covered + len(hop[1])
            if _same(shapes, x, z):
                last = z
        if clean and last is not None and last != x:
            out.append((x, last))
    return out


# ------------------------------------------------------------------------------------------------ entry points
def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor onnx type inference can tell (inputs, initializers, intermediates)."""
    try:
        m = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is best-effort
        m = model
    out = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    for t in m.graph.initializer:
        out[t.name] = t.data_type
    return out


class RemovableUnitsAnalysis:
    """``ctx.analysis(RemovableUnitsAnalysis, graph)``: the removable units of the current graph."""

    name: ClassVar[str] = "removable_units"

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> RemovableUnits:
        from onnxcompress.analyses.channel_groups import input_shapes_for, static_shapes

        model = ctx.export(graph)
        shapes_in, feed = input_shapes_for(model, ctx)
        return find_units(graph, static_shapes(model, shapes_in, feed), element_types(model))


def describe_units(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                   ) -> list[dict[str, Any]]:
    """Removable units of a model for ``onnxcompress inspect``: one dict per unit (id, kind, role, entry, exit,
    nodes, ops, params, reason, parent, exact, removable=True), then one per rejected candidate (where, kind,
    reason, removable=False)."""
    from onnxcompress import io
    from onnxcompress.analyses.channel_groups import static_shapes
    from onnxcompress.data import bind_dims, model_inputs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    io.lift_constant_nodes(m)
    graph = io.to_graph(m)
    shapes_in = input_shapes or bind_dims(model_inputs(m), {}, {})
    units = find_units(graph, static_shapes(m, shapes_in), element_types(m))
    return [u.as_dict() for u in units.units] + [dict(r, removable=False) for r in units.rejected]
