"""Weights inside If/Loop/Scan bodies: which layers there are, who reads each weight, where its one integer copy
lives, and what the stats say about every body.

**Scopes.** The main graph and every body, depth first in node order (deterministic); a body is named
``"<op> '<node>' <attribute>"``, e.g. ``"If 'outer_if' then_branch"``. ONNX's scoping rule: a body reads any value
of the graphs enclosing it (outer-scope values, e.g. weights held once in the main graph and read by both branches
of an If, as in silero VAD's op18 export), and names are unique across all scopes. Weights are therefore matched by
name across scopes (graphsurgeon's ``Graph.copy`` gives each body its own object for an outer weight).

**One integer copy per weight.** A constant float weight ``W`` read by quantizable layers in several scopes is
quantized once: ``W ≈ DQ(W_q, s_w, axis)``. For weight-only storage the DequantizeLinear is placed in the innermost
scope that encloses every reader (the lowest common ancestor of the readers' scopes; a weight read by both branches
of an If is dequantized once, before the If; never inside a Loop/Scan body, which would dequantize once per
iteration), and each reader takes its output. Exception: a DequantizeLinear
feeding a MatMul goes to the main graph — onnxruntime (1.22+) rewrites DQ -> MatMul into MatMulNBits at load
time, and inside a body it looks for the integer weight among the body's own initializers only: the model fails to
load ("Missing required weight") once the export keeps that weight in the main graph. Dynamic mode shares ``W_q`` and
``s_w`` between the readers' MatMulInteger chains. A weight that some other op also reads (a ``Slice`` of an LSTM
weight, a layer kept float) stays float for every reader: storing it twice would grow the file.

**Static mode.** Activation ranges come from the statistics collector, which exposes main-graph tensors as model
outputs; a body's tensors cannot be made model outputs, so there are no honest ranges for them. Body layers keep
float compute; their weights are stored int8 behind a DequantizeLinear (the output of the main graph's weight
DequantizeLinear when the main graph quantized the same weight: one copy), and the stats say so per body.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.naming import Namer, graph_names, unique_name

from . import qparams_math as qm
from .ort_int8_kernels import weight_axis

#: why body activations stay float in static mode
NO_RANGES = "no activation ranges inside subgraphs"


@dataclass(eq=False)
class Scope:
    """The main graph (``parent`` None) or one body."""

    graph: gs.Graph
    label: str
    parent: Scope | None = None
    #: a Loop/Scan body (runs once per iteration)
    repeated: bool = False
    done: Counter = field(default_factory=Counter)
    kept_float: Counter = field(default_factory=Counter)

    def chain(self) -> list[Scope]:
        """This scope's ancestors, outermost first, then itself."""
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]


def scopes(graph: gs.Graph) -> list[Scope]:
    """The main graph, then every body (recursively), depth first in node order."""
    out = [Scope(graph, "main")]

    def walk(s: Scope) -> None:
        for n in s.graph.nodes:
            for key, value in n.attrs.items():
                if isinstance(value, gs.Graph):
                    child = Scope(value, f"{n.op} {n.name!r} {key}", s, repeated=n.op in ("Loop", "Scan"))
                    out.append(child)
                    walk(child)

    walk(out[0])
    return out


def bodies(graph: gs.Graph) -> list[Scope]:
    return scopes(graph)[1:]


def namer(all_scopes: list[Scope]) -> Namer:
    """A ``Namer`` whose taken names span every scope (new names must be unique model-wide)."""
    nm = Namer(all_scopes[0].graph)
    for s in all_scopes[1:]:
        nm.taken |= graph_names(s.graph)
    return nm


def name_body_nodes(all_scopes: list[Scope], taken: set[str]) -> None:
    """A unique name for every unnamed node of a body (layers are reported and excluded by name)."""
    for s in all_scopes[1:]:
        for i, n in enumerate(s.graph.nodes):
            if not n.name:
                n.name = unique_name(f"{n.op}_{i}", taken)


def lca(scs: list[Scope]) -> Scope:
    """The innermost scope enclosing all of ``scs``."""
    chains = [s.chain() for s in scs]
    common = chains[0][0]
    for level in zip(*chains, strict=False):
        if any(x is not level[0] for x in level):
            break
        common = level[0]
    return common


Reader = tuple[Scope, gs.Node, int]


def readers(all_scopes: list[Scope]) -> dict[str, list[Reader]]:
    """Constant name -> every (scope, node, input slot) that reads it, across all scopes."""
    found: dict[str, list[Reader]] = {}
    for s in all_scopes:
        for n in s.graph.nodes:
            for slot, t in enumerate(n.inputs):
                if isinstance(t, gs.Constant):
                    found.setdefault(t.name, []).append((s, n, slot))
    return found


