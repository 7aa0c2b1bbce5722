"""Exact rewrites that make a float graph quantize better, run by ``quantize`` before calibration.

**Per-channel affine into Conv.** A Conv whose output feeds only an affine op with a constant that broadcasts per
output channel (``k`` of shape ``()``, ``[1]``, ``[C,1,1]``, ``[1,C,1,1]`` ...) absorbs it::

    Mul(y, k):  W' = W·k, b' = b·k          Div(y, k):  W' = W/k, b' = b/k
    Add(y, k):  b' = b + k                  Sub(y, k):  b' = b − k
    BatchNormalization: s = γ/√(σ²+ε), W' = W·s, b' = (b − μ)·s + β

(computed in float64, stored in the weight's dtype). Folding matters for quantization: the integer kernel then
produces the affine's output directly, and the per-channel weight scales absorb per-channel factors, instead of an
extra requantized elementwise op per layer (PP-LCNet's "learnable affine blocks" are such a Mul+Add after every Conv).
The consumer's output tensor keeps its name, so graph outputs are unchanged. A weight shared with other nodes is
copied, never modified in place.

**Constant offsets into the next Conv.** ``Conv(t + k)`` with ``k`` a scalar or per-input-channel constant and a
Conv without padding (1x1 pointwise convs, valid convs) is ``Conv(t) + Σ_{c,kh,kw} W[o, c, kh, kw]·k_c``::

    b'[o] = b[o] + Σ_{c in group(o)} k_c · Σ_{kh,kw} W[o, c, kh, kw]

(exact; with zero padding it would not be: the padded border would see ``k`` in one graph and 0 in the other).
This removes one requantized Add per such layer.

New initializers and node names come from ``onnxcompress.naming.unique_name`` against the caller's set of taken
names (``graph_names(graph)``), so they never collide with a tensor of the graph.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import unique_name

from .ort_int8_kernels import const_value

log = logging.getLogger(__name__)


def _per_channel(k: np.ndarray, cout: int, rank: int) -> np.ndarray | None:
    """``k`` as a vector of length ``cout`` if it broadcasts against ``[N, cout, 1...]`` only along channels."""
    if k.ndim > rank:
        return None
    target = (1, cout) + (1,) * (rank - 2)
    try:
        if np.broadcast_shapes(k.shape, target) != target:
            return None
    except ValueError:
        return None
    return np.broadcast_to(k.astype(np.float64), target).reshape(cout)


def fold_affine_into_conv(graph: gs.Graph, names: set[str]) -> int:
    """Fold Mul/Div/Add/Sub-by-constant and BatchNormalization consumers into Conv weights. Returns folds made."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in list(graph.nodes):
            if conv.op != "Conv" or len(conv.inputs) < 2 or len(conv.outputs) != 1:
                continue
            w = const_value(conv.inputs[1])
            if w is None or w.dtype != np.float32 or w.ndim < 3:
                continue
            y = conv.outputs[0]
            if id(y) in outputs or len(y.outputs) != 1:
                continue
            nxt = y.outputs[0]
            got = _affine_of(nxt, y, w.shape[0], w.ndim)
            if got is None:
                continue
            scale, shift = got
            has_bias = len(conv.inputs) > 2 and conv.inputs[2].name != ""
            b = const_value(conv.inputs[2]) if has_bias else np.zeros(w.shape[0], np.float32)
            if b is None:
                continue
            w2 = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
            b2 = (b.astype(np.float64) * scale + shift).astype(w.dtype)
            new_w = gs.Constant(unique_name(f"{conv.inputs[1].name}_folded", names), w2)
            new_b = gs.Constant(unique_name(f"{conv.name or 'conv'}_bias_folded", names), b2)
            out = nxt.outputs[0]
            conv.inputs = [conv.inputs[0], new_w, new_b]
            conv.outputs = [out]
            nxt.inputs.clear()
            nxt.outputs.clear()
            folded += 1
            changed = True
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded


