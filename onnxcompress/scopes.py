"""Subgraph initializers that reuse an outer scope's name, renamed before the graph is imported.

A branch of an ``If`` (or a ``Loop`` / ``Scan`` body) may hold an initializer named like a value of an enclosing
graph: ``onnx.checker`` (full check) accepts it and onnxruntime gives the inner one precedence inside the branch.
onnx-graphsurgeon keeps one tensor per name across scopes, so at import the branch would read the OUTER value and
every pass would compute something else than the model (found on a constant-condition ``If`` whose branch added its
own ``k``: cleanup's exact check failed, relative error 0.85). Renaming the inner initializer, and its readers in
that subgraph and the subgraphs nested in it, to a name no scope uses keeps what ORT computes and makes names
unique across scopes, which the importer needs.
"""

from __future__ import annotations

import onnx

from onnxcompress.naming import unique_name


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _defined(g: onnx.GraphProto) -> set[str]:
    """Names this graph itself defines: inputs, initializers, node outputs."""
    names = {i.name for i in g.input} | {i.name for i in g.initializer}
    names |= {i.values.name for i in g.sparse_initializer}
    names |= {o for n in g.node for o in n.output if o}
    return names


def _all_names(g: onnx.GraphProto, acc: set[str]) -> set[str]:
    acc |= _defined(g)
    for n in g.node:
        for sub in _subgraphs(n):
            _all_names(sub, acc)
    return acc


def _rename_reads(g: onnx.GraphProto, old: str, new: str) -> None:
    """Readers of ``old`` in ``g`` and in the subgraphs nested in it (unless one defines ``old`` again)."""
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for sub in _subgraphs(n):
            if old not in _defined(sub):
                _rename_reads(sub, old, new)
    for o in g.output:
        if o.name == old:
            o.name = new


def _shadows(g: onnx.GraphProto, outer: set[str], found: list) -> None:
    here = outer | _defined(g)
    for n in g.node:
        for sub in _subgraphs(n):
            for init in sub.initializer:
                if init.name in here:
                    found.append((sub, init))
            _shadows(sub, here, found)


def unshadow_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` unchanged when no subgraph initializer reuses an outer name; else a copy with each such initializer
    (and its readers in its scope) renamed. Returns (model, how many were renamed)."""
    found: list = []
    _shadows(model.graph, set(), found)
    if not found:
        return model, 0
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = _all_names(copy.graph, set())
    count = 0
    while True:  # one at a time on the copy (the protos found above belong to the original)
        found = []
        _shadows(copy.graph, set(), found)
        if not found:
            return copy, count
        sub, init = found[0]
        old = init.name
        new = unique_name(f"{old}_{sub.name or 'subgraph'}", taken)
        init.name = new
        _rename_reads(sub, old, new)
        count += 1


__all__ = ["unshadow_initializers"]
