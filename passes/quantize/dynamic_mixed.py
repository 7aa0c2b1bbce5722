"""Mixed precision for ``quantize{mode=dynamic}``: layers lifted above int8 until a fidelity target is met.

The targets are static mode's (``min_cosine``, ``min_sqnr_db``, ``max_agreement_drop``: the worst graph output's
cosine / SQNR / top-1 agreement lost, ``fidelity.meets``), measured the same way: against the float model's
outputs on the first ``eval_samples`` calibration feeds, the feeds combined by ``auto_float_score``. A target
therefore needs calibration data (one clear error without it).

Units: the main graph's MatMul/Gemm layers the dynamic pass quantizes; each has its own
``DynamicQuantizeLinear -> MatMulInteger`` (fused by ORT into ``DynamicQuantizeMatMul``), so any subset can be
lifted without changing the others. A lifted unit becomes float, two-pass (``two_pass``: its input quantized
twice, ~16-bit, on the int8 kernels) or row-ranged (``row_ranges``: one input range per row), as ``lift_to`` says;
with ``activation_ranges=row`` every unit starts row-ranged and float is the level above. One search (a *ladder*,
``sensitivity=leave_one_out``):

1. the model with every unit dynamic (after smoothing and weight rounding, when kept) is scored; if it meets the
   target nothing is lifted;
2. each unit alone lifted: its gain is the rise of the worst-output SQNR over the all-int8 model (N builds);
3. units are lifted in the order of their gains, largest first, the model re-measured after each, until it meets
   the target (two-pass and row ladders: all units at that level not enough, the same order then goes float one by
   one). When no step does, the best-scoring one is kept and the stats say the target was not met.

``lift_to=auto``: where a two-pass layer measured faster than its float MatMul on this machine
(``two_pass.pays``) both ladders run, and when both meet the target the two models are timed in one interleaved
call and the faster kept (MiniLM-L3 at 30 dB: two-pass, 0.46x against 0.49x; MiniLM-L6: float, 4 float layers
against 12 two-pass); elsewhere the float ladder alone. The row ladder runs in a pipeline of its own
(``dynamic_run``: the smoothing strength depends on it). Cost: N + k quantizations per ladder (about a second each
on MiniLM-L6) and as many runs of the evaluation feeds. Each lifted layer's reason goes in the stats
(``layers_lifted``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxcompress.errors import PassError
from onnxcompress.naming import graph_names

from . import fidelity as fid
from .prepare import name_unnamed_nodes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

    from .options import QuantizeOptions

#: gains reported in the stats (largest first)
REPORTED = 8


def targets(p: QuantizeOptions) -> dict[str, float]:
    """The targets set on ``p`` (empty: no mixed precision)."""
    got = {"min_cosine": p.min_cosine, "min_sqnr_db": p.min_sqnr_db, "max_agreement_drop": p.max_agreement_drop}
    return {k: v for k, v in got.items() if v is not None}


def check(p: QuantizeOptions, ctx: PassContext) -> None:
    """A target without calibration data, or a search dynamic mode does not have: one clear error."""
    if p.sensitivity != "leave_one_out" or p.max_latency is not None:
        raise PassError("quantize{mode=dynamic}: mixed precision searches by leave_one_out only (no sensitivity="
                        f"{p.sensitivity}, no max_latency)")
    if not targets(p):
        return
    if ctx.calibration is None or len(ctx.calibration) == 0:
        raise PassError(f"quantize{{mode=dynamic}} with a target ({', '.join(targets(p))}) measures it on calibration "
                        "data: give --calib FILE.npz or a folder of feeds, or drop the target")


@dataclasses.dataclass
class Ladder:
    """One search's outcome: the layers lifted, the score, whether it met the target."""

    float_layers: tuple[str, ...]
    two_pass: tuple[str, ...]
    score: dict[str, float]
    met: bool
    gains_db: dict[str, float]
    #: every unit's leave-one-out gain at the ladder's level (``gains_db``: the largest ``REPORTED``)
    all_gains: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the layers given row ranges (``row_ranges``)
    rows: tuple[str, ...] = ()


