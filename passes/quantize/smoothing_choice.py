"""``smooth=auto``: whether MatMul inputs are smoothed is measured on the user's model, not read off their channels.

Smoothing (``smoothing``, SmoothQuant) trades activation rounding noise for weight rounding noise at every smoothed
input. Whether the model's outputs gain depends on which noise dominates where, and on the float layers the search
keeps afterwards: on MiniLM-L3, smoothing every input moved the all-int8 embedding by only +0.2 dB, yet with it the
float-layer search found one layer worth +9.8 dB (worth +1.9 dB without smoothing): 30.2 dB against 23.5 dB in all.
No statistic of one activation (the old rule: largest channel RMS >= 8x the median) predicts that, so both
quantizations are made in full and measured:

* stages 1-5 of ``static_run`` (preparation, calibration, range choice, float-layer search, build) run twice from
  copies of the graph, once without smoothing and once with every candidate smoothed (``smooth_alpha``);
* both builds are scored by ``fidelity.score`` against the unsmoothed run's float reference on the same evaluation
  feeds, the feeds combined by ``auto_float_score``, on the graph outputs only (the last layers' input features of the
  smoothed model are the smoothed tensors ``x/s``: not comparable with ``x``);
* the smoothed one is kept only when it ranks strictly better: a higher worst-output SQNR, then less top-1 agreement
  lost (class outputs); a tie keeps the graph unsmoothed. SQNR first, unlike ``rank_key``'s agreement before it:
  agreement over a few dozen feeds moves in steps of one feed, and on the tests' toys (a MatMul head read as class
  scores) it picked the side that was worse on held-out feeds in 3 of 3 cases where the SQNR picked right;
* the chosen run goes on alone (mixed precision to a user target, latency guard, adoption).

A graph without candidates (no MatMul/Gemm reading an activation with a constant weight: most CNNs) is quantized
once, exactly as with ``smooth=none``. Cost: stages 1-5 twice (``stats["smoothing"]["seconds"]``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from onnxcompress.pass_base import PassResult

from . import fidelity as fid
from . import opset_upgrade as qo

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from onnxcompress.context import PassContext

    from .quantize_pass import Quantize

log = logging.getLogger(__name__)


def decision_key(s: dict[str, float]) -> tuple[float, float]:
    """Sort key of an outputs-only score, best first: the worst output's SQNR, then agreement lost."""
    return (-s["sqnr_db"], 1.0 - s.get("agreement", 1.0))


def choose_smoothing(run_cls, p: Quantize, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Quantize ``graph`` (modified in place) with and without smoothing (``run_cls``: ``StaticRun``), keep the
    better measured one (module doc)."""
    t_start = time.perf_counter()
    runs, got, secs = [], [], []
    for smooth_all in (False, True):
        t0 = time.perf_counter()
        r = run_cls(p, graph.copy(), ctx)
        r.smooth_all = smooth_all
        runs.append(r)
        got.append(r.candidate())
        secs.append(round(time.perf_counter() - t0, 2))
    if got[0] is None or got[1] is None:  # nothing to quantize in the main graph: the unsmoothed run says why
        res = runs[0].nothing_to_quantize(t_start)
        qo.transplant(graph, runs[0].graph)
        return res
    ref = got[0][0]
    outputs_only = fid.Reference(ref.feeds, ref.outputs, ref.names, class_outputs=ref.class_outputs)
    outputs_only = outputs_only.scored_by(p.auto_float_score)
    scores = [fid.score_model(outputs_only, r.export(g[2].graph)) for r, g in zip(runs, got, strict=True)]
    pick = 1 if decision_key(scores[1]) < decision_key(scores[0]) else 0
    win = runs[pick]
    smoothed = runs[1].stats.get("smoothing", {})
    win.stats["smoothing"] = {
        "decision": "smoothed" if pick else "not smoothed",
        **{k: v for k, v in smoothed.items() if k != "smoothed"},
        "smoothed": smoothed.get("smoothed", 0) if pick else 0,
        "candidates": smoothed.get("smoothed", 0),
        "measured": {
            name: {**{k: round(v, 4) for k, v in sc.items() if k in ("sqnr_db", "cosine", "agreement")},
                   "float_layers": sorted(r.auto_float)}
            for name, sc, r in zip(("not smoothed", "smoothed"), scores, runs, strict=True)
        },
        "feed_score": outputs_only.feed_score,
        "seconds": {"not smoothed": secs[0], "smoothed": secs[1]},
    }
    log.info("smooth=auto: %s (worst-output SQNR %.2f dB not smoothed, %.2f dB smoothed)",
             win.stats["smoothing"]["decision"], scores[0]["sqnr_db"], scores[1]["sqnr_db"])
    ref_w, feeds_w, built_w, sc_w = got[pick]
    runs[1 - pick] = r = got = None  # the other run's graphs and statistics can go
    res = win.finish(ref_w, feeds_w, built_w, sc_w, t_start=t_start)
    qo.transplant(graph, win.graph)
    return res


__all__ = ["choose_smoothing", "decision_key"]
