"""Where a static int8 model's error enters: the activation tensors whose rounding costs the outputs most.

A QDQ model quantizes an activation ``t`` as ``DQ(Q(t; s, z); s', z)``; ``s' = s`` except where a positive scalar
``c`` was absorbed (``s' = s·c``, ``placement``). Taking that pair out — the consumers read ``c·t`` directly, a
``Mul`` by ``s'/s`` when ``c ≠ 1`` — gives the same model without that one rounding, everything else unchanged
(``without_rounding``). Per tensor, the **leave-one-out gain** is

    gain(t) = SQNR(model without t's rounding) − SQNR(model)     [dB, against the float model's outputs]

on the evaluation feeds, scored like every candidate (``fidelity.score``: the worst output, and the last layers'
input features, which do not saturate the way a softmax does). Also measured: the model with *every* activation
rounding taken out (only the weights are int8: ``weights_only_*``), which bounds what any activation range choice
can reach. Gains of different tensors need not add up: when the error is spread over many tensors each one's gain
is small although all of them together cost many dB; ``weights_only`` tells the two cases apart.

Cost: one run of the model on ``feeds`` per quantized activation tensor (``quantize{explain=N}``; off by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import fidelity as fid

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun


def activation_roundings(model: onnx.ModelProto) -> list[str]:
    """Float tensors of the main graph that a QuantizeLinear reads (not initializers: weights are stored
    quantized), in graph order."""
    inits = {i.name for i in model.graph.initializer}
    seen: dict[str, None] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            seen.setdefault(n.input[0])
    return list(seen)


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def without_rounding(model: onnx.ModelProto, tensors: set[str] | frozenset[str]) -> onnx.ModelProto:
    """A copy of ``model`` where every Q -> DQ pair on a tensor of ``tensors`` is taken out: the DQ's consumers
    read the float tensor (times ``s_DQ / s_Q`` where a scalar was absorbed into the DQ's scale)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    q_of = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in tensors}
    rename: dict[str, str] = {}
    added: list[onnx.NodeProto] = []
    drop: set[int] = set()
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
    for k, n in enumerate(g.node):
        if n.op_type != "DequantizeLinear" or n.input[0] not in q_of:
            continue
        q = q_of[n.input[0]]
        s_q, s_dq = _const(m, q.input[1]), _const(m, n.input[1])
        if s_q is None or s_dq is None or s_q.size != 1 or s_dq.size != 1:
            continue  # per-axis or computed scales: left as they are
        drop.add(k)
        ratio = float(s_dq.reshape(-1)[0]) / float(s_q.reshape(-1)[0])
        if abs(ratio - 1.0) <= 1e-6:
            rename[n.output[0]] = q.input[0]
            continue
        c, out = f"{n.output[0]}_ratio", f"{n.output[0]}_float"
        while c in taken or out in taken:
            c, out = c + "_", out + "_"
        taken.update((c, out))
        g.initializer.append(numpy_helper.from_array(np.asarray(ratio, dtype=np.float32), c))
        added.append(helper.make_node("Mul", [q.input[0], c], [out], name=out))
        rename[n.output[0]] = out
    graph_outputs = {o.name for o in g.output}
    kept = []
    for k, n in enumerate(g.node):
        if k in drop and n.output[0] not in graph_outputs:
            continue
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
        kept.append(n)
    # a Mul goes right after the node producing its input (graph order stays topological)
    producer_pos = {o: i for i, n in enumerate(kept) for o in n.output}
    order: list[tuple[float, onnx.NodeProto]] = [(float(i), n) for i, n in enumerate(kept)]
    order += [(producer_pos.get(a.input[0], -1) + 0.5, a) for a in added]
    del g.node[:]
    g.node.extend(n for _, n in sorted(order, key=lambda p: p[0]))
    # Q nodes nobody reads any more
    used = {x for n in g.node for x in n.input} | graph_outputs
    live = [n for n in g.node if n.op_type != "QuantizeLinear" or n.output[0] in used]
    del g.node[:]
    g.node.extend(live)
    return m


def error_sources(ref: fid.Reference, model: onnx.ModelProto, top: int) -> dict:
    """The module docstring's measurement of ``model`` (a QDQ model) on ``ref``'s feeds: the ``top`` tensors by
    leave-one-out gain, the model's own scores, and the weights-only bound."""
    tensors = activation_roundings(model)
    base = fid.score_model(ref, model)
    key = "feature_sqnr_db" if "feature_sqnr_db" in base else "sqnr_db"
    weights_only = fid.score_model(ref, without_rounding(model, set(tensors)))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    rows = []
    for t in tensors:
        sc = fid.score_model(ref, without_rounding(model, {t}))
        rows.append({"tensor": t, "producer": producers.get(t, "input"),
                     "gain_db": round(sc[key] - base[key], 3),
                     "output_gain_db": round(sc["sqnr_db"] - base["sqnr_db"], 3)})
    rows.sort(key=lambda r: -r["gain_db"])
    return {
        "scored_by": key,
        "feeds": len(ref.feeds),
        "activation_tensors": len(tensors),
        "int8": {k: round(v, 3) for k, v in base.items()},
        "weights_only_int8": {k: round(v, 3) for k, v in weights_only.items()},
        "sum_of_gains_db": round(float(sum(max(r["gain_db"], 0.0) for r in rows)), 3),
        "top": rows[:top],
    }


#: evaluation feeds the leave-one-out runs use (one run of the model per tensor and feed)
EXPLAIN_FEEDS = 8


def explain(run: QuantizeRun, ref: fid.Reference, model: onnx.ModelProto) -> None:
    """``quantize{explain=N}``: ``run.stats["error_sources"]`` for the model the pass returns."""
    run.stats["error_sources"] = error_sources(ref.head(EXPLAIN_FEEDS), model, run.p.explain)
