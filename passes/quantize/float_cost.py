"""What keeping a layer float costs, against what it buys: the trade the automatic float-layer search decides by.

A layer kept float in an otherwise int8 model costs

* **latency**: ``Δt = (t(l float) − t(all int8)) / t_float``, the three whole models timed interleaved in one run
  under ORT (1 thread) through the run's latency profile (``paired_difference``: recorded, replayable) — a Conv holding
  90% of the MACs kept float takes back most of the int8 speed-up, a depthwise Conv whose integer kernel is slower
  than its float one costs nothing or less;
* **size**: ``Δs = (bytes(l float) − bytes(all int8)) / bytes(float model)``, the weight bytes the layer keeps at
  four bytes per value (exact, from the exported candidates);

and buys **fidelity**: ``g`` dB of SQNR at the last layers' inputs (the search's gain) — and it must buy something
at the outputs too: a candidate whose output SQNR is not higher (by 0.1 dB, with top-1 agreement not lower by
more than ``AGREEMENT_TOLERANCE``) than the all-int8 model's is never kept.

Rule: the layer stays float iff ``g >= auto_float_db``, the outputs improve, and
``max(Δt, Δs) <= min(auto_float_cost_per_db · g, MAX_COST)`` (and, for the layers around one activation rounding
taken together, ``Δt <= GROUP_MAX_LATENCY_COST`` and an output SQNR gain of at least ``auto_float_db``: on
ddddocr_det a group worth +0.5 dB on the calibration feeds' outputs gave 21.4 vs 21.6 dB on held-out images): each dB of fidelity may cost that share of the float
model's latency or size (default 0.05: 3 dB may cost 15%), never more than ``MAX_COST``; with
``auto_float_cost_per_db=inf`` the gain alone decides and nothing is measured (the rule before costs were weighed). The float model is the unit
of both costs, so they add across layers: the layers are taken best gain first (greedy), and from the second one on
the set with the layer is built, scored and measured as a whole — effects are not additive (on ddddocr_det three
layers each worth 1.2-2.7 dB alone took the outputs from 12.2 to 9.5 dB together) — and the layer joins only if
the set's outputs beat the set without it and its costs stay within the summed allowances. So the result is never
worse on both axes than the all-int8 candidate.

``macs_share`` (the layer's MACs / all MACs, from ``onnxcompress.analyses.macs`` on the first calibration feed)
is reported beside every decision; it explains a cost, the measured ratio decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxcompress import io
from onnxcompress.data import Feed

from . import fidelity as fid

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun

log = logging.getLogger(__name__)

#: a float layer never costs more than this share of the float model's latency or size
MAX_COST = 0.25
#: the layers around one activation rounding (a group) are kept float by default only when they cost at most this
#: share of the float model's latency: on PP-OCRv4 rec two groups worth 2.5-2.9 dB at the features (+3.1% and +5.8%
#: latency each, within the per-dB allowance) took the model from 0.43x to 0.55x latency for +0.4..0.8 dB at the
#: outputs on held-out lines; EfficientNet-Lite2's stem group (-2.9%, +8 dB at the logits) is free
GROUP_MAX_LATENCY_COST = 0.02
#: top-1 agreement differences up to this are noise on the evaluation feeds
AGREEMENT_TOLERANCE = 0.02


@dataclass
class Candidate:
    """One model scored and measured: output score, latency ratio vs float, weight bytes."""

    score: dict[str, float]
    latency_ratio: float
    weight_bytes: int


def outputs_better(cand: dict[str, float], base: dict[str, float], min_db: float = 0.1) -> bool:
    """``cand`` is better than ``base`` at the outputs: output SQNR higher by at least ``min_db`` (a hair of SQNR
    buys nothing) with top-1 agreement lower by at most ``AGREEMENT_TOLERANCE`` (a flip or two among the
    evaluation positions is noise), or agreement higher by more than that."""
    a_c, a_b = cand.get("agreement", 1.0), base.get("agreement", 1.0)
    if a_c > a_b + AGREEMENT_TOLERANCE:
        return True
    return a_c >= a_b - AGREEMENT_TOLERANCE and cand["sqnr_db"] >= base["sqnr_db"] + min_db


def macs_shares(run: QuantizeRun, feed: Feed) -> dict[str, float]:
    """MACs of each node of the prepared float model / all its MACs (empty when they cannot be counted)."""
    from onnxcompress.analyses.macs import count_macs

    shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in feed.items()}
    try:
        mc = count_macs(run.float_model, shapes, dict(feed))
    except Exception as exc:  # MACs only explain the measured cost; never fail a quantization on them
        log.debug("MACs not counted: %s", exc)
        return {}
    total = float(mc.total) or 1.0
    return {n: m / total for n, m in mc.by_node.items()}


def measure(run: QuantizeRun, model: onnx.ModelProto, ref: fid.Reference, feed: Feed,
            against: onnx.ModelProto | None = None) -> Candidate:
    """Score ``model`` on the reference feeds, measure its latency ratio to the float model (through
    ``ctx.latency``), count bytes. With ``against`` (the all-int8 model) the ratio is the all-int8 model's measured
    ratio plus the difference measured in the same interleaved run (``paired_difference``): a difference of two
    separate runs on a busy machine is mostly noise."""
    from .latency_guard import latency_ratio

    if against is None:
        ratio = latency_ratio(run, model, feed)
    else:
        ratio = latency_ratio(run, against, feed) + paired_difference(run, against, model, feed)
    return Candidate(fid.score_model(ref, model), ratio, io.weight_bytes(model))


def paired_difference(run: QuantizeRun, base: onnx.ModelProto, cand: onnx.ModelProto, feed: Feed) -> float:
    """``(t_cand − t_base) / t_float`` from ONE interleaved measurement of the three models (1 thread), through
    the run's latency profile."""
    from onnxcompress.latency_profile import fingerprint

    from .latency_guard import GUARD_THREADS

    shapes = sorted((k, tuple(int(d) for d in np.shape(a))) for k, a in feed.items())
    key = "quantize/float-cost/" + fingerprint(run.float_model.SerializeToString(), base.SerializeToString(),
                                               cand.SerializeToString(), str(shapes), f"threads={GUARD_THREADS}")

    def fn() -> float:
        from onnxcompress.latency import measure_latency

        lat = measure_latency({"float": run.float_model, "base": base, "cand": cand}, feed,
                              threads=GUARD_THREADS, budget_s=1.5)
        return float((lat["cand"] - lat["base"]) / lat["float"])

    return float(run.ctx.latency.measure(key, fn))


