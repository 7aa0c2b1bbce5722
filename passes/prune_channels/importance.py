"""Channel importance for ``prune-channels``: one score per unit (the smallest removable set of coupled channels).

Every coupled weight contributes (``ConstSlice`` members of the channel-group analysis, roles out/in/dw):

- ``l1`` / ``l2``: the L1 norm / squared L2 norm of the weight slice at each position of the cut axis, summed over
  the positions of a unit.
- ``bn``: |gamma| of the BatchNormalization scales in the group (groups without BN fall back to ``l2``).
- ``act``: mean |x| of the activation each consumer weight multiplies, per channel (calibration data).
- ``recon``: the output-reconstruction error of removing a channel from each consumer, to first order
  E[x_c^2] * ||W[:, c]||^2 (the diagonal of tr(W_S Sigma_SS W_S^T) for a removed set S) — "how much of the next
  layer's output this channel carries". Needs calibration data.
- ``obs``: the error of removing a unit *after* the optimal refit of its consumers (structured Optimal Brain
  Surgeon, greedy; ``obs_importance``) — ``recon`` with the correlations between channels; what ``distill`` recovers.
  Groups whose consumers it cannot model use ``recon``.
- ``ablation``: for groups of at most ``ABLATION_MAX_UNITS`` units (attention heads, small layers), the measured
  relative error of the model's outputs when that one unit is removed the way the pass removes it (zeroed, its mean
  moved into the consumers' biases when ``compensate``; one ORT run over a few calibration feeds per unit); larger
  groups use ``recon``.

Members have different scales (a 3x3 conv vs a BN vector), so each member's scores are divided by their mean over the
units of each group it touches before they are summed: every member votes with equal weight, as in Torch-Pruning's
group importance. Activation statistics are streamed (one feed at a time): sums of x^2 and |x| per channel only.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx

from onnxcompress.analyses.activations import stream_activations
from onnxcompress.analyses.channel_groups import AxisSpec, ChannelGroups
from onnxcompress.data import FeedSet

log = logging.getLogger(__name__)

IMPORTANCES = ("auto", "l1", "l2", "bn", "act", "recon", "obs", "ablation")


def _position_to_units(spec: AxisSpec, position_scores: np.ndarray, unit_of: np.ndarray, n_units: int) -> np.ndarray:
    """Spread per-position scores onto units (a position of a multi-axis layout splits evenly over its elements)."""
    el = spec.el
    if el.ndim == 1:
        return np.bincount(unit_of[el], weights=position_scores, minlength=n_units)
    moved = np.moveaxis(el, spec.pos, 0).reshape(el.shape[spec.pos], -1)
    w = np.repeat(position_scores / moved.shape[1], moved.shape[1])
    return np.bincount(unit_of[moved.reshape(-1)], weights=w, minlength=n_units)


def _normalise_into(total: np.ndarray, member: np.ndarray, touched: np.ndarray, unit_group: np.ndarray) -> None:
    """total += member / mean(member over the units of each group), for the touched units."""
    if not touched.size:
        return
    groups = unit_group[touched]
    v = member[touched]
    size = int(groups.max()) + 1
    sums = np.bincount(groups, weights=v, minlength=size)
    counts = np.bincount(groups, minlength=size)
    means = sums[groups] / counts[groups]
    ok = means > 0
    total[touched[ok]] += member[touched[ok]] / means[ok]


def weight_scores(cg: ChannelGroups, kind: str) -> np.ndarray:
    """Per-unit importance from the coupled weights (``l1``, ``l2`` or ``bn``)."""
    n = cg.n_units
    total = np.zeros(n)
    bn_total = np.zeros(n)
    has_bn = np.zeros(n, dtype=bool)
    for s in cg.slices:
        if s.role not in ("out", "in", "dw", "bn"):
            continue
        arr = cg.value(s.node.inputs[s.index]).astype(np.float64)
        for spec in s.specs:
            others = tuple(i for i in range(arr.ndim) if i != spec.axis)
            if s.role == "bn":
                pos = np.abs(arr)
            elif kind == "l1":
                pos = np.abs(arr).sum(axis=others) if others else np.abs(arr)
            else:
                pos = np.square(arr).sum(axis=others) if others else np.square(arr)
            member = _position_to_units(spec, pos, cg.unit_of, n)
            touched = np.unique(cg.unit_of[spec.el.reshape(-1)])
            if s.role == "bn":
                _normalise_into(bn_total, member, touched, cg.unit_group)
                has_bn[touched] = True
            else:
                _normalise_into(total, member, touched, cg.unit_group)
    if kind == "bn":
        # a group with BN scales uses them alone; others keep the weight norms
        group_has_bn = np.zeros(int(cg.unit_group.max()) + 1 if n else 0, dtype=bool)
        group_has_bn[cg.unit_group[has_bn]] = True
        use = group_has_bn[cg.unit_group]
        total = np.where(use, bn_total, total)
    return total


def activation_stats(model: onnx.ModelProto, cg: ChannelGroups, feeds: FeedSet, groups: set[int],
                     progress=None) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """(tensor, axis) -> (sum x^2, sum |x|, count, sum x) per position along the axis, for the consumer inputs of
    ``groups``. Streamed: only per-channel sums are kept."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for s in cg.slices:
        if s.role == "in" and s.act:
            touched = np.unique(cg.unit_group[cg.unit_of[s.specs[0].el.reshape(-1)]])
            if set(touched.tolist()) & groups:
                wanted[s.act].add(int(s.act_axis))
    stats: dict[tuple[str, int], list] = {}
    if not wanted:
        return {}
    for _, acts in stream_activations(model, sorted(wanted), feeds, progress=progress, desc="channel importance"):
        for name, axes in wanted.items():
            x = np.asarray(acts[name], dtype=np.float64)
            for axis in axes:
                moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
                sq = np.einsum("ij,ij->i", moved, moved)
                ab = np.abs(moved).sum(axis=1)
                sm = moved.sum(axis=1)
                cur = stats.get((name, axis))
                if cur is None:
                    stats[(name, axis)] = [sq, ab, moved.shape[1], sm]
                else:
                    cur[0] = cur[0] + sq
                    cur[1] = cur[1] + ab
                    cur[2] += moved.shape[1]
                    cur[3] = cur[3] + sm
    return {k: (v[0], v[1], v[2], v[3]) for k, v in stats.items()}


