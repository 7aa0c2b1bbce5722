"""The channel-group analysis: one walk over the graph, then units and groups (model and rules: the package
docstring).

After the walk, connected components of the union graph (element pairs that must go together) are the *units*;
allocations (the elements one producer created) linked through a unit form a *group*. A group gets the block
reasons of its elements, plus two checked only once units are known: a multi-axis layout whose units vary along more
than one axis (no dense cut), and a shape entry read from an axis whose kept count can differ from the axis it sizes
(a *tie* that does not hold). Groups are numbered by their first element, so ids are stable and readable.

Entry points: ``analyse(graph, shapes)``, ``ChannelGroupsAnalysis`` (``ctx.analysis(ChannelGroupsAnalysis, graph)``)
and ``describe_groups`` (``onnxcompress inspect``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import ChannelGroup, ChannelGroups
from onnxcompress.analyses.channel_groups.layout import (
    axis_elements,
    connected_components,
    position_units,
    varies_along,
)
from onnxcompress.analyses.channel_groups.rules_elementwise import ElementwiseRules
from onnxcompress.analyses.channel_groups.rules_index_ops import IndexRules
from onnxcompress.analyses.channel_groups.rules_passthrough import PassThroughRules
from onnxcompress.analyses.channel_groups.rules_shape_ops import ShapeRules
from onnxcompress.analyses.channel_groups.rules_weighted import WeightedRules
from onnxcompress.analyses.channel_groups.shapes import input_shapes_for, static_shapes
from onnxcompress.context import PassContext


class _Walker(ElementwiseRules, WeightedRules, IndexRules, ShapeRules, PassThroughRules):
    """One walk over a graph with every op family's rules (``op_<Type>`` methods)."""


# --------------------------------------------------------------------------------------------- entry points
def analyse(graph: gs.Graph, shapes: dict[str, list[int]]) -> ChannelGroups:
    """Channel groups of ``graph`` given static shapes of its tensors."""
    w = _Walker(graph, shapes)
    w.run()
    _tie_shared_weights(w)
    n = w.n
    a = np.concatenate(w.edges_a) if w.edges_a else np.zeros(0, np.int64)
    b = np.concatenate(w.edges_b) if w.edges_b else np.zeros(0, np.int64)
    unit_of = connected_components(n, a, b)
    n_units = int(unit_of.max()) + 1 if n else 0
    # blocks (allocations) linked through a unit form a group
    block_of = np.repeat(np.arange(len(w.sizes), dtype=np.int64), w.sizes)
    first_el = np.full(n_units, n, dtype=np.int64)
    np.minimum.at(first_el, unit_of, np.arange(n, dtype=np.int64))
    block_group = connected_components(len(w.sizes), block_of, block_of[first_el[unit_of]])
    unit_group_raw = block_group[block_of[first_el]] if n_units else np.zeros(0, np.int64)
    _block_after_walk(w, unit_of)
    reasons: dict[int, list[str]] = defaultdict(list)
    for el, reason in w.blocks:
        for g in np.unique(unit_group_raw[unit_of[el]]).tolist():
            if reason not in reasons[g]:
                reasons[g].append(reason)
    # renumber groups by first element (stable, readable ids)
    order = np.unique(unit_group_raw[np.argsort(first_el)], return_index=True)
    gid_sorted = order[0][np.argsort(order[1])]
    remap = np.empty(int(unit_group_raw.max()) + 1 if n_units else 0, dtype=np.int64)
    remap[gid_sorted] = np.arange(len(gid_sorted))
    unit_group = remap[unit_group_raw] if n_units else unit_group_raw
    reason_text = {int(remap[g]): "; ".join(r[:2]) + (f" (+{len(r) - 2} more)" if len(r) > 2 else "")
                   for g, r in reasons.items()}
    groups = _make_groups(w, unit_of, unit_group, block_of, first_el, len(gid_sorted), reason_text)
    return ChannelGroups(n, unit_of, unit_group, groups, w.layouts, w.slices, w.shape_edits, w.range_edits,
                         w.split_edits, w.group_edits, w.mac_terms, w.total_macs, shapes, w.folded)


def _tie_shared_weights(w: _Walker) -> None:
    """A weight read by several weighted nodes (tied layers: ALBERT's one set of layer weights read by every layer)
    is cut the same way for all of them: the elements its readers assign to one position along one axis are
    unioned, so the weight stays one tensor. Cut apart, every reader got its own ``_pruned`` copy and the model grew
    (a 3-layer ALBERT: 1.17x the parameters at 0.6x the MACs). Only the weight input (index 1) of Conv /
    ConvTranspose / Gemm / MatMul: biases equal by chance (zeros merged by cleanup) are not a tie and keep the copies
    ``ChannelGroups.apply`` makes."""
    first: dict[tuple[int, int], np.ndarray] = {}
    for s in w.slices:
        t = s.node.inputs[s.index]
        if s.index != 1 or s.role not in ("out", "in", "dw") or not isinstance(t, gs.Constant):
            continue
        for spec in s.specs:
            rep = axis_elements(spec)
            prev = first.setdefault((id(t), spec.axis), rep)
            if prev is not rep and prev.shape == rep.shape:
                w.edges_a.append(prev.ravel().astype(np.int64))
                w.edges_b.append(rep.ravel().astype(np.int64))