def choose(p: QuantizeOptions, graph: gs.Graph, quantize: Callable[[QuantizeOptions, gs.Graph, dict], object],
           score: fid.GraphScorer, two_pass_pays: Callable[[], dict] | None = None,
           latency: Callable[[dict[str, gs.Graph]], dict[str, float]] | None = None) -> tuple[Ladder, dict]:
    """(the chosen layers: float, two-pass, row ranges; stats); ``quantize(options, g, stats)`` quantizes a copy
    dynamically in place, ``score(g)`` scores it, ``two_pass_pays()`` measures whether a two-pass layer is faster
    than a float one here (``lift_to=auto``), ``latency({name: g})`` times candidates against the float model
    in one interleaved measurement."""
    t0 = time.perf_counter()
    name_unnamed_nodes(graph, graph_names(graph))
    want = targets(p)
    builds = 0

    def built(float_layers: tuple[str, ...], two: tuple[str, ...] = (), rows: tuple[str, ...] = (),
              stats: dict | None = None) -> gs.Graph:
        nonlocal builds
        g = graph.copy()
        quantize(lifted(p, Ladder(float_layers, two, {}, False, {}, rows=rows)), g, {} if stats is None else stats)
        builds += 1
        return g

    def scored(float_layers: tuple[str, ...], two: tuple[str, ...] = (), rows: tuple[str, ...] = ()
               ) -> dict[str, float]:
        return score(built(float_layers, two, rows))

    def meets(s: dict[str, float]) -> bool:
        return fid.meets(s, p.min_cosine, p.max_agreement_drop, p.min_sqnr_db)

    base_stats: dict = {}
    base = score(built((), stats=base_stats))
    not_quantized = set(base_stats.get("layers_kept_float", {}))  # e.g. a weight another node reads too
    stats: dict = {"target": want, "all_int8": base, "eval_feeds": len(score.feeds)}
    chosen = Ladder((), (), base, meets(base), {})
    if not chosen.met:
        excluded = set(p.exclude) | not_quantized
        units = [n.name for n in graph.nodes if n.op in ("MatMul", "Gemm") and n.op in p.dynamic_ops
                 and n.name not in excluded and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
        levels = [p.lift_to] if p.lift_to in ("two_pass", "row") else ["float"]
        if p.activation_ranges == "row":  # every layer already in rows: float is the level above
            levels = ["float"]
        elif p.lift_to == "auto" and two_pass_pays is not None:
            stats["two_pass_speed"] = two_pass_pays()
            if stats["two_pass_speed"]["pays"]:
                levels.append("two_pass")
        ladders = {lv: _ladder(lv, units, base, scored, meets) for lv in levels}
        stats["ladders"] = {lv: _ladder_stats(r) for lv, r in ladders.items()}
        met = {lv: r for lv, r in ladders.items() if r.met}
        if len(met) > 1 and latency is not None:  # both meet the target: the faster model, measured
            ratios = latency({lv: built(r.float_layers, r.two_pass, r.rows) for lv, r in met.items()})
            stats["latency_ratio"] = {lv: round(v, 3) for lv, v in ratios.items()}
            chosen = met[min(ratios, key=lambda lv: ratios[lv])]
        elif met:
            chosen = next(iter(met.values()))
        else:
            chosen = max(ladders.values(), key=lambda r: r.score["sqnr_db"])
        stats["gains_db"] = chosen.gains_db
    stats.update({"met": chosen.met, "float_layers": list(chosen.float_layers), "two_pass_layers":
                  list(chosen.two_pass), "row_range_layers": list(chosen.rows), "score": chosen.score,
                  "builds": builds, "seconds": round(time.perf_counter() - t0, 2)})
    stats["lifted"] = _reasons(chosen, stats)
    return chosen, stats


def lifted(p: QuantizeOptions, chosen: Ladder) -> QuantizeOptions:
    """``p`` with ``chosen``'s layers float, two-pass and in row ranges (a float layer is nothing else)."""
    def kept(names) -> tuple[str, ...]:
        return tuple(u for u in names if u not in chosen.float_layers)
    return dataclasses.replace(p, exclude=tuple(p.exclude) + chosen.float_layers,
                               two_pass=kept((*p.two_pass, *chosen.two_pass)),
                               row_ranges=kept((*p.row_ranges, *chosen.rows)))


def _reasons(chosen: Ladder, stats: dict) -> dict[str, str]:
    """Each lifted layer -> why, for the run's report (``onnxcompress.report.pass_reasons``)."""
    target = ", ".join(f"{k} {v}" for k, v in stats["target"].items())
    outcome = (f"target {target} {'met' if chosen.met else 'not met (best prefix kept)'}: worst-output SQNR "
               f"{chosen.score['sqnr_db']:.1f} dB on {stats['eval_feeds']} calibration feeds")
    if "latency_ratio" in stats:
        outcome += "; models meeting it timed " + ", ".join(
            f"{lv} lift {r:.3f}x" for lv, r in sorted(stats["latency_ratio"].items())) + ", the faster kept"
    out = {}
    for name in chosen.two_pass:
        out[name] = (f"two-pass (input quantized twice, ~16-bit, int8 kernels): +{chosen.all_gains.get(name, 0):.2f} "
                     f"dB alone; {outcome}")
    for name in chosen.rows:
        out[name] = (f"row ranges (one activation range per row, int8 kernels): +{chosen.all_gains.get(name, 0):.2f} "
                     f"dB alone; {outcome}")
    for name in chosen.float_layers:
        out[name] = f"kept float: +{chosen.all_gains.get(name, 0):.2f} dB alone; {outcome}"
    return out


def _ladder(level: str, units: list[str], base: dict[str, float],
            scored: Callable[..., dict[str, float]], meets: Callable[[dict[str, float]], bool]) -> Ladder:
    """Units lifted in the order of their leave-one-out gains at ``level``, until the target is met. ``float``:
    the first k float; ``two_pass`` / ``row``: the first k at that level, then (all of them not enough) the first j
    float and the rest at the level, so the ladder ends where the float one does (every unit float)."""
    def at_level(float_layers: tuple[str, ...], up: tuple[str, ...]) -> Ladder:
        return Ladder(float_layers, up if level == "two_pass" else (), {}, False, {},
                      rows=up if level == "row" else ())

    def scored_at(float_layers: tuple[str, ...], up: tuple[str, ...]) -> dict[str, float]:
        step = at_level(float_layers, up)
        return scored(step.float_layers, step.two_pass, step.rows)

    if level == "float":
        gains = {u: round(scored_at((u,), ())["sqnr_db"] - base["sqnr_db"], 3) for u in units}
    else:
        gains = {u: round(scored_at((), (u,))["sqnr_db"] - base["sqnr_db"], 3) for u in units}
    order = sorted(units, key=lambda u: -gains[u])
    steps: list[tuple[tuple[str, ...], tuple[str, ...]]]
    if level == "float":
        steps = [(tuple(order[:k]), ()) for k in range(1, len(order) + 1)]
    else:
        steps = [((), tuple(order[:k])) for k in range(1, len(order) + 1)]
        steps += [(tuple(order[:j]), tuple(order[j:])) for j in range(1, len(order) + 1)]
    top = {u: gains[u] for u in order[:REPORTED]}
    best = Ladder((), (), base, False, top, gains)
    for float_layers, up in steps:
        s = scored_at(float_layers, up)
        step = dataclasses.replace(at_level(float_layers, up), score=s, gains_db=top, all_gains=gains)
        if s["sqnr_db"] > best.score["sqnr_db"]:
            best = step
        if meets(s):
            return dataclasses.replace(step, met=True)
    return best


def _ladder_stats(r: Ladder) -> dict:
    return {"met": r.met, "float_layers": len(r.float_layers), "two_pass_layers": len(r.two_pass),
            "row_range_layers": len(r.rows), "sqnr_db": round(r.score["sqnr_db"], 2)}
