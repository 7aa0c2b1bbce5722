"""``min_fidelity``: the deepest channel cut whose measured fidelity holds (``prune-channels``).

Fidelity of a cut: F = min over the float outputs o of cos_o = <y_o, y0_o> / (||y_o|| ||y0_o||), the sums taken
over all held-out feeds (``onnxcompress.output_cosine``, shared with ``prune-layers``; a non-finite output
counts as 0; ORT numerics), y0 the outputs of the model the
pass received and y those of the trial model (``sensitivity.removed_like_the_pass``: the chosen units zeroed and,
with ``compensate``, their means moved into the biases — exactly the outputs of the cut graph). It is measured
before any later ``distill``, which raises it again: the floor is conservative.

Held-out feeds: up to ``fidelity_samples`` calibration feeds after the first max(samples, sensitivity_samples) the
scores and sensitivities read (``held_out``); when fewer than 8 are left, the last ``fidelity_samples`` feeds, and
the stats say they overlap. F is a sample statistic dominated by the worst feeds: on ppocr_cls (2-class softmax) a
cut measured at 0.996 on 8 held-out feeds gave 0.91 on all 64 calibration feeds and 0.95 on 32 evaluation feeds
(a few flipped samples), so the default measures 32.

The cuts form a one-parameter family: s in [0, 1] moves the budget from the input model (s = 0) to the bound B
(s = 1) — MAC target 1 - s (1 - B_macs) and, with a latency model, latency target 1 - s (1 - B_lat), where B is
``target_macs`` / ``target_latency`` when given, else the deepest cut the per-group floors allow (``min_keep``,
``round_to``). kept(s) is the allocation at those targets (sensitivity's marginal frontier or the global
threshold), from the scores and sensitivity curves computed once, so a trial costs one zeroed copy of the model
and one ORT session. F is not monotone in s (ppocr_cls: MACs x0.825 -> 0.974, x0.819 -> 0.995, x0.808 -> 0.969:
the allocation picks other groups at other budgets), so ``search`` keeps only measured cuts: s = 1 first (it holds:
done, the bound stopped the cut), then ``fidelity_steps`` bisection steps, keeping the largest measured s whose
F >= floor (with ``fidelity_confidence`` c: its bootstrap lower bound, ``lower_bound``). Two floors share the bisection path until a trial lies between them, where the looser goes up and the
tighter down, so a looser floor never ends at a smaller s. Trials are cached by their kept counts (nearby s often
give the same cut). Only measured cuts are ever returned; none holding means the model stays unchanged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcompress.analyses.channel_groups import ChannelGroups
from onnxcompress.data import FeedSet
from onnxcompress.output_cosine import cosine_terms, worst_cosine, worst_of

from . import allocation as plan_mod
from .sensitivity import removed_like_the_pass

log = logging.getLogger(__name__)

#: fewest held-out feeds measured apart from the scoring ones (fewer: the last feeds, overlapping, and said so)
MIN_HELD_OUT = 8


@dataclass
class Trial:
    s: float  # position between the input model (0) and the bound (1)
    macs: float  # MAC fraction kept (estimate of the channel-group analysis)
    latency: float | None  # latency fraction kept (the latency model's estimate), with target_latency
    fidelity: float  # worst output cosine on the held-out feeds
    lower: float | None  # its bootstrap lower bound, with fidelity_confidence
    holds: bool

    def as_dict(self) -> dict:
        d = {"s": round(self.s, 5), "macs": round(self.macs, 4), "fidelity": round(self.fidelity, 9),
             "holds": self.holds}
        if self.lower is not None:
            d["lower_bound"] = round(self.lower, 6)
        if self.latency is not None:
            d["latency"] = round(self.latency, 4)
        return d


def held_out(feeds: FeedSet, used: int, n: int) -> tuple[list[dict], str, bool]:
    """Up to ``n`` feeds after the first ``used``; when fewer than ``MIN_HELD_OUT`` (or ``n``) are left, the last
    min(n, total) feeds, which overlap the first ``used``. Returns the feeds, a description, and whether they are
    disjoint from the first ``used``."""
    total = len(feeds)
    left = total - used
    start = used if left >= min(n, MIN_HELD_OUT) else max(0, total - n)
    out = list(itertools.islice(iter(feeds), start, start + n))
    disjoint = start >= used
    where = f"calibration feeds {start}..{start + len(out) - 1} of {total}"
    if not disjoint:
        where += (f" (overlapping the first {used} that scored the channels: give at least "
                  f"{used + min(n, MIN_HELD_OUT)} calibration feeds for a held-out measurement)")
    return out, where, disjoint


def lower_bound(terms: np.ndarray, confidence: float, rng: np.random.Generator, resamples: int = 400) -> float:
    """One-sided ``confidence`` lower bound of the worst cosine: the (1 - confidence) quantile over bootstrap
    resamples of the feeds (each resample: feed counts drawn multinomially, the sums re-weighted)."""
    n = terms.shape[1]
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    return float(np.quantile(worst_of(terms, weights), 1.0 - confidence))


def search(alloc: Callable[[float], dict[int, int]],
           measure: Callable[[dict[int, int]], tuple[float, float | None, float, float | None]],
           floor: float, steps: int) -> tuple[dict[int, int] | None, list[Trial], bool]:
    """The kept counts of the deepest measured cut with fidelity (its lower bound, when measured) >= ``floor``
    (None: no cut holds), every trial, and whether the bound itself (s = 1) held. ``alloc(s)``: kept counts at s;
    ``measure(kept)``: (fidelity, lower bound or None, MAC fraction, latency fraction or None)."""
    cache: dict[tuple, Trial] = {}
    trials: list[Trial] = []

    def at(s: float) -> tuple[dict[int, int], Trial]:
        kept = alloc(s)
        key = tuple(sorted(kept.items()))
        if key not in cache:
            fid, lower, macs, lat = measure(kept)
            cache[key] = Trial(s, macs, lat, fid, lower, (fid if lower is None else lower) >= floor)
            trials.append(cache[key])
            log.info("prune-channels min_fidelity: s=%.4f MACs x%.3f -> worst cosine %.5f (lower bound %s)", s,
                     macs, fid, lower)
        return kept, cache[key]

    kept, t = at(1.0)
    if t.holds:
        return kept, trials, True
    best = None
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        kept, t = at(mid)
        if t.holds:
            lo, best = mid, kept
        else:
            hi = mid
    return best, trials, False


Held = tuple[list[dict], list[list[np.ndarray]]]  # held-out feeds and the input model's outputs on them


def floor_cut(pc, cg: ChannelGroups, plans: list[plan_mod.GroupPlan], allocation: str, model, ctx,
              act_stats: dict | None, lat, stats: dict) -> tuple[dict[int, int], Held | None]:
    """Kept counts of the deepest cut of ``pc`` (a ``PruneChannels`` with ``min_fidelity``) whose fidelity holds,
    and the held-out feeds with the input model's outputs (None when the model stays unchanged); fills ``stats``."""
    from onnxcompress.runtime import Session

    feeds, where, _ = held_out(ctx.calibration, max(pc.samples, pc.sensitivity_samples), pc.fidelity_samples)
    with Session(model, what="model for min_fidelity") as s:
        base = [s.run(f) for f in feeds]
    full = {p.gid: p.n for p in plans}
    lat_full = lat.estimate(cg, np.ones(cg.n_elements, bool)) if lat is not None else 0.0

    def fractions(removed: np.ndarray) -> tuple[float, float | None]:
        keep_el = cg.keep_elements(removed)
        macs = cg.macs_after(keep_el) / cg.total_macs if cg.total_macs else 1.0
        return macs, (lat.estimate(cg, keep_el) / lat_full if lat is not None and lat_full > 0 else None)

    deepest_macs, _ = fractions(plan_mod.removal(cg, plans, {p.gid: int(p.options[0]) for p in plans}))
    bound_macs = pc.target_macs if pc.target_macs is not None else (
        deepest_macs if pc.target_latency is None else 1.0)
    bound_lat = pc.target_latency if pc.target_latency is not None else 1.0
    curves = pc.curves(cg, plans, model, ctx, act_stats, lat) if allocation == "sensitivity" else None

    def alloc(s: float) -> dict[int, int]:
        if s <= 0.0:
            return full
        meets = plan_mod.budget(cg, plans, lat, 1 - s * (1 - bound_macs), 1 - s * (1 - bound_lat))
        if curves is None:
            return plan_mod.global_threshold(plans, meets)
        return plan_mod.marginal(plans, curves[0], curves[1], meets)

    def measure(kept: dict[int, int]) -> tuple[float, float | None, float, float | None]:
        removed = plan_mod.removal(cg, plans, kept)
        macs, latency = fractions(removed)
        if removed.size == 0:
            return 1.0, (1.0 if pc.fidelity_confidence else None), macs, latency
        zm = removed_like_the_pass(cg, model, removed, act_stats if pc.compensate else None)
        with Session(zm, what="min_fidelity trial") as s:
            terms = cosine_terms(base, [s.run(f) for f in feeds])
        lower = (lower_bound(terms, pc.fidelity_confidence, ctx.rng("prune-channels min_fidelity"))
                 if pc.fidelity_confidence else None)
        return float(worst_of(terms)[0]), lower, macs, latency

    kept, trials, bound_held = search(alloc, measure, pc.min_fidelity, pc.fidelity_steps)
    bounds = [n for n, v in (("target_macs", pc.target_macs), ("target_latency", pc.target_latency)) if v is not None]
    stats.update({
        "min_fidelity": pc.min_fidelity,
        "fidelity_confidence": pc.fidelity_confidence or None,
        "fidelity_feeds": where,
        "stopped_by": ((" and ".join(bounds) if bounds else "min_keep (every group at its per-group floor)")
                       if bound_held else "min_fidelity"),
        "fidelity_trials": [t.as_dict() for t in sorted(trials, key=lambda t: -t.macs)],
    })
    if kept is None or plan_mod.removal(cg, plans, kept).size == 0:
        cuts = [t for t in trials if t.macs < 1.0]
        smallest = max(cuts, key=lambda t: t.macs) if cuts else None
        stats["fidelity"] = 1.0
        stats["skipped"] = (f"min_fidelity={pc.min_fidelity}: no cut keeps the worst output cosine >= the floor"
                            + (f" (the smallest measured, MACs x{smallest.macs:.3f}, gives {smallest.fidelity:.5f})"
                               if smallest else "") + ": model unchanged")
        log.info("prune-channels: %s", stats["skipped"])
        return full, None
    return kept, (feeds, base)


def measured_fidelity(cut_model, held: Held) -> float:
    """Worst output cosine of the cut model against the input model's outputs on the held-out feeds."""
    from onnxcompress.runtime import Session

    feeds, base = held
    with Session(cut_model, what="pruned model (min_fidelity)") as s:
        return worst_cosine(base, [s.run(f) for f in feeds])
