"""Channel-group rules for ops that rearrange axes: Transpose, Squeeze/Unsqueeze, Flatten/Reshape, Expand.

- Transpose permutes the layout: output axis j is input axis perm[j], so channel axis a moves to perm.index(a).
- Squeeze/Unsqueeze renumber the channel axes (a squeezed channel axis has a single channel and drops out).
- Reshape/Flatten: input and output shapes are split into runs of consecutive axes with equal products
  (``reshape_blocks``); the layout is broadcast over the runs it touches and reshaped in C order, then axes along
  which it became constant are dropped (``simplify``). Conv -> Flatten -> Gemm maps channel c to features
  c*HW .. c*HW+HW-1; [B,T,384] -> [B,T,12,32] maps it to a (head, dim) pair.
- The target shape vector's entries on channel axes must follow the kept counts. ``trace_vector`` finds where each
  entry comes from through Concat/Shape/Slice/Gather/Cast/Unsqueeze chains: a constant slot becomes a ``ShapeEdit``
  (-1, and 0 on an axis the reshape leaves alone, need none); an entry read by Shape() from an axis with the same
  channels follows by itself (a *tie*, checked once units are known); anything else blocks.
- Expand: right-aligned like broadcasting; entries > 1 of its shape vector on channel axes become kept counts.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import ShapeEdit
from onnxcompress.analyses.channel_groups.layout import (
    AxisSpec,
    Layout,
    clamp_index,
    expand,
    reshape_blocks,
    simplify,
)
from onnxcompress.analyses.channel_groups.walk import Blocked, WalkerBase, present


class ShapeRules(WalkerBase):
    def op_Transpose(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        perm = list(self.attr(node, "perm", list(range(len(sx)))[::-1]))
        new_axes = sorted(perm.index(a) for a in lay.axes)
        order = [lay.axes.index(perm[j]) for j in new_axes]
        self.set(node.outputs[0], Layout(tuple(new_axes), np.ascontiguousarray(np.transpose(lay.el, order))))

    def _axes_arg(self, node: gs.Node) -> list[int] | None:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if present(node, 1):
            return [int(a) for a in self.const_vector(node, 1, f"{node.op} with dynamic axes")]
        return None

    def op_Squeeze(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        axes = self._axes_arg(node)
        r = len(sx)
        red = {a % r for a in axes} if axes is not None else {i for i, d in enumerate(sx) if d == 1}
        keep = [i for i, a in enumerate(lay.axes) if a not in red]
        if not keep:
            return  # a single channel squeezed away
        el = lay.el[tuple(slice(None) if a not in red else 0 for a in lay.axes)]
        self.set(node.outputs[0], Layout(tuple(lay.axes[i] - sum(1 for x in red if x < lay.axes[i]) for i in keep), el))

    def op_Unsqueeze(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        sx = self.shape(node.inputs[0])
        axes = self._axes_arg(node)
        if sx is None or axes is None:
            raise Blocked("Unsqueeze: shape or axes unknown")
        ro = len(sx) + len(axes)
        ins = sorted(a % ro for a in axes)
        remaining = [i for i in range(ro) if i not in ins]
        self.set(node.outputs[0], Layout(tuple(remaining[a] for a in lay.axes), lay.el))

    def op_Flatten(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        axis = int(self.attr(node, "axis", 1)) % (len(sx) + 1)
        so = [int(np.prod(sx[:axis], dtype=np.int64)), int(np.prod(sx[axis:], dtype=np.int64))]
        self.set(node.outputs[0], self.reshape_layout(lay, sx, so))

    def reshape_layout(self, lay: Layout, sx: list[int], so: list[int]) -> Layout | None:
        blocks = reshape_blocks(list(sx), list(so))
        if blocks is None:
            raise Blocked("Reshape shapes do not decompose")
        used = [(bi, bo) for bi, bo in blocks if set(bi) & set(lay.axes)]
        in_axes = tuple(a for bi, _ in used for a in bi)
        out_axes = tuple(a for _, bo in used for a in bo)
        full = expand(lay.el, lay.axes, in_axes, sx)
        el = np.ascontiguousarray(full).reshape([so[a] for a in out_axes])
        return simplify(Layout(out_axes, el))

    def op_Reshape(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.lay(x)
        if lay is None:
            return
        sx, sy = self.shape(x), self.shape(node.outputs[0])
        if sx is None or sy is None:
            raise Blocked("Reshape: shapes unknown")
        new = self.reshape_layout(lay, sx, sy)
        if new is None:
            return
        blocks = reshape_blocks(list(sx), list(sy)) or []
        identity = {bo[0] for bi, bo in blocks if len(bi) == 1 and len(bo) == 1 and bi == bo}
        entries = [(a, AxisSpec(a, new.el, pos)) for pos, a in enumerate(new.axes)]
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
        unknown = [None] * length if length is not None else None
        p = t.inputs[0] if t.inputs else None
        if p is None or depth > 8:
            return unknown
        out: list[tuple] | None = None
        try:
            if p.op == "Concat":
                out = []
                for i in range(len(p.inputs)):
                    sub = self.trace_vector(p, i, depth + 1)
                    if sub is None:
                        return unknown
                    out += sub
            elif p.op == "Shape":
                src = p.inputs[0]
                ss = self.shape(src)
                if ss is not None:
                    r = len(ss)
                    a0, a1 = clamp_index(int(p.attrs.get("start", 0)), r), clamp_index(int(p.attrs.get("end", r)), r)
                    out = [("dim", src, a) for a in range(a0, a1)]
            elif p.op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
                out = self.trace_vector(p, 0, depth + 1)
            elif p.op == "Slice" and len(p.inputs) >= 3:
                sub = self.trace_vector(p, 0, depth + 1)
                st, en = self.const(p.inputs[1]), self.const(p.inputs[2])
                steps = self.input_const(p, 4)
                if sub is not None and st is not None and en is not None and (steps is None or int(steps[0]) == 1):
                    n = len(sub)
                    out = sub[clamp_index(int(st.reshape(-1)[0]), n):clamp_index(int(en.reshape(-1)[0]), n)]
            elif p.op == "Gather":
                sub = self.trace_vector(p, 0, depth + 1)
                idx = self.const(p.inputs[1])
                if sub is not None and idx is not None:
                    out = [sub[int(i)] for i in idx.reshape(-1)]
        except (IndexError, KeyError, ValueError, TypeError):
            out = None
        if out is None or (length is not None and len(out) != length):
            return unknown
        return out

    def _shape_vector_edits(self, node: gs.Node, index: int, entries: list[tuple[int, AxisSpec]],
                            identity: set[int], allow_minus_one: bool) -> None:
        """Make entry k of the shape vector (input ``index``) follow the kept count along axis k: constant slots
        are edited; entries read from Shape() of a tensor whose axis carries the same channels follow by
        themselves (checked once units are known); anything else blocks."""
        src = self.trace_vector(node, index)
        if src is None:
            raise Blocked(f"{node.op} with an untraceable target shape on a channel axis")
        by_slot: dict[tuple[int, int], tuple[gs.Node, int, list[tuple[int, AxisSpec]]]] = {}
        for k, spec in entries:
            e = src[k] if k < len(src) else None
            if e is None:
                raise Blocked(f"{node.op} with a dynamic target size on a channel axis")
            if e[0] == "const":
                _, n, i, off, v = e
                if v == -1 and allow_minus_one:
                    continue
                if v == 0 and not node.attrs.get("allowzero", 0):
                    if k in identity:
                        continue
                    raise Blocked(f"{node.op} copies a channel dim from another axis")
                by_slot.setdefault((id(n), i), (n, i, []))[2].append((off, spec))
            else:
                _, t2, j = e
                lay2 = self.lay(t2)
                if lay2 is None or j not in lay2.axes:
                    raise Blocked(f"{node.op} reads the size of a channel axis from {t2.name}, whose channels are "
                                   "fixed")
                self.ties.append((spec, AxisSpec(j, lay2.el, lay2.axes.index(j)), f"{node.op} {node.name}"))
        for n, i, e in by_slot.values():
            self.shape_edits.append(ShapeEdit(n, i, e))

    def op_Expand(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        sx, sy = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if sx is None or sy is None:
            raise Blocked("Expand: shapes unknown")
        off = len(sy) - len(sx)
        new = Layout(tuple(a + off for a in lay.axes), lay.el)
        vec = self.const(node.inputs[1])
        if vec is None:
            raise Blocked("Expand with a dynamic shape on a channel tensor")
        vec = vec.reshape(-1)
        first = len(sy) - vec.size  # output axis of the vector's entry 0
        entries = [(a - first, AxisSpec(a, new.el, pos)) for pos, a in enumerate(new.axes)
                   if a >= first and int(vec[a - first]) > 1]
        if entries:
            self.shape_edits.append(ShapeEdit(node, 1, entries))
        self.set(node.outputs[0], new)
