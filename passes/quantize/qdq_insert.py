"""Writing a placement ``Plan`` into the graph: QuantizeLinear/DequantizeLinear pairs, integer weights, int32 biases.

Activation tensor ``t`` with parameters ``(s, z)``::

    producer -> t -> QuantizeLinear(s, z) -> t_q -> DequantizeLinear(s, z) -> t_dq -> every consumer of t

(a graph output keeps its name: the DQ output takes it). A tensor derived through absorbed positive scalars
``u = c_1·c_2·…·t`` is quantized with ``(s_u / Πc, z_u)`` and its DQ uses ``(s_u, z_u)`` and replaces ``u``; the
Mul/Div nodes disappear.

Weights become integer initializers ``W_q`` (int8, symmetric, per channel or per tensor) read through a
DequantizeLinear (``axis`` = the output channel); Conv/Gemm biases become int32 with ``s_b = s_x · s_w``
(``qparams_math``). Float constants feeding an integer Add/Mul are quantized per tensor with the activation type.
New tensors and nodes are named ``<tensor>_quantized``, ``<tensor>_scale``, ``<tensor>_DequantizeLinear`` ...
(``onnxcompress.naming.Namer``: ``_1``, ``_2`` ... on a clash).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import Namer

from . import qparams_math as qm
from .ort_int8_kernels import (
    activation_slots,
    bias_slot,
    is_float_const,
    weight_axis,
    weight_slot,
)
from .placement import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QParams:
    scale: np.float32
    zero_point: np.ndarray  # 0-d, activation qtype


@dataclass
class WeightOptions:
    per_channel: bool = True
    qtype: qm.QType = qm.INT8
    clip_search: bool = False
    #: anchor name -> integer weights chosen beforehand (``rounding``); used when the layout matches
    rounded: dict | None = None


def resolve_params(
    plan: Plan, ranges: dict[str, tuple[float, float]], qt: qm.QType, symmetric: bool
) -> tuple[dict[str, QParams], dict[str, QParams], dict[str, str]]:
    """Per quantized tensor: (Q params, DQ params, the tensor the DQ output replaces)."""
    tp = plan.tensors
    base_params: dict[str, QParams] = {}

    def base_of(name: str) -> tuple[str, float]:
        f = 1.0
        seen = set()
        while tp[name].derived_from is not None and name not in seen:
            seen.add(name)
            f *= tp[name].factor
            name = tp[name].derived_from
        return name, f

    def share_root(name: str) -> str:
        seen = set()
        while (
            name in tp and tp[name].share_with is not None and tp[name].share_with in tp and name not in seen
        ):
            seen.add(name)
            name = tp[name].share_with
        return name

    # clip bounds of derived tensors constrain their base: u = F·t with t in [lo, hi] -> u in [F·lo, F·hi]
    base_clip: dict[str, tuple[float, float]] = {}
    for name, t in tp.items():
        if t.clip is not None:
            b, f = base_of(name)
            lo, hi = t.clip
            base_clip[b] = (lo * f, hi * f)

    def params_for(name: str) -> QParams:
        if name in base_params:
            return base_params[name]
        t = tp[name]
        lo, hi = ranges.get(name, (0.0, 0.0))
        if t.fixed is not None:
            lo, hi = max(lo, t.fixed[0]), min(hi, t.fixed[1])
            lo, hi = min(lo, 0.0), max(hi, t.fixed[1] if hi > 0 else 0.0)
        clip = base_clip.get(name, t.clip)
        sym = symmetric
        if clip is not None:
            lo, hi = max(lo, clip[0]), min(hi, clip[1])
            if clip[0] >= 0:
                sym = False  # zero point at qmin so ORT drops the Relu/Clip before the Q
                lo = 0.0
                # shrink a hair so that float32 rounding of the scale keeps (qmax - z)·s inside the clip
                hi = hi * (1.0 - 1e-6)
        s, z = qm.scale_zero_point(lo, hi, qt, sym)
        p = QParams(np.float32(s), np.asarray(z, dtype=qt.numpy))
        base_params[name] = p
        return p

    # outputs of absorbed Mul/Div nodes get their values from the DQ of the tensor derived from them
    absorbed_outputs = {plan.nodes[i].outputs[0].name for i in plan.absorbed if plan.nodes[i].outputs}
    q_params: dict[str, QParams] = {}
    dq_params: dict[str, QParams] = {}
    replaces: dict[str, str] = {}
    for name, t in tp.items():
        if name in absorbed_outputs:
            continue
        if t.derived_from is not None:
            b, f = base_of(name)
            bp = params_for(share_root(b))
            q_params[name] = QParams(np.float32(bp.scale / f), bp.zero_point)
            dq_params[name] = bp
            replaces[name] = b
        else:
            p = params_for(share_root(name))
            q_params[name] = dq_params[name] = p
            replaces[name] = name
    return q_params, dq_params, replaces


def _const(namer: Namer, base: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(base), np.asarray(value))


def insert_qdq(
    graph: gs.Graph,
    plan: Plan,
    q_params: dict[str, QParams],
    dq_params: dict[str, QParams],
    replaces: dict[str, str],
    qt: qm.QType,
    wopts: WeightOptions,
) -> dict[str, int]:
    """Rewrite ``graph`` in place; returns counters for the pass stats."""
    namer = Namer(graph)
    tensors = graph.tensors()
    main_ids = {id(n) for n in graph.nodes}
    stats = {
        "activation_qdq": 0,
        "weights_quantized": 0,
        "bias_int32": 0,
        "constants_quantized": 0,
        "scalars_absorbed": len(plan.absorbed),
    }

    # --- activations
    out_index = {id(t): i for i, t in enumerate(graph.outputs)}
    for name, qp in q_params.items():
        t = tensors[name]
        dp = dq_params[name]
        target = tensors[replaces[name]]
        t_q = gs.Variable(namer(f"{name}_quantized"), dtype=qt.numpy)
        t_dq = gs.Variable(namer(f"{replaces[name]}_dequantized"), dtype=np.float32)
        q_node = gs.Node(
            "QuantizeLinear",
            namer(f"{name}_QuantizeLinear"),
            inputs=[
                t,
                _const(namer, f"{name}_scale", qp.scale),
                _const(namer, f"{name}_zero_point", qp.zero_point),
            ],
            outputs=[t_q],
        )
        if target is t:
            dq_scale_in = q_node.inputs[1]
            dq_zp_in = q_node.inputs[2]
        else:
            dq_scale_in = _const(namer, f"{target.name}_scale", dp.scale)
            dq_zp_in = _const(namer, f"{target.name}_zero_point", dp.zero_point)
        dq_node = gs.Node(
            "DequantizeLinear",
            namer(f"{target.name}_DequantizeLinear"),
            inputs=[t_q, dq_scale_in, dq_zp_in],
            outputs=[t_dq],
        )
        for consumer in list(target.outputs):
            if consumer is q_node or id(consumer) not in main_ids:
                continue
            for i, x in enumerate(consumer.inputs):
                if x is target:
                    consumer.inputs[i] = t_dq
        if id(target) in out_index and not any(target is x for x in graph.inputs):
            # the graph output keeps its name: the dequantized value takes it (a graph input that is also an output
            # keeps both roles: it stays the exact float input, nothing renamed)
            old = target.name
            target.name = namer(f"{old}_float")
            t_dq.name = old
            graph.outputs[out_index[id(target)]] = t_dq
            t_dq.shape = target.shape
            t_dq.dtype = target.dtype
        graph.nodes.extend([q_node, dq_node])
        stats["activation_qdq"] += 1
    for i in plan.absorbed:
        n = plan.nodes[i]
        n.inputs.clear()
        n.outputs.clear()

    # --- weights, biases, constants of integer nodes
    new_nodes: list[gs.Node] = []
    for i in plan.int8:
        n = plan.nodes[i]
        if i in plan.absorbed or not n.inputs:
            continue
        ws = weight_slot(n) if n.op in ("Conv", "Gemm", "MatMul") else None
        if ws is not None:
            new_nodes.extend(_quantize_anchor_weights(n, ws, namer, wopts, stats))
            if n.op == "MatMul" and n.outputs[0].name not in q_params:
                new_nodes.extend(_matmul_bias_int32(n, namer, stats))
        elif n.op in ("Add", "Mul"):
            for s in activation_slots(n):
                x = n.inputs[s]
                if is_float_const(x):
                    n.inputs[s], node = _quantized_constant(x, qt, namer)
                    new_nodes.append(node)
                    stats["constants_quantized"] += 1
    graph.nodes.extend(new_nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.toposort()
    return stats


def _input_scale(n: gs.Node) -> float | None:
    """Scale of the DQ feeding the activation input of an anchor (after rewiring)."""
    x = n.inputs[0]
    if x.inputs and x.inputs[0].op == "DequantizeLinear":
        return float(np.asarray(x.inputs[0].inputs[1].values))
    return None


def _quantize_anchor_weights(
    n: gs.Node, ws: int, namer: Namer, wopts: WeightOptions, stats: dict
) -> list[gs.Node]:
    """Integer weight (and int32 bias) of one anchor; returns the DQ nodes to add to the graph."""
    w_t = n.inputs[ws]
    w = np.asarray(w_t.values, dtype=np.float32)
    axis = weight_axis(n, w) if wopts.per_channel else None
    qw = (wopts.rounded or {}).get(n.name)
    if qw is None or axis is None or qw.axis != axis or qw.q.shape != w.shape:
        qw = qm.quantize_weight(w, wopts.qtype, axis, symmetric=True, clip_search=wopts.clip_search)
    bs = bias_slot(n)
    s_x = _input_scale(n)
    b = None
    if bs is not None and s_x is not None:
        b = np.asarray(n.inputs[bs].values, dtype=np.float32)
        if b.shape != (np.size(qw.scale),) and axis is not None:
            b = None
    if b is not None:
        scale = qw.scale if axis is not None else np.float32(qw.scale)
        fitted = qm.fit_bias_scale(np.broadcast_to(scale, b.shape) if axis is None else scale, b, s_x)
        if axis is None:
            fitted_t = np.float32(np.max(fitted))
            if fitted_t > qw.scale:
                qw = qm.requantize_with_scale(w, fitted_t, wopts.qtype, None)
        elif np.any(fitted > qw.scale):
            qw = qm.requantize_with_scale(w, fitted, wopts.qtype, axis)
    attrs = {"axis": int(axis)} if axis is not None else {}
    wq_c = _const(namer, f"{w_t.name}_quantized", qw.q)
    w_dq = gs.Variable(namer(f"{w_t.name}_dequantized"), dtype=np.float32)
    node = gs.Node(
        "DequantizeLinear",
        namer(f"{w_t.name}_DequantizeLinear"),
        attrs=attrs,
        inputs=[
            wq_c,
            _const(namer, f"{w_t.name}_scale", qw.scale),
            _const(namer, f"{w_t.name}_zero_point", qw.zero_point),
        ],
        outputs=[w_dq],
    )
    n.inputs[ws] = w_dq
    added = [node]
    stats["weights_quantized"] += 1
    if b is not None:
        bq, sb = qm.quantize_bias(b, s_x, np.broadcast_to(qw.scale, b.shape) if axis is None else qw.scale)
        if axis is None:
            # per-tensor weights: one bias scale
            sb = np.float32(s_x * float(qw.scale))
            bq = np.clip(np.rint(b.astype(np.float64) / np.float64(sb)), -qm.INT32_MAX, qm.INT32_MAX).astype(
                np.int32
            )
        bnode = _bias_dequantizer(namer, n.inputs[bs].name, bq, sb)
        n.inputs[bs] = bnode.outputs[0]
        added.append(bnode)
        stats["bias_int32"] += 1
    return added


def _bias_dequantizer(namer: Namer, name: str, bq: np.ndarray, sb: np.ndarray | np.float32) -> gs.Node:
    """``DequantizeLinear(bq int32, sb, 0)`` -> a new float tensor: the bias ``bq · sb`` (per channel on axis 0
    when ``sb`` is a vector)."""
    out = gs.Variable(namer(f"{name}_dequantized"), dtype=np.float32)
    return gs.Node(
        "DequantizeLinear",
        namer(f"{name}_DequantizeLinear"),
        attrs={"axis": 0} if np.ndim(sb) else {},
        inputs=[
            _const(namer, f"{name}_quantized", bq),
            _const(namer, f"{name}_scale", sb),
            _const(namer, f"{name}_zero_point", np.zeros(np.shape(sb), np.int32)),
        ],
        outputs=[out],
    )


def _matmul_bias_int32(n: gs.Node, namer: Namer, stats: dict) -> list[gs.Node]:
    """``MatMul -> Add(bias)`` with a float MatMul output: the bias becomes int32 (``s_x · s_w``) behind a DQ.

    ORT folds MatMul + Add into a Gemm before it fuses QDQ; with a float bias that Gemm stays float and dequantizes
    its weights on every run, with an int32 bias it becomes QGemm. Where ORT does not fold them (symbolic shapes),
    MatMulIntegerToFloat runs and the small bias DQ is an elementwise add."""
    y = n.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return []
    add = y.outputs[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    b = np.asarray(other.values, np.float32) if is_float_const(other) else None
    x, w = n.inputs[0], n.inputs[1]
    if b is None or b.ndim != 1 or not x.inputs or x.inputs[0].op != "DequantizeLinear":
        return []
    if not w.inputs or w.inputs[0].op != "DequantizeLinear":
        return []
    s_x = float(np.asarray(x.inputs[0].inputs[1].values))
    s_w = np.asarray(w.inputs[0].inputs[1].values, np.float32)
    if s_w.ndim and s_w.shape != b.shape:
        return []
    bq, sb = qm.quantize_bias(b, s_x, np.broadcast_to(s_w, b.shape) if s_w.ndim else s_w)
    if np.any(np.abs(bq.astype(np.int64)) >= 2**31 - 1):
        return []
    node = _bias_dequantizer(namer, other.name, bq, sb)
    out = node.outputs[0]
    for i, t in enumerate(add.inputs):
        if t is other:
            add.inputs[i] = out
    stats["bias_int32"] += 1
    return [node]


def _quantized_constant(x: gs.Constant, qt: qm.QType, namer: Namer) -> tuple[gs.Variable, gs.Node]:
    v = np.asarray(x.values, dtype=np.float32)
    s, z = qm.scale_zero_point(float(v.min()), float(v.max()), qt, symmetric=False)
    q = qm.quantize(v, s, z, qt)
    out = gs.Variable(namer(f"{x.name}_dequantized"), dtype=np.float32)
    node = gs.Node(
        "DequantizeLinear",
        namer(f"{x.name}_DequantizeLinear"),
        inputs=[
            _const(namer, f"{x.name}_quantized", q),
            _const(namer, f"{x.name}_scale", s),
            _const(namer, f"{x.name}_zero_point", z),
        ],
        outputs=[out],
    )
    return out, node
