"""Graph index, dead sets and bypass edits for the removable-unit analysis (``onnxcompress.analyses.blocks``).

A *bypass* of a unit (entry x, exit y) makes every consumer of y read x instead (y := x). What it removes is the
unit's *dead set*: the nodes that no longer reach a graph output once y has no consumers. It is found by local dead
propagation (reference counting), not by a whole-graph liveness pass: every node keeps the number of consumer edges
of its outputs (+1 when an output is a graph output or is read inside a subgraph); the producer P of y dies (its
edges to y's consumers move to x), and each death decrements the counts of the producers of the dying node's
inputs; a count reaching 0 kills that producer too, except the producer of x, which is pinned alive (x gains the
consumers of y). This is what a post-dominator tree with P's edge removed says (the nodes whose every path to an
output went through P and not through x), computed in O(size of the dead set + its fan-in) per unit, so the
analysis is linear in the graph for non-nested units and never O(nodes^2).

``bypass_graph`` applies bypasses to a graphsurgeon graph (the pass); ``bypass_model`` to a ModelProto with its own
dead-code elimination (the trial models of the importance measurement). Both keep graph output names: a y that is a
graph output is produced under its name by x's producer (x is renamed y), or by ``Identity(x)`` when x is a graph
input or output itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import redirect_consumers


class GraphIndex:
    """Topological node order, producers and consumer counts of the main graph (built once, O(nodes + edges))."""

    def __init__(self, graph: gs.Graph, order: list[gs.Node]):
        self.graph = graph
        self.nodes = order
        self.index = {id(n): i for i, n in enumerate(order)}
        self.producer: dict[str, int] = {}
        self.tensors: dict[str, gs.Tensor] = {}
        out_ids = {id(t) for t in graph.outputs}
        self.refcount = np.zeros(len(order), dtype=np.int64)
        for i, n in enumerate(order):
            for t in n.outputs:
                self.producer[t.name] = i
                self.tensors[t.name] = t
                users = [u for u in t.outputs]
                inside = sum(1 for u in users if id(u) in self.index)
                escapes = id(t) in out_ids or inside < len(users)  # graph output, or read inside a subgraph
                self.refcount[i] += inside + (1 if escapes else 0)
            for t in n.inputs:
                self.tensors.setdefault(t.name, t)
        for t in graph.inputs:
            self.tensors.setdefault(t.name, t)
        self.graph_outputs = {t.name for t in graph.outputs}

    def node_of(self, tensor: str) -> int | None:
        return self.producer.get(tensor)

    def consumers(self, tensor: str) -> list[int]:
        t = self.tensors.get(tensor)
        if t is None:
            return []
        return [self.index[id(u)] for u in t.outputs if id(u) in self.index]

    def is_constant(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant)

    def dead_set(self, exit_name: str, entry_name: str) -> list[int] | None:
        """Node indices that die when y=exit_name is bypassed to x=entry_name (None when y's producer stays
        alive: it has another output in use)."""
        p = self.producer.get(exit_name)
        if p is None:
            return None
        y = self.tensors[exit_name]
        users = sum(1 for u in y.outputs if id(u) in self.index)
        escapes = exit_name in self.graph_outputs or users < len(y.outputs)
        if self.refcount[p] - users - (1 if escapes else 0) > 0:
            return None
        pinned = self.producer.get(entry_name, -1)
        if p == pinned:
            return None
        dec: dict[int, int] = {}
        dead = [p]
        stack = [p]
        while stack:
            i = stack.pop()
            for t in self.nodes[i].inputs:
                q = self.producer.get(t.name)
                if q is None or q == pinned or q == i:
                    continue
                dec[q] = dec.get(q, 0) + 1
                if dec[q] == self.refcount[q]:
                    dead.append(q)
                    stack.append(q)
        return sorted(dead)


def bypass_graph(graph: gs.Graph, pairs: Iterable[tuple[str, str]]) -> int:
    """Bypass every (entry, exit) pair in ``graph`` (y := x) and drop what became dead; how many were applied.

    Pairs are applied in order; an entry that an earlier pair bypassed resolves to that pair's entry (so a chain of
    adjacent units collapses onto the first entry)."""
    objs = graph.tensors()  # by the names the pairs use; renaming a tensor below does not change this map
    alias: dict[str, str] = {}
    in_ids = {id(t) for t in graph.inputs}
    applied = 0
    for entry, exit_name in pairs:
        while entry in alias:
            entry = alias[entry]
        x = objs.get(entry)
        y = objs.get(exit_name)
        if x is None or y is None or x is y:
            continue
        alias[exit_name] = entry
        redirect_consumers(y, x)
        for i, out in enumerate(graph.outputs):
            if out is not y:
                continue
            name = y.name
            y.name = f"{name}__bypassed"
            if x.inputs and id(x) not in in_ids and all(o is not x for o in graph.outputs):
                # x takes the output's name (as cleanup does for Identity): no extra node
                x.name = name
                x.dtype = x.dtype if x.dtype is not None else y.dtype
                x.shape = y.shape if y.shape is not None else x.shape
                graph.outputs[i] = x
            else:
                new = gs.Variable(name, dtype=y.dtype, shape=y.shape)
                graph.nodes.append(gs.Node("Identity", name=f"{name}__bypass", inputs=[x], outputs=[new]))
                graph.outputs[i] = new
        applied += 1
    graph.cleanup(remove_unused_graph_inputs=False)
    return applied


def bypass_model(model: onnx.ModelProto, pairs: Iterable[tuple[str, str]]) -> onnx.ModelProto:
    """A copy of ``model`` with every (entry, exit) pair bypassed and dead nodes/initializers removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    alias: dict[str, str] = {}
    for entry, exit_name in pairs:
        while entry in alias:
            entry = alias[entry]
        alias[exit_name] = entry

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    if alias:
        _rename_inputs(g, resolve)
        for out in g.output:
            if out.name in alias:
                g.node.append(onnx.helper.make_node("Identity", [resolve(out.name)], [out.name + "__bp"],
                                                    name=out.name + "__bypass"))
                # produce the output name itself: rename the old producer's output out of the way
                _retarget_output(g, out.name)
    _dead_code(g)
    return m


def _rename_inputs(g: onnx.GraphProto, resolve) -> None:
    for node in g.node:
        for k, name in enumerate(node.input):
            if name:
                node.input[k] = resolve(name)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _rename_inputs(sub, resolve)


def _retarget_output(g: onnx.GraphProto, name: str) -> None:
    """The graph output ``name`` is bypassed: its old producer writes ``name__old``, the new Identity ``name``."""
    for node in g.node:
        for k, o in enumerate(node.output):
            if o == name:
                node.output[k] = name + "__old"
            elif o == name + "__bp":
                node.output[k] = name


def _dead_code(g: onnx.GraphProto) -> None:
    """Remove nodes that reach no graph output and initializers nothing reads (main graph; subgraph reads of
    outer-scope names count as reads of their node)."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_outer_reads(node))
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for n in sub.node:
                names.update(i for i in n.input if i)
                names.update(_outer_reads(n))
    return names
