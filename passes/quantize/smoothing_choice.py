"""``smooth=auto``: whether MatMul inputs are smoothed is measured on the user's model, not read off their channels.

Smoothing (``smoothing``, SmoothQuant) trades activation rounding noise for weight rounding noise at every smoothed
input. Whether the model's outputs gain depends on which noise dominates where, and on the float layers the search
keeps afterwards: on MiniLM-L3, smoothing every input moved the all-int8 embedding by only +0.2 dB, yet with it the
float-layer search found one layer worth +9.8 dB (worth +1.9 dB without smoothing): 30.2 dB against 23.5 dB in all.
No statistic of one activation (the old rule: largest channel RMS >= 8x the median) predicts that, so both
quantizations are made in full and measured:

* stages 1-5 of ``static_run`` (preparation, calibration, range choice, float-layer search, build) run on a copy
  of the graph without smoothing;
* for each strength α in ``smooth_alphas`` a copy with every candidate smoothed goes through stages 1-4 only, and
  its all-int8 model is scored; the best α's run alone goes on through the float-layer search and the build, and
  only when its all-int8 model beats the unsmoothed all-int8 model (else the unsmoothed quantization is kept: one
  float-layer search). The strength is the model's (held out, MiniLM-L3's embedding 30.2 / 31.0 / 30.3 dB at
  α = 0.5 / 0.65 / 0.8, MiniLM-L6's 20.4 / 24.7 / 25.5 dB), and on both the all-int8 models rank the strengths as
  the finished ones do (L3 all-int8 21.1 / 27.1 / 27.7 easy and 19.6 / 25.6 / 23.9 long, L6 18.3 / 23.0 / 24.8 and
  18.7 / 23.9 / 25.4 dB): one float-layer search per strength would cost more searches for the same pick. The
  screen against the unsmoothed all-int8 model needs a strong enough strength on the grid: MiniLM-L3 at α = 0.5
  loses at all-int8 (21.1 / 19.6 dB against 22.0 / 22.4) and wins finished (30.2 / 30.0 against 23.5 / 23.8);
* with ``smooth_per_input`` one more trial joins the screen: every input at its own strength (or unsmoothed),
  chosen by the predicted joint weight + activation rounding error at its layers' outputs
  (``smoothing_strength``); it is screened and kept exactly like a global strength;
* the unsmoothed and the best smoothed builds are scored by ``fidelity.score`` against the unsmoothed run's float
  reference on the same evaluation feeds, the feeds combined by ``auto_float_score``, on the graph outputs only (the
  last layers' input features of the smoothed model are the smoothed tensors ``x/s``: not comparable with ``x``);
* the smoothed one is kept only when it ranks strictly better: a higher worst-output SQNR, then less top-1 agreement
  lost (class outputs); a tie keeps the graph unsmoothed. SQNR first, unlike ``rank_key``'s agreement before it: agreement over
  a few dozen feeds moves in steps of one feed, and on the tests' toys (a MatMul head read as class scores) it picked
  the side that was worse on held-out feeds in 3 of 3 cases where the SQNR picked right;
* the chosen run goes on alone (mixed precision to a user target, latency guard, adoption).

A graph without candidates (no MatMul/Gemm reading an activation with a constant weight: most CNNs) is quantized
once, exactly as with ``smooth=none``. Cost: stages 1-5 once, stages 1-4 once per strength, and the float-layer
search once more when a strength passes the screen (``stats["smoothing"]["seconds"]``); only the best strength's
run is held beside the unsmoothed one.
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

    from .options import QuantizeOptions

log = logging.getLogger(__name__)

#: the screen's trial with a strength per input (``smoothing_strength``)
PER_INPUT = "per input"


def decision_key(s: dict[str, float]) -> tuple[float, float]:
    """Sort key of an outputs-only score, best first: the worst output's SQNR, then agreement lost."""
    return (-s["sqnr_db"], 1.0 - s.get("agreement", 1.0))