def foreign_reader(uses: list[Reader], allowed: set[tuple[int, int]]) -> str | None:
    """The first reader of a weight that is not one of the ``allowed`` (id(node), slot) pairs, as ``op 'name'``."""
    for _s, n, slot in uses:
        if (id(n), slot) not in allowed:
            return f"{n.op} {n.name!r}"
    return None


def candidates(
    all_scopes: list[Scope], ops: tuple[str, ...], exclude: tuple[str, ...], main: bool = True
) -> tuple[list[tuple[Scope, gs.Node]], dict[str, str]]:
    """Nodes of ``ops`` in every scope (the main graph too when ``main``), minus the user's exclusions."""
    chosen, skipped = [], {}
    for s in all_scopes if main else all_scopes[1:]:
        for n in s.graph.nodes:
            if n.op not in ops:
                continue
            if (n.name and n.name in exclude) or n.op in exclude:
                skipped[n.name] = "excluded by the user"
                s.kept_float[f"{n.op}: excluded by the user"] += 1
                continue
            chosen.append((s, n))
    return chosen, skipped


def float_weight(n: gs.Node, slot: int) -> np.ndarray | None:
    if len(n.inputs) <= slot or not isinstance(n.inputs[slot], gs.Constant):
        return None
    w = np.asarray(n.inputs[slot].values)
    return w if w.dtype == np.float32 else None


class SharedDQ:
    """One ``DequantizeLinear`` per (weight, quantization) across all scopes, placed at the readers' common scope."""

    def __init__(self, uses: dict[str, list[Reader]]):
        self.uses = uses
        self.made: dict[tuple, gs.Variable] = {}
        self.placed: dict[int, list[gs.Node]] = {}
        self.scope_of: dict[int, Scope] = {}

    def get(self, key: tuple, make: Callable[[], tuple[gs.Node, gs.Variable]], outermost: bool = False) -> gs.Variable:
        """The dequantized weight for ``key`` (``key[0]`` the weight's name); ``make`` builds it the first time, in
        the readers' common scope (the main graph when ``outermost``)."""
        if key not in self.made:
            node, out = make()
            readers_ = [s for s, _n, _slot in self.uses.get(key[0], [])]
            home = readers_[0].chain()[0] if outermost else lca(readers_)
            while home.repeated and home.parent is not None:  # never dequantize once per loop iteration
                home = home.parent
            self.placed.setdefault(id(home), []).append(node)
            self.scope_of[id(home)] = home
            self.made[key] = out
        return self.made[key]

    def insert(self) -> None:
        """Put the DequantizeLinear nodes first in their scopes (they read constants only)."""
        for sid, nodes in self.placed.items():
            g = self.scope_of[sid].graph
            g.nodes[:0] = nodes


# --------------------------------------------------------------------------------------- weight storage
def int8_weight_dq(namer: Namer, name: str, w: np.ndarray, axis: int | None) -> tuple[gs.Node, gs.Variable]:
    """Symmetric int8 ``w`` (per channel on ``axis``, per tensor when None) behind a DequantizeLinear."""
    qw = qm.quantize_weight(w, qm.INT8, axis)
    attrs = {"axis": int(axis)} if axis is not None else {}
    return dq_node(namer, name, qw.q, qw.scale, qw.zero_point, attrs, int4=False)


def dq_node(
    namer: Namer, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, attrs: dict, int4: bool
) -> tuple[gs.Node, gs.Variable]:
    out = gs.Variable(namer(f"{base}_dequantized"), dtype=np.float32)
    if int4:
        tq = numpy_helper.from_array(q, namer(f"{base}_quantized"))
        q_c = gs.Constant(tq.name, LazyValues(tq))
    else:
        q_c = gs.Constant(namer(f"{base}_quantized"), q)
    inputs = [q_c, gs.Constant(namer(f"{base}_scale"), np.asarray(scale, np.float32))]
    if zp is not None:
        if int4:
            tz = numpy_helper.from_array(zp, namer(f"{base}_zero_point"))
            inputs.append(gs.Constant(tz.name, LazyValues(tz)))
        else:
            inputs.append(gs.Constant(namer(f"{base}_zero_point"), np.asarray(zp)))
    node = gs.Node(
        "DequantizeLinear", namer(f"{base}_DequantizeLinear"), attrs=attrs, inputs=inputs, outputs=[out]
    )
    return node, out


def main_readers_of_body_weights(graph: gs.Graph) -> dict[str, list[tuple[gs.Node, int]]]:
    """Weights read both in the main graph and in a body: name -> the main graph's (node, slot) readers. Taken
    before static insertion, so the main layers' weight DequantizeLinear can be found afterwards."""
    all_scopes = scopes(graph)
    if len(all_scopes) == 1:
        return {}
    in_bodies = set(readers(all_scopes[1:]))
    found: dict[str, list[tuple[gs.Node, int]]] = {}
    for n in graph.nodes:
        for slot, t in enumerate(n.inputs):
            if isinstance(t, gs.Constant) and t.name in in_bodies:
                found.setdefault(t.name, []).append((n, slot))
    return found


