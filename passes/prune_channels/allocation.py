"""How many units each channel group keeps, and which ones (``prune-channels`` allocation).

Kept counts. A group of n units keeps k in {k_min .. n}, k_min = max(1, ceil(min_keep * n)), k a multiple of
``round_to`` (or n itself); groups with n <= round_to are left alone. Within a group the units with the lowest
importance go first. ``round_to=0`` (auto) is ``NCHWC_BLOCK`` for Conv channel groups and 1 for neurons and heads:
ORT runs a Conv in its blocked NCHWc layout only when the channel counts are multiples of the block, so on
ppocr_cls at 0.5x MACs free kept counts gave 0.85x latency and multiples of 16 gave 0.58x.

Allocations:

- ``uniform``: every group removes floor(ratio * n) units (k rounded up to the nearest allowed count).
- ``global``: one threshold t on the normalised importance (unit score / mean score of its group); a unit goes when
  its score is below t, within the per-group floor. t is bisected until the removed share of all candidate units
  reaches ``ratio``, or the model's MACs fall to ``target_macs`` x the original.
- ``sensitivity``: each group is pruned alone at a few ratios and the relative output error on calibration data is
  measured (e_g(k), with e_g(n) = 0, made monotone, linear in between). With save_g(k) = (n - k) / n * (MAC share
  of the layers the group touches), steps k -> next lower allowed k are taken cheapest first by
  (e_g increase) / (save_g increase) — each group's step costs made non-decreasing, so this is the Lagrangian
  optimum of sum e_g subject to the budget — until the budget is met. Pruning goes where the error per saved MAC
  is smallest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups import ChannelGroups

log = logging.getLogger(__name__)

#: channel block of ORT's NCHWc Conv kernels with AVX-512 (8 with AVX2; 16 is a multiple of both). A Conv whose
#: input channels are not a multiple of the block (and not below it), or a depthwise Conv whose channels are not,
#: falls back to ORT's plain NCHW Conv plus layout reorders, and output channels are padded up to the block:
#: odd kept counts cost latency that the MAC count does not show.
NCHWC_BLOCK = 16


@dataclass
class GroupPlan:
    gid: int
    order: np.ndarray  # unit ids, least important first
    norm_scores: np.ndarray  # normalised scores in the same order (ascending)
    options: np.ndarray  # allowed kept counts, ascending

    @property
    def n(self) -> int:
        return int(len(self.order))


def kept_options(n: int, min_keep: float, round_to: int) -> np.ndarray:
    if n <= max(1, round_to):
        return np.array([n])
    k_min = max(1, math.ceil(min_keep * n))
    if round_to > 1:
        start = max(round_to, math.ceil(k_min / round_to) * round_to)
        ks = np.arange(start, n + 1, round_to)
        if ks.size == 0 or ks[-1] != n:
            ks = np.append(ks, n)
        return ks
    return np.arange(k_min, n + 1)


def round_up(plan: GroupPlan, k: float) -> int:
    i = int(np.searchsorted(plan.options, k, side="left"))
    return int(plan.options[min(i, len(plan.options) - 1)])


def round_to_per_group(cg: ChannelGroups, gids: list[int], graph: gs.Graph, round_to: int) -> dict[int, int]:
    """``round_to`` for every group; 0 = auto: ``NCHWC_BLOCK`` for a group whose producers are all Conv /
    ConvTranspose outputs whose units are single channels, 1 for every other group (neurons, heads)."""
    if round_to > 0:
        return dict.fromkeys(gids, round_to)
    conv: set[str] = set()
    for n in graph.nodes:
        if n.op in ("Conv", "ConvTranspose"):
            conv.add(n.name)
            conv.update(t.name for t in n.outputs)
    out = {}
    for g in gids:
        grp = cg.groups[g]
        is_conv = bool(grp.producers) and all(p in conv for p in grp.producers) and grp.channels == grp.size
        out[g] = NCHWC_BLOCK if is_conv else 1
    return out


def make_plans(cg: ChannelGroups, gids: list[int], scores: np.ndarray, min_keep: float,
               round_to: int | dict[int, int]) -> list[GroupPlan]:
    plans = []
    for gid in gids:
        units = cg.groups[gid].units
        s = scores[units]
        order = np.argsort(s, kind="stable")
        mean = float(s.mean()) if s.size else 0.0
        norm = s[order] / mean if mean > 0 else np.zeros(len(units))
        rt = round_to[gid] if isinstance(round_to, dict) else round_to
        plans.append(GroupPlan(gid, units[order], norm, kept_options(len(units), min_keep, rt)))
    return plans


def removed_units(plans: list[GroupPlan], kept: dict[int, int]) -> np.ndarray:
    parts = [p.order[: p.n - kept[p.gid]] for p in plans if kept.get(p.gid, p.n) < p.n]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def uniform(plans: list[GroupPlan], ratio: float) -> dict[int, int]:
    return {p.gid: round_up(p, p.n - math.floor(ratio * p.n)) for p in plans}


Budget = Callable[[dict[int, int]], bool]  # True when the allocation meets the target


def global_threshold(plans: list[GroupPlan], meets: Budget) -> dict[int, int]:
    """Smallest threshold on normalised scores whose removals meet the budget."""

    def alloc(t: float) -> dict[int, int]:
        return {p.gid: round_up(p, p.n - int(np.searchsorted(p.norm_scores, t, side="left"))) for p in plans}

    hi = max((float(p.norm_scores[-1]) for p in plans if p.n), default=0.0) + 1.0
    if not meets(alloc(hi)):
        log.warning("prune-channels: the target cannot be met within the per-group floor; pruning to the floor")
        return alloc(hi)
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if meets(alloc(mid)):
            hi = mid
        else:
            lo = mid
    return alloc(hi)


def error_curve(plan: GroupPlan, measured: dict[int, float]) -> np.ndarray:
    """e(k) for every allowed k: linear between measured points, 0 at k = n, monotone (fewer kept, more error)."""
    pts = sorted({plan.n: 0.0, **measured}.items())
    ks = np.array([k for k, _ in pts], dtype=float)
    es = np.array([e for _, e in pts], dtype=float)
    opts = plan.options.astype(float)
    curve = np.interp(opts, ks, es)
    if len(ks) >= 2:  # extrapolate below the smallest measured count with the last slope
        slope = (es[1] - es[0]) / (ks[1] - ks[0]) if ks[1] != ks[0] else 0.0
        below = opts < ks[0]
        curve[below] = es[0] + slope * (opts[below] - ks[0])
    # monotone: error never decreases as k decreases
    curve = np.maximum.accumulate(curve[::-1])[::-1]
    return np.maximum(curve, 0.0)


def marginal(plans: list[GroupPlan], curves: dict[int, np.ndarray], saves: dict[int, float],
             meets: Budget) -> dict[int, int]:
    """Greedy on marginal cost: every step lowers one group's kept count to its next allowed value; steps are
    taken cheapest first (added error per saved MAC share), each group's step costs made non-decreasing (the convex
    hull of its curve, where greedy equals the Lagrangian optimum). The shortest prefix of steps that meets the
    budget is found by bisection."""
    steps_g, steps_k, steps_c = [], [], []
    for p in plans:
        e = curves[p.gid]
        opts = p.options
        if len(opts) < 2:
            continue
        # from the top (k = n) down: step i goes opts[i+1] -> opts[i]
        de = e[:-1] - e[1:]
        ds = saves[p.gid] * (opts[1:] - opts[:-1]) / p.n
        cost = np.where(ds > 0, de / np.maximum(ds, 1e-300), np.inf)[::-1]
        cost = np.maximum.accumulate(cost)
        steps_g.append(np.full(len(cost), p.gid))
        steps_k.append(opts[:-1][::-1])
        steps_c.append(cost)
    if not steps_c:
        return {p.gid: p.n for p in plans}
    g_all, k_all, c_all = np.concatenate(steps_g), np.concatenate(steps_k), np.concatenate(steps_c)
    order = np.lexsort((-k_all, c_all))  # cheapest first; within a group, larger kept counts first
    g_all, k_all = g_all[order], k_all[order]

    def alloc(n_steps: int) -> dict[int, int]:
        kept = {p.gid: p.n for p in plans}
        for g, k in zip(g_all[:n_steps].tolist(), k_all[:n_steps].tolist(), strict=True):
            kept[g] = min(kept[g], k)
        return kept

    if not meets(alloc(len(g_all))):
        log.warning("prune-channels: the target cannot be met within the per-group floor; pruning to the floor")
        return alloc(len(g_all))
    lo, hi = 0, len(g_all)
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(alloc(mid)):
            hi = mid
        else:
            lo = mid + 1
    kept = alloc(hi)
    # coarse steps (round_to, small groups) can overshoot: undo the costliest steps taken while the budget holds
    by_gid = {p.gid: p for p in plans}
    for i in range(hi - 1, -1, -1):
        g = int(g_all[i])
        p = by_gid[g]
        j = int(np.searchsorted(p.options, kept[g]))
        if j + 1 >= len(p.options) or int(k_all[i]) != kept[g]:
            continue
        trial = dict(kept)
        trial[g] = int(p.options[j + 1])
        if meets(trial):
            kept = trial
    return kept


def budget(cg: ChannelGroups, plans: list[GroupPlan], lat, macs_frac: float, lat_frac: float
           ) -> Budget:
    """True when kept counts leave <= ``macs_frac`` of the MACs and (with a latency model) <= ``lat_frac`` of the
    estimated latency."""
    target = macs_frac * cg.total_macs
    lat_target = lat_frac * lat.estimate(cg, np.ones(cg.n_elements, bool)) if lat is not None else None

    def meets(kept: dict[int, int]) -> bool:
        keep_el = cg.keep_elements(removed_units(plans, kept))
        if cg.macs_after(keep_el) > target * (1 + 1e-9):
            return False
        return lat is None or lat.estimate(cg, keep_el) <= lat_target

    return meets


def removal(cg: ChannelGroups, plans: list[GroupPlan], kept: dict[int, int]) -> np.ndarray:
    """The units the kept counts remove, minus those the graph needs back (an empty Split part / Slice range)."""
    removed = removed_units(plans, kept)
    restore = cg.check_removal(removed.tolist())
    if restore:
        removed = np.setdiff1d(removed, np.asarray(restore, dtype=np.int64))
    return removed
