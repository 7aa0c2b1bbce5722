"""``cleanup``: common subexpressions merged (``cse``).

**Common subexpressions** (``cse``): two nodes with the same op, domain, attributes and inputs (by identity;
constants by name, after duplicate initializers are merged) compute the same values; the later one's consumers
read the earlier one's outputs. Scope-aware: a node inside an If/Loop branch may reuse a node of an enclosing
graph that precedes the branch's node; never across sibling branches. Never merged: non-deterministic ops
(Random*, Multinomial, Bernoulli, Dropout), nodes with subgraphs, non-default domains, and a node whose output
is an output of its graph.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach, redirect_consumers

from .rewrite_env import Env, is_default

_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


def _attr_key(v):
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(e) for e in v)
    if isinstance(v, np.ndarray):
        return ("nd", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, gs.Constant):
        return ("c", v.name)
    if isinstance(v, gs.Tensor):
        return ("t", id(v))
    if isinstance(v, float) and v != v:
        return ("nan",)
    return (type(v).__name__, v)


def _node_key(node: gs.Node):
    ins = []
    for t in node.inputs:
        if t.is_empty():
            ins.append("")
        elif isinstance(t, gs.Constant):
            ins.append(("c", t.name))
        else:
            ins.append(("v", id(t)))
    attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    return (node.op, node.domain or "", tuple(ins), attrs, len(node.outputs))


def eliminate_common(env: Env, stats: Counter) -> set[int]:
    """Merge every node that repeats an earlier one (scope-aware, rule above); the ids of the nodes removed."""
    removed: set[int] = set()
    _cse_graph(env.graph, [], env, removed, stats)
    return removed


def _cse_graph(g: gs.Graph, outer: list[dict], env: Env, removed: set[int], stats: Counter) -> None:
    seen: dict = {}
    scopes = outer + [seen]
    for node in list(g.nodes):
        subs = list(node.subgraphs())
        if subs:
            for sub in subs:
                _cse_graph(sub, scopes, env, removed, stats)
            continue
        if not is_default(node) or node.op in _NONDETERMINISTIC or not node.outputs:
            continue
        key = _node_key(node)
        canon = next((s[key] for s in reversed(scopes) if key in s), None)
        if canon is None:
            seen[key] = node
            continue
        pairs = list(zip(node.outputs, canon.outputs, strict=True))
        if any(not d.is_empty() and (id(d) in env.any_out or c.is_empty()) for d, c in pairs):
            continue
        for d, c in pairs:
            if not d.is_empty():
                redirect_consumers(d, c)
        detach(node)
        removed.add(id(node))
        stats["cse_nodes_merged"] += 1
