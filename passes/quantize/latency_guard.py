"""Latency guard (``latency_guard=true``): never return a QDQ model that runs slower than the float one under ORT.

Rule: the candidate's ``ratio = t_int8 / t_float`` (one thread, interleaved medians on the first evaluation feed;
a short run settles clear wins below ``GUARD_QUICK_ACCEPT``, anything else is measured again, longer). Below
``CLEARLY_FASTER`` it is kept. Else fallbacks, each measured on the whole model:

1. the Convs whose integer kernel alone measured ``>= LAYER_KEEP_INT8_BELOW`` times their float Conv
   (``layer_speed``) stay float — when some but not all Convs are that slow; kept when it measured faster than the
   all-int8 model and than float;
2. the all-int8 model, when it measured < 1;
3. every depthwise Conv stays float (first one under 1 wins);
4. else the graph stays float, and the stats say why.

Every measurement goes through the run's ``LatencyProfile`` (``ctx.latency.measure``): whole models under
``model_ratio_key`` (a fingerprint of the float and candidate model bytes, the feed shapes and the thread count),
Conv layers under ``layer_speed.conv_speed_key``. A replayed profile therefore reproduces every decision without
measuring; the stats count the measurements taken and replayed. The pass runs inside the per-machine cache
(``latency_cache``, ``onnxcompress.latency_profile.MachineCache``): a key measured by an earlier run on this machine
is read back, so a ratio near 1.0 cannot land on different sides of it in two runs (byte-identical outputs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxcompress.data import Feed
from onnxcompress.latency_profile import fingerprint

from . import fidelity as fid
from . import layer_speed

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import Built, QuantizeRun

log = logging.getLogger(__name__)

#: a candidate measured below this ratio in a short run is accepted without the longer run
GUARD_QUICK_ACCEPT = 0.8
#: an all-int8 model at or above this ratio (not clearly faster: within a shared machine's noise of float) is
#: compared with fallback 1 (its slow Convs float), the faster kept: an unseen orientation classifier measured 0.94x
#: all-int8 (1.0x re-timed) at 18.3 dB, its slow Convs float 0.90x at 29.6 dB
CLEARLY_FASTER = 0.85
#: fallback 1: a Conv stays int8 only where its integer kernel alone measured below this ratio
LAYER_KEEP_INT8_BELOW = 0.9
#: whole models are timed on this many threads
GUARD_THREADS = 1


def model_ratio_key(
    float_model: onnx.ModelProto, candidate: onnx.ModelProto, feed: Feed, threads: int = GUARD_THREADS
) -> str:
    """The latency-profile key of ``candidate``'s latency ratio against ``float_model`` on a feed shaped like
    ``feed``."""
    shapes = sorted((name, tuple(int(d) for d in np.shape(a))) for name, a in feed.items())
    digest = fingerprint(
        float_model.SerializeToString(), candidate.SerializeToString(), str(shapes), f"threads={threads}"
    )
    return f"quantize/model-ratio/{digest}"


def latency_ratio(run: QuantizeRun, cand: onnx.ModelProto, feed: Feed) -> float:
    """int8 / float latency of ``cand``, through the run's latency profile."""

    def measure() -> float:
        from onnxcompress.latency import measure_latency

        models = {"float": run.float_model, "int8": cand}
        lat = measure_latency(models, feed, threads=GUARD_THREADS, budget_s=0.6)
        ratio = lat["int8"] / lat["float"]
        if ratio >= GUARD_QUICK_ACCEPT:
            lat = measure_latency(models, feed, threads=GUARD_THREADS, budget_s=2.0)
            ratio = lat["int8"] / lat["float"]
        return float(ratio)

    return run.ctx.latency.measure(model_ratio_key(run.float_model, cand, feed), measure)


