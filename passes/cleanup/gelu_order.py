"""``cleanup``: the erf GELU written in the operand order onnxruntime fuses (``order_gelu``).

GELU(x) = x · ½ (1 + erf(x / √2)). onnxruntime's GeluFusion turns the chain into one ``Gelu`` kernel when the
product is written ``(x · (1 + erf(x / √2))) · ½`` (or ``(x · ½) · (1 + erf)``); the torch dynamo exporter writes
``x · (½ · (1 + erf(x / √2)))``, which the fusion does not match, so the five element-wise nodes run one by one.
Rewritten here: the inner ``Mul(½, a)`` becomes ``Mul(x, a)`` and the outer ``Mul(x, ·)`` becomes ``Mul(·, ½)``.

Exact: a product by ½ only moves the exponent, so ``x · (½ a)`` and ``(x a) · ½`` are the same float (away from
the subnormal range); the nodes' outputs keep their names, and the inner product had no other reader.
MiniLM-L6 (dynamo export, 6 GELUs; dynamic int8 with four float layers, held out at 29.5 dB): 0.50-0.52x -> 0.48-0.51x
of FP32, three calls.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs


def _scalar(t, value: float) -> bool:
    return isinstance(t, gs.Constant) and t.values.size == 1 and float(np.asarray(t.values).ravel()[0]) == value


def _only_reader(t: gs.Variable, op: str) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.outputs[0].op == op else None


def order_gelus(graph: gs.Graph, stats: Counter) -> bool:
    """Rewrite every matching GELU of ``graph`` (module doc); whether one changed."""
    done = 0
    for erf in [n for n in graph.nodes if n.op == "Erf"]:
        scaled = erf.inputs[0]
        pre = scaled.inputs[0] if scaled.inputs else None
        if pre is None or not (pre.op == "Div" and _scalar(pre.inputs[1], float(np.float32(np.sqrt(2))))
                               or pre.op == "Mul" and _scalar(pre.inputs[1], float(np.float32(1 / np.sqrt(2))))):
            continue
        x = pre.inputs[0]
        one = _only_reader(erf.outputs[0], "Add")
        if one is None or not any(_scalar(i, 1.0) for i in one.inputs):
            continue
        half = _only_reader(one.outputs[0], "Mul")
        if half is None or not any(_scalar(i, 0.5) for i in half.inputs):
            continue
        outer = _only_reader(half.outputs[0], "Mul")
        if outer is None or x not in outer.inputs:
            continue
        c = next(i for i in half.inputs if _scalar(i, 0.5))
        half.inputs = [x, one.outputs[0]]
        outer.inputs = [half.outputs[0], c]
        done += 1
    if done:
        stats["gelu_reordered_for_fusion"] += done
    return bool(done)
