"""``quantize{mode=dynamic}`` given calibration data: SmoothQuant factors chosen by measuring the dynamic model.

Dynamic quantization measures each MatMul input's range at run time, ``s_x = (max(x, 0) − min(x, 0)) / 255`` over
the whole tensor (``DynamicQuantizeLinear``), so the few outlier channels of a transformer's LayerNorm and GELU
outputs set the step for every channel exactly as a calibrated range does: on MiniLM-L6 (held out, 48 sentences /
48 long inputs) the dynamic model's embedding is 19.1 / 19.6 dB, the static one without smoothing 18.4 / 19.4.
Smoothing (``smoothing``) is an exact float rewrite, ``X W = (X diag(1/s)) (diag(s) W)``, so it serves dynamic
ranges as well as calibrated ones: measured on the same sets, α = 0.5 / 0.65 / 0.8 gave 18.2 / 23.4 / 25.3 dB
(easy) at the same latency (0.46-0.48x), MiniLM-L3 20.6 / 26.7 / 28.0 dB easy but 18.9 / 24.6 / 23.8 long: the
strength is the model's and the data's, so it is measured, not set.

The choice (``smooth=auto``, the default): the float graph's channel statistics are collected once
(``smoothing.channel_stats``, the shared activation-statistics collector over ``calibration_samples`` feeds); then
the graph is quantized dynamically without smoothing and with every candidate input smoothed at each of
``smooth_alphas``, and each dynamic model is scored on the first ``eval_samples`` calibration feeds against the
float model's outputs (``fidelity.score``, feeds combined by ``auto_float_score``). The smoothed graph is kept only
when its worst-output SQNR is strictly higher (``smoothing_choice.decision_key``); a tie keeps the graph as it was.
With ``weight_rounding`` other than nearest each trial's weights are rounded against its own layer outputs
(``dynamic_rounding``) before it is scored: smoothing moves error from the activations into the weights, and the
rounding takes back part of the weights' share, so the best strength is the one of the model as it will be built.
``smooth=all`` smooths at ``smooth_alpha`` (``per_input``: each input at its predicted strength) without a trial;
``smooth=none`` or no calibration data: nothing is smoothed (dynamic quantization needs no data).

Cost: one dynamic quantization (seconds: no calibration of ranges) and one run of the evaluation feeds per
strength, plus the statistics run. The smoothing lands in the float graph (LayerNorm γ/β divided by ``s`` where the
LayerNorm feeds only these MatMuls, else a ``Mul`` by ``1/s``), so the quantized graph is exactly the dynamic
quantization of the chosen float graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxcompress.naming import graph_names

from . import fidelity as fid
from . import smoothing
from .smoothing_choice import decision_key

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext
    from onnxcompress.data import FeedSet

    from .options import QuantizeOptions


@dataclass
class SmoothingView:
    """What ``smoothing.smooth`` reads of a quantization run (``run_view.QuantizeRun``'s smoothing part)."""

    p: QuantizeOptions
    ctx: PassContext
    smooth_alpha: float | None
    #: the channel statistics every trial shares (filled by the first ``smooth``)
    smooth_rms: dict = field(default_factory=dict)

    def feeds(self, n: int) -> FeedSet:
        feeds = self.ctx.calibration
        return feeds.take(n) if n and n < len(feeds) else feeds


def wanted(p: QuantizeOptions, ctx: PassContext) -> bool:
    """Whether dynamic mode smooths: calibration data given and ``smooth`` not ``none``."""
    return ctx.calibration is not None and len(ctx.calibration) > 0 and p.smooth not in (None, "none")


def choose(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext, quantize: Callable[[gs.Graph, str], object],
           score: fid.GraphScorer) -> dict:
    """Smooth ``graph`` (in place) as the module doc says; ``quantize(g, label)`` quantizes a copy dynamically in
    place (``label``: the trial, e.g. ``alpha=0.8``), ``score(g)`` scores it. Returns the stats (decision, strength,
    ``chosen``: the label of the trial the graph now equals, the scores of every trial, seconds)."""
    t0 = time.perf_counter()
    ranks = smoothing.tensor_ranks(ctx.export(graph))
    if not smoothing.candidates(graph, ranks):
        return {"decision": "not smoothed", "reason": "no MatMul/Gemm input with positions and a constant weight"}
    if p.smooth in ("all", "per_input"):
        alpha = None if p.smooth == "per_input" else float(p.smooth_alpha)
        done = smoothing.smooth(SmoothingView(p, ctx, alpha), graph, graph_names(graph))
        return {"decision": "smoothed", "alpha": alpha if alpha is not None else "per input",
                "smoothed": done["smoothed"], "seconds": round(time.perf_counter() - t0, 2)}
    shared: dict = {}

    def scored(g: gs.Graph, label: str) -> dict[str, float]:
        quantize(g, label)
        return score(g)

    trials: dict[str, dict[str, float]] = {"not smoothed": scored(graph.copy(), "not smoothed")}
    best_label, best_alpha = "not smoothed", None
    for alpha in dict.fromkeys(float(a) for a in p.smooth_alphas):
        g = graph.copy()
        smoothing.smooth(SmoothingView(p, ctx, alpha, shared), g, graph_names(g))
        label = f"alpha={alpha:g}"
        trials[label] = scored(g, label)
        if decision_key(trials[label]) < decision_key(trials[best_label]):
            best_label, best_alpha = label, alpha
    stats: dict = {"decision": "not smoothed" if best_alpha is None else "smoothed", "alpha": best_alpha,
                   "chosen": best_label, "dynamic_by_strength": trials, "eval_feeds": len(score.feeds)}
    if best_alpha is not None:
        done = smoothing.smooth(SmoothingView(p, ctx, best_alpha, shared), graph, graph_names(graph))
        stats["smoothed"] = done["smoothed"]
        stats["channel_ratio"] = done.get("channel_ratio", {})
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats
