"""Channel-group rules for weighted ops: the producers that start groups, and MatMul of two activations.

- A producer with constant weights allocates one fresh element per output channel: Conv (group 1, W[out, in, k..]),
  ConvTranspose (group 1, W[in, out, k..]), Gemm (B[K, N] or B[N, K] with transB) and MatMul with a constant 2-D
  right operand (B[K, N]). Its weight is sliced on the output axis (and its bias), and on the input axis by the
  layout of the data input, which must carry channels on the contracted axis only (axis 1 for convs, K otherwise).
  MACs scale with kept_out/out * kept_in/in.
- Depthwise Conv (group == C_in, W[C_in * m, 1, k..]): output channel o is input channel o // m, so the output
  layout is the input layout with every element repeated m times; ``group`` becomes the kept input count.
  Depthwise ConvTranspose (group == C_in, W[C_in, m, k..]) likewise. Other grouped convs block their inputs.
- MatMul(A, B) of two activations: both operands are broadcast into the virtual product Z[batch.., M, K, N]
  (A over [.., M, K], B over [.., K, N]) and their elements unioned there; the output is Z contracted over K
  (``WalkerBase.contract``). Attention ``Q @ K^T`` with channels spread over (head, dim) thus unions each head's
  dims into one unit: the head is what can go.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups.edits import ConstSlice, GroupAttrEdit, MacTerm
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout
from onnxcompress.analyses.channel_groups.walk import Blocked, WalkerBase, const_value, present


class WeightedRules(WalkerBase):
    def produce(self, node: gs.Node, size: int, w_axes: tuple[int, int], la: Layout | None, k_axis: int,
                bias: bool) -> np.ndarray:
        """Fresh elements for ``size`` output channels of a weighted node. Weight (input 1) axis ``w_axes[0]`` and
        the bias (input 2, axis 0) are sliced by them; weight axis ``w_axes[1]`` by the data input's layout ``la``
        (channels on its axis ``k_axis``). Records the MAC term; returns the new elements."""
        out = self.fresh(size, node.name or node.outputs[0].name)
        self.slices.append(ConstSlice(node, 1, [AxisSpec(w_axes[0], out)], "out"))
        if bias:
            self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "out"))
        factors = [out]
        if la is not None:
            self.slices.append(ConstSlice(node, 1, [AxisSpec(w_axes[1], la.el)], "in", node.inputs[0].name, k_axis))
            factors.append(la.el)
        self.macs(node, factors)
        return out

    def depthwise(self, node: gs.Node, lx: Layout, out: np.ndarray, w_el: np.ndarray, bias: bool) -> None:
        """A depthwise conv: weight axis 0 sliced by ``w_el``, bias by the output elements ``out``; ``group``
        becomes the kept input count."""
        self.slices.append(ConstSlice(node, 1, [AxisSpec(0, w_el)], "dw"))
        if bias:
            self.slices.append(ConstSlice(node, 2, [AxisSpec(0, out)], "dw"))
        self.group_edits.append(GroupAttrEdit(node, AxisSpec(1, lx.el)))
        self.macs(node, [w_el])
        self.set(node.outputs[0], Layout((1,), out))

    def conv_operands(self, node: gs.Node) -> tuple[Layout | None, np.ndarray, bool] | None:
        """(input layout, weight, has bias) of a Conv/ConvTranspose; None when the weight or bias is not constant
        (blocking the input channels)."""
        lx = self.lay(node.inputs[0])
        wv = const_value(node.inputs[1])
        has_bias = present(node, 2)
        if wv is None or (has_bias and not isinstance(node.inputs[2], gs.Constant)):
            if lx is not None:
                what = "weight" if wv is None or node.op == "ConvTranspose" else "bias"
                raise Blocked(f"{node.op} {what} is not a constant")
            return None
        if lx is not None and lx.axes != (1,):
            self.block(lx.el, f"{node.op} input channels spread over spatial axes")
            lx = None
        return lx, wv, has_bias

    def op_Conv(self, node: gs.Node) -> None:
        if (got := self.conv_operands(node)) is None:
            return
        lx, wv, has_bias = got
        group = int(self.attr(node, "group", 1))
        cout = wv.shape[0]
        xs = self.shape(node.inputs[0])
        cin = xs[1] if xs is not None else wv.shape[1] * group
        if group == 1:
            out = self.produce(node, cout, (0, 1), lx, 1, has_bias)
            self.set(node.outputs[0], Layout((1,), out))
        elif group == cin and wv.shape[1] == 1 and cout % cin == 0:
            if lx is not None:
                out = np.repeat(lx.el, cout // cin)
                self.depthwise(node, lx, out, out, has_bias)
        elif lx is not None:
            self.block(lx.el, f"grouped Conv (group={group})")

    def op_ConvTranspose(self, node: gs.Node) -> None:
        if (got := self.conv_operands(node)) is None:
            return
        lx, wv, has_bias = got
        group = int(self.attr(node, "group", 1))
        if group == 1:
            out = self.produce(node, wv.shape[1], (1, 0), lx, 1, has_bias)
            self.set(node.outputs[0], Layout((1,), out))
        elif group == wv.shape[0] and lx is not None:
            self.depthwise(node, lx, np.repeat(lx.el, wv.shape[1]), lx.el, has_bias)
        elif lx is not None:
            self.block(lx.el, f"grouped ConvTranspose (group={group})")

    def op_Gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la = self.lay(a)
        bv = const_value(b)
        if bv is None or bv.ndim != 2:
            if la is not None or self.lay(b) is not None:
                raise Blocked("Gemm with a non-constant B")
            return
        trans_a, trans_b = int(self.attr(node, "transA", 0)), int(self.attr(node, "transB", 0))
        k_axis = 0 if trans_a else 1
        if la is not None and la.axes != (k_axis,):
            self.block(la.el, "Gemm row axis carries channels")
            la = None
        n = bv.shape[0] if trans_b else bv.shape[1]
        out = self.produce(node, n, (0, 1) if trans_b else (1, 0), la, k_axis, False)
        if present(node, 2):
            c = node.inputs[2]
            cv = self.const(c)
            if cv is None:
                self.block(out, "Gemm with a non-constant C")
            elif cv.ndim >= 1 and cv.shape[-1] > 1:
                self.slices.append(ConstSlice(node, 2, [AxisSpec(cv.ndim - 1, out)], "out"))
        self.set(node.outputs[0], Layout((1,), out))

    def op_MatMul(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.lay(a), self.lay(b)
        av, bv = const_value(a), const_value(b)
        if bv is not None:
            if bv.ndim == 2:
                sa = self.shape(a)
                if sa is None:
                    raise Blocked("MatMul: input shape unknown")
                k_axis = len(sa) - 1
                if la is not None and la.axes != (k_axis,):
                    self.block(la.el, "MatMul input carries channels on a non-contracted axis")
                    la = None
                out = self.produce(node, bv.shape[1], (1, 0), la, k_axis, False)
                self.set(node.outputs[0], Layout((k_axis,), out))
                return
            if la is not None:
                raise Blocked(f"MatMul with a constant {bv.ndim}-D right operand")
            return
        if av is not None:
            if lb is not None:
                raise Blocked("MatMul with a constant left operand")
            return
        if la is not None or lb is not None:
            self.matmul_activations(node, la, lb)

    def matmul_activations(self, node: gs.Node, la: Layout | None, lb: Layout | None) -> None:
        sa, sb, sy = self.shape(node.inputs[0]), self.shape(node.inputs[1]), self.shape(node.outputs[0])
        if sa is None or sb is None or sy is None or len(sa) < 2 or len(sb) < 2:
            raise Blocked("MatMul of activations with unknown or 1-D shapes")
        nb = len(sy) - 2
        # virtual Z[batch..., M, K, N]
        zdims = {i: sy[i] for i in range(nb)}
        zdims[nb], zdims[nb + 1], zdims[nb + 2] = sy[-2], sa[-1], sy[-1]

        def zmap(shp: list[int], mat_offset: int):
            """Axis of an operand (shape ``shp``) in Z: batch axes align right, the two matrix axes go to
            Z[nb + mat_offset], Z[nb + mat_offset + 1]."""
            nbo = len(shp) - 2
            return lambda ax: nb - nbo + ax if ax < nbo else nb + mat_offset + (ax - nbo)

        operands = [(la, sa, zmap(sa, 0)), (lb, sb, zmap(sb, 1))]
        mapped = [m for lay, shp, to in operands if lay is not None
                  and (m := self.place(lay, shp, to, zdims, "MatMul broadcasts a channel axis")) is not None]
        if not mapped:
            return
        z = self.join(mapped, zdims)
        # an operand without a layout but with extent on a channel axis of Z fixes those channels
        for lay, shp, to in operands:
            if lay is None and any(to(ax) in z.axes and shp[ax] > 1 for ax in range(len(shp))):
                self.block(z.el, "MatMul meets an operand whose channels are fixed")
        self.mac_terms.append(MacTerm(node, self.node_macs(node), [z.el]))
        yl = self.contract(z, {nb + 1})
        if yl is None:
            return
        self.set(node.outputs[0], Layout(tuple(ax if ax <= nb else ax - 1 for ax in yl.axes), yl.el))
