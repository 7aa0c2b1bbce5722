"""Channel-group rules for elementwise ops, normalisations and reductions.

- Unary ops (activations, Identity/Dropout/Cast...) pass the layout of input 0 through; a channel-carrying extra input
  (other than CastLike's type source) blocks.
- Broadcasting n-ary ops (Add/Sub/Mul/Div/Max/Min/Pow/Where/PRelu/Clip/comparisons...) align their operands to the
  right (NumPy broadcasting), broadcast every operand layout over the union S of their channel axes and union the
  elements position by position: a residual ``x + f(x)`` makes the channels of x and f(x) one. A channel axis
  broadcast from extent 1 blocks. An operand without a layout but with extent > 1 along an axis of S is sliced along
  it when constant (a per-channel bias or scale) and blocks the channels otherwise (its channels are fixed).
- BatchNormalization/InstanceNormalization: per-channel parameters are sliced along axis 0 (BN on axis 1 only; IN
  blocks channels on axes other than 1, its statistics are per (sample, channel)).
- Statistics over a channel axis change when a channel goes: LayerNormalization (axes >= axis), GroupNormalization,
  LRN, MeanVarianceNormalization, Softmax/LogSoftmax/Hardmax (opset >= 13: one axis; older: all axes from ``axis``)
  and ReduceMean/Max/Min/Prod/LogSum/LogSumExp over a channel axis block. ReduceSum/SumSquare/L1/L2 contract: a
  removed channel is a zero term of the sum, so elements along the reduced axis merge (``WalkerBase.contract``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import ConstSlice
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout
from onnxcompress.analyses.channel_groups.walk import OTHER_REDUCTIONS, Blocked, WalkerBase, present


class ElementwiseRules(WalkerBase):
    def op_unary(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        for i, t in enumerate(node.inputs[1:], 1):
            if self.lay(t) is not None and not (node.op == "CastLike" and i == 1):
                raise Blocked(f"{node.op} with a channel-carrying attribute input")
        if lay is not None:
            for out in node.outputs[:1]:
                self.set(out, lay)
            if node.op == "Dropout" and len(node.outputs) > 1:
                self.set(node.outputs[1], lay)

    def op_broadcast(self, node: gs.Node) -> None:
        operands = list(range(len(node.inputs)))
        if node.op == "Clip":
            operands = [0] + [i for i in (1, 2) if present(node, i) and self.lay(node.inputs[i]) is not None]
        out = node.outputs[0]
        self.set(out, self.broadcast(node, operands, self.shape(out)))

    def broadcast(self, node: gs.Node, operands: list[int], out_shape: list[int] | None) -> Layout | None:
        lays = [(i, self.lay(node.inputs[i])) for i in operands if present(node, i)]
        if not any(lay is not None for _, lay in lays):
            return None
        if out_shape is None:
            raise Blocked(f"{node.op}: output shape unknown")
        r = len(out_shape)
        mapped: list[Layout] = []
        for i, lay in lays:
            if lay is None:
                continue
            shp = self.shape(node.inputs[i])
            if shp is None:
                raise Blocked(f"{node.op}: input shape unknown")
            off = r - len(shp)
            m = self.place(lay, shp, lambda a, off=off: a + off, out_shape, f"{node.op} broadcasts a channel axis")
            if m is not None:
                mapped.append(m)
        if not mapped:
            return None
        result = self.join(mapped, out_shape)
        # operands without layout: constants are sliced; variables with real extent on a channel axis block
        for i, lay in lays:
            if lay is None:
                self._operand_without_layout(node, i, result, out_shape)
        return result

    def _operand_without_layout(self, node: gs.Node, i: int, result: Layout, out_shape: list[int]) -> None:
        t = node.inputs[i]
        shp = self.shape(t)
        if shp is None:
            raise Blocked(f"{node.op}: operand {t.name} has an unknown shape")
        off = len(out_shape) - len(shp)
        specs = []
        for pos, a in enumerate(result.axes):
            ca = a - off
            if ca < 0 or shp[ca] <= 1:
                continue
            if self.const(t) is None:
                self.block(result.el, f"{node.op} meets {t.name}, whose channels are fixed")
                return
            if shp[ca] != out_shape[a]:
                raise Blocked(f"{node.op}: constant {t.name} does not match the channel axis")
            specs.append(AxisSpec(ca, result.el, pos))
        if specs:
            self.slices.append(ConstSlice(node, i, specs, "param"))

    # --- normalisations
    def _per_channel_params(self, node: gs.Node, indices: tuple[int, ...], el: np.ndarray, pos: int,
                            first_role: str) -> None:
        """Constant inputs ``indices`` hold one entry per channel (axis 0): sliced with the channels."""
        for i in indices:
            if self.const(node.inputs[i]) is None:
                raise Blocked(f"{node.op} with non-constant parameters")
            self.slices.append(ConstSlice(node, i, [AxisSpec(0, el, pos)], first_role if i == indices[0] else "param"))

    def _statistics(self, node: gs.Node, lay: Layout, red: set[int], reason: str) -> None:
        """Output = f(input, statistics over axes ``red``): channels on those axes block; the layout passes."""
        if red & set(lay.axes):
            self.block(lay.el, reason)
        self.set(node.outputs[0], lay)

    def op_BatchNormalization(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        if 1 in lay.axes:
            self._per_channel_params(node, (1, 2, 3, 4), lay.el, lay.axes.index(1), "bn")
        self.set(node.outputs[0], lay)

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        if any(a >= 2 for a in lay.axes) or 0 in lay.axes:
            raise Blocked("InstanceNormalization over a channel-carrying axis")
        self._per_channel_params(node, (1, 2), lay.el, 0, "param")
        self.set(node.outputs[0], lay)

    def op_LayerNormalization(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, shp = got
        axis = int(self.attr(node, "axis", -1)) % len(shp)  # statistics over every axis from ``axis`` on
        self._statistics(node, lay, {a for a in lay.axes if a >= axis},
                         "LayerNormalization normalises over the channel axis")

    def op_GroupNormalization(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is not None:
            self._statistics(node, lay, set(lay.axes), "GroupNormalization mixes channels")

    def op_LRN(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is not None:
            self._statistics(node, lay, set(lay.axes), "LRN mixes neighbouring channels")

    def op_MeanVarianceNormalization(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is not None:
            axes = self.attr(node, "axes", [0, 2, 3])
            self._statistics(node, lay, set(axes), "MeanVarianceNormalization over the channel axis")

    def op_Softmax(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, shp = got
        r = len(shp)
        if self.opset >= 13:
            red = {int(self.attr(node, "axis", -1)) % r}
        else:
            red = set(range(int(self.attr(node, "axis", 1)) % r, r))
        self._statistics(node, lay, red, f"{node.op} normalises over the channel axis")

    op_LogSoftmax = op_Softmax
    op_Hardmax = op_Softmax

    # --- reductions
    def op_reduce(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, shp = got
        r = len(shp)
        axes = self.attr(node, "axes", None)
        if axes is None and present(node, 1):
            axes = self.const_vector(node, 1, f"{node.op} with dynamic axes").tolist()
        if not axes:
            if self.attr(node, "noop_with_empty_axes", 0):
                self.set(node.outputs[0], lay)
                return
            axes = list(range(r))
        red = {int(a) % r for a in axes}
        keepdims = int(self.attr(node, "keepdims", 1))
        if red & set(lay.axes) and node.op in OTHER_REDUCTIONS:
            self.block(lay.el, f"{node.op} over the channel axis")
        new = self.contract(lay, red)
        if new is None:
            return
        if not keepdims:
            remap = {a: a - sum(1 for x in red if x < a) for a in new.axes}
            new = Layout(tuple(remap[a] for a in new.axes), new.el)
        self.set(node.outputs[0], new)
