"""Mixed precision for ``quantize{mode=dynamic}``: layers kept float until a fidelity target is met.

The targets are static mode's (``min_cosine``, ``min_sqnr_db``, ``max_agreement_drop``: the worst graph output's
cosine / SQNR / top-1 agreement lost, ``fidelity.meets``), measured the same way: against the float model's
outputs on the first ``eval_samples`` calibration feeds, the feeds combined by ``auto_float_score``. A target
therefore needs calibration data (one clear error without it).

Units: the main graph's MatMul/Gemm layers the dynamic pass quantizes; each has its own
``DynamicQuantizeLinear -> MatMulInteger`` (fused by ORT into ``DynamicQuantizeMatMul``), so any subset can stay
float without changing the others. Search (``sensitivity=leave_one_out``, the only one dynamic mode has):

1. the model with every unit dynamic (after smoothing and weight rounding, when kept) is scored; if it meets the
   target nothing stays float;
2. each unit alone kept float: its gain is the rise of the worst-output SQNR over the all-int8 model (N builds);
3. units go float in the order of their gains, largest first, the model re-measured after each, until it meets
   the target. When no prefix does, the best-scoring one is kept and the stats say the target was not met.

Cost: N + k dynamic quantizations (no calibration of ranges: about a second each on MiniLM-L6) and as many runs
of the evaluation feeds. Float layers cost latency (MiniLM-L6: four FFN projections float, 0.50x -> 0.62x): the
run's report measures it; the search does not weigh it.
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


def choose(p: QuantizeOptions, graph: gs.Graph, quantize: Callable[[QuantizeOptions, gs.Graph], object],
           score: fid.GraphScorer) -> tuple[tuple[str, ...], dict]:
    """(the layers kept float, stats); ``quantize(options, g)`` quantizes a copy dynamically in place, ``score(g)``
    scores it."""
    t0 = time.perf_counter()
    name_unnamed_nodes(graph, graph_names(graph))
    want = targets(p)
    builds = 0

    def scored(float_layers: tuple[str, ...]) -> dict[str, float]:
        nonlocal builds
        g = graph.copy()
        quantize(dataclasses.replace(p, exclude=tuple(p.exclude) + float_layers), g)
        builds += 1
        return score(g)

    def meets(s: dict[str, float]) -> bool:
        return fid.meets(s, p.min_cosine, p.max_agreement_drop, p.min_sqnr_db)

    base = scored(())
    stats: dict = {"target": want, "all_int8": base, "eval_feeds": len(score.feeds)}
    chosen: tuple[str, ...] = ()
    final, met = base, meets(base)
    if not met:
        excluded = set(p.exclude)
        units = [n.name for n in graph.nodes if n.op in ("MatMul", "Gemm") and n.op in p.dynamic_ops
                 and n.name not in excluded and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
        gains = {u: round(scored((u,))["sqnr_db"] - base["sqnr_db"], 3) for u in units}
        order = sorted(units, key=lambda u: -gains[u])
        stats["gains_db"] = {u: gains[u] for u in order[:REPORTED]}
        best = (base, ())
        for k in range(1, len(order) + 1):
            s = scored(tuple(order[:k]))
            if s["sqnr_db"] > best[0]["sqnr_db"]:
                best = (s, tuple(order[:k]))
            if meets(s):
                final, chosen, met = s, tuple(order[:k]), True
                break
        if not met:
            final, chosen = best
    stats.update({"met": met, "float_layers": list(chosen), "score": final, "builds": builds,
                  "seconds": round(time.perf_counter() - t0, 2)})
    return chosen, stats
