"""Row ranges: a dynamic layer's input quantized with one range per row (token), on onnxruntime's int8 kernels.

``DynamicQuantizeLinear`` gives a whole input one range, so one token with large values coarsens every other
token's rounding. A row-range layer gives each row ``r`` (all axes but the last; the product's reduction axis is the
last) its own range ``[m_r, M_r]``::

    d_r = max(M_r - m_r, tiny)            q = QuantizeLinear((x - m_r) / d_r, 1/255, 0)   in 0..255
    x ≈ m_r + (d_r / 255) q

    y = x W ≈ (d_r / 255) s_w · Σ_k q_k (W_q,k - z_w)  +  m_r · c,     c = s_w · Σ_k (W_q,k - z_w)   (per column)

The first term is one integer product: ``MatMulInteger(q, W_q, 0, z_w) -> Cast -> Mul(S · s_w / 255)`` with the
scalar ``S = max_r d_r``, times ``t_r = d_r / S`` afterwards; written so, onnxruntime fuses the product into
``MatMulIntegerToFloat`` (measured: its fusion also accepts a per-row scale there and then computes wrong values, so
the per-row factor stays outside it). The second term is the rows' offsets, an outer product with a constant
vector. The row's rounding error is at most ``d_r / 510`` instead of the tensor's range over 510: on MiniLM-L6
(every MatMul, smoothing at 0.65, held out) the embedding went 24.4 / 24.6 -> 30.5 / 31.5 dB (short / long inputs).
The layers reading one input (Q, K, V) become one product over their joined weights and a ``Split``.

Cost: two reductions, two element-wise passes and a QuantizeLinear per input (shared by the layers reading it),
and three element-wise ops on each layer's output, where a ``MatMul -> Add(b)`` bias joins the offsets' sum (ORT
fuses the bias of a plain dynamic layer into ``MatMulIntegerToFloat``; the per-row factor in between prevents that).
MiniLM-L6 with every layer in rows 0.40x -> 0.50x of FP32 (1 thread, 30 tokens; 0.515x before the bias joined the
sum), so rows are a mixed-precision level (``lift_to``), chosen per layer by measured gain, not the default.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import Namer

from .two_pass import integer_product

#: a constant row's range: its offsets carry it exactly, the quotient (x - m) / d is 0
TINY = np.float32(1e-30)
#: ReduceMax/ReduceMin take their axes as an input from this opset on (an attribute before)
REDUCE_AXES_INPUT = 18


class RowInputs:
    """The row quantization of each input, made once and shared by the layers that read it (one per scope)."""

    def __init__(self, namer: Namer, opset: int):
        self.namer, self.opset = namer, opset
        self.made: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]] = {}
        #: input name -> (input, [(weight, output, bias, base)]): the layers reading it, made by ``products``
        self.readers: dict[str, tuple[gs.Variable, list[tuple]]] = {}

    def add(self, x: gs.Variable, weight: tuple[gs.Constant, gs.Constant, gs.Constant], y: gs.Variable,
            bias: gs.Constant | None, base: str) -> None:
        """Register a layer ``y = x W (+ bias)``; its nodes come from ``products``."""
        self.readers.setdefault(x.name, (x, []))[1].append((weight, y, bias, base))

    def products(self) -> list[gs.Node]:
        """The nodes of every registered layer: the layers reading one input as one wide integer product and a
        ``Split`` (Q/K/V: one per-row multiply and one offsets sum instead of three; MiniLM-L6 at 32 dB, 30 tokens, in
        one call 0.505x -> 0.49x, the same outputs), a layer alone as ``row_product``."""
        nodes: list[gs.Node] = []
        for x, members in self.readers.values():
            if len(members) == 1:
                weight, y, bias, base = members[0]
                nodes += row_product(x, weight, y, base, self.namer, self, bias)
                continue
            base = members[0][3]
            wide = gs.Variable(self.namer(f"{base}_row_readers"), dtype=np.float32)
            nodes += row_product(x, _joined_weights(members, self.namer, base), wide, base, self.namer, self,
                                 _joined_biases(members, self.namer, base))
            sizes = gs.Constant(self.namer(f"{base}_row_split"),
                                np.asarray([m[0][0].values.shape[1] for m in members], np.int64))
            nodes.append(gs.Node("Split", self.namer(f"{base}_row_Split"), attrs={"axis": -1},
                                 inputs=[wide, sizes], outputs=[m[1] for m in members]))
        self.readers.clear()
        return nodes

    def _reduce(self, op: str, x: gs.Variable, out: gs.Variable, base: str) -> gs.Node:
        if self.opset >= REDUCE_AXES_INPUT:
            axes = gs.Constant(self.namer(f"{base}_row_axes"), np.asarray([-1], np.int64))
            return gs.Node(op, self.namer(f"{base}_row_{op}"), attrs={"keepdims": 1}, inputs=[x, axes], outputs=[out])
        return gs.Node(op, self.namer(f"{base}_row_{op}"), attrs={"axes": [-1], "keepdims": 1}, inputs=[x],
                       outputs=[out])

    def quantized(self, x: gs.Variable, base: str) -> tuple[list[gs.Node], tuple[gs.Variable, ...]]:
        """(new nodes, (q, t, m, S)) for ``x``; the nodes are empty when ``x`` was quantized before."""
        if x.name in self.made:
            return [], self.made[x.name]

        def var(suffix: str, dtype=np.float32) -> gs.Variable:
            return gs.Variable(self.namer(f"{base}_row_{suffix}"), dtype=dtype)

        def const(suffix: str, value) -> gs.Constant:
            return gs.Constant(self.namer(f"{base}_row_{suffix}"), np.asarray(value))

        hi, lo, width, span, shifted, unit = (var(s) for s in ("max", "min", "width", "span", "shifted", "unit"))
        q, top, t = var("quantized", np.uint8), var("top_span", np.float32), var("span_share")
        nodes = [
            self._reduce("ReduceMax", x, hi, base),
            self._reduce("ReduceMin", x, lo, base),
            gs.Node("Sub", self.namer(f"{base}_row_width"), inputs=[hi, lo], outputs=[width]),
            gs.Node("Max", self.namer(f"{base}_row_span"), inputs=[width, const("tiny", TINY)], outputs=[span]),
            gs.Node("Sub", self.namer(f"{base}_row_shift"), inputs=[x, lo], outputs=[shifted]),
            gs.Node("Div", self.namer(f"{base}_row_unit"), inputs=[shifted, span], outputs=[unit]),
            gs.Node("QuantizeLinear", self.namer(f"{base}_row_QuantizeLinear"),
                    inputs=[unit, const("step", np.float32(1 / 255)), const("zero", np.uint8(0))], outputs=[q]),
            gs.Node("ReduceMax", self.namer(f"{base}_row_top_span"), attrs={"keepdims": 0}, inputs=[span],
                    outputs=[top]),
            gs.Node("Div", self.namer(f"{base}_row_span_share"), inputs=[span, top], outputs=[t]),
        ]
        self.made[x.name] = (q, t, lo, top)
        return nodes, self.made[x.name]


def _columns(value, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value), (n,))


def _joined_weights(members: list[tuple], namer: Namer, base: str) -> tuple[gs.Constant, gs.Constant, gs.Constant]:
    """The readers' ``(W_q, z_w, s_w)`` side by side along the output columns."""
    weights = [m[0] for m in members]
    cols = [w[0].values.shape[1] for w in weights]
    return (gs.Constant(namer(f"{base}_row_joined_quantized"), np.concatenate([w[0].values for w in weights], axis=1)),
            gs.Constant(namer(f"{base}_row_joined_zero_point"),
                        np.concatenate([_columns(w[1].values, c) for w, c in zip(weights, cols, strict=True)])),
            gs.Constant(namer(f"{base}_row_joined_scale"), np.concatenate(
                [_columns(w[2].values, c) for w, c in zip(weights, cols, strict=True)]).astype(np.float32)))