def fold_offset_into_next_conv(graph: gs.Graph, names: set[str]) -> int:
    """Fold ``Add(t, k)`` / ``Sub(t, k)`` feeding only an unpadded Conv into that Conv's bias. Returns folds made."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or len(conv.inputs) < 2 or not conv.inputs[0].inputs:
            continue
        w = const_value(conv.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim < 3:
            continue
        pads = conv.attrs.get("pads", [0] * (2 * (w.ndim - 2)))
        if any(int(p) for p in pads) or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            continue
        u = conv.inputs[0]
        add = u.inputs[0]
        if add.op not in ("Add", "Sub") or len(add.inputs) != 2 or len(u.outputs) != 1 or id(u) in outputs:
            continue
        a, b = add.inputs
        t, k = (a, b) if const_value(b) is not None else (b, a)
        kv = const_value(k)
        if kv is None or const_value(t) is not None or not np.issubdtype(kv.dtype, np.floating):
            continue
        if add.op == "Sub" and k is not b:
            continue
        groups = int(conv.attrs.get("group", 1))
        cin = w.shape[1] * groups
        kc = _per_channel(kv, cin, w.ndim)
        if kc is None:
            continue
        if add.op == "Sub":
            kc = -kc
        cout, cin_g = w.shape[0], w.shape[1]
        wsum = w.astype(np.float64).reshape(cout, cin_g, -1).sum(axis=2)  # (Cout, Cin/g)
        g_of_o = np.arange(cout) // (cout // groups)
        delta = np.sum(wsum * kc.reshape(groups, cin_g)[g_of_o], axis=1)
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name != ""
        bias = const_value(conv.inputs[2]) if has_bias else np.zeros(cout, np.float32)
        if bias is None:
            continue
        new_b = gs.Constant(
            unique_name(f"{conv.name or 'conv'}_bias_offset", names),
            (bias.astype(np.float64) + delta).astype(w.dtype),
        )
        conv.inputs = [t, conv.inputs[1], new_b]
        add.inputs.clear()
        add.outputs.clear()
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded


def _affine_of(node: gs.Node, y: gs.Tensor, cout: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel if ``node`` computes ``scale·y + shift`` with constants; else None."""
    if len(node.outputs) < 1 or (node.op != "BatchNormalization" and len(node.outputs) != 1):
        return None
    if node.op in ("Mul", "Add", "Sub", "Div") and len(node.inputs) == 2:
        a, b = node.inputs
        other = b if a is y else a
        if other is y:
            return None
        k = const_value(other)
        if k is None or not np.issubdtype(k.dtype, np.floating):
            return None
        kc = _per_channel(k, cout, rank)
        if kc is None:
            return None
        if node.op == "Mul":
            return kc, np.zeros(cout)
        if node.op == "Add":
            return np.ones(cout), kc
        if node.op == "Sub" and a is y:
            return np.ones(cout), -kc
        if node.op == "Div" and a is y and np.all(kc != 0):
            return 1.0 / kc, np.zeros(cout)
        return None
    if node.op == "BatchNormalization" and node.inputs[0] is y and len(node.inputs) == 5:
        if any(o.outputs for o in node.outputs[1:]) or node.attrs.get("training_mode", 0):
            return None
        vals = [const_value(t) for t in node.inputs[1:]]
        if any(v is None for v in vals) or any(v.shape != (cout,) for v in vals):
            return None
        gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
        s = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return s, beta - mean * s
    return None


def name_unnamed_nodes(graph: gs.Graph, names: set[str]) -> int:
    """Give every unnamed node of the main graph a unique name (``<op>_<n>``): layers are reported and excluded by
    name, so every layer needs one."""
    k = 0
    for i, n in enumerate(graph.nodes):
        if not n.name:
            n.name = unique_name(f"{n.op}_{i}", names)
            k += 1
    return k
