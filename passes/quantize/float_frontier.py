"""Greedy mixed precision by measured gain per measured latency cost (``sensitivity=greedy_cost``).

**Why not per layer.** ORT runs a Conv on integers only when its input *and* output are quantized, so keeping one
layer float removes its weight rounding but not the activation roundings around it: its neighbours still need them.
An activation rounding disappears only when every quantized layer next to it runs float. On EfficientNet-Lite2 the
stem's output (ReLU6 at 130x130, read by block 0's depthwise Conv through a Pad) costs 8 dB at the logits, yet
leave-one-out per layer sees < 0.5 dB for each of the two layers (and half of the layers float gave 18.2 dB against
18.4 all-int8); the Clip and the Pad output are rounded alike, so taking one rounding out alone gains nothing either.

**Units.** ``rounding_units``: for every activation tensor the all-int8 model rounds, the quantized layers next to
it (nearest anchor upstream, every nearest anchor downstream, through up to 3 other ops); roundings with the same
layers around them are one unit. ``unit="layer"`` gives the per-layer search for comparison.

**Noise and cost.** A candidate's noise is ``N = 10^(−S/10)`` with ``S`` the SQNR (dB) scored — the last layers'
input features when the outputs are probabilities (a softmax saturates), else the outputs; noise powers of
independent roundings add, so ``ΔN_u = N(F) − N(F ∪ u)`` is what unit ``u`` removes on top of the float set ``F``.
Its cost ``c_u = Σ_{l ∈ u − F} c_l`` with ``c_l = (t_float,l − t_int8,l) / T_float``: the layer's float and int8
kernels timed in isolation on its real input shape (``layer_speed.int8_savings_ms``, cached per machine) over the
float model's time; layers that cannot be timed alone (MatMul, Gemm) get their MAC share times the all-int8 model's
measured saving; never below ``COST_FLOOR``.

**Step.** The unit with the largest ``ΔN_u / c_u`` joins ``F``. Every ``ΔN`` is measured on a real build (``F ∪ u``
float) on ``GAIN_FEEDS`` evaluation feeds: all units once on the all-int8 model, then after each pick the
``RESCORE`` best by their last ratio again on the current model (lazy greedy: effects are not additive); a unit whose
re-measured gain is not positive is dropped, as is every unit that no longer fits ``max_latency`` (estimated:
the all-int8 model's measured ratio plus the picked costs).

The path (float set, score on the evaluation feeds, estimated latency after each pick) is the measured frontier;
``greedy_mixed_precision`` stops at the first step that meets the user's target (or takes the best step within
``max_latency``), measures that build's whole-model latency and steps back until it is within ``max_latency``:
the isolated timings are estimates, the measurement decides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import fidelity as fid
from . import layer_speed

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.data import Feed

    from .run_view import Built, QuantizeRun

log = logging.getLogger(__name__)

#: a float layer is never assumed cheaper than this share of the float model's latency
COST_FLOOR = 0.002
#: candidates re-scored on the current model at each step (lazy greedy)
RESCORE = 6
#: feeds the gains are measured on
GAIN_FEEDS = 4


@dataclass
class Step:
    """One point of the path: the float layers (in pick order), the score on the evaluation feeds, the estimated
    latency ratio (all-int8 measured + the picked layers' costs)."""

    float_layers: list[str]
    score: dict[str, float]
    latency_est: float
    gain_db: float = 0.0
    cost: float = 0.0
    #: what was picked: a layer, or the activation tensor whose surrounding layers went float (``rounding``)
    pick: str = ""


@dataclass
class Frontier:
    """The greedy path, the per-layer costs and the first (leave-one-out) gains it was chosen from."""

    steps: list[Step] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    scored_by: str = "sqnr_db"
    #: ``ΔN_l`` of every layer float alone in the all-int8 model (leave-one-out, as noise power)
    first_gains: dict[str, float] = field(default_factory=dict)
    #: the all-int8 model's noise power on the gain feeds (``first_gains`` are shares of it)
    first_noise: float = 0.0
    evaluations: int = 0
    seconds: float = 0.0

    def first_gains_db(self) -> dict[str, float]:
        """The leave-one-out gains in dB of the scored SQNR: ``10 log10(N / (N − ΔN_l))``."""
        n = self.first_noise
        return {k: float(10 * np.log10(n / max(n - g, 1e-30))) if n > 0 else 0.0 for k, g in self.first_gains.items()}


def probabilities(ref: fid.Reference) -> bool:
    """Every float output of the reference is in [0, 1] (softmax / sigmoid outputs: their SQNR saturates)."""
    for outs in ref.outputs[:2]:
        for o in outs:
            a = np.asarray(o)
            if np.issubdtype(a.dtype, np.floating) and (a.min() < 0 or a.max() > 1):
                return False
    return True


def noise(score: dict[str, float], key: str) -> float:
    s = score.get(key, score["sqnr_db"])
    return float(10 ** (-s / 10)) if np.isfinite(s) else 0.0


def float_model_ms(run: QuantizeRun, feed: Feed) -> float:
    """The float model's latency (ms, 1 thread, median) on a feed shaped like ``feed``, through the run's latency
    profile."""
    from onnxcompress.latency import measure_latency
    from onnxcompress.latency_profile import fingerprint

    from .latency_guard import GUARD_THREADS

    shapes = sorted((k, tuple(int(d) for d in np.shape(a))) for k, a in feed.items())
    key = "quantize/float-model-ms/" + fingerprint(run.float_model.SerializeToString(), str(shapes),
                                                    f"threads={GUARD_THREADS}")

    def fn() -> float:
        return float(measure_latency({"float": run.float_model}, feed, threads=GUARD_THREADS, budget_s=1.5)["float"])

    return float(run.ctx.latency.measure(key, fn))


def layer_costs(run: QuantizeRun, layers: list[str], feed: Feed, all_int8_ratio: float) -> dict[str, float]:
    """``c_l`` of the module docstring for every layer, as a share of the float model's latency."""
    from .float_cost import macs_shares
    from .latency_guard import input_shapes

    t_float = float_model_ms(run, feed)
    base_nodes = {n.name: n for n in run.base.nodes if n.name}
    convs = [base_nodes[n] for n in layers if n in base_nodes and base_nodes[n].op == "Conv"]
    savings: dict[str, float] = {}
    if convs:
        shapes = input_shapes(run.float_model, [n.inputs[0].name for n in convs], feed)
        savings = layer_speed.int8_savings_ms(convs, shapes, profile=run.ctx.latency)
    shares = macs_shares(run, feed)
    saved_all = max(0.0, 1.0 - all_int8_ratio)
    return {n: max(float(savings[n] / t_float if n in savings else shares.get(n, 0.0) * saved_all), COST_FLOOR)
            for n in layers}


def rounding_units(run: QuantizeRun, model: onnx.ModelProto, layers: list[str], depth: int = 3) -> dict[str, list[str]]:
    """For every activation tensor ``t`` the all-int8 ``model`` rounds: the quantized layers next to it (the nearest
    anchor upstream and every nearest anchor downstream, through at most ``depth`` other ops, in the float graph).
    ORT runs a Conv on integers only with integer input *and* output, so ``t``'s rounding goes away only when all of
    them run float: that set is the unit the ``rounding`` search adds at once."""
    from .error_sources import activation_roundings

    layer_set = set(layers)
    tensors = {t.name: t for t in run.base.tensors().values()}

    def up(t, d: int) -> set[str]:
        if d < 0 or not t.inputs:
            return set()
        n = t.inputs[0]
        if n.name in layer_set:
            return {n.name}
        return set().union(*[up(x, d - 1) for x in n.inputs if not isinstance(x, gs.Constant)])

    def down(t, d: int) -> set[str]:
        if d < 0:
            return set()
        found: set[str] = set()
        for c in t.outputs:
            if c.name in layer_set:
                found.add(c.name)
            else:
                for o in c.outputs:
                    found |= down(o, d - 1)
        return found

    order = {n: i for i, n in enumerate(layers)}
    units = {}
    for name in activation_roundings(model):
        t = tensors.get(name)
        if t is None:
            continue
        u = up(t, depth) | down(t, depth)
        if u:
            units[name] = sorted(u, key=lambda n: order[n])
    return units


def distinct_units(units: dict[str, list[str]]) -> dict[str, list[str]]:
    """``units`` with one entry per distinct layer set, named by its first rounded tensor: two roundings with the
    same layers around them (Clip -> Pad -> Conv) are one unit."""
    out: dict[str, list[str]] = {}
    seen: set[tuple[str, ...]] = set()
    for t, u in units.items():
        if tuple(u) not in seen:
            seen.add(tuple(u))
            out[t] = u
    return out


def greedy_path(
    run: QuantizeRun,
    ref: fid.Reference,
    max_steps: int,
    max_latency: float | None = None,
    stop=None,
    unit: str = "layer",
) -> Frontier:
    """The greedy path of the module docstring from the all-int8 model (plus ``run.auto_float``), at most
    ``max_steps`` picks; ``stop(score)`` True ends it (a target met), as does an estimated latency beyond
    ``max_latency``. ``unit``: ``layer`` (one layer per pick) or ``rounding`` (``rounding_units``: the layers
    around one activation rounding together)."""
    from .latency_guard import latency_ratio

    t0 = time.perf_counter()
    built = run.build()
    model = run.export(built.graph)
    layers = built.plan.int8_anchor_names()
    key = "feature_sqnr_db" if probabilities(ref) and ref.feature_nodes else "sqnr_db"
    fr = Frontier(scored_by=key)
    feed = ref.feeds[0]
    lat0 = latency_ratio(run, model, feed)
    fr.costs = layer_costs(run, layers, feed, lat0)
    units = distinct_units(rounding_units(run, model, layers)) if unit == "rounding" else {n: [n] for n in layers}
    small = ref.head(min(GAIN_FEEDS, len(ref.feeds)))
    score = fid.score_model(ref, model)
    fr.steps.append(Step([], score, lat0))
    if stop is not None and stop(score):
        fr.seconds = round(time.perf_counter() - t0, 2)
        return fr
    chosen: list[str] = []

    def cost(u: str) -> float:
        return max(sum(fr.costs[n] for n in units[u] if n not in chosen), COST_FLOOR)

    def gains_on(m: onnx.ModelProto, names: list[str]) -> dict[str, float]:
        n_cur = noise(fid.score_model(small, m), key)
        fr.first_noise = fr.first_noise or n_cur
        out = {}
        for u in names:
            new = [n for n in units[u] if n not in chosen]
            if not new:
                continue
            cand = run.export(run.build([*chosen, *new]).graph)
            out[u] = n_cur - noise(fid.score_model(small, cand), key)
            fr.evaluations += 1
        return out

    gains = gains_on(model, list(units))
    fr.first_gains = dict(gains)
    est = lat0
    while len(chosen) < max_steps and gains:
        if max_latency is not None:  # a unit that does not fit now never will: est only grows
            for u in [u for u in gains if est + cost(u) > max_latency]:
                del gains[u]
            if not gains:
                break
        ratio = {u: g / cost(u) for u, g in gains.items()}
        top = sorted(ratio, key=lambda u: -ratio[u])[:RESCORE]
        if chosen:  # re-measured on the current model
            gains.update(gains_on(model, top))
            for u in top:
                if all(n in chosen for n in units[u]):
                    gains.pop(u, None)
        fresh = {u: gains[u] for u in top if u in gains}
        for u in [u for u, g in fresh.items() if g <= 0]:
            del gains[u]
        fresh = {u: g for u, g in fresh.items() if g > 0}
        if not fresh:
            continue
        best = max(fresh, key=lambda u: fresh[u] / cost(u))
        c = cost(best)
        del gains[best]
        chosen.extend(n for n in units[best] if n not in chosen)
        est += c
        model = run.export(run.build(chosen).graph)
        prev = fr.steps[-1].score
        score = fid.score_model(ref, model)
        g_db = score.get(key, score["sqnr_db"]) - prev.get(key, prev["sqnr_db"])
        fr.steps.append(Step(list(chosen), score, est, round(float(g_db), 3), c, best))
        log.info("frontier: +%s -> %s %.2f dB, est. latency %.3f", best, key, score.get(key, score["sqnr_db"]), est)
        if stop is not None and stop(score):
            break
    fr.seconds = round(time.perf_counter() - t0, 2)
    return fr


def greedy_mixed_precision(run: QuantizeRun, ref: fid.Reference) -> tuple[Built, dict[str, float], dict[str, str]]:
    """``sensitivity=greedy_cost``: the path of ``greedy_path`` (one activation rounding's layers per pick) up to the
    first step that meets the target (``min_cosine``, ``max_agreement_drop``, ``min_sqnr_db``), or the best-scored
    step within ``max_latency`` when no target is set; then the chosen build's latency is measured and steps are
    taken back until it is within ``max_latency``. Returns the build, its score and the float layers with reasons."""
    from .latency_guard import latency_ratio

    p = run.p
    targets = (p.min_cosine, p.max_agreement_drop, p.min_sqnr_db)
    has_target = any(t is not None for t in targets)

    def stop(s: dict[str, float]) -> bool:
        return fid.meets(s, *targets)

    n_layers = len(run.build().plan.int8_anchor_names())
    fr = greedy_path(run, ref, n_layers, p.max_latency, stop if has_target else None, unit="rounding")
    key = fr.scored_by
    steps = fr.steps
    if has_target:
        idx = next((i for i, st in enumerate(steps) if stop(st.score)), len(steps) - 1)
    else:
        idx = max(range(len(steps)), key=lambda i: steps[i].score.get(key, steps[i].score["sqnr_db"]))
    measured: dict[int, float] = {}
    if p.max_latency is not None:
        while idx > 0:
            measured[idx] = latency_ratio(run, run.export(run.build(steps[idx].float_layers).graph), ref.feeds[0])
            if measured[idx] <= p.max_latency:
                break
            idx -= 1
    step = steps[idx]
    reasons: dict[str, str] = {}
    for st in steps[1: idx + 1]:
        for name in st.float_layers:
            reasons.setdefault(name, (
                f"mixed precision (greedy_cost): float with the layers around the rounding of {st.pick!r}, which "
                f"lifted the {key} by {st.gain_db:+.1f} dB for an estimated {st.cost:+.1%} of the float model's "
                "latency"))
    built = run.build(step.float_layers, tuple(reasons.items()))
    met = stop(step.score) if has_target else None
    run.stats["mixed_precision"] = {
        "search": "greedy_cost",
        "target": {"min_cosine": p.min_cosine, "max_agreement_drop": p.max_agreement_drop,
                   "min_sqnr_db": p.min_sqnr_db, "max_latency": p.max_latency},
        "met": met,
        "layers_float": len(step.float_layers),
        "scored_by": key,
        "path": [{"pick": st.pick, "layers_float": len(st.float_layers),
                  "score": {k: round(v, 4) for k, v in st.score.items()}, "latency_estimate": round(st.latency_est, 3),
                  **({"latency_measured": round(measured[i], 3)} if i in measured else {})}
                 for i, st in enumerate(steps)],
        "evaluations": fr.evaluations,
        "seconds": fr.seconds,
    }
    if met is False:
        log.warning("mixed precision (greedy_cost): target not met within the latency budget")
    return built, step.score, reasons


__all__ = ["COST_FLOOR", "Frontier", "GAIN_FEEDS", "RESCORE", "Step", "distinct_units", "float_model_ms", "greedy_mixed_precision", "greedy_path", "layer_costs",
           "noise", "probabilities", "rounding_units"]