def _joined_biases(members: list[tuple], namer: Namer, base: str) -> gs.Constant | None:
    """The readers' biases side by side (zeros for a reader without one); None when none has one."""
    if all(m[2] is None for m in members):
        return None
    return gs.Constant(namer(f"{base}_row_joined_bias"), np.concatenate(
        [np.asarray(m[2].values, np.float32) if m[2] is not None else np.zeros(m[0][0].values.shape[1], np.float32)
         for m in members]))


def offsets(codes: np.ndarray, zero_point: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``c = s_w · Σ_k (W_q,k - z_w)``: the float weight's column sums (``codes`` [K, N])."""
    w = codes.astype(np.int64) - np.asarray(zero_point).astype(np.int64)
    return (w.sum(axis=0) * np.asarray(scale, np.float64)).astype(np.float32)


def row_product(x: gs.Variable, weight: tuple[gs.Constant, gs.Constant, gs.Constant], y: gs.Variable, base: str,
                namer: Namer, rows: RowInputs, bias: gs.Constant | None = None) -> list[gs.Node]:
    """The nodes computing ``y = x W (+ bias)`` with ``x`` in row ranges (module doc) from ``weight = (W_q, z_w,
    s_w)``; a bias joins the offsets in one ``Sum`` (the MatMul's bias ``Add`` folded in: one op fewer per layer)."""
    w_q, w_zp, w_scale = weight
    made, (q, t, lo, top) = rows.quantized(x, base)

    def var(suffix: str, dtype=np.float32) -> gs.Variable:
        return gs.Variable(namer(f"{base}_row_{suffix}"), dtype=dtype)

    step = gs.Constant(namer(f"{base}_row_weight_step"),
                       (np.asarray(w_scale.values, np.float64) / 255).astype(np.float32))
    column = gs.Constant(namer(f"{base}_row_offsets"), offsets(w_q.values, w_zp.values, w_scale.values))
    zero = gs.Constant(namer(f"{base}_row_input_zero"), np.asarray(np.uint8(0)))
    y_top, y_rows, y_off = (var(s) for s in ("top", "rows", "off"))
    return [
        *made,
        *integer_product(q, zero, top, (w_q, w_zp, step), y_top, base, namer, "row_"),
        gs.Node("Mul", namer(f"{base}_row_share"), inputs=[y_top, t], outputs=[y_rows]),
        gs.Node("Mul", namer(f"{base}_row_offset"), inputs=[lo, column], outputs=[y_off]),
        gs.Node("Add", namer(f"{base}_row_Add"), inputs=[y_rows, y_off], outputs=[y]) if bias is None else
        gs.Node("Sum", namer(f"{base}_row_Sum"), inputs=[y_rows, y_off, bias], outputs=[y]),
    ]
