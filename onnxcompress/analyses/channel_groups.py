"""Channel groups: which channels of which tensors must be removed together (an ONNX dependency graph).

Model. Every channel a weighted producer creates is an *element* (an integer id). A tensor that carries channels has
a *layout*: the axes that carry them and an integer array ``el`` over those axes giving, for every position, the
element it belongs to (``el.shape == [dim(a) for a in axes]``). Positions of other axes are free (batch, space,
time). Walking the graph once in topological order, each op maps its inputs' layouts to its outputs' layouts and
records which elements must go together (*unions*), which constants must be sliced along which axis, and why an
element can never be removed (*blocks*). After the walk, connected components of the union graph are the
*units* — the smallest sets of channels that can be removed at once — and units whose elements were allocated by
producers that are linked through some unit form a *group* (what a user calls "the channels of conv2 and conv3":
one index set, several tensors).

Rules (X: data input with layout L; a channel axis is an axis in L.axes):

- Producers with constant weights start new elements: Conv/ConvTranspose (group 1) output axis 1, Gemm output axis 1,
  MatMul with a constant 2-D right operand output axis -1. Their weights are sliced on the output axis (and bias);
  their input-side weight axis (Conv W axis 1, ConvTranspose W axis 0, Gemm/MatMul the K axis) is sliced by L.
- Depthwise Conv/ConvTranspose (group == C_in, multiplier m): output channel o is input channel o // m; ``group``
  becomes the kept input count. Other grouped convs block their input channels.
- Elementwise ops (unary and broadcasting n-ary: Add/Sub/Mul/Div/Max/Min/Pow/Where/PRelu/comparisons...) union
  their operands' elements position by position (residual connections; the SE gate ``x * s``). A constant operand
  with more than one entry along a channel axis is sliced along it; an operand without a layout but with real
  extent along a channel axis (a graph input, an unprunable tensor) blocks the channels it meets; a channel axis
  broadcast from extent 1 blocks.
- BatchNormalization/InstanceNormalization: per-channel parameters are sliced. LayerNormalization, GroupNorm, LRN,
  MeanVarianceNormalization, Softmax/LogSoftmax/Hardmax and ReduceMean/Max/Min/Prod/LogSumExp over a channel axis
  block (the statistics change when a channel goes); ReduceSum/ReduceSumSquare/ReduceL1/ReduceL2 and the contraction
  of MatMul(activation, activation) over a channel axis are fine (a removed channel is a zero term of the sum).
- MatMul(A, B) of two activations: both operands are broadcast into the virtual product Z[..., M, K, N] and their
  elements unioned there; the output keeps the non-K axes. When a channel layout spans K and another axis (attention:
  heads x head_dim), all K positions of one index of the other axes are unioned: the unit becomes the head.
- Concat on a channel axis concatenates the element arrays (inputs without a layout get fresh, blocked elements);
  Split/Slice (step 1) cut them, and their sizes/starts/ends are recomputed from the kept counts.
- Reshape/Flatten: input and output shapes are decomposed into blocks of consecutive axes with equal products; a
  channel axis is carried through its block in C order (Conv -> Flatten -> Gemm maps channel c to features
  c*HW .. c*HW+HW-1; [B,T,384] -> [B,T,12,32] maps it to a (head, dim) pair). Explicit entries of the target shape on
  channel axes (a constant, or a constant piece of a Concat that builds the shape) become the kept counts.
  Transpose permutes the layout; Squeeze/Unsqueeze renumber it; Gather on a free axis passes it.
- Pooling, Resize/Upsample (scale 1 on channel axes), Pad (no padding on channel axes), Tile (repeat 1), Expand,
  Identity/Dropout/Cast, activations and per-tensor Q/DQ pass channels through (per-axis Q/DQ slices scale/zp).
- Anything else blocks the channels reaching it, with the op named in the reason; so do graph outputs, tensors read
  inside subgraphs, non-constant weights, and layouts whose units depend on more than one axis (the kept positions
  would not form a dense box).

A group is prunable when none of its units is blocked, it has at least two units and a weighted producer.
``ChannelGroups.apply`` slices every recorded constant/attribute for a set of removed units; ``zeroed_model`` zeroes
the same channels' weights instead (same outputs, same shapes: the property the tests check).

Where the rules live: ``_groups_layout`` (layouts, index maths, union-find), ``_groups_walk`` (walk state, shared
rules, dispatch), ``_groups_elementwise`` (unary/broadcast ops, norms, reductions), ``_groups_weighted``
(Conv/ConvTranspose/Gemm/MatMul), ``_groups_index_ops`` (Concat/Split/Slice/Gather), ``_groups_shape_ops``
(Transpose/Squeeze/Unsqueeze/Flatten/Reshape/Expand), ``_groups_passthrough`` (pooling/Pad/Resize/Tile/Q-DQ) and
``_groups_edits`` (edit records, the result, the edits it makes). This module joins them and holds the entry points.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses._groups_edits import (
    ChannelGroup,
    ChannelGroups,
    ConstSlice,
    GroupAttrEdit,
    MacTerm,
    RangeEdit,
    ShapeEdit,
    SplitEdit,
)
from onnxcompress.analyses._groups_elementwise import ElementwiseRules
from onnxcompress.analyses._groups_index_ops import IndexRules
from onnxcompress.analyses._groups_layout import (
    AxisSpec,
    Layout,
    connected_components,
    position_units,
    reshape_blocks,
    varies_along,
)
from onnxcompress.analyses._groups_passthrough import PassThroughRules
from onnxcompress.analyses._groups_shape_ops import ShapeRules
from onnxcompress.analyses._groups_walk import (
    BROADCAST_OPS,
    OTHER_REDUCTIONS,
    POOL_OPS,
    SHAPE_ONLY_OPS,
    SUM_REDUCTIONS,
    UNARY_OPS,
    toposort,
)
from onnxcompress.analyses._groups_weighted import WeightedRules
from onnxcompress.context import PassContext

__all__ = [
    "BROADCAST_OPS", "OTHER_REDUCTIONS", "POOL_OPS", "SHAPE_ONLY_OPS", "SUM_REDUCTIONS", "UNARY_OPS", "AxisSpec",
    "ChannelGroup", "ChannelGroups", "ConstSlice", "GroupAttrEdit", "Layout", "MacTerm", "RangeEdit", "ShapeEdit",
    "SplitEdit", "analyse", "ChannelGroupsAnalysis", "connected_components", "describe_groups",
    "input_shapes_for", "reshape_blocks", "static_shapes", "toposort",
]  # fmt: skip


class _Walker(ElementwiseRules, WeightedRules, IndexRules, ShapeRules, PassThroughRules):
    """One walk over a graph with every op family's rules (``op_<Type>`` methods)."""


