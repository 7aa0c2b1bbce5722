"""``quantize{mode=dynamic weight_rounding=matmul|auto|output}``: the dynamic model's int8 weights rounded against
the layers' outputs on calibration data, not one weight at a time.

A dynamic MatMul ``y = x W + b`` (W [K, N], per-column symmetric int8 scales ``s_n``) has the weight error
``E(Ŵ) = Σ_n (w_n − ŵ_n)^T H (w_n − ŵ_n)`` on its inputs, ``H = X^T X`` over the rows X [R, K] the layer reads. The
static path's solver (``rounding.channel_scales``: each column's clipping ratio chosen by E, then
``rounding.round_columns``: columns of ``Wᵀ`` rounded in the GPTQ order with the optimal update of those not yet
rounded) applies unchanged; only H differs: here it comes from the float graph (after smoothing, when kept), because
dynamic activation noise depends on each inference's own range and has no calibrated model to sample it from.
The rounding moves the layer's mean output by ``(Ŵ − W)^T E[x]``; that shift is taken out of the bias of the ``Add``
after the MatMul (``bias_correction.bias_add``), which stays float in a dynamic graph. Layers without such a bias, with
a weight read by another node, or whose input has no positions (``smoothing.positional``: a classifier's pooled
[batch, K] gives one row per feed, too few for H) keep round-to-nearest.

Statistics: one streaming run of the shared collector (``StatsRequest.second_moments``: H and Σx per input, the
inputs read by several MatMuls — a transformer's Q/K/V — once) over ``rounding_samples`` calibration feeds.
Kept: ``weight_rounding=output`` always; ``matmul`` / ``auto`` (and ``refit``, which has no dynamic form) only when
the dynamic model's worst-output SQNR on the first ``eval_samples`` calibration feeds is strictly higher than with
round-to-nearest (``smoothing_choice.decision_key``); else the weights and biases are left as they were.

Measured on MiniLM-L6 (smoothed at α = 0.8; 48 held-out sentences / 48 long inputs, weights only): round-to-nearest
27.8 / 28.1 dB, rounded 30.6 / 31.1 dB; the dynamic model 25.3 / 25.5 -> 26.1 / 26.4 dB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.activation_stats import StatisticsStore, StatsRequest
from onnxcompress.naming import unique_name

from . import fidelity as fid
from . import qparams_math as qm
from . import smoothing
from .bias_correction import bias_add
from .ort_int8_kernels import const_value
from .rounding import channel_scales, round_columns
from .smoothing_choice import decision_key

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from onnxcompress.context import PassContext

    from .options import QuantizeOptions


@dataclass
class RoundedWeight:
    """A MatMul's int8 weight rounded against its outputs, and the mean output shift its bias Add must lose."""

    weight: qm.QuantizedWeight
    shift: np.ndarray


def wanted(p: QuantizeOptions, ctx: PassContext) -> bool:
    """Whether dynamic mode rounds against outputs: calibration data given and a rounding other than nearest."""
    return ctx.calibration is not None and len(ctx.calibration) > 0 and p.weight_rounding != "nearest"


