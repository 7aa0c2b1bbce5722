"""``min_fidelity``: the deepest channel cut whose measured fidelity holds (``prune-channels``).

Fidelity of a cut: F = min over the float outputs o of cos_o = <y_o, y0_o> / (||y_o|| ||y0_o||), the sums taken
over all held-out feeds (``onnxcompress.validate.OutputFidelity``, ORT numerics), y0 the outputs of the model the
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
and one ORT session. F is not monotone in s in general, but close to it (the frontier's prefixes are nested):
``search`` measures s = 1 first (the bound holds: done, the bound stopped the cut), then bisects ``steps`` times and
keeps the largest measured s whose F >= floor; trials are cached by their kept counts (nearby s often give the
same cut). Only measured cuts are ever returned; none holding means the model stays unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcompress.analyses.channel_groups import ChannelGroups
from onnxcompress.data import FeedSet
from onnxcompress.validate import OutputFidelity

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
    holds: bool

    def as_dict(self) -> dict:
        d = {"s": round(self.s, 5), "macs": round(self.macs, 4), "fidelity": round(self.fidelity, 9),
             "holds": self.holds}
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


def worst_cosine(base: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    """min over float outputs of the cosine between ``cand`` and ``base`` over all feeds (0 when not finite)."""
    worst = 1.0
    for o in range(len(base[0])):
        if not np.issubdtype(np.asarray(base[0][o]).dtype, np.floating):
            continue
        acc = OutputFidelity(str(o))
        for b, c in zip(base, cand, strict=True):
            acc.update(np.asarray(b[o]), np.asarray(c[o]))
        cos = acc.summary()["cosine"]
        worst = min(worst, cos if math.isfinite(cos) else 0.0)
    return float(worst)


def search(alloc: Callable[[float], dict[int, int]],
           measure: Callable[[dict[int, int]], tuple[float, float, float | None]],
           floor: float, steps: int) -> tuple[dict[int, int] | None, list[Trial], bool]:
    """The kept counts of the deepest measured cut with fidelity >= ``floor`` (None: no cut holds), every trial,
    and whether the bound itself (s = 1) held. ``alloc(s)``: kept counts at s; ``measure(kept)``: (fidelity, MAC
    fraction, latency fraction or None)."""
    cache: dict[tuple, Trial] = {}
    trials: list[Trial] = []

    def at(s: float) -> tuple[dict[int, int], Trial]:
        kept = alloc(s)
        key = tuple(sorted(kept.items()))
        if key not in cache:
            fid, macs, lat = measure(kept)
            cache[key] = Trial(s, macs, lat, fid, fid >= floor)
            trials.append(cache[key])
            log.info("prune-channels min_fidelity: s=%.4f MACs x%.3f -> worst cosine %.5f", s, macs, fid)
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

    def measure(kept: dict[int, int]) -> tuple[float, float, float | None]:
        removed = plan_mod.removal(cg, plans, kept)
        macs, latency = fractions(removed)
        if removed.size == 0:
            return 1.0, macs, latency
        zm = removed_like_the_pass(cg, model, removed, act_stats if pc.compensate else None)
        with Session(zm, what="min_fidelity trial") as s:
            return worst_cosine(base, [s.run(f) for f in feeds]), macs, latency

    kept, trials, bound_held = search(alloc, measure, pc.min_fidelity, pc.fidelity_trials)
    bounds = [n for n, v in (("target_macs", pc.target_macs), ("target_latency", pc.target_latency)) if v is not None]
    stats.update({
        "min_fidelity": pc.min_fidelity,
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