def _block_after_walk(w: _Walker, unit_of: np.ndarray) -> None:
    """Blocks that need the units: multi-axis layouts whose units vary along more than one axis (no dense cut),
    and shape entries read from an axis whose kept count can differ from the axis they size."""
    for name, lay in w.layouts.items():
        if lay.el.ndim > 1:
            u = unit_of[lay.el]
            if sum(varies_along(u, i) for i in range(u.ndim)) > 1:
                w.block(lay.el, f"{name}: channels spread over several axes (no dense cut)")
    for a_spec, b_spec, what in w.ties:
        if not np.array_equal(position_units(a_spec, unit_of), position_units(b_spec, unit_of)):
            w.block(np.concatenate([a_spec.el.ravel(), b_spec.el.ravel()]),
                    f"{what}: target size read from an axis with other channels")


def _members(w: _Walker, unit_of: np.ndarray, unit_group: np.ndarray) -> dict[int, list[str]]:
    """Labels of the constants each group slices (``name[axes]``) and of the shape entries it sets
    (``name[position]``), in walk order."""
    members: dict[int, list[str]] = defaultdict(list)

    def add(label: str, els: list[np.ndarray]) -> None:
        for g in np.unique(unit_group[unit_of[np.concatenate([e.ravel() for e in els])]]).tolist():
            if label not in members[g]:
                members[g].append(label)

    for s in w.slices:
        add(f"{s.node.inputs[s.index].name}[{','.join(str(sp.axis) for sp in s.specs)}]", [sp.el for sp in s.specs])
    for e in w.shape_edits:
        for pos, spec in e.entries:
            add(f"{e.node.inputs[e.index].name}[{pos}]", [spec.el])
    return members


def _make_groups(w: _Walker, unit_of: np.ndarray, unit_group: np.ndarray, block_of: np.ndarray,
                 first_el: np.ndarray, n_groups: int, reason_text: dict[int, str]) -> list[ChannelGroup]:
    members = _members(w, unit_of, unit_group)
    units_by_group: dict[int, list[int]] = defaultdict(list)
    for u in np.argsort(first_el, kind="stable").tolist():
        units_by_group[int(unit_group[u])].append(u)
    producer_block = np.zeros(len(w.sizes), dtype=bool)
    producer_block[list(w.producer_blocks)] = True
    pairs = np.unique(np.stack([unit_group[unit_of], block_of]), axis=1) if w.n else np.zeros((2, 0), np.int64)
    blocks_by_group: dict[int, list[int]] = defaultdict(list)
    for g, bk in pairs.T.tolist():
        blocks_by_group[g].append(bk)
    groups = []
    for gid in range(n_groups):
        units = np.asarray(units_by_group[gid], dtype=np.int64)
        blocks_in = blocks_by_group[gid]
        producers = [w.alloc_owner[bk] for bk in blocks_in if producer_block[bk]]
        reason = reason_text.get(gid, "")
        prunable = not reason
        if prunable and len(units) < 2:
            prunable, reason = False, "a single channel"
        if prunable and not producers:
            prunable, reason = False, "no weighted producer"
        channels = int(w.sizes[blocks_in[0]]) if blocks_in else 0
        groups.append(ChannelGroup(gid, units, channels, members.get(gid, []), producers, prunable, reason))
    return groups


class ChannelGroupsAnalysis:
    """``ctx.analysis(ChannelGroupsAnalysis, graph)``: the channel groups of the current graph at its input shape."""

    name: ClassVar[str] = "channel_groups"

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
        model = ctx.export(graph)
        shapes_in, feed = input_shapes_for(model, ctx)
        return analyse(graph, static_shapes(model, shapes_in, feed))


def describe_groups(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                    ) -> list[dict[str, Any]]:
    """Channel groups of a model for ``onnxcompress inspect``: id, size, members, prunable, reason."""
    from onnxcompress import io
    from onnxcompress.data import bind_dims, model_inputs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    io.lift_constant_nodes(m)
    graph = io.to_graph(m)
    shapes_in = input_shapes or bind_dims(model_inputs(m), {}, {})
    cg = analyse(graph, static_shapes(m, shapes_in))
    out = []
    for g in cg.groups:
        if not g.members and not g.producers:
            continue
        out.append({
            "id": g.id,
            "size": g.size,
            "members": list(g.members),
            "producers": list(g.producers),
            "prunable": bool(g.prunable),
            "reason": g.reason,
        })
    return out
