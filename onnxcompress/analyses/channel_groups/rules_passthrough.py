"""Channel-group rules for ops that move data along free axes only and so pass channels through unchanged.

- Pooling (Max/Average/Lp, global or not) works per channel over space: it passes a layout on axis 1; a layout on a
  spatial axis, or a used indices output, blocks.
- Pad passes when no channel axis is padded (pads[i] == pads[i + n] == 0 for each channel axis i).
- Resize/Upsample passes when every channel axis has scale 1; with an explicit ``sizes`` vector its entries on channel
  axes become the kept counts (a ``ShapeEdit``).
- Tile passes when every channel axis is repeated once.
- QuantizeLinear/DequantizeLinear pass; per-axis scale and zero point on a channel axis are sliced with it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import ConstSlice, ShapeEdit
from onnxcompress.analyses.channel_groups.layout import AxisSpec
from onnxcompress.analyses.channel_groups.walk import Blocked, WalkerBase, present


class PassThroughRules(WalkerBase):
    def op_pool(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        if lay.axes != (1,):
            raise Blocked(f"{node.op} over a channel-carrying spatial axis")
        self.set(node.outputs[0], lay)
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise Blocked(f"{node.op} indices output is used")

    def op_Pad(self, node: gs.Node) -> None:
        if (got := self.data_input(node)) is None:
            return
        lay, sx = got
        r = len(sx)
        if "pads" in node.attrs:
            pads = list(node.attrs["pads"])
        else:
            pads = [int(v) for v in self.const_vector(node, 1, "Pad with dynamic pads")]
        axes = list(range(r))
        if present(node, 3):
            axes = [int(a) % r for a in self.const_vector(node, 3, "Pad with dynamic axes")]
        n = len(axes)
        for i, a in enumerate(axes):
            if a in lay.axes and (pads[i] != 0 or pads[i + n] != 0):
                raise Blocked("Pad on a channel axis")
        self.set(node.outputs[0], lay)

    def op_Resize(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        scales = sizes = None
        if node.op == "Upsample" or (self.opset < 11 and len(node.inputs) >= 2):
            scales = self.input_const(node, 1)
            if scales is None and "scales" in node.attrs:
                scales = np.asarray(node.attrs["scales"])
            if scales is None:
                raise Blocked("Resize with dynamic scales")
        elif present(node, 3):
            sizes = self.const_vector(node, 3, "Resize with dynamic sizes")
        elif present(node, 2):
            scales = self.const_vector(node, 2, "Resize with dynamic scales")
        if "axes" in node.attrs:
            raise Blocked("Resize with an axes attribute")
        if scales is not None and scales.size and any(float(scales.reshape(-1)[a]) != 1.0 for a in lay.axes):
            raise Blocked("Resize scales a channel axis")
        if sizes is not None:
            self.shape_edits.append(ShapeEdit(node, 3, [(a, AxisSpec(a, lay.el, p)) for p, a in enumerate(lay.axes)]))
        self.set(node.outputs[0], lay)

    op_Upsample = op_Resize

    def op_Tile(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        rep = self.const(node.inputs[1])
        if rep is None or any(int(rep.reshape(-1)[a]) != 1 for a in lay.axes):
            raise Blocked("Tile repeats a channel axis")
        self.set(node.outputs[0], lay)

    def op_QuantizeLinear(self, node: gs.Node) -> None:
        if (lay := self.lay(node.inputs[0])) is None:
            return
        scale = self.const(node.inputs[1])
        if scale is None:
            raise Blocked(f"{node.op} with a dynamic scale")
        if scale.size > 1:
            sx = self.shape(node.inputs[0])
            axis = int(self.attr(node, "axis", 1)) % len(sx)
            if axis in lay.axes:
                pos = lay.axes.index(axis)
                for i in (1, 2):
                    if present(node, i):
                        self.slices.append(ConstSlice(node, i, [AxisSpec(0, lay.el, pos)], "param"))
        self.set(node.outputs[0], lay)

    op_DequantizeLinear = op_QuantizeLinear