def _stand_in(main_uses: list[tuple[gs.Node, int]]) -> gs.Variable | None:
    """The main graph's dequantized version of a weight, if every main reader now reads a DequantizeLinear output
    (static insertion quantized all of them)."""
    outs = []
    for n, slot in main_uses:
        t = n.inputs[slot] if slot < len(n.inputs) else None
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
            return None
        outs.append(t)
    return outs[0] if outs else None


def static_body_weights(
    graph: gs.Graph,
    main_uses: dict[str, list[tuple[gs.Node, int]]],
    per_channel: bool,
    exclude: tuple[str, ...],
    taken: set[str],
) -> dict[str, str]:
    """Static mode, after the main graph's Q/DQ insertion: every body MatMul/Gemm/Conv keeps float compute (no
    activation ranges inside subgraphs) and reads its weight int8 — through the main graph's DequantizeLinear when
    the main graph quantized the same weight, else through one shared weight-only DequantizeLinear. Returns the
    per-body stats (``body_stats``); ``{}`` without bodies."""
    all_scopes = scopes(graph)
    if len(all_scopes) == 1:
        return {}
    for s in all_scopes[1:]:
        taken |= graph_names(s.graph)
    name_body_nodes(all_scopes, taken)
    nm = Namer(graph)
    nm.taken = taken
    nodes, _skipped = candidates(all_scopes, ("MatMul", "Gemm", "Conv"), exclude, main=False)
    uses = readers(all_scopes)
    allowed = {(id(n), 1) for _s, n in nodes}
    dq = SharedDQ(uses)
    stand_ins = {name: _stand_in(rs) for name, rs in main_uses.items()}
    for s, n in nodes:
        w = float_weight(n, 1)
        if w is None or (n.op != "Conv" and w.ndim != 2) or (n.op == "Gemm" and int(n.attrs.get("transA", 0))):
            s.kept_float[f"{n.op} float: no constant float weight"] += 1
            continue
        name = n.inputs[1].name
        if name in stand_ins:
            if stand_ins[name] is None:
                s.kept_float[f"{n.op} float: its weight is shared with a float layer of the main graph"] += 1
                continue
            n.inputs[1] = stand_ins[name]
            s.done[f"{n.op} weight-int8 (the main graph's int8 copy)"] += 1
            continue
        other = foreign_reader(uses.get(name, []), allowed)
        if other:
            s.kept_float[f"{n.op} float: its weight is also read by {other}: kept float (one copy)"] += 1
            continue
        axis = weight_axis(n, w) if per_channel else None
        n.inputs[1] = dq.get((name, "int8", axis), lambda w=w, name=name, axis=axis: int8_weight_dq(nm, name, w, axis),
                             outermost=n.op == "MatMul")
        s.done[f"{n.op} weight-int8"] += 1
    dq.insert()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return body_stats(all_scopes, static=True)


#: more bodies than this with nothing to quantize are summed up in one stats entry
LIST_EMPTY_BODIES = 4
NOTHING = "nothing to quantize (no MatMul/Gemm/Conv with a constant float weight)"


def body_stats(all_scopes: list[Scope], static: bool = False) -> dict[str, str]:
    """One line per body: what was quantized there and what stayed float, and why. Bodies holding layers come
    first; more than ``LIST_EMPTY_BODIES`` bodies without any are one entry (``"<n> other bodies"``)."""
    out: dict[str, str] = {}
    empty: list[str] = []
    for s in all_scopes[1:]:
        parts = [f"{k} {what}" for what, k in sorted(s.done.items())]
        parts += [f"{k} {what}" for what, k in sorted(s.kept_float.items())]
        if static and s.done:
            parts.append(f"compute float: {NO_RANGES}")
        if parts:
            out[s.label] = "; ".join(parts)
        else:
            empty.append(s.label)
    return {**out, **collapse_empty(empty, NOTHING, other=bool(out))}


def collapse_empty(labels: list[str], text: str, other: bool = False) -> dict[str, str]:
    """``{label: text}`` per body, or one ``"<n> (other) bodies"`` entry naming the first three."""
    if len(labels) <= LIST_EMPTY_BODIES:
        return dict.fromkeys(labels, text)
    return {f"{len(labels)} {'other ' if other else ''}bodies": f"{text}: {', '.join(labels[:3])}, ..."}


__all__ = [
    "NO_RANGES",
    "Reader",
    "Scope",
    "SharedDQ",
    "bodies",
    "body_stats",
    "collapse_empty",
    "candidates",
    "float_weight",
    "foreign_reader",
    "dq_node",
    "int8_weight_dq",
    "lca",
    "main_readers_of_body_weights",
    "name_body_nodes",
    "namer",
    "readers",
    "scopes",
    "static_body_weights",
]
