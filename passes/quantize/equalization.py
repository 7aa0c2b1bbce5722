"""Cross-layer equalization (Nagel et al. 2019), an exact rewrite ``quantize{equalize=true}`` runs before calibration.

For Conv1 -> f -> Conv2 with ``f`` positively homogeneous (identity, Relu, LeakyRelu: ``f(x/s) = f(x)/s`` for
``s > 0``), per channel ``i`` with ``r1_i = max|W1[i]|`` (output channel of Conv1) and ``r2_i = max|W2[:, i]|``
(input channel of Conv2; for a depthwise Conv2 its channel ``i``)::

    s_i = sqrt(r1_i / r2_i);   W1[i] /= s_i;   b1[i] /= s_i;   W2[:, i] *= s_i

after which both ranges equal ``sqrt(r1_i · r2_i)`` — per-tensor-friendly weights, exactly the same function.
New initializers are named ``<weight>_cle`` (``onnxcompress.naming.unique_name``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import unique_name

from .ort_int8_kernels import const_value, is_depthwise

#: f between the two Convs: positively homogeneous, f(x / s) = f(x) / s for s > 0
HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu", "Identity"})


def equalize(graph: gs.Graph, names: set[str], iterations: int = 2) -> int:
    """Cross-layer equalization of Conv -> (Relu|LeakyRelu|none) -> Conv pairs; returns pairs equalized."""
    pairs = 0
    outputs = {id(t) for t in graph.outputs}
    for _ in range(iterations):
        for c1 in list(graph.nodes):
            if c1.op != "Conv" or len(c1.inputs) < 2 or len(c1.outputs) != 1:
                continue
            w1 = const_value(c1.inputs[1])
            if (
                w1 is None
                or w1.dtype != np.float32
                or int(c1.attrs.get("group", 1)) != 1
                and not is_depthwise(c1)
            ):
                continue
            y = c1.outputs[0]
            if id(y) in outputs or len(y.outputs) != 1:
                continue
            nxt = y.outputs[0]
            if nxt.op in HOMOGENEOUS_OPS:
                z = nxt.outputs[0]
                if id(z) in outputs or len(z.outputs) != 1:
                    continue
                nxt = z.outputs[0]
            if nxt.op != "Conv" or len(nxt.inputs) < 2:
                continue
            w2 = const_value(nxt.inputs[1])
            if w2 is None or w2.dtype != np.float32:
                continue
            g2 = int(nxt.attrs.get("group", 1))
            cout = w1.shape[0]
            if g2 == 1:
                if w2.shape[1] != cout:
                    continue
                r2 = np.abs(w2).max(axis=tuple(i for i in range(w2.ndim) if i != 1)).astype(np.float64)
            elif is_depthwise(nxt) and w2.shape[0] == cout:
                r2 = np.abs(w2).reshape(cout, -1).max(axis=1).astype(np.float64)
            else:
                continue
            r1 = np.abs(w1).reshape(cout, -1).max(axis=1).astype(np.float64)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(cout)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if np.allclose(s, 1.0, rtol=1e-3):
                continue
            has_b1 = len(c1.inputs) > 2 and c1.inputs[2].name
            b1 = const_value(c1.inputs[2]) if has_b1 else np.zeros(cout, np.float32)
            if b1 is None:
                continue
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            w1n = (w1 / s.reshape(shape1)).astype(np.float32)
            b1n = (b1 / s).astype(np.float32)
            if g2 == 1:
                shape2 = (1, -1) + (1,) * (w2.ndim - 2)
            else:
                shape2 = (-1,) + (1,) * (w2.ndim - 1)
            w2n = (w2 * s.reshape(shape2)).astype(np.float32)
            c1.inputs[1] = gs.Constant(unique_name(f"{c1.inputs[1].name}_cle", names), w1n)
            if has_b1:
                c1.inputs[2] = gs.Constant(unique_name(f"{c1.inputs[2].name}_cle", names), b1n)
            else:
                c1.inputs.append(gs.Constant(unique_name(f"{c1.name}_bias_cle", names), b1n))
            nxt.inputs[1] = gs.Constant(unique_name(f"{nxt.inputs[1].name}_cle", names), w2n)
            pairs += 1
    return pairs
