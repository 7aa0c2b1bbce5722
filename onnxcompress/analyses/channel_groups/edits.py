"""The records the channel-group walk leaves, the result of the analysis and the graph edits it drives.

The walk records what a removal must change: constants to slice along an axis (``ConstSlice``), entries of shape
vectors that become kept counts (``ShapeEdit``), Slice ranges (``RangeEdit``), Split sizes (``SplitEdit``),
depthwise ``group`` attributes (``GroupAttrEdit``) and MAC terms (``MacTerm``).

``ChannelGroups`` holds the element -> unit -> group maps and all those records. Removing a set of units is then pure
bookkeeping: an element is kept iff its unit is kept (``keep_el = keep_unit[unit_of]``); along every recorded axis a
position is kept iff an element there is kept (``AxisSpec.keep``); a constant is ``np.compress``-ed along each such
axis, a shape entry becomes the kept count, a Slice range ``[s, e)`` becomes ``[#kept before s, + #kept in [s, e))``
and a Split part's size its kept count. MACs after the cut: each term's MACs scale with the product of the kept
fractions of its factors. ``zeroed_model`` zeroes the same weights instead of cutting them (same outputs, same
shapes), which is what the tests compare against.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import mmap_weights
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout, axis_elements, part_bounds
from onnxcompress.naming import unique_name


# ------------------------------------------------------------------------------------------- edit records
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


# ------------------------------------------------------------------------------------------------ the result
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
        """Units (from ``removed_units``) to put back so that no Split part / Slice range / weight axis becomes empty."""
        removed = set(int(u) for u in removed_units)
        restore: list[int] = []
        changed = True
        while changed:
            changed = False
            keep_el = self.keep_elements(np.fromiter(removed, dtype=np.int64, count=len(removed)))
            ranges: list[np.ndarray] = []
            for e in self.split_edits:
                k = e.spec.keep(keep_el)
                ranges += [axis_elements(e.spec)[a:b] for a, b in part_bounds(e.sizes) if not k[a:b].any()]
            for e in self.range_edits:
                k = e.spec.keep(keep_el)
                if not k[e.start:e.end].any() and e.end > e.start:
                    ranges.append(axis_elements(e.spec)[e.start:e.end])
            for sl in self.slices:  # no weight may lose a whole axis (a Concat input's producer, an SE squeeze)
                ranges += [axis_elements(spec) for spec in sl.specs if not spec.keep(keep_el).any()]
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
        keep_el = self.keep_elements(removed_units)
        const_edits: dict[tuple[int, int], tuple[gs.Node, int, np.ndarray]] = {}
        attr_edits: list[tuple[gs.Node, str, Any]] = []

        def current(node: gs.Node, index: int) -> np.ndarray:
            key = (id(node), index)
            if key in const_edits:
                return const_edits[key][2]
            return self.value(node.inputs[index])

        def put(node: gs.Node, index: int, arr: np.ndarray) -> None:
            const_edits[(id(node), index)] = (node, index, arr)

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
                put(s.node, s.index, new)
        for e in self.shape_edits:
            vec = current(e.node, e.index).copy()
            changed = False
            for pos, spec in e.entries:
                n = int(spec.keep(keep_el).sum())
                if vec.reshape(-1)[pos] != n:
                    vec.reshape(-1)[pos] = n
                    changed = True
            if changed:
                put(e.node, e.index, vec)
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
                    put(e.node, idx, vec)
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
            sizes = np.array([int(k[a:b].sum()) for a, b in part_bounds(e.sizes)], dtype=np.int64)
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
        keep_el = self.keep_elements(removed_units)
        out: dict[str, dict[int, np.ndarray]] = {}
        for name, lay in self.layouts.items():
            for i, a in enumerate(lay.axes):
                k = AxisSpec(a, lay.el, i).keep(keep_el)
                if not k.all():
                    out.setdefault(name, {})[a] = np.flatnonzero(k)
        return out

    def zeroed_model(self, model: onnx.ModelProto, removed_units: Iterable[int]) -> onnx.ModelProto:
        """A copy of ``model`` with the weights of the removed channels zeroed (producer outputs, biases, consumer
        inputs) instead of cut: the outputs equal the pruned model's."""
        keep_el = self.keep_elements(removed_units)
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
                arr = mmap_weights.tensor_array(inits[name]).copy()
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
                const = gs.Constant(unique_name(f"{t.name}_pruned", taken), np.ascontiguousarray(arr))
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