# --------------------------------------------------------------------------------------------- entry points
def analyse(graph: gs.Graph, shapes: dict[str, list[int]]) -> ChannelGroups:
    """Channel groups of ``graph`` given static shapes of its tensors."""
    w = _Walker(graph, shapes)
    w.run()
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


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                  feed: dict[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Shapes of every tensor at ``input_shapes``: ONNX inference, then one ORT run for what it could not tell."""
    from onnxcompress.analyses.macs import _ort_shapes, infer_shapes

    shapes = infer_shapes(model, input_shapes)
    init = {t.name for t in model.graph.initializer}
    missing = sorted({o for n in model.graph.node for o in n.output if o and o not in shapes and o not in init})
    if missing:
        if feed is None:
            feed = _random_feed(model, input_shapes)
        shapes.update(_ort_shapes(model, missing, feed))
    return shapes


def _random_feed(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    from onnxcompress.data import model_inputs

    rng = np.random.default_rng(0)
    feed = {}
    for spec in model_inputs(model):
        shape = input_shapes.get(spec.name, tuple(d if isinstance(d, int) else 1 for d in spec.shape))
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
    return feed


def input_shapes_for(model: onnx.ModelProto, ctx: PassContext | None) -> tuple[dict[str, tuple[int, ...]],
                                                                           dict[str, np.ndarray] | None]:
    from onnxcompress.data import bind_dims, feed_shapes, model_inputs

    if ctx is not None and ctx.calibration is not None:
        feed = ctx.calibration.first()
        return feed_shapes(feed), feed
    dims = ctx.dims if ctx is not None else {}
    shapes = ctx.input_shapes if ctx is not None else {}
    return bind_dims(model_inputs(model), dims, shapes), None


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
