"""Automatic float layers (``auto_float_db``): keep float the few layers that, alone, add a large share of the noise.

Rule: let ``S`` be the SQNR (dB) of the last layers' input features (``fidelity.feature_nodes``) of the all-int8
model against the float one, and ``S_l`` the same with layer ``l`` alone kept float. The layers with the largest
gain ``S_l − S >= auto_float_db`` stay float (1 dB: the layer contributes ~20% of all the quantization noise there),
at most 5% of the layers (candidates), best gain first, a candidate rejected for its cost leaving its place to the
next, and only when the features are noisy at all (``S < AUTO_FLOAT_BELOW_DB``) and the model
has at most ``AUTO_FLOAT_MAX_LAYERS`` quantized layers.

**Groups.** ORT runs a Conv on integers only with integer input and output, so one layer float takes out its
weight rounding but not the activation roundings around it. With ``auto_float_units`` (default) the candidates also
include, for every rounded activation, the layers around it together (``float_frontier.rounding_units``), ranked on
all ``AUTO_FLOAT_FEEDS`` feeds by the model without the roundings they surround (``error_sources.without_rounding``),
then re-scored with real builds like the layers. On EfficientNet-Lite2 the stem's output rounding costs 8 dB at the
logits while each of its two layers alone gains < 0.5 dB: the group is the whole gain. A group is kept only at
``float_cost.GROUP_MAX_LATENCY_COST`` measured latency or less; ``sensitivity=greedy_cost`` (``float_frontier``)
trades further.

**Feeds** (``auto_float_score``, ``fidelity.FEED_SCORES``): every SQNR of the search and of ``float_cost`` combines
the feeds ``pooled`` (one ratio of all their signal over all their error: a feed counts by its energy), by the
``worst_feed``'s SQNR, the ``mean_feed_db``, the ``mean_feed_nsr``, or pooled over the ``least_sure_half`` (the
feeds where the float model's top-1 margin is smallest). On PP-OCRv4 rec, with easy and low-contrast lines mixed, the stem
output's rounding ranks 119th of 129 pooled and 1st on the hard lines alone; but per feed too it ranks 114th-122nd
on mixed feeds (taking it out lowers the easy lines' SQNR while it lifts the hard ones': a trade, not an energy
weighting); only ``least_sure_half`` on 16 feeds ranks it first (taken out of the default int8 model), and no score
measured was better on every model held-out (``benchmarks/results/int8_margins.md``), so ``pooled`` stays the
default.

Layers are left out one at a time: the effects are not additive (on PP-OCR's recognizer, keeping one early
depthwise Conv float *lowers* the features' SQNR while keeping a later one float lifts it by 2 dB), so testing groups
of layers misses the layers that matter. Each layer is ranked on a patched copy of the all-int8 model
(``float_patch``: no rebuild) on ``AUTO_FLOAT_RANK_FEEDS`` feeds, and only the best ``limit + AUTO_FLOAT_VERIFY``
are re-scored with real builds on ``AUTO_FLOAT_FEEDS`` feeds.

A gain alone does not keep a layer float: ``float_cost`` weighs what the layer costs float (measured latency and
weight bytes, against the all-int8 model) against what it buys (the gain, and a better output score), so a layer
that holds most of the MACs is not kept float for a dB or two. Every decision, kept or rejected, is in
``stats["auto_float"]`` with its reason, MAC share, gain and costs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxcompress.data import Feed

from . import fidelity as fid
from . import float_cost
from .float_patch import FloatPatcher

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun

#: leave-one-out is skipped above this many layers, and scored on this many feeds (``auto_float_feeds``'s default)
AUTO_FLOAT_MAX_LAYERS = 256
AUTO_FLOAT_FEEDS = 4
#: ... ranked on patched models (``float_patch``); this many beyond the float-layer budget are re-scored with real
#: builds before choosing
AUTO_FLOAT_VERIFY = 3
#: feeds the patched ranking runs on (the re-scoring uses AUTO_FLOAT_FEEDS)
AUTO_FLOAT_RANK_FEEDS = 2
#: ... and only when the all-int8 model's last-layer features are noisier than this (SQNR, dB)
AUTO_FLOAT_BELOW_DB = 30.0


def search_float_layers(run: QuantizeRun, ref: fid.Reference, eval_feeds: list[Feed]) -> None:
    """The module rule; the chosen layers go into ``run.auto_float`` (name -> reason, kept float by every later
    build) and the search's figures into ``run.stats["auto_float"]``."""
    p = run.p
    ref = ref.scored_by(p.auto_float_score)  # every score below (and float_cost's) combines the feeds this way
    cached = run.all_int8
    if cached is not None and cached[0] == run.method and not run.auto_float:
        plan, model = cached[1], cached[2]
    else:
        b = run.build()
        plan, model = b.plan, run.export(b.graph)
    layers = plan.int8_anchor_names()
    if not ref.feature_nodes or not layers or len(layers) > AUTO_FLOAT_MAX_LAYERS:
        return
    feeds = eval_feeds[: min(len(eval_feeds), p.auto_float_feeds)]
    base = fid.model_feature_sqnr(ref, model, feeds)
    if base is None or not np.isfinite(base) or base >= AUTO_FLOAT_BELOW_DB:
        return  # already accurate: nothing worth a float layer
    t0 = time.perf_counter()

    builds: dict[str, onnx.ModelProto] = {}
    # candidate -> its layers (a layer alone: itself); the roundings each multi-layer candidate takes out
    members, removed = _rounding_units(run, model, layers) if p.auto_float_units else ({}, {})

    def gain(cand: str) -> float:  # a real build with the candidate's layers float
        m = run.export(run.build(members.get(cand, [cand])).graph)
        builds[cand] = m
        s_ = fid.model_feature_sqnr(ref, m, feeds)
        return (base if s_ is None else s_) - base

    approx = _patched_gains(run, model, layers, ref, feeds[:AUTO_FLOAT_RANK_FEEDS], gain)
    limit = max(1, len(layers) // 20)
    shortlist = sorted(approx, key=lambda n: -approx[n])[: limit + AUTO_FLOAT_VERIFY]
    # groups are ranked on all the search's feeds (their gain can sit in a few inputs: EfficientNet-Lite2's stem
    # rounding +0.2 dB on the first 2 evaluation feeds, +5.3 dB on the first 4) and join the layers' shortlist
    # without taking their places (on PP-OCRv4 rec they would push out the one layer worth keeping float)
    approx_units = _unit_gains(model, removed, ref, feeds, base)
    shortlist += sorted(approx_units, key=lambda n: -approx_units[n])[:AUTO_FLOAT_VERIFY]
    approx.update(approx_units)
    gains = {n: gain(n) for n in shortlist}
    ranked = sorted(gains, key=lambda n: -gains[n])
    worth = {n: gains[n] for n in ranked if gains[n] >= p.auto_float_db}
    chosen: list[str] = []
    kept: list[dict] = []
    rejected: list[dict] = []
    if worth:  # what each costs in measured latency and size against what it buys (``float_cost``)
        chosen, kept, rejected = float_cost.choose(run, worth, builds, model, ref, eval_feeds[0], members, limit)
    for rec in kept:
        for layer in members.get(rec["layer"], [rec["layer"]]):
            run.auto_float[layer] = rec["reason"]
            run.float_details[layer] = rec
    run.stats["auto_float"] = {
        "feed_score": ref.feed_score,
        "feature_sqnr_db_all_int8": round(base, 2),
        "top_gains_db": {n: round(gains[n], 2) for n in ranked[:5]},
        "ranking_gains_db": {n: round(approx[n], 2) for n in shortlist},
        "kept_float": chosen,
        "rejected": rejected,
        "evaluations": len(layers) + len(shortlist),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _patched_gains(
    run: QuantizeRun, model: onnx.ModelProto, layers: list[str], ref: fid.Reference, rank_feeds: list[Feed], gain
) -> dict[str, float]:
    """Approximate feature-SQNR gain of each layer kept float, on patched copies of the all-int8 ``model``
    (a real build, ``gain(name)``, for a layer the patcher cannot patch)."""
    patcher = FloatPatcher(model, run.base)
    rank_base = fid.model_feature_sqnr(ref, model, rank_feeds)
    approx: dict[str, float] = {}
    for name in layers:
        if not patcher.can_patch(name):
            approx[name] = gain(name)
            continue
        with patcher.float_layer(name) as m:
            s_ = fid.model_feature_sqnr(ref, m, rank_feeds)
        approx[name] = (rank_base if s_ is None else s_) - rank_base
    return approx


def _rounding_units(run: QuantizeRun, model: onnx.ModelProto, layers: list[str]
                    ) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Candidates of more than one layer: for each set of layers around activation roundings
    (``float_frontier.rounding_units``), ``"rounding of <first tensor>"`` -> the layers; and per candidate the
    rounded tensors whose layers are all in it (what keeping it float takes out)."""
    from .float_frontier import distinct_units, rounding_units

    units = rounding_units(run, model, layers)
    members = {f"rounding of {t}": u for t, u in distinct_units(units).items() if len(u) > 1}
    removed = {c: {t for t, u in units.items() if set(u) <= set(m)} for c, m in members.items()}
    return members, removed


def _unit_gains(model: onnx.ModelProto, removed: dict[str, set[str]], ref: fid.Reference, rank_feeds: list[Feed],
                rank_base: float | None) -> dict[str, float]:
    """Approximate feature-SQNR gain of each multi-layer candidate: the all-int8 ``model`` (its feature SQNR on
    ``rank_feeds``: ``rank_base``) without the activation roundings its layers surround
    (``error_sources.without_rounding``; the weights stay int8)."""
    from .error_sources import without_rounding

    if not removed:
        return {}
    approx: dict[str, float] = {}
    for cand, ts in removed.items():
        s_ = fid.model_feature_sqnr(ref, without_rounding(model, ts), rank_feeds)
        approx[cand] = 0.0 if s_ is None or rank_base is None else s_ - rank_base
    return approx
