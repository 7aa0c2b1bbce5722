"""``quantize{mode=dynamic}``'s decisions: smoothing, weight rounding, mixed precision, and tensor or row ranges.

One *pipeline* quantizes a graph dynamically after three measured decisions (each kept only where it scores
better against the float model's outputs on the calibration feeds): the MatMul inputs smoothed at the best strength
(``dynamic_smoothing``), the weights rounded against the layer outputs (``dynamic_rounding``), layers lifted above
int8 to a fidelity target (``dynamic_mixed``).

Row ranges change what the best smoothing is (a token with large values no longer coarsens the other tokens'
rounding, so less of the activations' spread needs moving into the weights: MiniLM-L6 with every layer in rows,
held out, 28.9 / 29.7 dB smoothed at 0.8, the strength chosen for tensor ranges, against 30.5 / 31.4 dB at 0.65).
So with a target and ``lift_to=auto`` the *row pipeline* is a pipeline of its own: smoothing and rounding chosen
with every layer's input in rows, then the ladder lifts layers from tensor to row ranges (then float) in the order
of their gains. It runs only when the tensor pipeline needs any lifted layer. Where both meet the target, the two
results are timed in one interleaved call and the faster kept; where one does, that one; else the better score.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import ort_layernorm
from onnxcompress.pass_base import PassResult

from . import dynamic_mixed, dynamic_rounding, dynamic_smoothing, two_pass
from . import fidelity as fid
from . import u8s8_saturation as u8s8
from .dynamic import matmul_weight, quantize_dynamic, weight_bytes
from .latency_guard import input_shapes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

    from .options import QuantizeOptions

log = logging.getLogger(__name__)


def run_dynamic(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """MatMul/Gemm of every scope (main graph and If/Loop/Scan bodies) quantized dynamically; one ``W_q`` per
    weight, shared. With calibration data, the decisions of the module doc; with a target and ``lift_to=auto``,
    the tensor and row pipelines compared."""
    dynamic_mixed.check(p, ctx)
    # the decisions below score their dynamic models against the float graph's outputs, computed once
    score = fid.GraphScorer(graph, ctx.export, ctx.calibration.take(min(p.eval_samples, len(ctx.calibration))),
                            p.auto_float_score) if ctx.calibration is not None else None
    searched = bool(dynamic_mixed.targets(p)) and p.activation_ranges == "tensor"
    if not (searched and p.lift_to == "auto"):
        return pipeline(p, graph, ctx, score)
    tensor_graph = graph.copy()
    tensor = pipeline(p, tensor_graph, ctx, score)
    mixed = tensor.stats["mixed_precision"]
    if mixed["met"] and not mixed["float_layers"] and not mixed["two_pass_layers"]:
        _adopt(graph, tensor_graph)  # all-int8 with tensor ranges meets the target: nothing is faster
        return tensor
    row_graph = graph.copy()
    results = {"tensor": (tensor_graph, tensor),
               "row": (row_graph, pipeline(dataclasses.replace(p, lift_to="row"), row_graph, ctx, score))}
    met = [k for k, (_, r) in results.items() if r.stats["mixed_precision"]["met"]]
    summary: dict = {k: _summary(r.stats) for k, (_, r) in results.items()}
    if len(met) == 2:
        feed = next(iter(score.feeds))
        ratios = two_pass.latency_ratios(ctx, ctx.export(score.float_graph),
                                         {k: ctx.export(g) for k, (g, _) in results.items()}, feed)
        summary["latency_ratio"] = {k: round(v, 3) for k, v in ratios.items()}
        chosen = min(ratios, key=lambda k: ratios[k])
    elif met:
        chosen = met[0]
    else:
        chosen = max(results, key=lambda k: results[k][1].stats["mixed_precision"]["score"]["sqnr_db"])
    summary["chosen"] = chosen
    g, result = results[chosen]
    result.stats["ranges_search"] = summary
    result.stats["ranges_decision"] = {f"{k} ranges": _decision(k, summary) for k in results}
    _adopt(graph, g)
    return result


def pipeline(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext, score: fid.GraphScorer | None) -> PassResult:
    """Smoothing, weight rounding, mixed precision and the quantization of ``graph`` in place (modified: layers
    quantized or the graph smoothed; the stats). With
    ``lift_to=row`` or ``activation_ranges=row`` the smoothing and rounding trials are built with every layer in
    row ranges."""
    stats: dict = {"mode": "dynamic", "weight_bytes_before": weight_bytes(graph, ctx)}
    rows = p.lift_to == "row" and bool(dynamic_mixed.targets(p)) or p.activation_ranges == "row"
    trial_p = dataclasses.replace(p, activation_ranges="row") if rows else p
    if rows:
        stats["activation_ranges"] = "row (smoothing and rounding chosen with every layer in rows)"
    rounding = dynamic_rounding.wanted(p, ctx)
    if p.weight_rounding != "nearest" and not rounding:
        stats["weight_rounding"] = {"kept": False, "reason": "no calibration data: round-to-nearest"}
        log.warning("quantize{mode=dynamic weight_rounding=%s}: no calibration data (--calib), the weights are "
                    "rounded to nearest", p.weight_rounding)

    trial_rounding: dict[str, tuple[dict, dict]] = {}  # smoothing trial -> its rounded weights and their stats

    def as_built(g: gs.Graph, label: str) -> None:  # a smoothing trial: the dynamic model as it would be built
        r = dynamic_rounding.round_weights(p, g, ctx, None) if rounding else ({}, {})
        trial_rounding[label] = r
        quantize_dynamic(trial_p, g, ctx, {}, r[0])

    if dynamic_smoothing.wanted(p, ctx):
        stats["smoothing"] = dynamic_smoothing.choose(p, graph, ctx, as_built, score)
    rounded: dict[str, dynamic_rounding.RoundedWeight] = {}
    if rounding:
        chosen = stats.get("smoothing", {}).get("chosen")
        # the graph now equals the chosen trial's (smoothing is deterministic): its rounding and rounded score serve
        reuse = (*trial_rounding[chosen], stats["smoothing"]["dynamic_by_strength"][chosen]) \
            if chosen in trial_rounding else None
        rounded, stats["weight_rounding"] = dynamic_rounding.round_weights(
            p, graph, ctx, lambda g, r: quantize_dynamic(trial_p, g, ctx, {}, r), score, reuse)
    if dynamic_mixed.targets(p):
        feed = next(iter(score.feeds))
        float_model = ctx.export(graph)
        chosen_layers, stats["mixed_precision"] = dynamic_mixed.choose(
            p, graph, lambda q, g, st: quantize_dynamic(q, g, ctx, st, rounded), score,
            two_pass_pays=lambda: two_pass.pays_for_largest(ctx, float_model, feed, [
                (n, w[0].shape) for n in graph.nodes
                if n.op in ("MatMul", "Gemm") and n.op in p.dynamic_ops and (w := matmul_weight(n)) is not None],
                u8s8.unsigned_weights(p.weight_type, {})),
            latency=lambda gs_: two_pass.latency_ratios(ctx, float_model, {k: ctx.export(g) for k, g in gs_.items()},
                                                        feed))
        stats["layers_lifted"] = stats["mixed_precision"].pop("lifted")  # name -> why, listed in the report
        p = dynamic_mixed.lifted(p, chosen_layers)
    done = quantize_dynamic(p, graph, ctx, stats, rounded)
    for name in stats.get("layers_lifted", {}):  # the search's float layers reached the build as exclusions
        if name in stats.get("layers_kept_float", {}):
            stats["layers_kept_float"][name] = "lifted to float by the target search (see layers lifted)"
    if done and p.unfuse_skip_layernorm:
        stats["skip_layernorm"] = ort_layernorm.unfuse_if_faster(graph, ctx, _rows(graph, ctx, score))
    return PassResult(bool(done) or stats.get("smoothing", {}).get("decision") == "smoothed", stats)


def _summary(stats: dict) -> dict:
    m = stats["mixed_precision"]
    return {"met": m["met"], "sqnr_db": round(m["score"]["sqnr_db"], 2), "float_layers": len(m["float_layers"]),
            "two_pass_layers": len(m["two_pass_layers"]), "row_range_layers": len(m["row_range_layers"]),
            "smoothing": stats.get("smoothing", {}).get("chosen", stats.get("smoothing", {}).get("decision"))}


def _decision(kind: str, summary: dict) -> str:
    """One line for the report: what the ``kind`` pipeline reached and whether it was kept."""
    s = summary[kind]
    kinds = {"row_range_layers": "row-range", "two_pass_layers": "two-pass", "float_layers": "float"}
    lifted = ", ".join(f"{s[k]} {kind}" for k, kind in kinds.items() if s[k]) + " layers" if any(
        s[k] for k in kinds) else "none lifted"
    timed = f", {summary['latency_ratio'][kind]:.3f}x of the float model" if "latency_ratio" in summary else ""
    return (f"{'kept' if summary['chosen'] == kind else 'not kept'}: target {'met' if s['met'] else 'not met'} at "
            f"{s['sqnr_db']:.1f} dB ({lifted}; smoothing {s['smoothing']}){timed}")


def _adopt(graph: gs.Graph, built: gs.Graph) -> None:
    """Make ``graph`` (the pass's graph object) the quantized copy ``built``."""
    graph.nodes = built.nodes
    graph.inputs = built.inputs
    graph.outputs = built.outputs
    graph.opset = built.opset
    graph.import_domains = built.import_domains


def _rows(graph: gs.Graph, ctx: PassContext, score: fid.GraphScorer | None) -> int | None:
    """Rows (all axes but the last) of the first residual Add -> LayerNormalization: its static shape, else its
    shape on the first calibration feed, else None."""
    pairs = ort_layernorm.candidates(graph)
    name = pairs[0][0].outputs[0].name if pairs else None
    shape = ort_layernorm.static_shape(ctx.export(graph), name) if name else None
    if shape is None and name and score is not None:
        shape = input_shapes(ctx.export(score.float_graph), [name], next(iter(score.feeds)))[name]
    return int(np.prod(shape[:-1])) if shape is not None and len(shape) > 1 else None
