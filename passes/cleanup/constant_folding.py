"""``cleanup``: constant folding (``fold_constants``), with the shape values computed from shapes (``fold_shapes``).

**Constant folding.** A node whose inputs are all constants is evaluated with onnxruntime (all optimisations
off, so the very same kernels produce the value) and replaced by an initializer, provided that
``bytes(outputs) <= bytes(inputs) + fold_size_limit`` (Tile/Expand/ConstantOfShape/Range/Cast-up do not inflate
the file). Never folded: nodes with subgraphs, random ops, Q/DQ (weight-only and QDQ patterns must stay for ORT),
sequence/optional ops, non-default domains, values that are graph outputs.

**Shape folding** (``fold_shapes``). A small integer value computed from ``Shape``/``Size`` is a constant when
every element is known from computed shapes, however dynamic the rest of the tensor is: ``Gather(Shape(s), 0)``
with ``s: [2, batch, 128]`` is 2. A Reshape target computed from shapes becomes a constant with 0 (copy) for
dims provably equal to the data's dim at the same position and -1 for one remaining dim.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.constant_eval import NO_FOLD, evaluate_constant_nodes
from onnxcompress.graph_utils import all_graphs, detach, graph_output_ids, redirect_consumers

from .rewrite_env import DEFAULT_DOMAINS, is_default, purge
from .shape_facts import Facts, RoundFacts

log = logging.getLogger(__name__)




def fold_constants(
    graph: gs.Graph,
    imports: list,
    an: RoundFacts | None,
    size_limit: int,
    inline_if: bool,
    stats: Counter,
    kept: dict[int, str],
) -> bool:
    """Fold every constant-only node of every graph (and, given ``an``, every value known from computed shapes);
    ``size_limit``: bytes a result may exceed its inputs by; ``inline_if``: whether constant Ifs are inlined
    later (else shape folds that decide an If condition are kept). Whether anything changed."""
    graphs = all_graphs(graph)
    any_out = graph_output_ids(graphs)
    eval_imports = [i for i in imports if i.domain in DEFAULT_DOMAINS]  # only default-domain nodes fold
    folded_total = 0
    for g in graphs:
        folded_total += _fold_graph(g, an, any_out, eval_imports, size_limit, inline_if, kept)
    if folded_total:
        stats["constants_folded"] += folded_total
    return folded_total > 0


def _fold_candidates(
    g: gs.Graph,
    an: RoundFacts | None,
    any_out: set[int],
    kept: dict[int, str],
    excluded: frozenset[int],
    size_limit: int,
) -> tuple[list[gs.Node], dict[int, np.ndarray]]:
    """Nodes (topological order) whose inputs are constant or become constant, and the values known from
    computed shapes without evaluation (tensor id -> value)."""
    cand: list[gs.Node] = []
    will_be_const: set[int] = set()
    direct: dict[int, np.ndarray] = {}
    for node in g.nodes:
        if not is_default(node) or node.op in NO_FOLD or any(True for _ in node.subgraphs()):
            continue
        outs = [t for t in node.outputs if not t.is_empty()]
        ins = [t for t in node.inputs if not t.is_empty()]
        if not outs or not ins or any(id(t) in any_out for t in outs):
            continue
        if all(isinstance(t, gs.Constant) or id(t) in will_be_const for t in ins):
            if an is not None and _too_large_by_inference(node, an.facts, size_limit):
                kept[id(node)] = "fold_skipped_too_large"
                continue
            cand.append(node)
            will_be_const.update(id(t) for t in outs)
        elif an is not None and len(outs) == 1 and id(node) not in excluded:
            sv = an.sym.get(outs[0].name)
            if sv is not None and sv.known:
                direct[id(outs[0])] = sv.array()
                cand.append(node)
                will_be_const.add(id(outs[0]))
    return cand, direct


def _fold_graph(
    g: gs.Graph,
    an: RoundFacts | None,
    any_out: set[int],
    imports: list[onnx.OperatorSetIdProto],
    size_limit: int,
    inline_if: bool,
    kept: dict[int, str],
) -> int:
    cand, direct = _fold_candidates(g, an, any_out, kept, frozenset(), size_limit)
    if direct and not inline_if:
        # Shape folds are the only values that become constant here but not in onnxruntime's own folding.
        # One that decides an If condition lets ORT inline a branch at load and re-run shape inference on it,
        # which rejects some graphs that ran fine (1-element tensors where the spec wants scalars): without
        # our own If inlining, keep those.
        blocked = _feeding_if_conditions(cand, direct)
        if blocked:
            for nid in blocked:
                kept[nid] = "fold_skipped_if_condition"
            cand, direct = _fold_candidates(g, an, any_out, kept, frozenset(blocked), size_limit)
    if not cand:
        return 0

    values = evaluate_constant_nodes([n for n in cand if id(n.outputs[0]) not in direct], direct, imports)

    foldable: set[int] = set()
    avail: dict[int, np.ndarray] = dict(direct)
    for node in cand:
        outs = [t for t in node.outputs if not t.is_empty()]
        if id(outs[0]) in direct:
            foldable.add(id(node))
            continue
        ins = [t for t in node.inputs if not t.is_empty()]
        if not all(isinstance(t, gs.Constant) or id(t) in avail for t in ins):
            continue
        res = [values.get(t.name) for t in outs]
        if any(r is None for r in res):
            kept[id(node)] = "fold_skipped_eval_failed"
            continue
        if any(not isinstance(r, np.ndarray) or r.dtype.kind not in "biufc" for r in res):
            kept[id(node)] = "fold_skipped_non_numeric"
            continue
        in_bytes = sum(_nbytes(t, avail) for t in ins)
        out_bytes = sum(int(r.nbytes) for r in res)
        if out_bytes > in_bytes + size_limit:
            kept[id(node)] = "fold_skipped_too_large"
            continue
        foldable.add(id(node))
        for t, r in zip(outs, res, strict=True):
            avail[id(t)] = r

    if not foldable:
        return 0
    removed: set[int] = set()
    for node in cand:
        if id(node) not in foldable:
            continue
        for t in node.outputs:
            if t.is_empty():
                continue
            if any(id(c) not in foldable for c in t.outputs):
                const = gs.Constant(t.name, values=np.asarray(avail[id(t)]))
                redirect_consumers(t, const, keep=foldable)
        removed.add(id(node))
    # detach only after every frontier value was redirected (foldable consumers still read their inputs above)
    for node in cand:
        if id(node) in removed:
            detach(node)
    purge([g], removed)
    return len(removed)


def _feeding_if_conditions(cand: list[gs.Node], direct: dict[int, np.ndarray]) -> set[int]:
    """ids of the static Shape/Size candidates whose value reaches an If condition through candidate nodes."""
    cand_ids = {id(n) for n in cand}
    stack = []
    for node in cand:
        for t in node.outputs:
            if any(c.op == "If" and c.inputs and c.inputs[0] is t for c in t.outputs):
                stack.append(node)
    blocked: set[int] = set()
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.outputs and id(node.outputs[0]) in direct:
            blocked.add(id(node))
            continue
        for t in node.inputs:
            if len(t.inputs) == 1 and id(t.inputs[0]) in cand_ids:
                stack.append(t.inputs[0])
    return blocked


def _nbytes(t: gs.Tensor, avail: dict[int, np.ndarray]) -> int:
    if id(t) in avail:
        return int(avail[id(t)].nbytes)
    if isinstance(t, gs.Constant):
        try:
            return int(t._values.nbytes)  # LazyValues knows its size without loading
        except Exception:  # pragma: no cover - exotic dtypes
            return int(np.asarray(t.values).nbytes)
    return 0


def _too_large_by_inference(node: gs.Node, facts: Facts, limit: int) -> bool:
    """Skip before evaluating when computed output shapes already prove the result would inflate."""
    out_bytes = 0
    for t in node.outputs:
        if t.is_empty():
            continue
        f = facts.get(t.name)
        if f is None or f.static is None or f.dtype is None:
            return False
        out_bytes += int(np.prod(f.static, dtype=np.int64)) * f.dtype.itemsize
    in_bytes = 0
    for t in node.inputs:
        if t.is_empty():
            continue
        if isinstance(t, gs.Constant):
            in_bytes += _nbytes(t, {})
            continue
        f = facts.get(t.name)
        if f is None or f.static is None or f.dtype is None:
            return False
        in_bytes += int(np.prod(f.static, dtype=np.int64)) * f.dtype.itemsize
    return out_bytes > in_bytes + limit


