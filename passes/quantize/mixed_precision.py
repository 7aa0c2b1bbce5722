"""Mixed precision to a user target (``min_cosine``, ``max_agreement_drop``, ``min_sqnr_db``): which layers stay float.

``sensitivity=greedy_cost`` hands the whole choice to ``float_frontier`` (noise removed per latency cost, one
activation rounding's layers at a time, within ``max_latency``); the rest of this module is the per-layer search.

**Sensitivity** of a layer (anchor node), one model per layer: *leave-one-out* (default) keeps that layer float in
the otherwise quantized model and scores the outputs — the marginal gain at the operating point; *one-at-a-time*
quantizes that layer alone. On deep, noise-amplifying nets (PP-OCR's recognizer) any single quantized layer already
saturates the output metrics, so one-at-a-time cannot rank layers, while leave-one-out finds the one depthwise
Conv whose wide-range output costs most.

**Search**: order layers from most to least sensitive (``fidelity.rank_key``) and keep the first ``k`` in float,
with ``k`` the smallest count that meets the target (``fidelity.meets``), found by doubling ``k = 1, 2, 4 ...`` until
the target is met, then bisection between the last failing and the first meeting count (assumes more float layers
never hurt, which holds up to noise). If even every layer float misses it, all are kept float and the stats say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import fidelity as fid
from .fidelity import meets

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import Built, QuantizeRun

log = logging.getLogger(__name__)


def sensitivity(
    layers: list[str], evaluate_only: Callable[[str], dict[str, float]], progress: Callable | None = None
) -> dict[str, dict[str, float]]:
    """``evaluate_only(layer)`` for each layer (the score of the model built for that layer)."""
    it = progress(layers, total=len(layers), desc="sensitivity") if progress else layers
    return {name: evaluate_only(name) for name in it}


def search_float_set(
    order: list[str],
    evaluate_with_float: Callable[[list[str]], dict[str, float]],
    min_cosine: float | None,
    max_agreement_drop: float | None,
    first: dict[str, float],
    min_sqnr_db: float | None = None,
) -> tuple[int, dict[str, float], int]:
    """Smallest k such that keeping ``order[:k]`` float meets the target; (k, score, evaluations)."""
    if meets(first, min_cosine, max_agreement_drop, min_sqnr_db):
        return 0, first, 0
    scores: dict[int, dict[str, float]] = {0: first}
    evals = 0

    def meets_with(k: int) -> bool:
        nonlocal evals
        s = evaluate_with_float(order[:k])
        log.debug("mixed precision: %d float -> %s", k, s)
        evals += 1
        scores[k] = s
        return meets(s, min_cosine, max_agreement_drop, min_sqnr_db)

    lo, hi = 0, None  # lo fails, hi meets
    k = 1
    n = len(order)
    while k <= n:
        if meets_with(k):
            hi = k
            break
        lo = k
        if k == n:
            break
        k = min(2 * k, n)
    if hi is None:
        return n, scores[max(scores)], evals
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets_with(mid):
            hi = mid
        else:
            lo = mid
    return hi, scores[hi], evals


def mixed_precision(
    run: QuantizeRun, ref: fid.Reference, built: Built, sc: dict[str, float]
) -> tuple[Built, dict[str, float], dict[str, str]]:
    """The search of the module docstring from the all-int8 ``built`` (scored ``sc``); returns the chosen build,
    its score and the float layers with their reasons."""
    p = run.p
    float_layers: dict[str, str] = {}
    run.stats["score_all_int8"] = {k: round(v, 6) for k, v in sc.items()}
    if p.sensitivity == "greedy_cost":
        from .float_frontier import greedy_mixed_precision

        return greedy_mixed_precision(run, ref)
    if meets(sc, p.min_cosine, p.max_agreement_drop, p.min_sqnr_db):
        return built, sc, float_layers
    layers = built.plan.int8_anchor_names()
    all_anchor_names = [n.name for n in built.plan.anchors]

    def evaluate(float_names: list[str]) -> dict[str, float]:
        return fid.score_model(ref, run.export(run.build(float_names).graph))

    t0 = time.perf_counter()
    if p.sensitivity == "leave_one_out":
        # the gain of keeping each layer float while every other layer is quantized
        sens = sensitivity(layers, lambda name: evaluate([name]), run.ctx.progress)
        order = sorted(layers, key=lambda n: fid.rank_key(sens[n]))
        how = "float alone it lifts the score to"
    else:
        # the damage of quantizing each layer alone
        sens = sensitivity(
            layers, lambda name: evaluate([x for x in all_anchor_names if x != name]), run.ctx.progress
        )
        order = sorted(layers, key=lambda n: fid.rank_key(sens[n]), reverse=True)
        how = "quantized alone the score drops to"

    run.stats["sensitivity_top"] = [
        {"layer": n, **{k: round(v, 5) for k, v in sens[n].items()}} for n in order[:10]
    ]
    k, best, evals = search_float_set(order, evaluate, p.min_cosine, p.max_agreement_drop, sc, p.min_sqnr_db)
    chosen = order[:k]
    for rank, n in enumerate(chosen, 1):
        s_ = sens[n]
        parts = [f"cosine {s_['cosine']:.5f}", f"SQNR {s_['sqnr_db']:.1f} dB"]
        if "agreement" in s_:
            parts.append(f"agreement {s_['agreement']:.4f}")
        float_layers[n] = (
            f"mixed precision: sensitivity rank {rank} of {len(layers)} ({how} " + ", ".join(parts) + ")"
        )
    built = run.build(chosen, tuple(float_layers.items()))
    met = meets(best, p.min_cosine, p.max_agreement_drop, p.min_sqnr_db)
    run.stats["mixed_precision"] = {
        "target": {"min_cosine": p.min_cosine, "max_agreement_drop": p.max_agreement_drop,
                   "min_sqnr_db": p.min_sqnr_db},
        "met": met,
        "layers_float": len(chosen),
        "layers_total": len(layers),
        "evaluations": evals + len(layers),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not met:
        log.warning("mixed precision: target not met even with %d layers float", len(chosen))
    return built, best, float_layers