def activation_scores(cg: ChannelGroups, stats: dict, kind: str) -> np.ndarray:
    """``act``: mean |x| per channel; ``recon``: E[x^2] * ||W[:, c]||^2 — both summed over consumer members."""
    n = cg.n_units
    total = np.zeros(n)
    for s in cg.slices:
        if s.role != "in" or not s.act or (s.act, s.act_axis) not in stats:
            continue
        sq, ab, count, _ = stats[(s.act, s.act_axis)]
        spec = s.specs[0]
        if kind == "act":
            pos = ab / max(count, 1)
        else:
            arr = cg.value(s.node.inputs[s.index]).astype(np.float64)
            others = tuple(i for i in range(arr.ndim) if i != spec.axis)
            wn = np.square(arr).sum(axis=others) if others else np.square(arr)
            pos = sq / max(count, 1) * wn
        if pos.shape[0] != spec.el.shape[spec.pos if spec.el.ndim > 1 else 0]:
            continue
        member = _position_to_units(spec, pos, cg.unit_of, n)
        touched = np.unique(cg.unit_of[spec.el.reshape(-1)])
        _normalise_into(total, member, touched, cg.unit_group)
    return total


ABLATION_MAX_UNITS = 64


def ablation_scores(cg: ChannelGroups, model: onnx.ModelProto, feeds: list[dict], groups: set[int],
                    error: callable, trial_model: callable) -> tuple[np.ndarray, set[int]]:
    """Output error of removing each unit alone, for the small groups among ``groups``. ``trial_model(units)``
    builds the model without them the way the pass will."""
    from onnxcompress.runtime import Session

    scores = np.zeros(cg.n_units)
    done: set[int] = set()
    small = [g for g in cg.groups if g.id in groups and g.size <= ABLATION_MAX_UNITS]
    if not small:
        return scores, done
    with Session(model, what="model for ablation") as s:
        base = [s.run(f) for f in feeds]
    for g in small:
        for u in g.units.tolist():
            with Session(trial_model([u]), what="ablation trial") as s:
                scores[u] = error(base, [s.run(f) for f in feeds])
        done.add(g.id)
    return scores, done


def unit_scores(cg: ChannelGroups, kind: str, model: onnx.ModelProto | None, feeds: FeedSet | None,
                groups: set[int], progress=None, stats: dict | None = None) -> tuple[np.ndarray, str]:
    """Scores per unit and the importance actually used (``auto``: recon with data, else l2)."""
    if kind == "auto":
        kind = "recon" if feeds is not None else "l2"
    if kind in ("act", "recon"):
        if feeds is None or model is None:
            log.warning("importance %s needs calibration data; using l2 weight norms", kind)
            return weight_scores(cg, "l2"), "l2"
        if stats is None:
            stats = activation_stats(model, cg, feeds, groups, progress)
        scores = activation_scores(cg, stats, kind)
        # groups no consumer weight reaches (no activation term): fall back to weight norms
        fallback = weight_scores(cg, "l2")
        covered = np.zeros(int(cg.unit_group.max()) + 1 if cg.n_units else 0, dtype=bool)
        covered[cg.unit_group[scores > 0]] = True
        return np.where(covered[cg.unit_group], scores, fallback), kind
    return weight_scores(cg, kind), kind