def choose_smoothing(run_cls, p: QuantizeOptions, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Quantize ``graph`` (modified in place) without smoothing and smoothed at the strength of ``smooth_alphas``
    whose all-int8 model measures best (``run_cls``: ``StaticRun``); keep the better (module doc)."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def fresh(alpha: float | str | None):  # None: not smoothed; PER_INPUT: a strength per input
        r = run_cls(p, graph.copy(), ctx)
        r.smooth_all = alpha is not None
        r.smooth_alpha = p.smooth_alpha if alpha is None else None if alpha == PER_INPUT else alpha
        r.smooth_rms = shared_rms
        r.weight_type_choice = shared_weight_type  # measured once, by the unsmoothed run (``u8s8_saturation``)
        return r

    shared_rms: dict = {}  # the float graph's channel RMS, measured by the first smoothed trial for all
    shared_weight_type: dict = {}  # weight_type=auto: the unsmoothed run's measured choice, for every trial
    t0 = time.perf_counter()
    plain = fresh(None)
    ready_plain = plain.setup()
    if ready_plain is None:  # nothing to quantize in the main graph (exclusions): the unsmoothed run says why
        res = plain.nothing_to_quantize(t_start)
        qo.transplant(graph, plain.graph)
        return res
    ref = ready_plain[0]
    outputs_only = fid.Reference(ref.feeds, ref.outputs, ref.names, class_outputs=ref.class_outputs)
    outputs_only = outputs_only.scored_by(p.auto_float_score)

    def scored(model) -> dict:
        return fid.outputs_summary(outputs_only, model)

    screen: dict[str, dict] = {"not smoothed": scored(plain.all_int8_model())}
    got_plain = plain.complete(*ready_plain)
    seconds["not smoothed"] = round(time.perf_counter() - t0, 2)

    # 1. each strength's all-int8 model (setup only: preparation, calibration, range choice)
    best = None  # (key, label, run, setup result): only the best strength's run is kept
    trials: list[float | str] = list(dict.fromkeys(float(a) for a in p.smooth_alphas))
    if p.smooth_per_input:
        trials.append(PER_INPUT)
    for alpha in trials:
        label = f"alpha={alpha:g}" if alpha != PER_INPUT else "alpha per input"
        t0 = time.perf_counter()
        r = fresh(alpha)
        ready = r.setup()
        if ready is None:
            continue
        screen[label] = scored(r.all_int8_model())
        seconds[label] = round(time.perf_counter() - t0, 2)
        key = decision_key(screen[label])
        if best is None or key < best[0]:
            best = (key, label, r, ready)
        r = ready = None
    # 2. the best strength through the float-layer search, against the unsmoothed quantization, when its all-int8
    # model beats the unsmoothed all-int8 model
    measured = {"not smoothed": {**scored(plain.export(got_plain[2].graph)), "float_layers": sorted(plain.auto_float)}}
    win, got, label = plain, got_plain, "not smoothed"
    smoothed_run = None
    if best is not None and best[0] < decision_key(screen["not smoothed"]):
        _, s_label, smoothed_run, ready = best
        t0 = time.perf_counter()
        got_s = smoothed_run.complete(*ready)
        seconds[s_label] = round(seconds[s_label] + time.perf_counter() - t0, 2)
        measured[s_label] = {**scored(smoothed_run.export(got_s[2].graph)),
                             "float_layers": sorted(smoothed_run.auto_float)}
        if decision_key(measured[s_label]) < decision_key(measured["not smoothed"]):  # strictly better
            win, got, label = smoothed_run, got_s, s_label
    smoothed = win.stats.get("smoothing", {})
    win.stats["smoothing"] = {
        "decision": "smoothed" if win is not plain else "not smoothed",
        "alpha": (win.smooth_alpha if win.smooth_alpha is not None else PER_INPUT) if win is not plain else None,
        **({"alphas": smoothed["alphas"]} if "alphas" in smoothed else {}),
        "smoothed": smoothed.get("smoothed", 0),
        **({"channel_ratio": smoothed["channel_ratio"]} if "channel_ratio" in smoothed else {}),
        "all_int8_by_strength": screen,
        "measured": measured,
        "feed_score": outputs_only.feed_score,
        "seconds": seconds,
    }
    log.info("smooth=auto: %s (worst-output SQNR on the evaluation feeds: %s; all-int8 by strength: %s)", label,
             ", ".join(f"{k} {v['sqnr_db']:.2f} dB" for k, v in measured.items()),
             ", ".join(f"{k} {v['sqnr_db']:.2f} dB" for k, v in screen.items()))
    plain = smoothed_run = best = got_plain = None  # the other run's graphs and statistics can go
    res = win.finish(*got, t_start=t_start)
    qo.transplant(graph, win.graph)
    return res


__all__ = ["choose_smoothing", "decision_key"]
