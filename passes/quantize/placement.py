"""Where Q/DQ pairs go in a static int8 model, so that onnxruntime fuses them into integer kernels.

The graph is split into an integer domain and a float domain. A tensor crossing from float to integer costs a
QuantizeLinear, the other way a DequantizeLinear; inside the integer domain ORT runs QLinear* kernels and the Q/DQ
pairs vanish (see ``ort_int8_kernels``). Rules, in order (all linear in the graph size):

1. **Anchors** (Conv 1-D/2-D, MatMul, Gemm with a constant float weight; MatMul of two activations only when asked)
   are integer unless excluded (by name, op type, or ``depthwise=False`` for depthwise Conv).
2. **Forward** (topological order): an int8-capable op (binary, unary lookup/pooling, Concat, transparent, Relu/Clip,
   positive-scalar Mul/Div) joins the integer domain when *every* float data input is already available as
   integers — produced by an integer node. A new Q is never inserted just to feed such an op: the float op costs
   the same and is exact. With ``binary_join="any"`` an Add/Mul joins when *any* activation input is integer, the
   float ones quantized (a gate ``conv * HardSigmoid(...)`` then leaves no DequantizeLinear at the border, which
   ORT copies per reader). ``Add`` of a MatMul/Gemm output and a constant stays float (ORT fuses the bias into
   MatMulIntegerToFloat / QGemm).
3. **Backward** (reverse topological order): an int8-capable op none of whose consumers is integer goes back to
   float, except Relu/Clip right after a Conv (the Q after them is fused into QLinearConv anyway). This keeps
   outputs and the inputs of float-only ops (LayerNorm, HardSigmoid, heads) out of needless requantization.
4. **Concat of mixed ranges** (after calibration): a Concat whose inputs' magnitudes differ by more than
   ``mixed_range_ratio`` stays float, then rule 3 runs again (YOLO heads: box pixels 0-320 next to scores 0-1).

The result is a ``Plan``: the integer nodes, which of their outputs are quantized, and per quantized tensor how its
range is obtained (own calibration, shared with a transparent op's input, clamped by a Clip, or derived through an
absorbed scalar Mul/Div: ``Q(c·t; s, z) = Q(t; s/c, z)``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .ort_int8_kernels import (
    ABSORBED_ACTIVATIONS,
    ANCHOR_OPS,
    BINARY_OPS,
    TRANSPARENT_OPS,
    UNARY_OPS,
    VARIADIC_OPS,
    activation_slots,
    clip_bounds,
    conv_rank_ok,
    is_const,
    is_depthwise,
    is_float_const,
    positive_scalar,
    weight_slot,
)

log = logging.getLogger(__name__)


@dataclass
class TensorPlan:
    """How one quantized activation tensor gets its scale / zero point."""

    name: str
    share_with: str | None = None  # transparent op: same params as this tensor
    clip: tuple[float, float] | None = None  # Relu/Clip absorbed: range clamped to these bounds
    fixed: tuple[float, float] | None = None  # Sigmoid/Softmax outputs: known range
    #: absorbed scalar: this tensor is quantized with (s_U / factor, z_U) of tensor ``derived_from`` = U
    derived_from: str | None = None
    factor: float = 1.0


@dataclass
class Plan:
    int8: set[int] = field(default_factory=set)  # ids of integer nodes
    nodes: dict[int, gs.Node] = field(default_factory=dict)
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)  # ids of scalar Mul/Div nodes removed by absorption
    kept_float: dict[str, str] = field(default_factory=dict)  # anchor node name -> reason
    anchors: list[gs.Node] = field(default_factory=list)  # candidate anchors, in graph order

    def int8_ops(self) -> Counter:
        return Counter(self.nodes[i].op for i in self.int8 if i not in self.absorbed)

    def int8_anchor_names(self) -> list[str]:
        return [n.name for n in self.anchors if id(n) in self.int8]


@dataclass(frozen=True)
class PlacementOptions:
    exclude: tuple[str, ...] = ()  # node names or op types kept float
    depthwise: bool = True
    matmul_activations: bool = False  # MatMul of two activations (attention scores)
    softmax: bool = False
    mixed_range_ratio: float = 16.0
    float_nodes: frozenset[str] = frozenset()  # anchors kept float by mixed precision
    float_reasons: tuple[tuple[str, str], ...] = ()
    #: an Add/Mul joins the integer domain when all its activation inputs are integer ("all"), or any ("any": the
    #: float ones get their own Q/DQ; fewer DequantizeLinear at float/integer borders)
    binary_join: str = "all"


def _is_anchor(node: gs.Node, dtypes: dict[str, np.dtype], opts: PlacementOptions) -> tuple[bool, str]:
    if node.op not in ANCHOR_OPS:
        return False, ""
    ws = weight_slot(node)
    if ws is None:
        if node.op != "MatMul" or not opts.matmul_activations:
            return False, "no constant float weight (activation x activation)"
    if node.op == "Conv" and not conv_rank_ok(node):
        return False, "Conv rank not 1-D/2-D (no integer kernel)"
    for s in activation_slots(node):
        t = node.inputs[s]
        if dtypes.get(t.name) != np.float32:
            return False, "input is not float32"
    if node.op == "Conv" and is_depthwise(node) and not opts.depthwise:
        return False, "depthwise Conv kept float (depthwise=false)"
    return True, ""


def _excluded(node: gs.Node, opts: PlacementOptions) -> str | None:
    if node.name and node.name in opts.float_nodes:
        return dict(opts.float_reasons).get(node.name, "kept float by mixed precision")
    if (node.name and node.name in opts.exclude) or node.op in opts.exclude:
        return "excluded by the user"
    return None


def plan_static(
    graph: gs.Graph,
    dtypes: dict[str, np.dtype],
    opts: PlacementOptions,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> Plan:
    """Rules 1-4 of the module docstring. ``dtypes``: computed dtype per tensor name (from a probe run);
    ``ranges`` (calibrated min/max) enables rule 4."""
    nodes = list(graph.nodes)  # callers toposort first
    plan = Plan()
    main_ids = {id(n) for n in nodes}
    plan.nodes = {id(n): n for n in nodes}
    out_ids = {id(t) for t in graph.outputs}

    def is_float(t: gs.Tensor) -> bool:
        return dtypes.get(t.name) == np.float32

    # 1. anchors
    for n in nodes:
        ok, why = _is_anchor(n, dtypes, opts)
        if n.op in ANCHOR_OPS and (ok or weight_slot(n) is not None):
            plan.anchors.append(n)
        if not ok:
            if weight_slot(n) is not None and why:
                plan.kept_float[n.name] = why
            continue
        ex = _excluded(n, opts)
        if ex:
            plan.kept_float[n.name] = ex
            continue
        plan.int8.add(id(n))

    def producer(t: gs.Tensor) -> gs.Node | None:
        if not t.inputs:
            return None
        p = t.inputs[0]
        return p if id(p) in main_ids else None

    def available(t: gs.Tensor) -> bool:
        p = producer(t)
        return p is not None and id(p) in plan.int8

    def data_inputs(n: gs.Node) -> list[gs.Tensor]:
        return [n.inputs[s] for s in activation_slots(n) if s < len(n.inputs) and n.inputs[s].name]

    # 2. forward
    flexible_kind: dict[int, str] = {}
    for n in nodes:
        if id(n) in plan.int8 or _excluded(n, opts):
            continue
        kind = _flexible_kind(n, opts)
        if kind is None:
            continue
        ins = data_inputs(n)
        if not ins or not all(is_float(t) or is_const(t) for t in ins):
            continue
        acts = [t for t in ins if not is_const(t)]
        if not acts:
            continue
        if kind == "binary":
            consts = [t for t in ins if is_const(t)]
            if any(not is_float_const(t) for t in consts):
                continue
            if consts and any(
                producer(t) is not None and producer(t).op in ("MatMul", "Gemm") and n.op == "Add"
                for t in acts
            ):
                continue  # MatMul/Gemm + bias: ORT fuses the bias into the float-output integer kernel
        if kind == "activation" and clip_bounds(n) is None:
            continue
        if kind == "scalar":
            src = acts[0]
            p = producer(src)
            if not (
                len(src.outputs) == 1
                and id(src) not in out_ids
                and p is not None
                and flexible_kind.get(id(p)) != "transparent"
            ):
                if n.op == "Div":
                    continue  # no integer Div: stays float
                kind = "binary"
        joins = any if kind == "binary" and opts.binary_join == "any" else all
        if joins(available(t) for t in acts):
            plan.int8.add(id(n))
            flexible_kind[id(n)] = kind

    def consumers(t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def has_int8_consumer(n: gs.Node) -> bool:
        for o in n.outputs:
            for c in consumers(o):
                if id(c) in plan.int8:
                    return True
        return False

    # 3. backward
    def backward() -> None:
        for n in reversed(nodes):
            k = flexible_kind.get(id(n))
            if k is None or id(n) not in plan.int8:
                continue
            if has_int8_consumer(n):
                continue
            if k == "activation":
                p = producer(n.inputs[0])
                if p is not None and p.op == "Conv" and id(p) in plan.int8:
                    continue
            plan.int8.discard(id(n))

    backward()

    # 4. Concat of mixed ranges
    if ranges:
        demoted = False
        for n in nodes:
            if n.op != "Concat" or id(n) not in plan.int8:
                continue
            mags = [
                max(abs(ranges[t.name][0]), abs(ranges[t.name][1]))
                for t in data_inputs(n)
                if t.name in ranges
            ]
            mags = [m for m in mags if m > 0]
            if len(mags) >= 2 and max(mags) / min(mags) > opts.mixed_range_ratio:
                plan.int8.discard(id(n))
                flexible_kind.pop(id(n), None)
                demoted = True
                log.info("Concat %s kept float: input ranges differ %.0fx", n.name, max(mags) / min(mags))
        if demoted:
            backward()

    _tensor_plans(plan, nodes, flexible_kind, out_ids, is_float, producer)
    return plan


def _flexible_kind(n: gs.Node, opts: PlacementOptions) -> str | None:
    op = n.op
    if op in ("Mul", "Div") and len(n.inputs) == 2:
        if op == "Div" and positive_scalar(n.inputs[1]) is not None and not is_const(n.inputs[0]):
            return "scalar"
        if op == "Mul" and (
            positive_scalar(n.inputs[1]) is not None or positive_scalar(n.inputs[0]) is not None
        ):
            return "scalar"
    if op in BINARY_OPS:
        return "binary"
    if op in UNARY_OPS:
        if op == "Softmax" and not opts.softmax:
            return None
        return "unary"
    if op in VARIADIC_OPS:
        return "variadic"
    if op in TRANSPARENT_OPS:
        return "transparent"
    if op in ABSORBED_ACTIVATIONS:
        return "activation"
    return None


def _tensor_plans(
    plan: Plan, nodes: list[gs.Node], kind: dict[int, str], out_ids: set[int], is_float, producer
) -> None:
    """Decide the quantized tensors of the integer nodes and how each gets its parameters."""
    tp: dict[str, TensorPlan] = {}

    def want(name: str) -> TensorPlan:
        if name not in tp:
            tp[name] = TensorPlan(name)
        return tp[name]

    def has_int8_consumer(t: gs.Tensor) -> bool:
        return any(id(c) in plan.int8 for c in t.outputs)

    for n in nodes:
        if id(n) not in plan.int8:
            continue
        k = kind.get(id(n), "anchor")
        # inputs
        if k not in ("activation", "scalar"):
            for s in activation_slots(n):
                if s < len(n.inputs):
                    t = n.inputs[s]
                    if t.name and not is_const(t) and is_float(t):
                        want(t.name)
        # outputs
        if k == "anchor":
            if n.op == "Conv" or any(has_int8_consumer(o) for o in n.outputs):
                o = n.outputs[0]
                want(o.name)
        elif k == "transparent":
            src = n.inputs[0].name
            for o in n.outputs:
                if is_float(o):
                    want(o.name).share_with = src
        elif k == "activation":
            o = n.outputs[0]
            want(o.name).clip = clip_bounds(n)
        elif k == "scalar":
            o = n.outputs[0]
            want(o.name)
        else:  # binary, unary, variadic
            o = n.outputs[0]
            t = want(o.name)
            if n.op == "Sigmoid" or n.op == "Softmax":
                t.fixed = (0.0, 1.0)

    # inputs of activation/scalar nodes: the producer's output is quantized *through* them
    for n in nodes:
        k = kind.get(id(n))
        if id(n) not in plan.int8 or k not in ("activation", "scalar"):
            continue
        src = n.inputs[0] if k == "activation" or not is_const(n.inputs[0]) else n.inputs[1]
        if k == "scalar":
            c = positive_scalar(n.inputs[1]) if not is_const(n.inputs[0]) else positive_scalar(n.inputs[0])
            if n.op == "Div":
                c = 1.0 / c
            out = n.outputs[0].name
            if len(src.outputs) == 1 and id(src) not in out_ids:
                # absorbed: Q(c·t; s, z) = Q(t; s/c, z) — the Mul/Div node disappears
                old = tp.pop(src.name, None)
                t = want(src.name)
                t.derived_from, t.factor = out, c
                t.clip = old.clip if old is not None else None
                plan.absorbed.add(id(n))
            else:
                want(src.name)
        else:
            # Relu/Clip: the pre-activation tensor is not quantized unless something else reads it
            t = tp.get(src.name)
            if t is not None and t.derived_from is None and t.share_with is None:
                if len(src.outputs) == 1 and id(src) not in out_ids:
                    tp.pop(src.name, None)
    plan.tensors = tp
