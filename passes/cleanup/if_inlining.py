"""``cleanup``: an ``If`` whose condition is a constant is replaced by the branch it always takes.

Rule: ``y_1..y_n = If(c)`` with ``c`` a one-element constant becomes the nodes of ``then_branch`` (``c`` true) or
``else_branch``, placed where the If stood, so the parent graph stays topologically ordered (a branch reads only
values that exist before the If). Scoping follows ONNX: a branch may read any value of its enclosing scopes, and
value names are unique across all scopes, so moving the branch's nodes one scope up keeps every name resolvable;
nested subgraphs that read a branch value read it from the parent scope afterwards. Branch output ``k``:

* produced by a node of the branch (and no other branch output): that node now produces ``y_k`` directly;
* anything else (an outer value, a constant, an output repeated): ``y_k = Identity(branch output)``, which the
  Identity rewrite then removes where it can.

A branch constant that shadows a parent constant of the same name (graphsurgeon imports one copy per scope) is
replaced by the parent's copy, so the parent graph never holds two constants of one name.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach, redirect_consumers
from onnxcompress.naming import unique_name

log = logging.getLogger(__name__)


def constant_condition(node: gs.Node) -> bool | None:
    """The If's condition when it is a one-element constant, else None."""
    if not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return None
    try:
        arr = np.asarray(node.inputs[0].values)
    except Exception:
        return None
    if arr.size != 1:
        return None
    return bool(arr.reshape(-1)[0])


def inline_constant_ifs(graphs: list[gs.Graph], taken: set[str], stats: Counter) -> int:
    """Inline every If with a constant condition (outermost first); returns how many."""
    inlined = 0
    for g in graphs:
        if not any(n.op == "If" and constant_condition(n) is not None for n in g.nodes):
            continue
        parent_consts: dict[str, gs.Constant] = {}
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    parent_consts.setdefault(t.name, t)
        new_nodes: list[gs.Node] = []
        changed = False
        for node in list(g.nodes):
            cond = (
                constant_condition(node)
                if node.op == "If" and (node.domain or "") in ("", "ai.onnx")
                else None
            )
            branch = node.attrs.get("then_branch" if cond else "else_branch") if cond is not None else None
            if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
                new_nodes.append(node)
                continue
            new_nodes.extend(_inline(node, branch, parent_consts, taken))
            inlined += 1
            changed = True
        if changed:
            g.nodes = new_nodes
    if inlined:
        stats["if_inlined"] += inlined
    return inlined


def _inline(
    node: gs.Node, branch: gs.Graph, parent_consts: dict[str, gs.Constant], taken: set[str]
) -> list[gs.Node]:
    moved = list(branch.nodes)
    for n in moved:
        for i, t in enumerate(n.inputs):
            if not isinstance(t, gs.Constant):
                continue
            canon = parent_consts.setdefault(t.name, t)
            if canon is not t:
                n.inputs[i] = canon
    local = {id(n) for n in moved}
    outs = list(node.outputs)
    b_outs = list(branch.outputs)
    detach(node)  # the If's outputs now have no producer
    counts: dict[int, int] = {}
    for b in b_outs:
        counts[id(b)] = counts.get(id(b), 0) + 1
    extra: list[gs.Node] = []
    for y, b in zip(outs, b_outs, strict=True):
        if y.is_empty():
            continue
        producer = b.inputs[0] if not isinstance(b, gs.Constant) and len(b.inputs) == 1 else None
        if producer is not None and id(producer) in local and counts[id(b)] == 1:
            idx = next(i for i, t in enumerate(producer.outputs) if t is b)
            redirect_consumers(b, y)
            producer.outputs[idx] = y
        else:
            name = unique_name(f"{y.name}_inlined", taken)
            extra.append(gs.Node("Identity", name=name, inputs=[b], outputs=[y]))
    branch.nodes = []
    branch.outputs = []
    return moved + extra
