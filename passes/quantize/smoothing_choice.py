"""``smooth=auto``: whether MatMul inputs are smoothed is measured on the user's model, not read off their channels.

Smoothing (``smoothing``, SmoothQuant) trades activation rounding noise for weight rounding noise at every smoothed
input. Whether the model's outputs gain depends on which noise dominates where, and on the float layers the search
keeps afterwards: on MiniLM-L3, smoothing every input moved the all-int8 embedding by only +0.2 dB, yet with it the
float-layer search found one layer worth +9.8 dB (worth +1.9 dB without smoothing): 30.2 dB against 23.5 dB in all.
No statistic of one activation (the old rule: largest channel RMS >= 8x the median) predicts that, so both
quantizations are made in full and measured:

* stages 1-5 of ``static_run`` (preparation, calibration, range choice, float-layer search, build) run from copies
  of the graph, once without smoothing and once per strength α in ``smooth_alphas`` with every candidate smoothed
  (the best α is the model's: held out, MiniLM-L3's embedding 30.2 / 31.0 / 30.3 dB at α = 0.5 / 0.65 / 0.8,
  MiniLM-L6's 20.4 / 24.7 / 25.5 dB);
* the builds are scored by ``fidelity.score`` against the unsmoothed run's float reference on the same evaluation
  feeds, the feeds combined by ``auto_float_score``, on the graph outputs only (the last layers' input features of the
  smoothed model are the smoothed tensors ``x/s``: not comparable with ``x``);
* a smoothed one is kept only when it ranks strictly better than every earlier trial: a higher worst-output SQNR,
  then less top-1 agreement lost (class outputs); a tie keeps the graph unsmoothed. SQNR first, unlike ``rank_key``'s agreement before it:
  agreement over a few dozen feeds moves in steps of one feed, and on the tests' toys (a MatMul head read as class
  scores) it picked the side that was worse on held-out feeds in 3 of 3 cases where the SQNR picked right;
* the chosen run goes on alone (mixed precision to a user target, latency guard, adoption).

A graph without candidates (no MatMul/Gemm reading an activation with a constant weight: most CNNs) is quantized
once, exactly as with ``smooth=none``. Cost: stages 1-5 once per trial (``stats["smoothing"]["seconds"]``); only
the best run so far is held in memory.
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
    """Quantize ``graph`` (modified in place) without smoothing and smoothed at each of ``smooth_alphas``
    (``run_cls``: ``StaticRun``), keep the best measured one (module doc)."""
    t_start = time.perf_counter()
    trials: list[float | None] = [None, *dict.fromkeys(float(a) for a in p.smooth_alphas)]
    best = None  # (key, label, run, candidate): only the best run so far is kept in memory
    measured: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    outputs_only = None
    shared_rms: dict = {}  # the float graph's channel RMS, measured by the first smoothed trial for all
    for alpha in trials:
        label = "not smoothed" if alpha is None else f"alpha={alpha:g}"
        t0 = time.perf_counter()
        r = run_cls(p, graph.copy(), ctx)
        r.smooth_all = alpha is not None
        r.smooth_alpha = p.smooth_alpha if alpha is None else alpha
        r.smooth_rms = shared_rms
        got = r.candidate()
        if got is None:  # nothing to quantize in the main graph (exclusions): the unsmoothed run says why
            res = r.nothing_to_quantize(t_start)
            qo.transplant(graph, r.graph)
            return res
        if outputs_only is None:  # the unsmoothed run's float reference, graph outputs only
            ref = got[0]
            outputs_only = fid.Reference(ref.feeds, ref.outputs, ref.names, class_outputs=ref.class_outputs)
            outputs_only = outputs_only.scored_by(p.auto_float_score)
        sc = fid.score_model(outputs_only, r.export(got[2].graph))
        seconds[label] = round(time.perf_counter() - t0, 2)
        measured[label] = {**{k: round(v, 4) for k, v in sc.items() if k in ("sqnr_db", "cosine", "agreement")},
                           "float_layers": sorted(r.auto_float)}
        key = decision_key(sc)
        if best is None or key < best[0]:  # strictly better; the earlier (unsmoothed, weaker) wins a tie
            best = (key, label, r, got)
        r = got = None
    _, label, win, got = best
    smoothed = win.stats.get("smoothing", {})
    win.stats["smoothing"] = {
        "decision": "smoothed" if label != "not smoothed" else "not smoothed",
        "alpha": win.smooth_alpha if label != "not smoothed" else None,
        "smoothed": smoothed.get("smoothed", 0),
        **({"channel_ratio": smoothed["channel_ratio"]} if "channel_ratio" in smoothed else {}),
        "measured": measured,
        "feed_score": outputs_only.feed_score,
        "seconds": seconds,
    }
    log.info("smooth=auto: %s (worst-output SQNR on the evaluation feeds: %s)", label,
             ", ".join(f"{k} {v['sqnr_db']:.2f} dB" for k, v in measured.items()))
    res = win.finish(*got, t_start=t_start)
    qo.transplant(graph, win.graph)
    return res


__all__ = ["choose_smoothing", "decision_key"]
