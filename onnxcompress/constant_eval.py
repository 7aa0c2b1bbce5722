"""Values of constant-only nodes, computed with onnxruntime exactly as the graph would compute them.

``evaluate_constant_nodes(nodes, direct, imports)``: the outputs of ``nodes`` (topologically ordered, every input a
constant, an output of an earlier node of the list, or a value in ``direct``) from one ORT session with all
optimisations off (the very kernels a session would run), falling back to one session per node, and to onnx's
reference evaluator for integer-only nodes (shape arithmetic) ORT cannot run alone. ``cleanup`` folds with it.

``integer_constant_values(graph)``: the tensors a graph computes from integer constants alone — the bit-packed
indices of a clustered weight unpacked by integer ops, shape arithmetic on constants — by name, the graph unchanged.
Float constants are never roots, so a weight and everything computed from it stay live (``distill`` trains and
refits through them).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxcompress.analyses.channel_groups import toposort

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

#: ops never constant-folded: non-deterministic, quantisation boundaries ORT pattern-matches, non-tensor values.
NO_FOLD = frozenset(
    {
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
        "Dropout", "Constant",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
        "SequenceMap", "SplitToSequence", "ConcatFromSequence",
        "Optional", "OptionalGetElement", "OptionalHasElement",
        "If", "Loop", "Scan",
    }
)  # fmt: skip


def integer_constant_values(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Values of the tensors ``graph`` computes from integer constants alone (bit-packed indices unpacked by
    integer ops, shape arithmetic on constants), by name: every default-domain node whose inputs are integer/bool
    constants or such values, evaluated once with onnxruntime exactly as a fold would. Float constants are never
    roots, so a weight and everything computed from it stay live. The graph itself is not changed."""
    known: set[str] = set()
    nodes: list[gs.Node] = []
    for node in toposort(graph):
        if (node.domain or "") not in DEFAULT_DOMAINS or node.op in NO_FOLD or any(True for _ in node.subgraphs()):
            continue
        ins = [t for t in node.inputs if not t.is_empty()]
        outs = [t for t in node.outputs if not t.is_empty()]
        if outs and ins and all(t.name in known or _integer_constant(t) for t in ins):
            nodes.append(node)
            known.update(t.name for t in outs)
    imports = [onnx.helper.make_opsetid("", int(graph.opset or 13))]
    return {k: v for k, v in evaluate_constant_nodes(nodes, {}, imports).items() if k in known}


def _integer_constant(t: gs.Tensor) -> bool:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype.kind in "biu"
    node = t.inputs[0] if len(t.inputs) == 1 else None
    value = node.attrs.get("value") if node is not None and node.op == "Constant" else None
    return isinstance(value, gs.Constant) and np.asarray(value.values).dtype.kind in "biu"


def evaluate_constant_nodes(nodes: list[gs.Node], direct: dict[int, np.ndarray],
                            imports: list) -> dict[str, np.ndarray]:
    """Values of every output of ``nodes`` (constant-only, topologically ordered): one ORT session, falling back
    to one session per node (and the reference evaluator for integer-only nodes) when the batch fails."""
    if not nodes:
        return {}
    try:
        return _run_ort(nodes, direct, {}, imports)
    except Exception as exc:
        log.debug("constant evaluation: batched constant evaluation failed (%s); evaluating node by node", exc)
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        try:
            values.update(_run_ort([node], direct, values, imports))
            continue
        except Exception as exc:
            log.debug("constant evaluation: onnxruntime cannot evaluate %s (%s): %s", node.name, node.op, exc)
        try:
            values.update(_run_reference(node, direct, values, imports))
        except Exception as exc:
            log.debug("constant evaluation: reference evaluator cannot evaluate %s (%s): %s", node.name, node.op, exc)
    return values


def _fold_model(
    nodes: list[gs.Node], direct: dict[int, np.ndarray], known: dict[str, np.ndarray], imports: list
) -> onnx.ModelProto:
    produced = {t.name for n in nodes for t in n.outputs if not t.is_empty()}
    inits: dict[str, onnx.TensorProto] = {}
    for n in nodes:
        for t in n.inputs:
            if t.is_empty() or t.name in produced or t.name in inits:
                continue
            if isinstance(t, gs.Constant):
                inits[t.name] = OnnxExporter.export_tensor_proto(t)
            elif id(t) in direct:
                inits[t.name] = numpy_helper.from_array(direct[id(t)], t.name)
            elif t.name in known:
                inits[t.name] = numpy_helper.from_array(known[t.name], t.name)
            else:
                raise KeyError(f"input {t.name!r} of {n.name!r} is not constant")
    outputs = [onnx.ValueInfoProto(name=name) for name in sorted(produced)]
    g = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes], "cleanup_fold", [], outputs, list(inits.values())
    )
    model = onnx.helper.make_model(g, opset_imports=imports)
    model.ir_version = max(7, onnx.helper.find_min_ir_version_for(list(imports), ignore_unknown=True))
    return model


def _run_ort(nodes, direct, known, imports) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    model = _fold_model(nodes, direct, known, imports)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {}), strict=True))


def _run_reference(node, direct, known, imports) -> dict[str, np.ndarray]:
    """onnx's reference evaluator, only for nodes whose inputs are all integer/bool (shape arithmetic): float
    kernels could round differently from onnxruntime."""
    from onnx.reference import ReferenceEvaluator

    for t in node.inputs:
        if t.is_empty():
            continue
        arr = direct.get(id(t)) if id(t) in direct else known.get(t.name)
        if arr is None and isinstance(t, gs.Constant):
            arr = np.asarray(t.values)
        if arr is None or arr.dtype.kind not in "biu":
            raise TypeError("reference fallback only for integer inputs")
    model = _fold_model([node], direct, known, imports)
    names = [o.name for o in model.graph.output]
    res = ReferenceEvaluator(model).run(None, {})
    out = {n: np.asarray(r) for n, r in zip(names, res, strict=True)}
    if any(r.dtype.kind not in "biu" for r in out.values()):
        raise TypeError("reference fallback only for integer outputs")
    return out
