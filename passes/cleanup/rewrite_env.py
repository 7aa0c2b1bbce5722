"""What every ``cleanup`` rewrite shares: the ``Env`` of one rewrite step and the graph primitives.

Every rewrite leaves every value the graph still has unchanged. Shapes come from ``shape_facts`` (computed, never
declared). The one primitive with a rule of its own is ``bypass``: making ``y``'s consumers read ``x`` and dropping
the node that computed ``y == x``. When ``y`` is an output of its graph, ``x``'s producer is made to produce ``y``
instead, so the output name survives; that needs ``x`` to come from a node of the same graph and to be no graph
input, initializer or output (else the node stays, and the reason says which). Names of new constants come from
``onnxcompress.naming.unique_name`` against every name in the model (``Env.taken``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.constant_eval import DEFAULT_DOMAINS
from onnxcompress.graph_utils import (
    all_graphs,
    all_tensor_names,
    detach,
    graph_input_ids,
    graph_output_ids,
    node_owner,
    redirect_consumers,
)
from onnxcompress.naming import unique_name

from .shape_facts import Facts, RoundFacts
from .symbolic_values import SymVal, const_ints


@dataclass
class Env:
    """What every rewrite needs to know about the graph; rebuilt once per rewrite step."""

    graph: gs.Graph
    graphs: list[gs.Graph]
    facts: Facts
    sym: dict[str, SymVal]
    opset: int
    any_out: set[int] = field(default_factory=set)
    any_in: set[int] = field(default_factory=set)
    owner: dict[int, gs.Graph] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    _g_outs: dict[int, set[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, graph: gs.Graph, facts: RoundFacts | None) -> Env:
        """The Env of ``graph`` as it is now (``facts``: the round's computed facts, or None for rewrites that
        need no shapes)."""
        graphs = all_graphs(graph)
        return cls(
            graph=graph,
            graphs=graphs,
            facts=facts.facts if facts is not None else Facts(),
            sym=facts.sym if facts is not None else {},
            opset=int(graph.opset or 1),
            any_out=graph_output_ids(graphs),
            any_in=graph_input_ids(graphs),
            owner=node_owner(graphs),
            taken=all_tensor_names(graphs),
        )

    def outputs_of(self, g: gs.Graph) -> set[int]:
        """ids of ``g``'s own outputs (cached; the outputs of a graph never change during a step)."""
        ids = self._g_outs.get(id(g))
        if ids is None:
            ids = self._g_outs[id(g)] = {id(t) for t in g.outputs}
        return ids


def is_default(node: gs.Node) -> bool:
    """The node is in the default ONNX domain (the only one cleanup rewrites)."""
    return (node.domain or "") in DEFAULT_DOMAINS


def single_use(t: gs.Tensor, env: Env) -> bool:
    """``t`` is read by exactly one node (in any scope) and is no graph output."""
    return len(t.outputs) == 1 and id(t) not in env.any_out


def producer_in(t: gs.Tensor, env: Env, g: gs.Graph) -> gs.Node | None:
    """The default-domain node of graph ``g`` that produces ``t`` (None: a constant, a graph input, or a node of
    another scope)."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    p = t.inputs[0]
    return p if env.owner.get(id(p)) is g and is_default(p) else None


def new_const(env: Env, base: str, values: np.ndarray) -> gs.Constant:
    """A new constant named after ``base`` (unique in the model)."""
    return gs.Constant(unique_name(base, env.taken), values=np.ascontiguousarray(values))


def axes_of(node: gs.Node, idx: int = 1) -> list[int] | None:
    """Constant axes of Squeeze/Unsqueeze (attribute before opset 13, input after); None when not constant."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > idx and not node.inputs[idx].is_empty():
        arr = const_ints(node.inputs[idx])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def rank_of(t: gs.Tensor, env: Env) -> int | None:
    """The computed rank of ``t`` (None: unknown)."""
    f = env.facts.of(t)
    return None if f is None or f.dims is None else len(f.dims)


def bypass(node: gs.Node, x: gs.Tensor, y: gs.Tensor, g: gs.Graph, env: Env) -> str | None:
    """Make ``y``'s consumers read ``x`` and drop ``node``. None on success, else why the node stays.

    When ``y`` is an output of its graph, ``x``'s producer is made to produce ``y`` instead (the output name
    survives); that needs ``x`` to come from a node of the same graph and to be no graph input/output.
    """
    if id(y) in env.outputs_of(g):
        if isinstance(x, gs.Constant):
            return "output_of_initializer"
        if id(x) in env.any_in:
            return "output_of_graph_input"
        if id(x) in env.any_out:
            return "output_of_output"
        if len(x.inputs) != 1 or env.owner.get(id(x.inputs[0])) is not g:
            return "output_of_outer_scope"
        producer = x.inputs[0]
        detach(node)
        redirect_consumers(x, y)
        idx = next(i for i, t in enumerate(producer.outputs) if t is x)
        producer.outputs[idx] = y
        return None
    if id(y) in env.any_out:
        return "subgraph_output"
    detach(node)
    redirect_consumers(y, x)
    return None


def purge(graphs: list[gs.Graph], removed: set[int]) -> None:
    """Drop the nodes whose ids are in ``removed`` from the node lists of ``graphs``."""
    if not removed:
        return
    for g in graphs:
        if any(id(n) in removed for n in g.nodes):
            g.nodes = [n for n in g.nodes if id(n) not in removed]