def costs(cand: Candidate, base: Candidate, float_bytes: int) -> tuple[float, float]:
    """(latency cost, size cost) of ``cand`` over ``base``, both as shares of the float model."""
    return cand.latency_ratio - base.latency_ratio, (cand.weight_bytes - base.weight_bytes) / max(float_bytes, 1)


def allowance(gain_db: float, per_db: float) -> float:
    return min(per_db * max(gain_db, 0.0), MAX_COST)


def choose(
    run: QuantizeRun,
    gains: dict[str, float],
    builds: dict[str, onnx.ModelProto],
    all_int8: onnx.ModelProto,
    ref: fid.Reference,
    feed: Feed,
    members: dict[str, list[str]] | None = None,
    max_kept: int | None = None,
) -> tuple[list[str], list[dict], list[dict]]:
    """The module rule on the candidates of ``gains`` (each with feature-SQNR gain >= auto_float_db; ``builds``:
    their float models; a candidate is a layer, or in ``members`` a name for several layers kept float together —
    the layers around one activation rounding). Returns (chosen candidates, kept records, rejected records); records
    are ``{layer, reason, macs_share, fidelity_gain_db, latency_cost, size_cost}`` (+ ``layers`` for a group).
    At most ``max_kept`` candidates are kept: one rejected for its cost leaves its place to the next."""
    p = run.p
    members = members or {}

    def layers_of(name: str) -> list[str]:
        return members.get(name, [name])

    def what(name: str) -> str:
        return f"with {', '.join(layers_of(name))} ({name})" if name in members else ""

    if not np.isfinite(p.auto_float_cost_per_db):  # no limit: the gain alone decides, nothing is measured
        gains = dict(sorted(gains.items(), key=lambda kv: -kv[1])[:max_kept])
        kept = [{"layer": n, "fidelity_gain_db": round(g, 2), **({"layers": layers_of(n)} if n in members else {}),
                 "reason": f"kept float automatically{' ' + what(n) if n in members else ''}: alone it lifts the "
                           f"last layers' features by {g:.1f} dB (auto_float_cost_per_db=inf: cost not weighed)"}
                for n, g in gains.items()]
        return list(gains), kept, []
    float_bytes = io.weight_bytes(run.float_model)
    shares = macs_shares(run, feed)
    base = measure(run, all_int8, ref, feed)
    run.stats["auto_float_all_int8"] = {
        "latency_ratio": round(base.latency_ratio, 3),
        "weight_bytes": base.weight_bytes,
        "score": {k: round(v, 5) for k, v in base.score.items()},
    }
    kept: list[dict] = []
    rejected: list[dict] = []
    current, budget = base, 0.0
    for name in sorted(gains, key=lambda n: -gains[n]):
        if max_kept is not None and len(kept) >= max_kept:
            break
        g = gains[name]
        cand = measure(run, builds[name], ref, feed, against=all_int8)
        dt, ds = costs(cand, base, float_bytes)
        rec = {
            "layer": name,
            **({"layers": layers_of(name)} if name in members else {}),
            "macs_share": round(sum(shares.get(n, float("nan")) for n in layers_of(name)), 4),
            "fidelity_gain_db": round(g, 2),
            "output_sqnr_gain_db": round(cand.score["sqnr_db"] - base.score["sqnr_db"], 2),
            "latency_cost": round(dt, 3),
            "size_cost": round(ds, 4),
        }
        allow = allowance(g, p.auto_float_cost_per_db)
        if not outputs_better(cand.score, base.score):
            rec["reason"] = (
                f"kept int8: float alone it lifts the last layers' features by {g:.1f} dB but not the outputs "
                f"(output SQNR {cand.score['sqnr_db']:.1f} vs {base.score['sqnr_db']:.1f} dB all-int8)"
            )
            rejected.append(rec)
            continue
        if name in members and cand.score["sqnr_db"] - base.score["sqnr_db"] < p.auto_float_db:
            rec["reason"] = (
                f"kept int8: {what(name)} float lifts the outputs by "
                f"{cand.score['sqnr_db'] - base.score['sqnr_db']:+.1f} dB only; layers around a rounding stay float "
                f"by default for >= {p.auto_float_db:g} dB at the outputs"
            )
            rejected.append(rec)
            continue
        if name in members and dt > GROUP_MAX_LATENCY_COST:
            rec["reason"] = (
                f"kept int8: {what(name)} float would cost {dt:+.1%} latency of the float model for {g:.1f} dB; "
                f"layers around a rounding stay float by default only up to {GROUP_MAX_LATENCY_COST:.0%} "
                "(sensitivity=greedy_cost with max_latency trades more)"
            )
            rejected.append(rec)
            continue
        if max(dt, ds) > allow:
            rec["reason"] = (
                f"kept int8: float it would cost {dt:+.1%} latency and {ds:+.1%} size of the float model "
                f"({rec['macs_share']:.0%} of the MACs) for {g:.1f} dB; the allowance is {allow:.1%}"
            )
            rejected.append(rec)
            continue
        if kept:  # with the layers already kept float: effects are not additive, so the set is measured
            names = [n for r in kept for n in layers_of(r["layer"])] + layers_of(name)
            cand = measure(run, run.export(run.build(names).graph), ref, feed, against=all_int8)
            dt_set, ds_set = costs(cand, base, float_bytes)
            small = name in members and cand.score["sqnr_db"] - current.score["sqnr_db"] < p.auto_float_db
            if small or not outputs_better(cand.score, current.score) or max(dt_set, ds_set) > budget + allow:
                rec["reason"] = (
                    f"kept int8: with {', '.join(r['layer'] for r in kept)} float as well the outputs reach "
                    f"{cand.score['sqnr_db']:.1f} dB SQNR (without it {current.score['sqnr_db']:.1f} dB) for "
                    f"{dt_set:+.1%} latency and {ds_set:+.1%} size (allowance {budget + allow:.1%})"
                )
                rejected.append(rec)
                continue
            rec["set_latency_cost"], rec["set_size_cost"] = round(dt_set, 3), round(ds_set, 4)
        rec["reason"] = (
            f"kept float automatically{' ' + what(name) if name in members else ''}: alone it lifts the last "
            f"layers' features by {g:.1f} dB "
            f"(all-int8 outputs {base.score['sqnr_db']:.1f} dB SQNR, with it {cand.score['sqnr_db']:.1f} dB) for "
            f"{dt:+.1%} latency and {ds:+.1%} size"
        )
        kept.append(rec)
        current, budget = cand, budget + allow
    return [r["layer"] for r in kept], kept, rejected


__all__ = ["Candidate", "GROUP_MAX_LATENCY_COST", "MAX_COST", "allowance", "choose", "costs", "macs_shares", "measure", "outputs_better",
           "paired_difference"]