def layers(graph: gs.Graph, ranks: dict[str, int], exclude: tuple[str, ...]) -> list[gs.Node]:
    """Main-graph MatMuls the rounding may change (module doc: a bias Add, a weight of their own, positions)."""
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for t in n.inputs:
            readers[t.name] = readers.get(t.name, 0) + 1
    out = []
    for n in graph.nodes:
        if n.op != "MatMul" or n.name in exclude or bias_add(n) is None or readers.get(n.inputs[1].name, 0) != 1:
            continue
        w = const_value(n.inputs[1])
        if w is not None and w.dtype == np.float32 and smoothing.positional(n.inputs[0], ranks.get(n.inputs[0].name)):
            out.append(n)
    return out


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``Σ_n (w_n − ŵ_n)^T H (w_n − ŵ_n)`` for W [K, N] (the layer's output error on the rows H was built from)."""
    e = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    return float(np.einsum("kn,kn->", h @ e, e))


def solve(w: np.ndarray, h: np.ndarray) -> qm.QuantizedWeight:
    """W [K, N] -> int8 ``q`` [K, N] with per-column scales [N] (axis 1, zero points 0) minimising E (module doc)."""
    wm = np.asarray(w, np.float64).T  # [N, K]: one row per output column
    scale = channel_scales(wm, h)
    q = np.clip(round_columns(wm, h, scale), -127, 127).astype(np.int8).T
    return qm.QuantizedWeight(np.ascontiguousarray(q), scale.astype(np.float32), np.zeros(scale.shape, np.int8), 1)


def round_weights(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext,
                  quantize: Callable[[gs.Graph, dict[str, RoundedWeight]], object] | None,
                  score: fid.GraphScorer | None = None,
                  reuse: tuple[dict[str, RoundedWeight], dict, dict[str, float]] | None = None,
                  ) -> tuple[dict[str, RoundedWeight], dict]:
    """(weight name -> rounded weight and bias shift, stats); ``graph`` is not changed (the quantizer applies a
    weight's shift where it uses that weight, ``shift_bias``). ``quantize(g, rounded)`` quantizes a copy dynamically
    with those weights and ``score(g)`` scores it (the keep decision); ``quantize`` None: kept without a decision (a
    smoothing trial scores the model as it would be built). ``reuse``: (rounded, stats, its score) of a smoothing
    trial ``graph`` equals: no statistics run nor solve again, only the round-to-nearest model is scored."""
    t0 = time.perf_counter()
    if reuse is not None and reuse[0] and quantize is not None and \
            set(reuse[0]) <= {t.name for t in graph.tensors().values() if isinstance(t, gs.Constant)}:
        rounded, stats, score_rounded = reuse[0], dict(reuse[1]), reuse[2]
        return _decide(p, graph, quantize, score, rounded, {**stats, "reused_from_smoothing": True},
                       t0, score_rounded)
    ranks = smoothing.tensor_ranks(ctx.export(graph))
    todo = layers(graph, ranks, tuple(p.exclude))
    if not todo:
        return {}, {"kept": False, "reason": "no MatMul with a bias Add, its own weight and an input with positions"}
    feeds = ctx.calibration.take(p.rounding_samples) if 0 < p.rounding_samples < len(ctx.calibration) \
        else ctx.calibration
    store = StatisticsStore(ctx.export(graph), feeds, ctx, "float model (dynamic weight rounding)")
    inputs = sorted({n.inputs[0].name for n in todo})
    rows = {x: (x, lambda a: np.asarray(a, np.float32).reshape(-1, a.shape[-1])) for x in inputs}
    store.get(StatsRequest(second_moments={f"{x}:dynamic_rounding": rows[x] for x in inputs}, samples=len(feeds)))
    rounded: dict[str, RoundedWeight] = {}
    row_counts = []
    gains: list[float] = []  # per layer: output error of round-to-nearest over the rounded one, dB
    for n in todo:
        g = store.gram(f"{n.inputs[0].name}:dynamic_rounding", samples=len(feeds))
        if g is None or g.rows <= len(feeds):  # one row per feed: too few for H
            continue
        w = const_value(n.inputs[1]).astype(np.float64)
        qw = solve(w, g.xtx)
        gains.append(10.0 * np.log10(output_error(w, qm.quantize_weight(w.astype(np.float32), qm.INT8, 1).dequantized(),
                                                  g.xtx) / max(output_error(w, qw.dequantized(), g.xtx), 1e-30)))
        rounded[n.inputs[1].name] = RoundedWeight(qw, (qw.dequantized().astype(np.float64) - w).T @ (g.row_sum / g.rows))
        row_counts.append(g.rows)
    stats: dict = {"layers": len(rounded), "rows": min(row_counts, default=0), "feeds": len(feeds),
                   "output_error_db_gain_median": round(float(np.median(gains)), 2) if gains else None}
    if not rounded:
        return {}, {**stats, "kept": False, "reason": "no input with more than one row per feed"}
    return _decide(p, graph, quantize, score, rounded, stats, t0)


def _decide(p: QuantizeOptions, graph: gs.Graph, quantize, score, rounded: dict[str, RoundedWeight], stats: dict,
            t0: float, score_rounded: dict[str, float] | None = None) -> tuple[dict[str, RoundedWeight], dict]:
    """Keep ``rounded`` when asked (``weight_rounding=output``, or no ``quantize``: a trial) or when the rounded
    dynamic model scores better than the round-to-nearest one (``score_rounded``: already measured)."""
    keep = p.weight_rounding == "output" or quantize is None
    if not keep:
        def scored(g: gs.Graph, weights: dict) -> dict[str, float]:
            quantize(g, weights)
            return score(g)

        stats["score_nearest"] = scored(graph.copy(), {})
        stats["score_rounded"] = score_rounded if score_rounded is not None else scored(graph.copy(), rounded)
        keep = decision_key(stats["score_rounded"]) < decision_key(stats["score_nearest"])
    stats["kept"] = bool(keep)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return (rounded if keep else {}), stats


def shift_bias(node: gs.Node, shift: np.ndarray, names: set[str]) -> None:
    """Take ``shift`` [N] out of the bias of the Add after the MatMul ``node`` (``bias_correction.bias_add``)."""
    add, slot = bias_add(node)
    b = const_value(add.inputs[slot]).astype(np.float64)
    add.inputs[slot] = gs.Constant(unique_name(f"{add.inputs[slot].name}_rounded", names), (b - shift).astype(np.float32))
