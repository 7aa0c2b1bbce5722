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
"""

from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.context import PassContext, register_analysis

log = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf", "Exp",
    "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Cast",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh",
    "Atanh", "Not", "IsNaN", "IsInf", "ThresholdedRelu", "Shrink", "CastLike", "Swish",
})  # fmt: skip
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Where", "Clip", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})  # fmt: skip
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
SUM_REDUCTIONS = frozenset({"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
OTHER_REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
_FOLDABLE = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})


# ------------------------------------------------------------------------------------------------ data types
@dataclass
class Layout:
    """Channel layout of a tensor: ``el[i, j, ..]`` is the element at position (i, j, ..) of ``axes``."""

    axes: tuple[int, ...]
    el: np.ndarray


@dataclass
class AxisSpec:
    """One axis of something to cut: positions along ``axis`` are kept where any element of ``el`` (over the other
    layout axes, ``pos`` being this axis' index in ``el``) is kept."""

    axis: int
    el: np.ndarray
    pos: int = 0

    def keep(self, keep_el: np.ndarray) -> np.ndarray:
        k = keep_el[self.el]
        if k.ndim == 1:
            return k
        others = tuple(i for i in range(k.ndim) if i != self.pos)
        return k.any(axis=others)


@dataclass
class ConstSlice:
    """Slice constant input ``index`` of ``node`` along the given axes.

    role: "out" (a producer's weight/bias on its output axis), "in" (a consumer's weight on its input axis),
    "dw" (depthwise weight/bias: in and out are the same channel), "bn" (BatchNorm scale), "param" (other
    per-channel constants). ``act``/``act_axis``: for "in", the activation the weight axis multiplies.
    """

    node: gs.Node
    index: int
    specs: list[AxisSpec]
    role: str = "param"
    act: str | None = None
    act_axis: int | None = None


@dataclass
class ShapeEdit:
    """Entries of a 1-D int constant (input ``index`` of ``node``) become the kept count along an axis."""

    node: gs.Node
    index: int
    entries: list[tuple[int, AxisSpec]]  # (position in the vector, axis spec giving the count)


@dataclass
class RangeEdit:
    """Slice (step 1) along a channel axis: starts/ends recomputed from the kept positions of the input."""

    node: gs.Node
    slot: int  # position of the axis in the node's starts/ends vectors
    spec: AxisSpec  # input layout along the sliced axis
    start: int
    end: int


@dataclass
class SplitEdit:
    node: gs.Node
    spec: AxisSpec  # input layout along the split axis
    sizes: list[int]


@dataclass
class GroupAttrEdit:
    """Depthwise conv: ``group`` becomes the kept input channel count."""

    node: gs.Node
    spec: AxisSpec


@dataclass
class MacTerm:
    node: gs.Node
    macs: int
    factors: list[np.ndarray]  # element arrays; MACs scale with the product of their kept fractions


@dataclass
class ChannelGroup:
    id: int
    units: np.ndarray  # unit ids in channel order
    channels: int  # channels of the first producer's output (>= len(units): depthwise multipliers, heads)
    members: list[str]
    producers: list[str]
    prunable: bool
    reason: str

    @property
    def size(self) -> int:
        return int(len(self.units))


@dataclass
class ChannelGroups:
    n_elements: int
    unit_of: np.ndarray  # element -> unit
    unit_group: np.ndarray  # unit -> group id
    groups: list[ChannelGroup]
    layouts: dict[str, Layout]
    slices: list[ConstSlice]
    shape_edits: list[ShapeEdit]
    range_edits: list[RangeEdit]
    split_edits: list[SplitEdit]
    group_edits: list[GroupAttrEdit]
    mac_terms: list[MacTerm]
    total_macs: int
    shapes: dict[str, list[int]] = field(default_factory=dict)
    #: values of non-constant tensors computed from constants (a Reshape'd bias): sliced copies replace them
    folded: dict[str, np.ndarray] = field(default_factory=dict)

    def value(self, t: gs.Tensor) -> np.ndarray:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return self.folded[t.name]

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def n_units(self) -> int:
        return int(len(self.unit_group))

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def keep_elements(self, removed_units: Iterable[int] | np.ndarray) -> np.ndarray:
        keep_units = np.ones(self.n_units, dtype=bool)
        idx = np.asarray(list(removed_units) if not isinstance(removed_units, np.ndarray) else removed_units,
                         dtype=np.int64)
        keep_units[idx] = False
        return keep_units[self.unit_of]

    def macs_after(self, keep_el: np.ndarray) -> float:
        total = float(self.total_macs)
        for t in self.mac_terms:
            frac = 1.0
            for f in t.factors:
                frac *= float(keep_el[f].mean()) if f.size else 1.0
            total -= t.macs * (1.0 - frac)
        return total

    def check_removal(self, removed_units: Iterable[int]) -> list[int]:
        """Units (from ``removed_units``) to put back so that no Split part / Slice range becomes empty."""
        removed = set(int(u) for u in removed_units)
        restore: list[int] = []
        changed = True
        while changed:
            changed = False
            keep_el = self.keep_elements(np.fromiter(removed, dtype=np.int64, count=len(removed)))
            ranges: list[np.ndarray] = []
            for e in self.split_edits:
                k = e.spec.keep(keep_el)
                bounds = np.cumsum([0] + e.sizes)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                    if not k[a:b].any():
                        ranges.append(_axis_elements(e.spec)[a:b])
            for e in self.range_edits:
                k = e.spec.keep(keep_el)
                if not k[e.start:e.end].any() and e.end > e.start:
                    ranges.append(_axis_elements(e.spec)[e.start:e.end])
            for els in ranges:
                units = [u for u in np.unique(self.unit_of[els.ravel()]).tolist() if u in removed]
                if units:
                    removed.discard(units[0])
                    restore.append(units[0])
                    changed = True
        return restore

    # ---------------------------------------------------------------------------------------------- editing
    def edits(self, removed_units: Iterable[int]) -> tuple[dict[tuple[int, int], tuple[gs.Node, int, np.ndarray]],
                                                           list[tuple[gs.Node, str, Any]]]:
        """New constant values per (node, input) and attribute changes for removing ``removed_units``."""
        keep_el = self.keep_elements(np.asarray(list(removed_units), dtype=np.int64))
        const_edits: dict[tuple[int, int], tuple[gs.Node, int, np.ndarray]] = {}
        attr_edits: list[tuple[gs.Node, str, Any]] = []

        def current(node: gs.Node, index: int) -> np.ndarray:
            key = (id(node), index)
            if key in const_edits:
                return const_edits[key][2]
            return self.value(node.inputs[index])

        for s in self.slices:
            arr = current(s.node, s.index)
            new = arr
            for spec in s.specs:
                k = spec.keep(keep_el)
                if not k.all():
                    if new.shape[spec.axis] != k.size:
                        raise ValueError(f"{s.node.name}: input {s.index} axis {spec.axis} has {new.shape[spec.axis]} "
                                         f"entries, the layout {k.size}")
                    new = np.compress(k, new, axis=spec.axis)
            if new is not arr:
                const_edits[(id(s.node), s.index)] = (s.node, s.index, new)
        for e in self.shape_edits:
            vec = current(e.node, e.index).copy()
            changed = False
            for pos, spec in e.entries:
                n = int(spec.keep(keep_el).sum())
                if vec.reshape(-1)[pos] != n:
                    vec.reshape(-1)[pos] = n
                    changed = True
            if changed:
                const_edits[(id(e.node), e.index)] = (e.node, e.index, vec)
        opset_inputs_slice = {}
        for e in self.range_edits:
            k = e.spec.keep(keep_el)
            if k.all():
                continue
            start = int(k[: e.start].sum())
            end = start + int(k[e.start:e.end].sum())
            if len(e.node.inputs) >= 3:  # opset >= 10: starts/ends inputs
                for idx, val in ((1, start), (2, end)):
                    vec = current(e.node, idx).copy()
                    vec.reshape(-1)[e.slot] = val
                    const_edits[(id(e.node), idx)] = (e.node, idx, vec)
            else:
                d = opset_inputs_slice.setdefault(id(e.node), {
                    "starts": list(e.node.attrs["starts"]), "ends": list(e.node.attrs["ends"])})
                d["starts"][e.slot] = start
                d["ends"][e.slot] = end
                attr_edits.append((e.node, "starts", d["starts"]))
                attr_edits.append((e.node, "ends", d["ends"]))
        for e in self.split_edits:
            k = e.spec.keep(keep_el)
            if k.all():
                continue
            bounds = np.cumsum([0] + e.sizes)
            sizes = np.array([int(k[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                             dtype=np.int64)
            attr_edits.append((e.node, "__split__", sizes))
        for e in self.group_edits:
            n = int(e.spec.keep(keep_el).sum())
            if n != e.node.attrs.get("group", 1):
                attr_edits.append((e.node, "group", n))
        return const_edits, attr_edits

    def apply(self, graph: gs.Graph, removed_units: Iterable[int]) -> dict[str, int]:
        """Physically remove ``removed_units`` from ``graph`` (the graph this analysis was computed on)."""
        removed_units = list(removed_units)
        const_edits, attr_edits = self.edits(removed_units)
        stats = _write_const_edits(graph, const_edits, self.value)
        for node, attr, value in attr_edits:
            if attr == "__split__":
                _set_split_sizes(graph, node, value)
            else:
                node.attrs[attr] = value
        # intermediate shapes changed: drop declared ones (graph inputs/outputs are never pruned)
        io_ids = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in io_ids:
                t.shape = None
        stats["attributes_changed"] = len(attr_edits)
        return stats

    def kept_positions(self, removed_units: Iterable[int]) -> dict[str, dict[int, np.ndarray]]:
        """tensor name -> {axis: indices (in the original tensor) of the kept positions} for every cut axis."""
        keep_el = self.keep_elements(np.asarray(list(removed_units), dtype=np.int64))
        out: dict[str, dict[int, np.ndarray]] = {}
        for name, lay in self.layouts.items():
            k_full = keep_el[lay.el]
            for i, a in enumerate(lay.axes):
                others = tuple(j for j in range(k_full.ndim) if j != i)
                k = k_full.any(axis=others) if others else k_full
                if not k.all():
                    out.setdefault(name, {})[a] = np.flatnonzero(k)
        return out

    def zeroed_model(self, model: onnx.ModelProto, removed_units: Iterable[int]) -> onnx.ModelProto:
        """A copy of ``model`` with the weights of the removed channels zeroed (producer outputs, biases, consumer
        inputs) instead of cut: the outputs equal the pruned model's."""
        keep_el = self.keep_elements(np.asarray(list(removed_units), dtype=np.int64))
        m = onnx.ModelProto()
        m.CopyFrom(model)
        inits = {t.name: t for t in m.graph.initializer}
        new_values: dict[str, np.ndarray] = {}
        for s in self.slices:
            if s.role not in ("out", "in", "dw"):
                continue
            name = s.node.inputs[s.index].name
            if name not in inits:
                continue
            arr = new_values.get(name)
            if arr is None:
                arr = onnx.numpy_helper.to_array(inits[name]).copy()
            for spec in s.specs:
                k = spec.keep(keep_el)
                if not k.all():
                    idx = [slice(None)] * arr.ndim
                    idx[spec.axis] = ~k
                    arr[tuple(idx)] = 0
            new_values[name] = arr
        for name, arr in new_values.items():
            inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
        return m

    # ---------------------------------------------------------------------------------------------- helpers
    def group_of_name(self, patterns: Iterable[str]) -> set[int]:
        """Ids of groups with a member, producer or layout tensor matching any glob pattern (or 'group:<id>')."""
        pats = list(patterns)
        if not pats:
            return set()
        hit: set[int] = set()
        for g in self.groups:
            if any(p == f"group:{g.id}" or p == str(g.id) for p in pats):
                hit.add(g.id)
        names_by_group: dict[int, set[str]] = defaultdict(set)
        for name, lay in self.layouts.items():
            for gid in np.unique(self.unit_group[self.unit_of[lay.el.ravel()]]).tolist():
                names_by_group[gid].add(name)
        for g in self.groups:
            names = names_by_group[g.id] | set(g.producers) | {m.split("[")[0] for m in g.members}
            if any(fnmatch.fnmatchcase(n, p) for n in names for p in pats):
                hit.add(g.id)
        return hit


def _axis_elements(spec: AxisSpec) -> np.ndarray:
    """One representative element array per position along the spec's axis (all positions if multi-axis)."""
    if spec.el.ndim == 1:
        return spec.el
    return np.moveaxis(spec.el, spec.pos, 0).reshape(spec.el.shape[spec.pos], -1)


def _position_units(spec: AxisSpec, unit_of: np.ndarray) -> np.ndarray:
    """Sorted unique (position, unit) pairs along a spec's axis: equal for two axes iff their kept counts always
    agree."""
    u = unit_of[spec.el]
    if u.ndim == 1:
        pos = np.arange(u.size)
    else:
        u = np.moveaxis(u, spec.pos, 0)
        pos = np.broadcast_to(np.arange(u.shape[0]).reshape((-1,) + (1,) * (u.ndim - 1)), u.shape)
    return np.unique(np.stack([np.asarray(pos).ravel(), u.ravel()]), axis=1)


def _write_const_edits(graph: gs.Graph, const_edits: dict, value_of: Callable[[gs.Tensor], np.ndarray]
                       ) -> dict[str, int]:
    """Assign new constant values. A constant every consumer changes the same way keeps its name; otherwise each
    distinct new value becomes a new constant for the nodes that need it."""
    by_tensor: dict[int, list[tuple[gs.Node, int, np.ndarray]]] = defaultdict(list)
    tensors: dict[int, gs.Constant] = {}
    for node, index, arr in const_edits.values():
        t = node.inputs[index]
        by_tensor[id(t)].append((node, index, arr))
        tensors[id(t)] = t
    taken = set(graph.tensors().keys())
    stats = {"constants_sliced": 0, "constants_copied": 0, "params_before": 0, "params_after": 0}
    for tid, uses in by_tensor.items():
        t = tensors[tid]
        old = value_of(t)
        consumers = {id(n) for n in t.outputs}
        users = {(id(n), i) for n, i, _ in uses}
        all_slots = {(id(n), i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t}
        first = uses[0][2]
        same = all(a.shape == first.shape and a.dtype == first.dtype and np.array_equal(a, first) for _, _, a in uses)
        stats["params_before"] += int(old.size)
        if same and users >= all_slots and consumers and isinstance(t, gs.Constant):
            t.values = np.ascontiguousarray(first)
            stats["constants_sliced"] += 1
            stats["params_after"] += int(first.size)
            continue
        made: list[tuple[np.ndarray, gs.Constant]] = []
        for node, index, arr in uses:
            const = next((c for a, c in made if a.shape == arr.shape and np.array_equal(a, arr)), None)
            if const is None:
                base = f"{t.name}_pruned"
                name = base
                i = 0
                while name in taken:
                    i += 1
                    name = f"{base}_{i}"
                taken.add(name)
                const = gs.Constant(name, np.ascontiguousarray(arr))
                made.append((arr, const))
                stats["constants_copied"] += 1
                stats["params_after"] += int(arr.size)
            node.inputs[index] = const
    return stats


def _set_split_sizes(graph: gs.Graph, node: gs.Node, sizes: np.ndarray) -> None:
    opset = graph.opset or 13
    if opset >= 13:
        const = gs.Constant(f"{node.name or node.outputs[0].name}_split_sizes", sizes.astype(np.int64))
        if len(node.inputs) >= 2 and node.inputs[1].name:
            node.inputs[1] = const
        else:
            while len(node.inputs) < 2:
                node.inputs.append(const)
            node.inputs[1] = const
        node.attrs.pop("num_outputs", None)
    else:
        node.attrs["split"] = [int(s) for s in sizes]


# ------------------------------------------------------------------------------------------ union-find (NumPy)
def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (0..k-1, ordered by smallest member) of each of n nodes joined by edges (a[i], b[i]).

    Hook-and-jump: every edge hooks the larger of its two roots under the smaller one, then pointers jump to their
    roots; repeat until every edge joins equal roots. Vectorised, no per-edge Python work.
    """
    parent = np.arange(n, dtype=np.int64)
    if a.size:
        while True:
            ra, rb = parent[a], parent[b]
            diff = ra != rb
            if not diff.any():
                break
            ra, rb = ra[diff], rb[diff]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(parent, hi, lo)
            while True:
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64)


# -------------------------------------------------------------------------------------------- the walk
class _Blocked(Exception):
    pass


def _expand(el: np.ndarray, axes: tuple[int, ...], target: tuple[int, ...], dims: dict[int, int]) -> np.ndarray:
    shape = [el.shape[axes.index(a)] if a in axes else 1 for a in target]
    return np.broadcast_to(el.reshape(shape), [dims[a] for a in target])


def _simplify(lay: Layout) -> Layout:
    """Drop layout axes along which the element array is constant (the same channel repeated); keep at least one."""
    el = lay.el
    varies = []
    for i in range(el.ndim):
        first = el.take([0], axis=i)
        varies.append(el.shape[i] > 1 and not np.array_equal(np.broadcast_to(first, el.shape), el))
    if not any(varies):
        i = next((i for i in range(el.ndim) if el.shape[i] > 1), 0)
        varies[i] = True
    if all(varies):
        return lay
    idx = tuple(slice(None) if v else 0 for v in varies)
    return Layout(tuple(a for a, v in zip(lay.axes, varies, strict=True) if v), np.ascontiguousarray(el[idx]))


def reshape_blocks(si: list[int], so: list[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Split two shapes with the same element count into runs of consecutive axes with equal products."""
    blocks = []
    i = j = 0
    while i < len(si) or j < len(so):
        i0, j0 = i, j
        pi = pj = 1
        if i < len(si):
            pi *= si[i]
            i += 1
        if j < len(so):
            pj *= so[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(si):
                pi *= si[i]
                i += 1
            elif pj < pi and j < len(so):
                pj *= so[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 axes into this block
        while i < len(si) and si[i] == 1 and (j >= len(so) or so[j] != 1):
            i += 1
        while j < len(so) and so[j] == 1 and (i >= len(si) or si[i] != 1):
            j += 1
        blocks.append((tuple(range(i0, i)), tuple(range(j0, j))))
    return blocks


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def _present(node: gs.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i].name != ""


class _Walker:
    def __init__(self, graph: gs.Graph, shapes: dict[str, list[int]]):
        self.graph = graph
        self.shapes = shapes
        self.opset = graph.opset or 13
        self.sizes: list[int] = []
        self.alloc_owner: list[str] = []
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.layouts: dict[str, Layout] = {}
        self.slices: list[ConstSlice] = []
        self.shape_edits: list[ShapeEdit] = []
        self.range_edits: list[RangeEdit] = []
        self.split_edits: list[SplitEdit] = []
        self.group_edits: list[GroupAttrEdit] = []
        self.mac_terms: list[MacTerm] = []
        self.total_macs = 0
        self.producer_blocks: set[int] = set()
        self.folded: dict[str, np.ndarray] = {}
        self.ties: list[tuple[AxisSpec, AxisSpec, str]] = []
        self.n = 0

    # ------------------------------------------------------------------------------------------ primitives
    def fresh(self, size: int, owner: str, producer: bool = True) -> np.ndarray:
        el = np.arange(self.n, self.n + size, dtype=np.int64)
        if producer:
            self.producer_blocks.add(len(self.sizes))
        self.sizes.append(size)
        self.alloc_owner.append(owner)
        self.n += size
        return el

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        diff = a != b
        if diff.any():
            self.edges_a.append(a[diff])
            self.edges_b.append(b[diff])

    def block(self, el: np.ndarray, reason: str) -> None:
        self.blocks.append((np.unique(el), reason))

    def shape(self, t: gs.Tensor) -> list[int] | None:
        if isinstance(t, gs.Constant):
            return list(np.asarray(t.values).shape)
        return self.shapes.get(t.name)

    def const(self, t: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        """The value of a constant, or of a small chain of shape ops over constants (Reshape(bias, [1,C,1,1]))."""
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if not t.name or not t.inputs or depth > 6:
            return None
        if t.name in self.folded:
            return self.folded[t.name]
        p = t.inputs[0]
        if p.op not in _FOLDABLE or len(p.outputs) != 1:
            return None
        vals = [self.const(x, depth + 1) if x.name else None for x in p.inputs]
        x = vals[0]
        if x is None:
            return None
        try:
            if p.op in ("Identity", "Cast"):
                out = x if p.op == "Identity" else x.astype(onnx.helper.tensor_dtype_to_np_dtype(p.attrs["to"]))
            elif p.op == "Reshape":
                shp = self.shape(p.outputs[0])
                if shp is None:
                    return None
                out = x.reshape(shp)
            elif p.op in ("Unsqueeze", "Squeeze", "Flatten"):
                shp = self.shape(p.outputs[0])
                if shp is None:
                    return None
                out = x.reshape(shp)
            else:  # Transpose
                out = np.transpose(x, p.attrs.get("perm"))
        except (ValueError, KeyError, TypeError):
            return None
        self.folded[t.name] = out
        return out

    def lay(self, t: gs.Tensor) -> Layout | None:
        return self.layouts.get(t.name) if t.name else None

    def set(self, t: gs.Tensor, lay: Layout | None) -> None:
        if lay is not None and t.name:
            self.layouts[t.name] = lay

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            lay = self.lay(t)
            if lay is not None:
                self.block(lay.el, reason)

    def attr(self, node: gs.Node, name: str, default: Any = None) -> Any:
        return node.attrs.get(name, default)

    def macs(self, node: gs.Node, factors: list[np.ndarray]) -> None:
        m = self.node_macs(node)
        if factors and m:
            self.mac_terms.append(MacTerm(node, m, factors))

    def node_macs(self, node: gs.Node) -> int:
        op = node.op
        try:
            if op == "Conv":
                y, w = self.shape(node.outputs[0]), self.shape(node.inputs[1])
                return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
            if op == "ConvTranspose":
                x, w = self.shape(node.inputs[0]), self.shape(node.inputs[1])
                return int(np.prod(x, dtype=np.int64) * w[1] * np.prod(w[2:], dtype=np.int64))
            if op == "Gemm":
                a, y = self.shape(node.inputs[0]), self.shape(node.outputs[0])
                k = a[0] if self.attr(node, "transA", 0) else a[-1]
                return int(np.prod(y, dtype=np.int64) * k)
            if op == "MatMul":
                a, y = self.shape(node.inputs[0]), self.shape(node.outputs[0])
                return int(np.prod(y, dtype=np.int64) * a[-1])
        except (TypeError, IndexError):
            return 0
        return 0

    # ------------------------------------------------------------------------------------------ the walk
    def run(self) -> None:
        for node in toposort(self.graph):
            op = node.op
            handler: Callable[[gs.Node], None] | None = getattr(self, f"op_{op}", None)
            has_layout = any(self.lay(t) is not None for t in node.inputs)
            if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                self.total_macs += self.node_macs(node)
            try:
                if node.domain not in (None, "", "ai.onnx"):
                    if has_layout:
                        self.block_inputs(node, f"{op} ({node.domain}) not understood")
                    continue
                if handler is not None:
                    handler(node)
                elif op in UNARY_OPS:
                    self.op_unary(node)
                elif op in BROADCAST_OPS:
                    self.op_broadcast(node)
                elif op in POOL_OPS:
                    self.op_pool(node)
                elif op in SUM_REDUCTIONS or op in OTHER_REDUCTIONS:
                    self.op_reduce(node)
                elif op in SHAPE_ONLY_OPS:
                    pass
                elif has_layout:
                    self.block_inputs(node, f"{op} not understood")
            except _Blocked as exc:
                self.block_inputs(node, str(exc))
                for t in node.outputs:
                    self.layouts.pop(t.name, None)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                log.debug("channel groups: %s %s: %s", op, node.name, exc)
                self.block_inputs(node, f"{op} could not be analysed ({type(exc).__name__})")
                for t in node.outputs:
                    self.layouts.pop(t.name, None)
        main_ids = {id(n) for n in self.graph.nodes}
        for t in self.graph.outputs:
            lay = self.lay(t)
            if lay is not None:
                self.block(lay.el, f"reaches graph output {t.name}")
        tensors = self.graph.tensors()
        for name, lay in self.layouts.items():
            t = tensors.get(name)
            if t is not None and any(id(c) not in main_ids for c in t.outputs):
                self.block(lay.el, f"{name} is read inside a subgraph")

    # ------------------------------------------------------------------------------------------ op rules
    def op_unary(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        for i, t in enumerate(node.inputs[1:], 1):
            if self.lay(t) is not None and not (node.op == "CastLike" and i == 1):
                raise _Blocked(f"{node.op} with a channel-carrying attribute input")
        if lay is not None:
            for out in node.outputs[:1]:
                self.set(out, lay)
            if node.op == "Dropout" and len(node.outputs) > 1:
                self.set(node.outputs[1], lay)

    def op_broadcast(self, node: gs.Node) -> None:
        operands = list(range(len(node.inputs)))
        if node.op == "Clip":
            operands = [0] + [i for i in (1, 2) if _present(node, i) and self.lay(node.inputs[i]) is not None]
        out = node.outputs[0]
        self.set(out, self.broadcast(node, operands, self.shape(out)))

    def broadcast(self, node: gs.Node, operands: list[int], out_shape: list[int] | None) -> Layout | None:
        lays = [(i, self.lay(node.inputs[i])) for i in operands if _present(node, i)]
        if not any(lay is not None for _, lay in lays):
            return None
        if out_shape is None:
            raise _Blocked(f"{node.op}: output shape unknown")
        r = len(out_shape)
        mapped: list[Layout] = []
        for i, lay in lays:
            if lay is None:
                continue
            shp = self.shape(node.inputs[i])
            if shp is None:
                raise _Blocked(f"{node.op}: input shape unknown")
            off = r - len(shp)
            ok = True
            for a in lay.axes:
                if shp[a] != out_shape[a + off]:
                    self.block(lay.el, f"{node.op} broadcasts a channel axis")
                    ok = False
            if ok:
                mapped.append(Layout(tuple(a + off for a in lay.axes), lay.el))
        if not mapped:
            return None
        S = tuple(sorted(set().union(*[m.axes for m in mapped])))
        dims = {a: out_shape[a] for a in S}
        base = _expand(mapped[0].el, mapped[0].axes, S, dims)
        for m in mapped[1:]:
            self.union(base, _expand(m.el, m.axes, S, dims))
        result = Layout(S, np.ascontiguousarray(base))
        # operands without layout: constants are sliced; variables with real extent on a channel axis block
        for i, lay in lays:
            if lay is not None:
                continue
            t = node.inputs[i]
            shp = self.shape(t)
            if shp is None:
                raise _Blocked(f"{node.op}: operand {t.name} has an unknown shape")
            off = r - len(shp)
            specs = []
            for pos, a in enumerate(S):
                ca = a - off
                if ca >= 0 and shp[ca] > 1:
                    if self.const(t) is not None:
                        if shp[ca] != out_shape[a]:
                            raise _Blocked(f"{node.op}: constant {t.name} does not match the channel axis")
                        specs.append(AxisSpec(ca, result.el, pos))
                    else:
                        self.block(result.el, f"{node.op} meets {t.name}, whose channels are fixed")
                        specs = []
                        break
            if specs:
                role = "param"
                self.slices.append(ConstSlice(node, i, specs, role))
        return result

    def op_BatchNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        if 1 in lay.axes:
            pos = lay.axes.index(1)
            for i in range(1, 5):
                if self.const(node.inputs[i]) is None:
                    raise _Blocked("BatchNormalization with non-constant parameters")
                self.slices.append(ConstSlice(node, i, [AxisSpec(0, lay.el, pos)], "bn" if i == 1 else "param"))
        self.set(node.outputs[0], lay)

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        if any(a >= 2 for a in lay.axes) or 0 in lay.axes:
            raise _Blocked("InstanceNormalization over a channel-carrying axis")
        for i in (1, 2):
            if self.const(node.inputs[i]) is None:
                raise _Blocked("InstanceNormalization with non-constant parameters")
            self.slices.append(ConstSlice(node, i, [AxisSpec(0, lay.el, 0)], "param"))
        self.set(node.outputs[0], lay)

    def op_LayerNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        shp = self.shape(node.inputs[0])
        if shp is None:
            raise _Blocked("LayerNormalization: input shape unknown")
        axis = int(self.attr(node, "axis", -1)) % len(shp)
        if any(a >= axis for a in lay.axes):
            self.block(lay.el, "LayerNormalization normalises over the channel axis")
        self.set(node.outputs[0], lay)

    def _block_norm(self, node: gs.Node, what: str) -> None:
        lay = self.lay(node.inputs[0])
        if lay is not None:
            self.block(lay.el, what)
            self.set(node.outputs[0], lay)

    def op_GroupNormalization(self, node: gs.Node) -> None:
        self._block_norm(node, "GroupNormalization mixes channels")

    def op_LRN(self, node: gs.Node) -> None:
        self._block_norm(node, "LRN mixes neighbouring channels")

    def op_MeanVarianceNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        axes = self.attr(node, "axes", [0, 2, 3])
        if set(lay.axes) & set(axes):
            self.block(lay.el, "MeanVarianceNormalization over the channel axis")
        self.set(node.outputs[0], lay)

    def op_Softmax(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        shp = self.shape(node.inputs[0])
        if shp is None:
            raise _Blocked(f"{node.op}: input shape unknown")
        r = len(shp)
        if self.opset >= 13:
            red = {int(self.attr(node, "axis", -1)) % r}
        else:
            red = set(range(int(self.attr(node, "axis", 1)) % r, r))
        if red & set(lay.axes):
            self.block(lay.el, f"{node.op} normalises over the channel axis")
        self.set(node.outputs[0], lay)

    op_LogSoftmax = op_Softmax
    op_Hardmax = op_Softmax

    def op_pool(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        if lay.axes != (1,):
            raise _Blocked(f"{node.op} over a channel-carrying spatial axis")
        self.set(node.outputs[0], lay)
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Blocked(f"{node.op} indices output is used")

    def op_reduce(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        shp = self.shape(node.inputs[0])
        if shp is None:
            raise _Blocked(f"{node.op}: input shape unknown")
        r = len(shp)
        axes = self.attr(node, "axes", None)
        if axes is None and _present(node, 1):
            c = self.const(node.inputs[1])
            if c is None:
                raise _Blocked(f"{node.op} with dynamic axes")
            axes = c.reshape(-1).tolist()
        if not axes:
            if self.attr(node, "noop_with_empty_axes", 0):
                self.set(node.outputs[0], lay)
                return
            axes = list(range(r))
        red = {int(a) % r for a in axes}
        keepdims = int(self.attr(node, "keepdims", 1))
        hit = red & set(lay.axes)
        if hit and node.op in OTHER_REDUCTIONS:
            self.block(lay.el, f"{node.op} over the channel axis")
        new = self.contract(lay, red)
        if new is None:
            return
        if not keepdims:
            remap = {a: a - sum(1 for x in red if x < a) for a in new.axes}
            new = Layout(tuple(remap[a] for a in new.axes), new.el)
        self.set(node.outputs[0], new)

    def contract(self, lay: Layout, red: set[int]) -> Layout | None:
        """Sum over ``red``: elements along a reduced axis merge when the layout keeps other axes."""
        hit = [a for a in lay.axes if a in red]
        if not hit:
            return lay
        rest = [a for a in lay.axes if a not in red]
        if not rest:
            return None
        rest_pos = [lay.axes.index(a) for a in rest]
        hit_pos = [lay.axes.index(a) for a in hit]
        arr = np.transpose(lay.el, rest_pos + hit_pos)
        rows = arr.reshape(int(np.prod(arr.shape[: len(rest)])), -1)
        self.union(rows[:, :1], rows)
        return Layout(tuple(rest), np.ascontiguousarray(rows[:, 0].reshape(arr.shape[: len(rest)])))

    # --- weighted ops
    def op_Conv(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        lx = self.lay(x)
        wv = _const(w)
        y = node.outputs[0]
        if wv is None:
            if lx is not None:
                raise _Blocked("Conv weight is not a constant")
            return
        has_bias = _present(node, 2)
        if has_bias and not isinstance(node.inputs[2], gs.Constant):
            if lx is not None:
                raise _Blocked("Conv bias is not a constant")
            return
        if lx is not None and lx.axes != (1,):
            self.block(lx.el, "Conv input channels spread over spatial axes")
            lx = None
        group = int(self.attr(node, "group", 1))
        cout = wv.shape[0]
        xs = self.shape(x)
        cin = xs[1] if xs is not None else wv.shape[1] * group
        name = node.name or y.name
        if group == 1:
            out = self.fresh(cout, name)
            self.slices.append(ConstSlice(node, 1, [AxisSpec(0, out)], "out"))
            if has_bias:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "out"))
            factors = [out]
            if lx is not None:
                self.slices.append(ConstSlice(node, 1, [AxisSpec(1, lx.el)], "in", x.name, 1))
                factors.append(lx.el)
            self.macs(node, factors)
            self.set(y, Layout((1,), out))
            return
        if group == cin and wv.shape[1] == 1 and cout % cin == 0:
            if lx is None:
                return
            m = cout // cin
            out = np.repeat(lx.el, m)
            self.slices.append(ConstSlice(node, 1, [AxisSpec(0, out)], "dw"))
            if has_bias:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "dw"))
            self.group_edits.append(GroupAttrEdit(node, AxisSpec(1, lx.el)))
            self.macs(node, [out])
            self.set(y, Layout((1,), out))
            return
        if lx is not None:
            self.block(lx.el, f"grouped Conv (group={group})")

    def op_ConvTranspose(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        lx = self.lay(x)
        wv = _const(w)
        y = node.outputs[0]
        has_bias = _present(node, 2)
        if wv is None or (has_bias and not isinstance(node.inputs[2], gs.Constant)):
            if lx is not None:
                raise _Blocked("ConvTranspose weight is not a constant")
            return
        if lx is not None and lx.axes != (1,):
            self.block(lx.el, "ConvTranspose input channels spread over spatial axes")
            lx = None
        group = int(self.attr(node, "group", 1))
        cin = wv.shape[0]
        name = node.name or y.name
        if group == 1:
            out = self.fresh(wv.shape[1], name)
            self.slices.append(ConstSlice(node, 1, [AxisSpec(1, out)], "out"))
            if has_bias:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "out"))
            factors = [out]
            if lx is not None:
                self.slices.append(ConstSlice(node, 1, [AxisSpec(0, lx.el)], "in", x.name, 1))
                factors.append(lx.el)
            self.macs(node, factors)
            self.set(y, Layout((1,), out))
            return
        if group == cin and lx is not None:
            m = wv.shape[1]
            out = np.repeat(lx.el, m)
            self.slices.append(ConstSlice(node, 1, [AxisSpec(0, lx.el)], "dw"))
            if has_bias:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "dw"))
            self.group_edits.append(GroupAttrEdit(node, AxisSpec(1, lx.el)))
            self.macs(node, [lx.el])
            self.set(y, Layout((1,), out))
            return
        if lx is not None:
            self.block(lx.el, f"grouped ConvTranspose (group={group})")

    def op_Gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la = self.lay(a)
        bv = _const(b)
        y = node.outputs[0]
        if bv is None or bv.ndim != 2:
            if la is not None or self.lay(b) is not None:
                raise _Blocked("Gemm with a non-constant B")
            return
        trans_a, trans_b = int(self.attr(node, "transA", 0)), int(self.attr(node, "transB", 0))
        k_axis = 0 if trans_a else 1
        if la is not None and la.axes != (k_axis,):
            self.block(la.el, "Gemm row axis carries channels")
            la = None
        n = bv.shape[0] if trans_b else bv.shape[1]
        out = self.fresh(n, node.name or y.name)
        self.slices.append(ConstSlice(node, 1, [AxisSpec(0 if trans_b else 1, out)], "out"))
        factors = [out]
        if la is not None:
            self.slices.append(ConstSlice(node, 1, [AxisSpec(1 if trans_b else 0, la.el)], "in", a.name, k_axis))
            factors.append(la.el)
        self.macs(node, factors)
        if _present(node, 2):
            c = node.inputs[2]
            cv = self.const(c)
            if cv is None:
                self.block(out, "Gemm with a non-constant C")
            elif cv.ndim >= 1 and cv.shape[-1] > 1:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(cv.ndim - 1, out)], "out"))
        self.set(y, Layout((1,), out))

    def op_MatMul(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.lay(a), self.lay(b)
        av, bv = _const(a), _const(b)
        y = node.outputs[0]
        if bv is not None:
            if bv.ndim == 2:
                sa = self.shape(a)
                if sa is None:
                    raise _Blocked("MatMul: input shape unknown")
                k_axis = len(sa) - 1
                if la is not None and la.axes != (k_axis,):
                    self.block(la.el, "MatMul input carries channels on a non-contracted axis")
                    la = None
                out = self.fresh(bv.shape[1], node.name or y.name)
                self.slices.append(ConstSlice(node, 1, [AxisSpec(1, out)], "out"))
                factors = [out]
                if la is not None:
                    self.slices.append(ConstSlice(node, 1, [AxisSpec(0, la.el)], "in", a.name, k_axis))
                    factors.append(la.el)
                self.macs(node, factors)
                self.set(y, Layout((len(sa) - 1,), out))
                return
            if la is not None:
                raise _Blocked(f"MatMul with a constant {bv.ndim}-D right operand")
            return
        if av is not None:
            if lb is not None:
                raise _Blocked("MatMul with a constant left operand")
            return
        if la is None and lb is None:
            return
        sa, sb, sy = self.shape(a), self.shape(b), self.shape(y)
        if sa is None or sb is None or sy is None or len(sa) < 2 or len(sb) < 2:
            raise _Blocked("MatMul of activations with unknown or 1-D shapes")
        ry = len(sy)
        nb = ry - 2
        # virtual Z[batch..., M, K, N]
        zdims = {i: sy[i] for i in range(nb)}
        zdims[nb], zdims[nb + 1], zdims[nb + 2] = sy[-2], sa[-1], sy[-1]

        def zmap_a(ax: int) -> int:
            return nb - (len(sa) - 2) + ax if ax < len(sa) - 2 else nb + (ax - (len(sa) - 2))

        def zmap_b(ax: int) -> int:
            return nb - (len(sb) - 2) + ax if ax < len(sb) - 2 else nb + 1 + (ax - (len(sb) - 2))

        mapped = []
        for lay, shp, zmap in ((la, sa, zmap_a), (lb, sb, zmap_b)):
            if lay is None:
                continue
            zaxes = tuple(zmap(ax) for ax in lay.axes)
            if any(shp[ax] != zdims[z] for ax, z in zip(lay.axes, zaxes, strict=True)):
                self.block(lay.el, "MatMul broadcasts a channel axis")
                continue
            mapped.append(Layout(zaxes, lay.el))
        if not mapped:
            return
        S = tuple(sorted(set().union(*[m.axes for m in mapped])))
        dims = {z: zdims[z] for z in S}
        base = _expand(mapped[0].el, mapped[0].axes, S, dims)
        for m in mapped[1:]:
            self.union(base, _expand(m.el, m.axes, S, dims))
        z = Layout(S, np.ascontiguousarray(base))
        # an operand without a layout but with extent on a channel axis of Z fixes those channels
        for lay, shp, zmap in ((la, sa, zmap_a), (lb, sb, zmap_b)):
            if lay is not None:
                continue
            for ax in range(len(shp)):
                if zmap(ax) in S and shp[ax] > 1:
                    self.block(z.el, "MatMul meets an operand whose channels are fixed")
                    break
        self.mac_terms.append(MacTerm(node, self.node_macs(node), [z.el]))
        yl = self.contract(z, {nb + 1})
        if yl is None:
            return
        self.set(y, Layout(tuple(ax if ax <= nb else ax - 1 for ax in yl.axes), yl.el))

    # --- index-mapping ops
    def op_Concat(self, node: gs.Node) -> None:
        ins = [t for t in node.inputs if t.name]
        lays = [self.lay(t) for t in ins]
        if not any(lays):
            return
        y = node.outputs[0]
        sy = self.shape(y)
        if sy is None:
            raise _Blocked("Concat: output shape unknown")
        r = len(sy)
        axis = int(self.attr(node, "axis", 0)) % r
        if all(lay is None or axis not in lay.axes for lay in lays):
            # concatenation along a free axis: channel axes must agree across inputs
            S = tuple(sorted(set().union(*[lay.axes for lay in lays if lay is not None])))
            dims = {a: sy[a] for a in S}
            ref = next(lay for lay in lays if lay is not None)
            base = _expand(ref.el, ref.axes, S, dims)
            for t, lay in zip(ins, lays, strict=True):
                if lay is not None:
                    self.union(base, _expand(lay.el, lay.axes, S, dims))
                else:
                    st = self.shape(t)
                    if st is None or any(st[a] > 1 for a in S):
                        self.block(base, f"Concat with {t.name}, whose channels are fixed")
            self.set(y, Layout(S, np.ascontiguousarray(base)))
            return
        parts = []
        for t, lay in zip(ins, lays, strict=True):
            st = self.shape(t)
            if st is None:
                raise _Blocked("Concat: input shape unknown")
            if lay is None:
                filler = self.fresh(st[axis], f"{t.name} (fixed)", producer=False)
                self.block(filler, f"concatenated with {t.name}, whose channels are fixed")
                parts.append(filler)
            elif lay.axes != (axis,):
                raise _Blocked("Concat of multi-axis channel layouts")
            else:
                parts.append(lay.el)
        self.set(y, Layout((axis,), np.concatenate(parts)))

    def op_Split(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.lay(x)
        if lay is None:
            return
        sx = self.shape(x)
        if sx is None:
            raise _Blocked("Split: input shape unknown")
        axis = int(self.attr(node, "axis", 0)) % len(sx)
        if axis not in lay.axes:
            for out in node.outputs:
                self.set(out, lay)
            return
        pos = lay.axes.index(axis)
        if _present(node, 1):
            c = self.const(node.inputs[1])
            if c is None:
                raise _Blocked("Split with dynamic sizes")
            sizes = [int(v) for v in c.reshape(-1)]
        elif "split" in node.attrs:
            sizes = [int(v) for v in node.attrs["split"]]
        else:
            n = len(node.outputs)
            d = sx[axis]
            chunk = -(-d // n)
            sizes = [min(chunk, d - i * chunk) for i in range(n)]
        if sum(sizes) != sx[axis]:
            raise _Blocked("Split sizes do not add up")
        bounds = np.cumsum([0] + sizes)
        for out, a, b in zip(node.outputs, bounds[:-1], bounds[1:], strict=True):
            self.set(out, Layout(lay.axes, np.take(lay.el, np.arange(a, b), axis=pos)))
        self.split_edits.append(SplitEdit(node, AxisSpec(axis, lay.el, pos), sizes))

    def op_Slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.lay(x)
        if lay is None:
            return
        sx = self.shape(x)
        if sx is None:
            raise _Blocked("Slice: input shape unknown")
        r = len(sx)
        if len(node.inputs) >= 3:
            vals = []
            for i in (1, 2, 3, 4):
                if _present(node, i):
                    c = self.const(node.inputs[i])
                    if c is None:
                        vals.append(None)
                    else:
                        vals.append([int(v) for v in c.reshape(-1)])
                else:
                    vals.append(None)
            starts, ends, axes, steps = vals
            if starts is None or ends is None:
                if any(_present(node, i) and self.const(node.inputs[i]) is None for i in (1, 2)):
                    # dynamic ranges are fine on free axes only; we cannot tell which: require constant axes
                    if axes is None or any(int(a) % r in lay.axes for a in axes):
                        raise _Blocked("Slice with dynamic starts/ends on a channel axis")
                    self.set(node.outputs[0], lay)
                    return
        else:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes, steps = node.attrs.get("axes"), None
        if axes is None:
            axes = list(range(len(starts)))
        if steps is None:
            steps = [1] * len(starts)
        el = lay.el
        for slot, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps, strict=True)):
            a = int(a) % r
            if a not in lay.axes:
                continue
            if st != 1:
                raise _Blocked("Slice with a step on a channel axis")
            d = sx[a]
            s = max(0, min(d, s + d if s < 0 else s))
            e = max(0, min(d, e + d if e < 0 else e))
            pos = lay.axes.index(a)
            if s == 0 and e == d:
                continue
            self.range_edits.append(RangeEdit(node, slot, AxisSpec(a, el, pos), s, e))
            el = np.take(el, np.arange(s, e), axis=pos)
        if el.size == 0:
            return
        self.set(node.outputs[0], Layout(lay.axes, el))

    def op_Gather(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if self.lay(node.inputs[1]) is not None:
            raise _Blocked("Gather indexed by channels")
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        si = self.shape(node.inputs[1])
        if sx is None or si is None:
            raise _Blocked("Gather: shape unknown")
        axis = int(self.attr(node, "axis", 0)) % len(sx)
        if axis in lay.axes:
            raise _Blocked("Gather along a channel axis")
        q = len(si)
        self.set(node.outputs[0], Layout(tuple(a if a < axis else a + q - 1 for a in lay.axes), lay.el))

    def op_Transpose(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        if sx is None:
            raise _Blocked("Transpose: input shape unknown")
        perm = list(self.attr(node, "perm", list(range(len(sx)))[::-1]))
        new_axes = sorted(perm.index(a) for a in lay.axes)
        order = [lay.axes.index(perm[j]) for j in new_axes]
        self.set(node.outputs[0], Layout(tuple(new_axes), np.ascontiguousarray(np.transpose(lay.el, order))))

    def _axes_arg(self, node: gs.Node) -> list[int] | None:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if _present(node, 1):
            c = self.const(node.inputs[1])
            if c is None:
                raise _Blocked(f"{node.op} with dynamic axes")
            return [int(a) for a in c.reshape(-1)]
        return None

    def op_Squeeze(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        if sx is None:
            raise _Blocked("Squeeze: input shape unknown")
        axes = self._axes_arg(node)
        r = len(sx)
        red = {a % r for a in axes} if axes is not None else {i for i, d in enumerate(sx) if d == 1}
        keep = [i for i, a in enumerate(lay.axes) if a not in red]
        if not keep:
            return  # a single channel squeezed away
        el = lay.el[tuple(slice(None) if a not in red else 0 for a in lay.axes)]
        self.set(node.outputs[0], Layout(tuple(lay.axes[i] - sum(1 for x in red if x < lay.axes[i]) for i in keep), el))

    def op_Unsqueeze(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        axes = self._axes_arg(node)
        if sx is None or axes is None:
            raise _Blocked("Unsqueeze: shape or axes unknown")
        ro = len(sx) + len(axes)
        ins = sorted(a % ro for a in axes)
        remaining = [i for i in range(ro) if i not in ins]
        self.set(node.outputs[0], Layout(tuple(remaining[a] for a in lay.axes), lay.el))

    def op_Flatten(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        if sx is None:
            raise _Blocked("Flatten: input shape unknown")
        axis = int(self.attr(node, "axis", 1)) % (len(sx) + 1)
        so = [int(np.prod(sx[:axis], dtype=np.int64)), int(np.prod(sx[axis:], dtype=np.int64))]
        self.set(node.outputs[0], self.reshape_layout(lay, sx, so))

    def reshape_layout(self, lay: Layout, sx: list[int], so: list[int]) -> Layout | None:
        blocks = reshape_blocks(list(sx), list(so))
        if blocks is None:
            raise _Blocked("Reshape shapes do not decompose")
        used = [(bi, bo) for bi, bo in blocks if set(bi) & set(lay.axes)]
        in_axes = tuple(a for bi, _ in used for a in bi)
        out_axes = tuple(a for _, bo in used for a in bo)
        full = _expand(lay.el, lay.axes, in_axes, {a: sx[a] for a in in_axes})
        el = np.ascontiguousarray(full).reshape([so[a] for a in out_axes])
        return _simplify(Layout(out_axes, el))

    def op_Reshape(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.lay(x)
        if lay is None:
            return
        sx, sy = self.shape(x), self.shape(node.outputs[0])
        if sx is None or sy is None:
            raise _Blocked("Reshape: shapes unknown")
        new = self.reshape_layout(lay, sx, sy)
        if new is None:
            return
        blocks = reshape_blocks(list(sx), list(sy)) or []
        identity = {bo[0] for bi, bo in blocks if len(bi) == 1 and len(bo) == 1 and bi == bo}
        entries = []
        for pos, a in enumerate(new.axes):
            entries.append((a, AxisSpec(a, new.el, pos)))
        self._shape_vector_edits(node, 1, entries, identity, allow_minus_one=True)
        self.set(node.outputs[0], new)

    def trace_vector(self, node: gs.Node, index: int, depth: int = 0) -> list[tuple] | None:
        """Where each entry of a 1-D int tensor comes from: ("const", node, input, offset, value) for an editable
        constant slot, ("dim", tensor, axis) for a Shape() read, None when unknown."""
        t = node.inputs[index]
        if isinstance(t, gs.Constant):
            return [("const", node, index, k, int(v)) for k, v in enumerate(np.asarray(t.values).reshape(-1))]
        shp = self.shape(t)
        length = int(np.prod(shp)) if shp is not None else None
        p = t.inputs[0] if t.inputs else None
        if p is None or depth > 8:
            return [None] * length if length is not None else None
        out: list[tuple] | None = None
        try:
            if p.op == "Concat":
                out = []
                for i in range(len(p.inputs)):
                    sub = self.trace_vector(p, i, depth + 1)
                    if sub is None:
                        return [None] * length if length is not None else None
                    out += sub
            elif p.op == "Shape":
                src = p.inputs[0]
                ss = self.shape(src)
                if ss is not None:
                    r = len(ss)
                    a0 = int(p.attrs.get("start", 0))
                    a1 = int(p.attrs.get("end", r))
                    a0, a1 = (a0 + r if a0 < 0 else a0), (a1 + r if a1 < 0 else a1)
                    out = [("dim", src, a) for a in range(max(0, a0), min(r, a1))]
            elif p.op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
                out = self.trace_vector(p, 0, depth + 1)
            elif p.op == "Slice" and len(p.inputs) >= 3:
                sub = self.trace_vector(p, 0, depth + 1)
                st, en = self.const(p.inputs[1]), self.const(p.inputs[2])
                steps = self.const(p.inputs[4]) if _present(p, 4) else None
                if sub is not None and st is not None and en is not None and (steps is None or int(steps[0]) == 1):
                    n = len(sub)
                    a0, a1 = int(st.reshape(-1)[0]), int(en.reshape(-1)[0])
                    a0 = max(0, min(n, a0 + n if a0 < 0 else a0))
                    a1 = max(0, min(n, a1 + n if a1 < 0 else a1))
                    out = sub[a0:a1]
            elif p.op == "Gather":
                sub = self.trace_vector(p, 0, depth + 1)
                idx = self.const(p.inputs[1])
                if sub is not None and idx is not None:
                    out = [sub[int(i)] for i in idx.reshape(-1)]
        except (IndexError, KeyError, ValueError, TypeError):
            out = None
        if out is None or (length is not None and len(out) != length):
            return [None] * length if length is not None else None
        return out

    def _shape_vector_edits(self, node: gs.Node, index: int, entries: list[tuple[int, AxisSpec]],
                            identity: set[int], allow_minus_one: bool) -> None:
        """Make entry k of the shape vector (input ``index``) follow the kept count along axis k: constant slots
        are edited; entries read from Shape() of a tensor whose axis carries the same channels follow by
        themselves (checked once units are known); anything else blocks."""
        src = self.trace_vector(node, index)
        if src is None:
            raise _Blocked(f"{node.op} with an untraceable target shape on a channel axis")
        by_slot: dict[tuple[int, int], tuple[gs.Node, int, list[tuple[int, AxisSpec]]]] = {}
        for k, spec in entries:
            e = src[k] if k < len(src) else None
            if e is None:
                raise _Blocked(f"{node.op} with a dynamic target size on a channel axis")
            if e[0] == "const":
                _, n, i, off, v = e
                if v == -1 and allow_minus_one:
                    continue
                if v == 0 and not node.attrs.get("allowzero", 0):
                    if k in identity:
                        continue
                    raise _Blocked(f"{node.op} copies a channel dim from another axis")
                by_slot.setdefault((id(n), i), (n, i, []))[2].append((off, spec))
            else:
                _, t2, j = e
                lay2 = self.lay(t2)
                if lay2 is None or j not in lay2.axes:
                    raise _Blocked(f"{node.op} reads the size of a channel axis from {t2.name}, whose channels are "
                                   "fixed")
                self.ties.append((spec, AxisSpec(j, lay2.el, lay2.axes.index(j)), f"{node.op} {node.name}"))
        for n, i, e in by_slot.values():
            self.shape_edits.append(ShapeEdit(n, i, e))

    def op_Expand(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx, sy = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if sx is None or sy is None:
            raise _Blocked("Expand: shapes unknown")
        off = len(sy) - len(sx)
        new = Layout(tuple(a + off for a in lay.axes), lay.el)
        vec = self.const(node.inputs[1])
        if vec is None:
            raise _Blocked("Expand with a dynamic shape on a channel tensor")
        n = vec.size
        entries = []
        for pos, a in enumerate(new.axes):
            k = a - (len(sy) - n)
            if k >= 0 and int(vec.reshape(-1)[k]) > 1:
                entries.append((k, AxisSpec(a, new.el, pos)))
        if entries:
            self.shape_edits.append(ShapeEdit(node, 1, entries))
        self.set(node.outputs[0], new)

    def op_Tile(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        rep = self.const(node.inputs[1])
        if rep is None or any(int(rep.reshape(-1)[a]) != 1 for a in lay.axes):
            raise _Blocked("Tile repeats a channel axis")
        self.set(node.outputs[0], lay)

    def op_Pad(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        if sx is None:
            raise _Blocked("Pad: input shape unknown")
        r = len(sx)
        if "pads" in node.attrs:
            pads = list(node.attrs["pads"])
        else:
            c = self.const(node.inputs[1]) if _present(node, 1) else None
            if c is None:
                raise _Blocked("Pad with dynamic pads")
            pads = [int(v) for v in c.reshape(-1)]
        axes = list(range(r))
        if _present(node, 3):
            c = self.const(node.inputs[3])
            if c is None:
                raise _Blocked("Pad with dynamic axes")
            axes = [int(a) % r for a in c.reshape(-1)]
        n = len(axes)
        for i, a in enumerate(axes):
            if a in lay.axes and (pads[i] != 0 or pads[i + n] != 0):
                raise _Blocked("Pad on a channel axis")
        self.set(node.outputs[0], lay)

    def op_Resize(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        scales = sizes = None
        if node.op == "Upsample" or (self.opset < 11 and len(node.inputs) >= 2):
            scales = self.const(node.inputs[1]) if _present(node, 1) else None
            if scales is None and "scales" in node.attrs:
                scales = np.asarray(node.attrs["scales"])
            if scales is None:
                raise _Blocked("Resize with dynamic scales")
        else:
            if _present(node, 3):
                sizes = self.const(node.inputs[3])
                if sizes is None:
                    raise _Blocked("Resize with dynamic sizes")
            elif _present(node, 2):
                scales = self.const(node.inputs[2])
                if scales is None:
                    raise _Blocked("Resize with dynamic scales")
        if "axes" in node.attrs:
            raise _Blocked("Resize with an axes attribute")
        if scales is not None and scales.size and any(float(scales.reshape(-1)[a]) != 1.0 for a in lay.axes):
            raise _Blocked("Resize scales a channel axis")
        if sizes is not None:
            self.shape_edits.append(ShapeEdit(node, 3, [(a, AxisSpec(a, lay.el, p)) for p, a in enumerate(lay.axes)]))
        self.set(node.outputs[0], lay)

    op_Upsample = op_Resize

    def op_QuantizeLinear(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        scale = self.const(node.inputs[1])
        if scale is None:
            raise _Blocked(f"{node.op} with a dynamic scale")
        if scale.size > 1:
            sx = self.shape(node.inputs[0])
            axis = int(self.attr(node, "axis", 1)) % len(sx)
            if axis in lay.axes:
                pos = lay.axes.index(axis)
                for i in (1, 2):
                    if _present(node, i):
                        self.slices.append(ConstSlice(node, i, [AxisSpec(0, lay.el, pos)], "param"))
        self.set(node.outputs[0], lay)

    op_DequantizeLinear = op_QuantizeLinear


def toposort(graph: gs.Graph) -> list[gs.Node]:
    """Kahn's algorithm over the main graph (node order of the file breaks ties); O(nodes + edges)."""
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    indeg = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        seen = set()
        for t in n.inputs:
            for p in t.inputs:
                j = index.get(id(p))
                if j is not None and j not in seen:
                    seen.add(j)
                    users[j].append(i)
                    indeg[i] += 1
    ready = [i for i in range(len(nodes)) if indeg[i] == 0]
    ready.reverse()
    order = []
    while ready:
        i = ready.pop()
        order.append(nodes[i])
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):  # a cycle (invalid graph): fall back to file order
        return nodes
    return order


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
    # multi-axis layouts whose units vary along more than one axis cannot be cut densely
    for name, lay in w.layouts.items():
        if lay.el.ndim > 1:
            u = unit_of[lay.el]
            varying = sum(
                1 for i in range(u.ndim) if u.shape[i] > 1 and not np.array_equal(np.broadcast_to(u.take([0], axis=i),
                                                                                                   u.shape), u))
            if varying > 1:
                w.block(lay.el, f"{name}: channels spread over several axes (no dense cut)")
    for a_spec, b_spec, what in w.ties:
        if not np.array_equal(_position_units(a_spec, unit_of), _position_units(b_spec, unit_of)):
            w.block(np.concatenate([a_spec.el.ravel(), b_spec.el.ravel()]),
                    f"{what}: target size read from an axis with other channels")
    blocked_units = np.zeros(n_units, dtype=bool)
    reasons: dict[int, list[str]] = defaultdict(list)
    for el, reason in w.blocks:
        us = unit_of[el]
        blocked_units[us] = True
        for g in np.unique(unit_group_raw[us]).tolist():
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
    # members per group
    members: dict[int, list[str]] = defaultdict(list)
    for s in w.slices:
        gids = set()
        for spec in s.specs:
            gids.update(np.unique(unit_group[unit_of[spec.el.ravel()]]).tolist())
        axes = ",".join(str(sp.axis) for sp in s.specs)
        label = f"{s.node.inputs[s.index].name}[{axes}]"
        for g in gids:
            if label not in members[g]:
                members[g].append(label)
    for e in w.shape_edits:
        for pos, spec in e.entries:
            label = f"{e.node.inputs[e.index].name}[{pos}]"
            for g in np.unique(unit_group[unit_of[spec.el.ravel()]]).tolist():
                if label not in members[g]:
                    members[g].append(label)
    groups = []
    unit_order = np.argsort(first_el, kind="stable")
    units_by_group: dict[int, list[int]] = defaultdict(list)
    for u in unit_order.tolist():
        units_by_group[int(unit_group[u])].append(u)
    producer_block = np.zeros(len(w.sizes), dtype=bool)
    producer_block[list(w.producer_blocks)] = True
    pairs = np.unique(np.stack([unit_group[unit_of], block_of]), axis=1) if n else np.zeros((2, 0), np.int64)
    blocks_by_group: dict[int, list[int]] = defaultdict(list)
    for g, bk in pairs.T.tolist():
        blocks_by_group[g].append(bk)
    for gid in range(len(gid_sorted)):
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
    return ChannelGroups(n, unit_of, unit_group, groups, w.layouts, w.slices, w.shape_edits, w.range_edits,
                         w.split_edits, w.group_edits, w.mac_terms, w.total_macs, shapes, w.folded)


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


@register_analysis("channel_groups")
def channel_groups(graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
    model = ctx.export(graph)
    shapes_in, feed = input_shapes_for(model, ctx)
    return analyse(graph, static_shapes(model, shapes_in, feed))


#: the kept positions of every pruning in this run live on the context itself: they are provenance, not a fact about
#: the current graph, and must survive passes that drop cached analyses (quantize between prune and distill)
_PROVENANCE_ATTR = "_pruned_channel_map"


@register_analysis("channel_map")
def channel_map(graph: gs.Graph, ctx: PassContext) -> dict[str, dict[int, np.ndarray]]:
    """Kept channel positions per pruned tensor: tensor name -> {axis: indices into the original tensor}, as left by
    ``prune-channels`` in this run (empty when nothing was pruned)."""
    return getattr(ctx, _PROVENANCE_ATTR, {})


def remember_channel_map(ctx: PassContext, mapping: dict[str, dict[int, np.ndarray]]) -> None:
    """Record the kept positions of a pruning for later passes (``distill`` matches student to teacher with them).

    Composed with an earlier pruning of the same run: positions index the original (kept-of-kept)."""
    old = getattr(ctx, _PROVENANCE_ATTR, {})
    merged = {k: dict(v) for k, v in old.items()}
    for name, axes in mapping.items():
        for axis, idx in axes.items():
            prev = merged.get(name, {}).get(axis)
            merged.setdefault(name, {})[axis] = prev[idx] if prev is not None else idx
    setattr(ctx, _PROVENANCE_ATTR, merged)
    ctx.invalidate(frozenset(k for k in ctx.cached_analyses() if k != "channel_map"))


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
