"""Channel-group rules for ops that cut or join tensors along an axis: Concat, Split, Slice, Gather.

- Concat along a channel axis concatenates the inputs' element arrays; an input without a layout contributes fresh
  elements that are blocked (its channels are fixed, but the others' stay prunable). Concat along a free axis
  requires the channel axes to agree: the inputs' layouts are unioned position by position (``WalkerBase.join``) and
  an input without a layout but with extent on a channel axis blocks.
- Split along a channel axis cuts the element array at the part boundaries; each part's size becomes its kept count
  (a ``SplitEdit``; ``ChannelGroups.check_removal`` keeps every part non-empty). Along a free axis it passes.
- Slice with step 1 along a channel axis takes ``el[s:e]`` (s, e clamped into [0, d], negatives from the end); the
  range becomes [#kept before s, #kept before s + #kept in [s, e)) (a ``RangeEdit``). A step on a channel axis, or
  dynamic starts/ends that may touch one, blocks.
- Gather along a free axis passes (the channel axes after it shift by rank(indices) - 1); along a channel axis, or
  indexed by a channel-carrying tensor, it blocks.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import RangeEdit, SplitEdit
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout, clamp_index, part_bounds
from onnxcompress.analyses.channel_groups.walk import Blocked, WalkerBase, present


class IndexRules(WalkerBase):
    def op_Concat(self, node: gs.Node) -> None:
        ins = [t for t in node.inputs if t.name]
        lays = [self.lay(t) for t in ins]
        if not any(lays):
            return
        y = node.outputs[0]
        sy = self.shape(y)
        if sy is None:
            raise Blocked("Concat: output shape unknown")
        axis = int(self.attr(node, "axis", 0)) % len(sy)
        if all(lay is None or axis not in lay.axes for lay in lays):
            # concatenation along a free axis: channel axes must agree across inputs
            joined = self.join([lay for lay in lays if lay is not None], sy)
            for t, lay in zip(ins, lays, strict=True):
                st = self.shape(t) if lay is None else None
                if lay is None and (st is None or any(st[a] > 1 for a in joined.axes)):
                    self.block(joined.el, f"Concat with {t.name}, whose channels are fixed")
            self.set(y, joined)
            return
        parts = []
        for t, lay in zip(ins, lays, strict=True):
            st = self.shape(t)
            if st is None:
                raise Blocked("Concat: input shape unknown")
            if lay is None:
                filler = self.fresh(st[axis], f"{t.name} (fixed)", producer=False)
                self.block(filler, f"concatenated with {t.name}, whose channels are fixed")
                parts.append(filler)
            elif lay.axes != (axis,):
                raise Blocked("Concat of multi-axis channel layouts")
            else:
                parts.append(lay.el)
        self.set(y, Layout((axis,), np.concatenate(parts)))

    def op_Split(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        axis = int(self.attr(node, "axis", 0)) % len(sx)
        if axis not in lay.axes:
            for out in node.outputs:
                self.set(out, lay)
            return
        pos = lay.axes.index(axis)
        if present(node, 1):
            sizes = [int(v) for v in self.const_vector(node, 1, "Split with dynamic sizes")]
        elif "split" in node.attrs:
            sizes = [int(v) for v in node.attrs["split"]]
        else:
            n = len(node.outputs)
            d = sx[axis]
            chunk = -(-d // n)
            sizes = [min(chunk, d - i * chunk) for i in range(n)]
        if sum(sizes) != sx[axis]:
            raise Blocked("Split sizes do not add up")
        for out, (a, b) in zip(node.outputs, part_bounds(sizes), strict=True):
            self.set(out, Layout(lay.axes, np.take(lay.el, np.arange(a, b), axis=pos)))
        self.split_edits.append(SplitEdit(node, AxisSpec(axis, lay.el, pos), sizes))

    def _slice_args(self, node: gs.Node, lay: Layout, r: int) -> tuple[list, list, list | None, list | None] | None:
        """(starts, ends, axes, steps) of a Slice; None when dynamic ranges lie on free axes only (it passes)."""
        if len(node.inputs) < 3:  # opset < 10: attributes
            return list(node.attrs["starts"]), list(node.attrs["ends"]), node.attrs.get("axes"), None
        vals = [None if (c := self.input_const(node, i)) is None else [int(v) for v in c.reshape(-1)]
                for i in (1, 2, 3, 4)]
        starts, ends, axes, steps = vals
        if starts is None or ends is None:
            if any(present(node, i) and self.const(node.inputs[i]) is None for i in (1, 2)):
                # dynamic ranges are fine on free axes only; we cannot tell which: require constant axes
                if axes is None or any(int(a) % r in lay.axes for a in axes):
                    raise Blocked("Slice with dynamic starts/ends on a channel axis")
                return None
        return starts, ends, axes, steps

    def op_Slice(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        r = len(sx)
        args = self._slice_args(node, lay, r)
        if args is None:
            self.set(node.outputs[0], lay)
            return
        starts, ends, axes, steps = args
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
                raise Blocked("Slice with a step on a channel axis")
            d = sx[a]
            s, e = clamp_index(s, d), clamp_index(e, d)
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
            raise Blocked("Gather indexed by channels")
        if lay is None:
            return
        sx = self.shape(node.inputs[0])
        si = self.shape(node.inputs[1])
        if sx is None or si is None:
            raise Blocked("Gather: shape unknown")
        axis = int(self.attr(node, "axis", 0)) % len(sx)
        if axis in lay.axes:
            raise Blocked("Gather along a channel axis")
        q = len(si)
        self.set(node.outputs[0], Layout(tuple(a if a < axis else a + q - 1 for a in lay.axes), lay.el))
