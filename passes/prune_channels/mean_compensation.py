"""Mean compensation for ``prune-channels``: what a removed channel contributed on average moves into the bias.

A consumer y = W x + b that loses input positions R (Conv: channels, summed over the kernel; Gemm/MatMul: features)
changes its output by -W[:, R] x_R. Replacing x_R by its calibration mean keeps the output's mean:

    b' = b + W[:, R] E[x_R]            (Conv: b'_o = b_o + sum_{c in R} E[x_c] sum_{k} W[o, c, k])

(exact in the mean; at Conv borders where padding zeros enter, the kernel sum is an over-estimate). Channels after
a ReLU/SiLU have positive means, so without this every pruned layer shifts its outputs; with it the pruned model
stays calibrated before any ``distill``. Consumers without a bias get one (Conv/Gemm; a MatMul uses the Add that
follows it, else it is skipped).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups import ChannelGroups

log = logging.getLogger(__name__)


def _bias_slot(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(node, input index) of the 1-D bias added to ``node``'s output, existing or not; None if there is none."""
    if node.op in ("Conv", "Gemm"):
        return node, 2
    if node.op == "MatMul":
        y = node.outputs[0]
        if len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = 1 if add.inputs[0] is y else 0
            t = add.inputs[other]
            if isinstance(t, gs.Constant) and np.asarray(t.values).ndim == 1:
                return add, other
    return None


def bias_deltas(cg: ChannelGroups, stats: dict, keep_el: np.ndarray) -> dict[int, tuple[gs.Node, np.ndarray]]:
    """id(consumer node) -> (node, delta of its bias in the original output indexing)."""
    out: dict[int, tuple[gs.Node, np.ndarray]] = {}
    acc: dict[int, np.ndarray] = defaultdict(lambda: 0.0)
    nodes: dict[int, gs.Node] = {}
    for s in cg.slices:
        if s.role != "in" or not s.act or (s.act, s.act_axis) not in stats:
            continue
        spec = s.specs[0]
        if spec.el.ndim != 1:
            continue
        removed = ~keep_el[spec.el]
        if not removed.any():
            continue
        node = s.node
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        _, _, count, total = stats[(s.act, s.act_axis)]
        if total.shape[0] != spec.el.shape[0]:
            continue
        mean = total / max(count, 1)
        w = cg.value(node.inputs[s.index]).astype(np.float64)
        if node.op == "Conv":
            contrib = w.sum(axis=tuple(range(2, w.ndim)))[:, removed] @ mean[removed]  # [Cout]
        elif node.op == "ConvTranspose":
            contrib = w.sum(axis=tuple(range(2, w.ndim)))[removed].T @ mean[removed]
        elif node.op == "Gemm":
            bm = w.T if node.attrs.get("transB", 0) else w
            contrib = float(node.attrs.get("alpha", 1.0)) * (mean[removed] @ bm[removed])
        elif node.op == "MatMul":
            contrib = mean[removed] @ w[removed]
        else:
            continue
        acc[id(node)] = acc[id(node)] + contrib
        nodes[id(node)] = node
    for k, delta in acc.items():
        out[k] = (nodes[k], np.asarray(delta))
    return out


def apply_before(deltas: dict[int, tuple[gs.Node, np.ndarray]]) -> dict[int, tuple[gs.Node, np.ndarray]]:
    """Add the deltas to existing constant biases (before slicing, so the analysis cuts them as usual). Returns the
    consumers that have no bias yet (to be given one after the cut)."""
    later = {}
    for k, (node, delta) in deltas.items():
        slot = _bias_slot(node)
        if slot is None:
            continue
        bnode, idx = slot
        if len(bnode.inputs) > idx and bnode.inputs[idx].name:
            t = bnode.inputs[idx]
            if not isinstance(t, gs.Constant):
                continue
            old = np.asarray(t.values)
            scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            if old.size != delta.size or scale == 0.0:
                continue
            new = (old.astype(np.float64).reshape(-1) + delta / scale).astype(old.dtype).reshape(old.shape)
            if len({id(c) for c in t.outputs}) > 1:
                bnode.inputs[idx] = gs.Constant(f"{t.name}_compensated_{len(later)}_{k % 997}", new)
            else:
                t.values = new
        elif node.op in ("Conv", "Gemm"):
            later[k] = (node, delta)
    return later


def _weight_dtype(node: gs.Node) -> np.dtype:
    """The float type of a Conv/Gemm's constant weight (a new bias must match it); float32 otherwise."""
    return np.asarray(node.inputs[1].values).dtype if isinstance(node.inputs[1], gs.Constant) else np.dtype(np.float32)


def apply_after(later: dict[int, tuple[gs.Node, np.ndarray]], kept: dict[str, dict[int, np.ndarray]]) -> int:
    """Give bias-less Conv/Gemm consumers a bias holding their (cut) delta."""
    n = 0
    for node, delta in later.values():
        y = node.outputs[0].name
        idx = kept.get(y, {}).get(1)
        d = delta[idx] if idx is not None else delta
        const = gs.Constant(f"{y}_bias", d.astype(_weight_dtype(node)))
        while len(node.inputs) < 3:
            node.inputs.append(const)
        node.inputs[2] = const
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        n += 1
    return n


def compensate_model(model, deltas: dict[int, tuple[gs.Node, np.ndarray]]) -> None:
    """Add the deltas to the bias initializers of a ModelProto exported from the analysed graph (same names), in
    place: the sensitivity trials of a zeroed model then see what the pruned, compensated model will compute."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    protos = {n.output[0]: n for n in model.graph.node if n.output}
    for node, delta in deltas.values():
        slot = _bias_slot(node)
        if slot is None:
            continue
        bnode, idx = slot
        if len(bnode.inputs) <= idx or not bnode.inputs[idx].name:  # a Conv/Gemm without a bias: give it one
            proto = protos.get(bnode.outputs[0].name)
            if proto is None or bnode.op not in ("Conv", "Gemm"):
                continue
            while len(proto.input) <= idx:
                proto.input.append("")
            if proto.input[idx]:
                continue
            proto.input[idx] = f"{bnode.outputs[0].name}__compensation_bias"
            model.graph.initializer.append(numpy_helper.from_array(delta.astype(_weight_dtype(bnode)),
                                                                   proto.input[idx]))
            if bnode.op == "Gemm":
                for a in proto.attribute:
                    if a.name == "beta":
                        a.f = 1.0
            continue
        if bnode.inputs[idx].name not in inits:
            continue
        t = inits[bnode.inputs[idx].name]
        old = numpy_helper.to_array(t)
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if old.size != delta.size or scale == 0.0:
            continue
        new = (old.astype(np.float64).reshape(-1) + delta / scale).astype(old.dtype).reshape(old.shape)
        t.CopyFrom(numpy_helper.from_array(new, t.name))
