"""Bias correction of the weight quantization error (Nagel et al. 2019, with the input mean measured).

Quantizing a layer's weights ``W -> Ŵ`` shifts the mean of its output per output channel ``o`` by
``E[ŷ_o] − E[y_o] = Σ_i (Ŵ − W)[o, i] · E[x_i]``; for a Conv the sum runs over the input channels of ``o``'s group
and the kernel positions, for Gemm/MatMul over K (Gemm's ``alpha`` scales it). ``E[x_i]`` is the per-channel mean of
the layer's input on the calibration feeds, collected in the first calibration pass itself (``calibrate``: per
channel sums on axis 1 for Conv inputs, the last axis for Gemm). The shift is subtracted from the float bias, which
the integer build then quantizes: ``b' = b − (Ŵ − W)·E[x]`` (a Conv without a bias gets one). The weights are
quantized like the build does (int8 symmetric, per channel when ``per_channel``).

Anchors: Conv and Gemm with a constant weight and a float32 input; a MatMul with a constant 2-D weight whose output
only one ``Add`` reads, with a constant ``[N]`` bias as its other input (how transformer exports write a linear
layer): that Add's bias absorbs the shift (``matmul_bias``). Measured on MiniLM-L6 (smoothed at alpha 0.8, all-int8,
8 long inputs): embedding 25.3 -> 26.0 dB, weights-only 27.9 -> 28.1 dB; without it output-fitted rounding
(``rounding``) left its own weights' mean shift in the output (weights-only 27.5 dB, with the correction 30.7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import unique_name

from . import qparams_math as qm
from .ort_int8_kernels import const_value, weight_axis

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun


def bias_anchors(base: gs.Graph, dtypes: dict[str, np.dtype], matmul: bool = True) -> dict[str, gs.Node]:
    """Layers whose bias absorbs the weight error: Conv/Gemm with a constant weight and a float input; with
    ``matmul``, also a MatMul read by one Add of a constant bias (``bias_add``)."""
    anchors = {}
    for n in base.nodes:
        if n.op in ("Conv", "Gemm") and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant):
            x = n.inputs[0]
            if dtypes.get(x.name) == np.float32:
                anchors[n.name] = n
        elif matmul and n.op == "MatMul" and bias_add(n) is not None and dtypes.get(n.inputs[0].name) == np.float32:
            anchors[n.name] = n
    return anchors


def bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(the Add, the slot of its constant ``[N]`` bias) when a MatMul with a constant 2-D weight ``[K, N]`` is read
    by one Add alone whose other input is that bias (transformer exports: ``MatMul -> Add(b)``), else None."""
    if node.op != "MatMul" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    w = const_value(node.inputs[1])
    y = node.outputs[0]
    if w is None or w.ndim != 2 or len(y.outputs) != 1 or y.outputs[0].op != "Add" or len(y.outputs[0].inputs) != 2:
        return None
    add = y.outputs[0]
    slot = 1 if add.inputs[0] is y else 0
    if add.inputs[1 - slot] is not y:
        return None
    b = const_value(add.inputs[slot])
    if b is None or b.dtype != np.float32 or b.shape != (w.shape[1],):
        return None
    return add, slot


def channel_axes(anchors: dict[str, gs.Node]) -> dict[str, int]:
    """Input tensor -> the axis whose per-channel sums the calibration pass collects (1 for Conv, -1 for Gemm)."""
    return {n.inputs[0].name: (1 if n.op == "Conv" else -1) for n in anchors.values()}


def correct_biases(run: QuantizeRun, anchors: dict[str, gs.Node]) -> None:
    """Record ``−(Ŵ − W)·E[x]`` per anchor in ``run.bias_shift`` (applied by every build to the layers it
    quantizes), from the input means of ``run.tstats``."""
    means = {n: st.channel_mean for n, st in run.tstats.items() if st.channel_mean is not None}
    fixed = 0
    for n in anchors.values():
        m = means.get(n.inputs[0].name)
        if m is None:
            continue
        shift = weight_error_shift(n, m, run.per_channel)
        if shift is None or not np.any(shift):
            continue
        run.bias_shift[n.name] = -shift
        fixed += 1
    run.stats["bias_corrected_layers"] = fixed


def weight_error_shift(node: gs.Node, mean_x: np.ndarray, per_channel: bool) -> np.ndarray | None:
    """``(Ŵ − W)·E[x]`` per output channel for Conv (grouped too), Gemm and 2-D MatMul weights."""
    w = const_value(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return None
    axis = weight_axis(node, w) if per_channel else None
    err = qm.quantize_weight(w, qm.INT8, axis).dequantized().astype(np.float64) - w.astype(np.float64)
    if node.op == "Conv":
        cout, cin_g = w.shape[0], w.shape[1]
        groups = int(node.attrs.get("group", 1))
        if mean_x.shape != (cin_g * groups,):
            return None
        e = err.reshape(cout, cin_g, -1).sum(axis=2)  # (Cout, Cin/g)
        g_of_o = np.arange(cout) // (cout // groups)
        mx = mean_x.reshape(groups, cin_g)[g_of_o]  # (Cout, Cin/g)
        return np.sum(e * mx, axis=1)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        e = err.T if node.attrs.get("transB", 0) else err  # (K, N)
        if mean_x.shape != (e.shape[0],):
            return None
        return float(node.attrs.get("alpha", 1.0)) * (mean_x @ e)
    if node.op == "MatMul" and w.ndim == 2 and mean_x.shape == (w.shape[0],):
        return mean_x @ err
    return None


def add_to_bias(node: gs.Node, delta: np.ndarray, names: set[str]) -> bool:
    """Add ``delta`` to a Conv/Gemm bias (creating one for Conv if absent), or to the bias of the Add after a MatMul
    (``bias_add``); False where there is no bias to change."""
    delta = np.asarray(delta, dtype=np.float64)
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = const_value(node.inputs[2])
            if b is None:
                return False
            node.inputs[2] = gs.Constant(
                unique_name(f"{node.inputs[2].name}_bc", names), (b + delta).astype(np.float32)
            )
        else:
            node.inputs.append(gs.Constant(unique_name(f"{node.name}_bias_bc", names), delta.astype(np.float32)))
        return True
    if node.op == "Gemm" and len(node.inputs) > 2 and float(node.attrs.get("beta", 1.0)) == 1.0:
        c = const_value(node.inputs[2])
        if c is None or c.ndim != 1 or c.shape != delta.shape:
            return False
        node.inputs[2] = gs.Constant(
            unique_name(f"{node.inputs[2].name}_bc", names), (c + delta).astype(np.float32)
        )
        return True
    found = bias_add(node) if node.op == "MatMul" else None
    if found is not None:
        add, slot = found
        b = const_value(add.inputs[slot])
        add.inputs[slot] = gs.Constant(unique_name(f"{add.inputs[slot].name}_bc", names), (b + delta).astype(np.float32))
        return True
    return False
