"""Small helpers for rewriting onnx-graphsurgeon graphs, shared by passes.

Scoping rule (ONNX IR): a subgraph (If/Loop/Scan body) may read any value visible in its enclosing graphs, and a
node output name must be distinct from every name visible from an enclosing scope. onnx-graphsurgeon imports such an
outer-scope read as the *same* ``Tensor`` object, so ``tensor.outputs`` lists consumers in every scope. Everything
here works on object identity (``id``), never on ``Node.__eq__`` (which compares contents), and is linear in the
size of the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_graphsurgeon as gs

from onnxcompress.naming import unique_name  # noqa: F401  (re-exported for the passes)

log = logging.getLogger(__name__)


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The main graph first, then every subgraph below it (depth first)."""
    out = [graph]
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.nodes:
            for sub in node.subgraphs():
                out.append(sub)
                stack.append(sub)
    return out


def node_count(graphs: Iterable[gs.Graph]) -> int:
    return sum(len(g.nodes) for g in graphs)


def node_owner(graphs: Iterable[gs.Graph]) -> dict[int, gs.Graph]:
    """id(node) -> the graph whose node list holds it."""
    return {id(n): g for g in graphs for n in g.nodes}


def graph_output_ids(graphs: Iterable[gs.Graph]) -> set[int]:
    """ids of tensors that are an output of any of the graphs (main graph or subgraph)."""
    return {id(t) for g in graphs for t in g.outputs}


def graph_input_ids(graphs: Iterable[gs.Graph]) -> set[int]:
    return {id(t) for g in graphs for t in g.inputs}


def all_tensor_names(graphs: Iterable[gs.Graph]) -> set[str]:
    names: set[str] = set()
    for g in graphs:
        names.update(t.name for t in g.inputs)
        names.update(t.name for t in g.outputs)
        for n in g.nodes:
            names.update(t.name for t in n.inputs)
            names.update(t.name for t in n.outputs)
    names.discard("")
    return names


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every input slot of ``node`` that holds ``old`` (by identity) at ``new``."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def redirect_consumers(old: gs.Tensor, new: gs.Tensor, keep: set[int] | None = None) -> int:
    """Make every consumer of ``old`` (in any scope) read ``new`` instead, except nodes whose id is in ``keep``."""
    moved = 0
    seen: set[int] = set()
    for consumer in list(old.outputs):
        if id(consumer) in seen or (keep is not None and id(consumer) in keep):
            continue
        seen.add(id(consumer))
        replace_input(consumer, old, new)
        moved += 1
    return moved


def detach(node: gs.Node) -> None:
    """Disconnect a node from all its tensors; ``Graph.cleanup`` then drops it."""
    node.inputs.clear()
    node.outputs.clear()


def bypass_constant_identities(graph: gs.Graph) -> int:
    """Readers of ``Identity(constant)`` in the main graph read the constant itself (an exporter ties weights that
    way: ALBERT's shared layers); the Identity is dropped unless its output is a graph output. Exact. Returns how
    many were bypassed."""
    outs = {id(t) for t in graph.outputs}
    done = 0
    for n in list(graph.nodes):
        if (n.op == "Identity" and len(n.inputs) == 1 and isinstance(n.inputs[0], gs.Constant)
                and len(n.outputs) == 1 and id(n.outputs[0]) not in outs):
            redirect_consumers(n.outputs[0], n.inputs[0])
            detach(n)
            done += 1
    if done:
        graph.cleanup(remove_unused_graph_inputs=False)
    return done
