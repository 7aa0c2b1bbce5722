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
from onnxcompress.output_error import relative_output_error as relative_error

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
