"""Measured output error of pruning trials for ``prune-channels``: sensitivity curves and ablation trials.

A trial model computes what the pruned model will (``removed_like_the_pass``): the chosen units' weights zeroed
(``ChannelGroups.zeroed_model``, exactly the outputs of the cut model) and, with ``compensate``, their calibration
means moved into the consumers' biases. Its error against the unpruned model is ``relative_error`` over a few
calibration feeds.

Sensitivity (``sensitivity_curves``): every candidate group is pruned alone at each of ``ratios`` (its kept count
rounded up to an allowed one), giving measured points e_g(k) of its error curve (``allocation.error_curve``), and
its saving when fully cut, save_g: the share of estimated latency (with a latency model), of MACs (with a MAC
target), or of the candidate units (with a ratio) — what ``allocation.marginal`` trades against the error.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onnxcompress.analyses.channel_groups import ChannelGroups

from . import allocation as plan_mod
from .mean_compensation import bias_deltas, compensate_model

log = logging.getLogger(__name__)


def sensitivity_curves(cg: ChannelGroups, plans: list[plan_mod.GroupPlan], model, feeds: list[dict],
                       ratios: tuple[float, ...], act_stats: dict | None = None, lat=None,
                       by_macs: bool = False) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Error curve e_g(k) and saving save_g of every plan's group, each pruned alone at ``ratios`` and run on
    ``feeds``. ``lat``: a ``LatencyModel`` (savings in estimated time); ``by_macs``: savings in MACs."""
    from onnxcompress.runtime import Session

    with Session(model, what="model for sensitivity") as s:
        base = [s.run(f) for f in feeds]
    curves: dict[int, np.ndarray] = {}
    saves: dict[int, float] = {}
    total = float(cg.total_macs) or 1.0
    base_lat = lat.estimate(cg, np.ones(cg.n_elements, bool)) if lat is not None else 0.0
    for p in plans:
        all_gone = cg.keep_elements(p.order)
        if lat is not None and base_lat > 0:  # pruning goes where it buys time
            saves[p.gid] = (base_lat - lat.estimate(cg, all_gone)) / base_lat
        elif by_macs:
            saves[p.gid] = (total - cg.macs_after(all_gone)) / total
        else:
            saves[p.gid] = p.n / max(1, sum(q.n for q in plans))
        measured: dict[int, float] = {}
        for r in ratios:
            k = plan_mod.round_up(p, p.n - math.floor(r * p.n))
            if k >= p.n or k in measured:
                continue
            zm = removed_like_the_pass(cg, model, p.order[: p.n - k], act_stats)
            with Session(zm, what="sensitivity trial") as s:
                measured[k] = relative_error(base, [s.run(f) for f in feeds])
        curves[p.gid] = plan_mod.error_curve(p, measured)
        log.debug("sensitivity group %d (n=%d): %s", p.gid, p.n, measured)
    return curves, saves


def removed_like_the_pass(cg: ChannelGroups, model, units, act_stats: dict | None):
    """A copy of ``model`` computing what the pruned model will: the units' weights zeroed and, given activation
    statistics (``compensate``), their calibration means moved into the consumers' biases."""
    zm = cg.zeroed_model(model, units)
    if act_stats:
        compensate_model(zm, bias_deltas(cg, act_stats, cg.keep_elements(units)))
    return zm


def relative_error(base: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    """Mean over outputs of the relative squared error sum ||y - y0||^2 / sum ||y0||^2 across the feeds.

    Outputs of rank >= 3 are measured per feature along their smallest non-batch axis of fixed size (a detector's
    [1, 4+C, A]: box coordinates and class scores count alike, whatever their scales; an axis whose size varies
    between feeds is not a feature axis), each feature's energy floored at 1e-6 of
    the mean feature energy (features that are always ~0 do not blow up)."""
    errs = []
    for o in range(len(base[0])):
        b0 = np.asarray(base[0][o])
        if not np.issubdtype(b0.dtype, np.floating) or b0.size == 0:
            continue
        axis = None
        if b0.ndim >= 3 and all(np.ndim(b[o]) == b0.ndim for b in base):
            # feature axis: the smallest non-batch axis whose size is > 1 and the same for every feed (a
            # segmentation map's H or W, which vary with the input, is not a feature axis)
            dims = [(b0.shape[a], a) for a in range(1, b0.ndim)
                    if b0.shape[a] > 1 and all(np.shape(b[o])[a] == b0.shape[a] for b in base)]
            axis = min(dims)[1] if dims else None
        if axis is None:
            num = sum(float(np.sum(np.square(c[o].astype(np.float64) - b[o]))) for b, c in zip(base, cand,
                                                                                               strict=True))
            den = sum(float(np.sum(np.square(b[o].astype(np.float64)))) for b in base)
            if den > 0:
                errs.append(num / den)
            continue
        num = np.zeros(b0.shape[axis])
        den = np.zeros(b0.shape[axis])
        for b, c in zip(base, cand, strict=True):
            bb = np.moveaxis(b[o].astype(np.float64), axis, 0).reshape(b0.shape[axis], -1)
            cc = np.moveaxis(c[o].astype(np.float64), axis, 0).reshape(b0.shape[axis], -1)
            num += np.square(cc - bb).sum(axis=1)
            den += np.square(bb).sum(axis=1)
        den = np.maximum(den, 1e-6 * den.mean())
        if den.mean() > 0:
            errs.append(float(np.mean(num / den)))
    return float(np.mean(errs)) if errs else 0.0


