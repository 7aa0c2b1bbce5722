"""What onnxruntime's CPU execution provider can run on 8-bit integers, and where each op keeps its weights.

ORT turns a QDQ graph into integer kernels by matching *node units*: ``DQ -> op -> Q`` groups (its
``QDQSelectorActionTransformer``). On the CPU EP (onnxruntime 1.2x-1.3x) the units are:

========================  ======================================================================================
anchor ops                ``Conv`` -> QLinearConv (DQ x, DQ w, optional DQ int32 bias, Q y — all required but the
                          bias); ``MatMul`` -> QLinearMatMul (with Q y) or MatMulIntegerToFloat (float y);
                          ``Gemm`` -> QGemm (Q y optional)
binary                    ``Add``, ``Mul`` -> QLinearAdd / QLinearMul (DQ on both inputs, Q on the output)
unary (lookup / pooling)  ``Sigmoid``, ``LeakyRelu``, ``AveragePool``, ``GlobalAveragePool``, ``Softmax``
variadic                  ``Concat`` -> QLinearConcat
transparent               ``Reshape``, ``Transpose``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Slice``, ``Gather``,
                          ``Expand``, ``Tile``, ``MaxPool``, ``Resize``, ``Split``: the Q/DQ pair is dropped when
                          input and output share scale and zero point, and the op runs on the 8-bit data
absorbed                  ``Relu`` / ``Clip`` directly before a Q whose range lies inside the clip range are
                          removed (ReluQuantFusion / ClipQuantFusion); a multiplication by a positive scalar
                          constant before a Q is absorbed by us: ``Q(c·t; s, z) = Q(t; s/c, z)``
========================  ======================================================================================

Everything else (Div, Sub, Pow, Sqrt, ReduceMean, LayerNormalization, Erf, Tanh, HardSigmoid, HardSwish, Pad,
ConvTranspose ...) runs in float: in a QDQ graph it costs a DQ before and a Q after.

Per-channel weight axes (the output channel): Conv ``[Cout, Cin/g, k..]`` axis 0; ConvTranspose
``[Cin, Cout/g, k..]`` axis 1; MatMul ``B [K, N]`` axis 1 (the last); Gemm ``B`` axis 1, or 0 when ``transB=1``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

ANCHOR_OPS = frozenset({"Conv", "MatMul", "Gemm"})
BINARY_OPS = frozenset({"Add", "Mul"})
UNARY_OPS = frozenset({"Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool", "Softmax"})
VARIADIC_OPS = frozenset({"Concat"})
#: op -> the input slots that carry data (the others are shapes, indices, scales)
TRANSPARENT_OPS: dict[str, tuple[int, ...]] = {
    "Reshape": (0,),
    "Transpose": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "MaxPool": (0,),
    "Resize": (0,),
    "Split": (0,),
    "Identity": (0,),
}
ABSORBED_ACTIVATIONS = frozenset({"Relu", "Clip"})
#: ops whose weights we quantize when they stay float (weight storage only)
WEIGHT_ONLY_FLOAT_OPS = frozenset({"ConvTranspose"})


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def is_float_const(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.dtype == np.float32


def weight_slot(node: gs.Node) -> int | None:
    """Input slot of the constant weight of an anchor op (None: no constant weight)."""
    if node.op in ("Conv", "ConvTranspose"):
        return 1 if len(node.inputs) > 1 and is_float_const(node.inputs[1]) else None
    if node.op == "Gemm":
        return 1 if len(node.inputs) > 1 and is_float_const(node.inputs[1]) else None
    if node.op == "MatMul":
        if len(node.inputs) == 2 and is_float_const(node.inputs[1]) and node.inputs[1].values.ndim == 2:
            return 1
        return None
    return None


def weight_axis(node: gs.Node, w: np.ndarray) -> int:
    """Per-channel axis of an anchor's weight (the output channel)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return w.ndim - 1  # MatMul B [.., K, N]


def bias_slot(node: gs.Node) -> int | None:
    """Slot of a 1-D constant bias that can be stored as int32 (Conv input 2; Gemm C when 1-D of size N)."""
    if node.op == "Conv" and len(node.inputs) > 2 and is_float_const(node.inputs[2]):
        return 2
    if node.op == "Gemm" and len(node.inputs) > 2 and is_float_const(node.inputs[2]):
        c = node.inputs[2].values
        if c.ndim == 1 and float(attr(node, "beta", 1.0)) == 1.0:
            return 2
    return None


def activation_slots(node: gs.Node) -> tuple[int, ...]:
    """Input slots of an int8-capable node that carry float activations to quantize."""
    op = node.op
    if op in ("Conv", "Gemm", "MatMul"):
        ws = weight_slot(node)
        slots = [i for i in range(min(len(node.inputs), 2)) if i != ws]
        return tuple(slots)
    if op in BINARY_OPS or op == "Div":
        return (0, 1) if op != "Div" else (0,)
    if op in UNARY_OPS or op in ABSORBED_ACTIVATIONS:
        return (0,)
    if op in VARIADIC_OPS:
        return tuple(range(len(node.inputs)))
    if op in TRANSPARENT_OPS:
        return TRANSPARENT_OPS[op]
    return ()


def is_depthwise(node: gs.Node) -> bool:
    if node.op != "Conv":
        return False
    g = int(attr(node, "group", 1))
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return g > 1 and w is not None and w.shape[1] == 1


def conv_rank_ok(node: gs.Node) -> bool:
    """QLinearConv on the CPU EP handles 1-D and 2-D convolutions."""
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return w is not None and w.ndim in (3, 4)


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip / Relu node; None when a bound is not a constant."""
    if node.op == "Relu":
        return 0.0, np.inf
    if node.op != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    lo, hi = -np.inf, np.inf
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(node.inputs[1])
        if v is None:
            return None
        lo = float(v)
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = const_value(node.inputs[2])
        if v is None:
            return None
        hi = float(v)
    return lo, hi


def positive_scalar(t: gs.Tensor) -> float | None:
    """The value of a constant that is a single positive float, else None."""
    v = const_value(t)
    if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.floating):
        return None
    x = float(v.reshape(()))
    return x if x > 0 and np.isfinite(x) else None