def input_shapes(float_model: onnx.ModelProto, names: list[str], feed: Feed) -> dict[str, tuple[int, ...]]:
    """Shapes of the float model's tensors ``names`` on ``feed`` (one probe run)."""
    from onnxcompress.analyses.activations import expose_outputs
    from onnxcompress.runtime import Session

    names = list(dict.fromkeys(names))
    with Session(expose_outputs(float_model, names), optimize=False, what="shape probe") as s:
        return {n: tuple(np.shape(a)) for n, a in zip(names, s.run(feed, names), strict=True)}


def latency_guard(
    run: QuantizeRun,
    built: Built,
    sc: dict[str, float],
    float_layers: dict[str, str],
    ref: fid.Reference,
    eval_feeds: list[Feed],
) -> tuple[Built, dict[str, float]] | None:
    """The module rule: the build to return and its score, or None when the graph stays float.
    ``float_layers`` (name -> reason) gains the layers fallback 1 keeps float."""
    profile = run.ctx.latency
    measured0, replayed0, cached0 = profile.measured, profile.replayed, profile.cached
    try:
        return _guard(run, built, sc, float_layers, ref, eval_feeds)
    finally:
        run.stats["latency_measurements"] = {
            "measured": profile.measured - measured0,
            "replayed": profile.replayed - replayed0,
            "machine_cache": profile.cached - cached0,
        }


def _guard(
    run: QuantizeRun,
    built: Built,
    sc: dict[str, float],
    float_layers: dict[str, str],
    ref: fid.Reference,
    eval_feeds: list[Feed],
) -> tuple[Built, dict[str, float]] | None:
    """``latency_guard`` without the measurement count."""
    feed = eval_feeds[0]
    ratio = latency_ratio(run, run.export(built.graph), feed)
    run.stats["latency_ratio_measured"] = round(ratio, 3)
    if ratio < CLEARLY_FASTER:
        return built, sc
    plan = built.plan
    base_nodes = {n.name: n for n in run.base.nodes if n.name}  # float weights, float input names
    convs = [
        base_nodes[n.name] for n in plan.anchors if id(n) in plan.int8 and n.op == "Conv" and n.name in base_nodes
    ]
    if convs:
        shapes = input_shapes(run.float_model, [n.inputs[0].name for n in convs], feed)
        speed = layer_speed.int8_speed_ratios(convs, shapes, profile=run.ctx.latency)
        slow = {n: r for n, r in speed.items() if r >= LAYER_KEEP_INT8_BELOW}
        run.stats["latency_layer_ratios"] = {n: round(r, 2) for n, r in sorted(speed.items())}
        if slow and len(slow) < len(convs):
            reasons = dict(float_layers)
            for n, r in slow.items():
                reasons[n] = f"kept float for speed: ORT's int8 kernel measured {r:.2f}x its float Conv"
            outcome = _try(run, list(reasons), reasons, ref, feed, "latency_ratio_slow_layers_float")
            if outcome is not None and run.stats["latency_ratio_slow_layers_float"] < ratio:
                float_layers.update(reasons)
                return outcome
    if ratio < 1.0:  # faster than float, and no fallback measured faster
        return built, sc
    if run.depthwise and any(n.op == "Conv" for n in plan.anchors):
        run.depthwise = False
        outcome = _try(run, list(float_layers), float_layers, ref, feed, "latency_ratio_depthwise_float")
        if outcome is not None:
            return outcome
    run.stats["skipped"] = (
        f"the quantized model was slower than the float one under ORT (latency ratio "
        f"{ratio:.2f}); graph left float"
    )
    log.warning("quantize: %s", run.stats["skipped"])
    return None


def _try(
    run: QuantizeRun, float_nodes: list[str], reasons: dict[str, str], ref: fid.Reference, feed: Feed, stat: str
) -> tuple[Built, dict[str, float]] | None:
    """Build a fallback with ``float_nodes`` float, measure it (``run.stats[stat]``); it and its score if faster."""
    b = run.build(float_nodes, tuple(reasons.items()))
    cand = run.export(b.graph)
    ratio = latency_ratio(run, cand, feed)
    run.stats[stat] = round(ratio, 3)
    if ratio < 1.0:
        return b, fid.score_model(ref, cand)
    return None
