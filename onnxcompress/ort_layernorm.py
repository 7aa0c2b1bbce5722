"""Residual ``Add -> LayerNormalization`` kept out of onnxruntime's SkipLayerNormalization fusion where that is slower.

onnxruntime (graph optimization level >= extended, the default) fuses ``y = LayerNormalization(a + b)`` into
``com.microsoft.SkipLayerNormalization``. On onnxruntime 1.32's CPU provider the fused kernel measured 63 µs for one
[1, 30, 384] pair where the unfused Add + LayerNormalization took 16 µs (1 thread, AVX-512 EPYC): MiniLM-L6, with 12
such pairs, ran its dynamic int8 model at 0.48x of FP32 fused and 0.41x unfused.

The fusion matches the op type ``Add``. ``Sum(a, b)`` of the same two same-shaped inputs is the same elementwise
float addition (one rounding per element, bit for bit) and is not matched, so writing the pair's ``Add`` as ``Sum``
keeps the two kernels apart. ``unfuse_if_faster`` times one pair both ways at the model's width and row count on this
machine (``ctx.latency``: recorded, replayable, cached per machine) and rewrites every such ``Add`` only when the
unfused form measured below ``FASTER_BELOW`` of the fused one; elsewhere (a CPU or onnxruntime whose fused kernel is
fast) the graph is left as it is.

Candidates: an ``Add`` of two inputs, at least one of them computed (a residual sum, or a bias added to a computed
tensor: onnxruntime fuses both), whose output feeds a ``LayerNormalization`` over the last axis (opset 17); ``Sum``
broadcasts like ``Add``, and the Add's other consumers (the residual stream) read the same sum either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.latency_profile import fingerprint

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

#: the unfused pair is kept where it measured below this fraction of the fused kernel's time
FASTER_BELOW = 0.8
#: rows timed when the model's own row count is not known
DEFAULT_ROWS = 64
BUDGET_S = 0.6


def candidates(graph: gs.Graph) -> list[tuple[gs.Node, int]]:
    """(Add, the LayerNormalization's width) of every pair onnxruntime would fuse (module doc)."""
    found = []
    for n in graph.nodes:
        if n.op != "Add" or len(n.inputs) != 2 or all(isinstance(i, gs.Constant) for i in n.inputs):
            continue
        a = next(i for i in n.inputs if not isinstance(i, gs.Constant))
        for c in n.outputs[0].outputs:
            axis = int(c.attrs.get("axis", -1)) if c.op == "LayerNormalization" else None
            gamma = c.inputs[1] if c.op == "LayerNormalization" and len(c.inputs) > 1 else None
            rank = len(a.shape) if a.shape is not None else None
            if isinstance(gamma, gs.Constant) and gamma.values.ndim == 1 and (axis == -1 or (rank and axis == rank - 1)):
                found.append((n, int(gamma.values.shape[0])))
                break
    return found


def static_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    """``name``'s shape when shape inference (``analyses.macs.infer_shapes``, on a weightless stand-in) makes every
    dim a number, else None."""
    from onnxcompress.analyses.macs import infer_shapes

    shape = infer_shapes(model, {}).get(name)
    return tuple(int(d) for d in shape) if shape else None


def _pair_models(rows: int, width: int) -> tuple[bytes, bytes]:
    """(fused-able Add -> LayerNormalization, the same with Sum) on [1, rows, width]."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    def model(op: str) -> bytes:
        x = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [1, rows, width]) for k in ("a", "b")]
        g = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1, epsilon=1e-12)],
            "pair", x, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
            [nh.from_array(np.ones(width, np.float32), "g"), nh.from_array(np.zeros(width, np.float32), "beta")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    return model("Add"), model("Sum")


def unfused_ratio(ctx: PassContext, rows: int, width: int) -> float:
    """Unfused (Sum) / fused (Add -> SkipLayerNormalization) time of one pair on this machine, 1 thread."""
    key = f"ort/skip-layernorm-unfused/{fingerprint(str((rows, width)), 'threads=1')}"

    def measure() -> float:
        from onnxcompress.latency import measure_latency

        fused, unfused = _pair_models(rows, width)
        rng = np.random.default_rng(0)
        feed = {k: rng.standard_normal((1, rows, width)).astype(np.float32) for k in ("a", "b")}
        lat = measure_latency({"fused": onnx.load_from_string(fused), "unfused": onnx.load_from_string(unfused)},
                              feed, threads=1, budget_s=BUDGET_S)
        return float(lat["unfused"] / lat["fused"])

    return float(ctx.latency.measure(key, measure))


def unfuse_if_faster(graph: gs.Graph, ctx: PassContext, rows: int | None = None) -> dict:
    """Rewrite the candidates' ``Add`` as ``Sum`` when that measured faster here; what was done, for the stats."""
    pairs = candidates(graph)
    if not pairs:
        return {"pairs": 0}
    width = max(w for _, w in pairs)
    ratio = unfused_ratio(ctx, rows or DEFAULT_ROWS, width)
    done = ratio < FASTER_BELOW
    if done:
        for n, _ in pairs:
            n.op = "Sum"
    return {"pairs": len(pairs), "shape_timed": [1, rows or DEFAULT_ROWS, width],
            "unfused_over_fused": round(ratio, 3), "unfused": done}
