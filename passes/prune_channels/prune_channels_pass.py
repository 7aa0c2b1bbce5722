"""``prune-channels``: structured pruning — remove whole channels, neurons or attention heads.

The channel-group analysis (``onnxcompress.analyses.channel_groups``) says which channels of which tensors go
together; this pass scores every removable unit (``importance``: l1/l2 of all coupled weights, BN scale, mean
|activation|, or the reconstruction error E[x_c^2]·||W[:,c]||^2 on calibration data), decides how many units each
group keeps (``allocation``: a uniform ratio, one global threshold, or a sensitivity-driven MAC budget with a per-group
floor and ``round_to``), and physically slices every coupled tensor: producer weights and biases, BatchNorm
statistics, per-channel constants, consumer weights, Concat/Split sizes, Slice ranges, Reshape/Expand/Resize
targets and depthwise ``group`` attributes. The result is a smaller dense graph ORT runs as is — no masks.

Pruning a set of units gives exactly the outputs of the original with the same channels' weights zeroed
(``ChannelGroups.zeroed_model``); the loss of accuracy comes from the channels themselves. Follow with ``distill``,
which refits the layers after each cut on calibration data against the original model.

Latency: ORT runs a Conv in its blocked NCHWc layout only when channel counts are multiples of the block (16 with
AVX-512), so ``round_to=0`` (default) rounds Conv channel groups to 16. MACs still miss the memory-bound ops
(activations, pooling, reorders: ~60% of ppocr_cls's profiled time); ``target_latency=X`` budgets a latency model
fitted to one ORT profile of the model (``latency_model``; taken through ``ctx.latency``, so a recorded profile
replays the same cut) instead of, or with, ``target_macs``.

Fidelity floor: ``min_fidelity=X`` searches the cut instead of taking a budget (``fidelity_floor``): the deepest
cut whose worst output cosine against the input model, on held-out calibration feeds under ORT, stays >= X (alone:
down to the per-group floors; with ``target_macs`` / ``target_latency``: toward that budget, stopping before the
floor breaks). It is measured before any later ``distill`` (which raises it), so the floor is conservative.

Large cuts work better in steps, each followed by ``distill`` (the next step's scores and sensitivities then see the
refit model): ``prune-channels{target_macs=0.7},distill,prune-channels{target_macs=0.714},distill`` reaches 0.5x
(``target_macs`` is relative to the graph the pass receives).

Transformers: FFN neurons and attention heads are different kinds of unit (a head is 32 channels of Q, K, V and
the output projection). ``head_ratio`` budgets the heads apart from the other groups (``ratio`` then counts FFN
neurons / channels only), and with ``allocation=global`` or ``sensitivity`` each budget is counted over all layers
and spread where it costs least: on MiniLM-L3 (3 layers x 12 heads, 1536 FFN neurons), 11 of 36 heads and 30% of the
neurons by sensitivity gave embedding cosine 0.935 (0.969 after ``distill``) against 0.921 (0.961) for a uniform
4 heads and 34% of the neurons per layer (MiniLM-L6, 22 of 72 heads: 0.964 after ``distill`` against 0.930).
Sensitivity is measured one group at a time at ``sensitivity_ratios``. ``global`` compares scores normalised per group, so it cannot see that
one layer's heads matter less than another's (0.903 before distill there).

Names: every surviving tensor keeps its name (so ``distill`` can match student to teacher); a constant shared by
nodes that are cut differently is split into ``<name>_pruned`` copies. The kept positions of every cut tensor are
left in the context as its ``channel_map`` (a declared result).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups import ChannelGroups, ChannelGroupsAnalysis
from onnxcompress.context import PassContext
from onnxcompress.errors import BadInputError, PassError
from onnxcompress.graph_utils import bypass_constant_identities
from onnxcompress.pass_base import Pass, PassResult, option, register

from . import allocation as plan_mod
from . import fidelity_floor as floor_mod
from .importance import IMPORTANCES, ablation_scores, activation_stats, unit_scores
from .mean_compensation import apply_after, apply_before, bias_deltas
from .obs_importance import obs_scores
from .sensitivity import relative_error, removed_like_the_pass, sensitivity_curves

log = logging.getLogger(__name__)

ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")


@register
@dataclass(frozen=True)
class PruneChannels(Pass):
    name: ClassVar[str] = "prune-channels"
    description: ClassVar[str] = ("remove whole channels / neurons / attention heads by group importance; shrinks "
                                  "every coupled tensor (real MAC cut); follow with distill")
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})  # for target_latency only: see needs_calibration
    #: none: the cut changes tensor shapes, so channel groups, MACs and activation statistics are all stale
    preserves: ClassVar[frozenset[str]] = frozenset()

    ratio: float = option(0.0, "fraction of each group's channels to remove (uniform), or of all channels (global)")
    head_ratio: float | None = option(
        None, "fraction of the attention heads to remove (groups whose unit spans several channels); the ratio "
              "option then counts the other groups only (FFN neurons, channels); with allocation global / "
              "sensitivity each kind is budgeted alone")
    target_macs: float | None = option(None, "keep this fraction of the model's MACs (e.g. 0.5); overrides ratio",
                                       search=(0.3, 0.95, 0.05))
    target_latency: float | None = option(
        None, "keep this fraction of the estimated latency (a cost model fitted to one ORT profile: MAC kernels + "
              "memory-bound ops; replayed from --latency-profile); with target_macs both must hold; needs "
              "calibration data")
    importance: str = option(
        "auto", "auto (recon with data, else l2), l1, l2, bn, act (mean |x|), recon (E[x^2]*||W[:,c]||^2), obs "
                "(error after optimal refit of the consumers, structured OBS), ablation (measured output error "
                "per unit for groups of <= 64 units, recon otherwise)")
    allocation: str = option("auto", "auto (sensitivity for target_macs with data, else global; uniform for "
                                     "ratio), uniform, global, sensitivity")
    min_keep: float = option(0.25, "per-group floor: keep at least this fraction of every group")
    round_to: int = option(0, "kept channel counts are multiples of this (SIMD-friendly); groups not larger are "
                              "left alone; 0 = auto: 16 for groups made by Conv/ConvTranspose (ORT's NCHWc "
                              "blocks), 1 for the rest")
    exclude: tuple[str, ...] = option((), "groups to leave alone: glob patterns on node/tensor/weight names, or "
                                          "group ids")
    samples: int = option(32, "calibration feeds used for activation-based importance")
    sensitivity_samples: int = option(8, "calibration feeds used per sensitivity trial")
    sensitivity_ratios: tuple[float, ...] = option((0.25, 0.5, 0.75), "ratios each group is pruned at alone to "
                                                                      "measure its sensitivity")
    compensate: bool = option(True, "move the calibration mean of removed channels into the consumers' biases "
                                    "(needs data)")
    verify: bool = option(True, "run the pruned model once under ORT before returning")
    min_fidelity: float | None = option(
        None, "floor on the worst output's cosine against the input model, measured under ORT on held-out "
              "calibration feeds before any later distill (which raises it again: the floor is conservative); "
              "alone: the deepest cut (most MACs removed) that keeps it; with target_macs / target_latency: cut "
              "toward that budget and stop before the floor breaks; needs calibration data")
    fidelity_samples: int = option(32, "held-out calibration feeds min_fidelity is measured on (after the ones "
                                       "that score the channels; the worst feeds dominate: measure many)")
    fidelity_steps: int = option(6, "bisection steps of the min_fidelity search (each measures one trial cut)")
    fidelity_confidence: float = option(
        0.0, "0: min_fidelity must hold on the held-out feeds as measured; c in (0, 1): on the one-sided c lower "
             "bound of the worst cosine (bootstrap over those feeds), a margin for data not seen")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise ValueError(f"head_ratio must be in [0, 1), got {self.head_ratio}")
        if self.head_ratio is not None and (self.target_macs is not None or self.target_latency is not None):
            raise ValueError("head_ratio goes with ratio, not with target_macs / target_latency")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"target_macs must be in (0, 1], got {self.target_macs}")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise ValueError(f"target_latency must be in (0, 1], got {self.target_latency}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.round_to < 0:
            raise ValueError(f"round_to must be >= 0 (0: auto), got {self.round_to}")
        if self.samples < 1 or self.sensitivity_samples < 1:
            raise ValueError("samples and sensitivity_samples must be >= 1")
        if not self.sensitivity_ratios or any(not 0.0 < r < 1.0 for r in self.sensitivity_ratios):
            raise ValueError("sensitivity_ratios must be in (0, 1)")
        if self.allocation == "uniform" and (self.target_macs is not None or self.target_latency is not None
                                             or self.min_fidelity is not None):
            raise ValueError("allocation=uniform takes ratio, not target_macs / target_latency / min_fidelity")
        if self.min_fidelity is not None:
            if not 0.0 < self.min_fidelity <= 1.0:
                raise ValueError(f"min_fidelity must be in (0, 1] (a cosine), got {self.min_fidelity}")
            if self.ratio or self.head_ratio is not None:
                raise ValueError("min_fidelity goes alone or with target_macs / target_latency, not with ratio / "
                                 "head_ratio")
        if not 0.0 <= self.fidelity_confidence < 1.0:
            raise ValueError(f"fidelity_confidence must be in [0, 1), got {self.fidelity_confidence}")
        if self.fidelity_samples < 1 or self.fidelity_steps < 1:
            raise ValueError("fidelity_samples and fidelity_steps must be >= 1")

    def needs_calibration(self) -> bool:
        """Only ``target_latency`` (one feed is profiled) and ``min_fidelity`` (cuts are measured) cannot run
        without data; the data-driven importances and allocations fall back to weight norms / ``global`` with a
        warning, and ``compensate`` is skipped."""
        return self.target_latency is not None or self.min_fidelity is not None

    # ------------------------------------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tied = bypass_constant_identities(graph)  # weights shared through Identity: one tensor, cut once
        if tied:
            ctx.invalidate()
        cg: ChannelGroups = ctx.analysis(ChannelGroupsAnalysis, graph)
        excluded = cg.group_of_name(self.exclude)
        candidates = [g.id for g in cg.groups if g.prunable and g.id not in excluded]
        reasons = Counter(_reason_key(g.reason) for g in cg.groups if not g.prunable and (g.members or g.producers))
        stats: dict = {
            "groups": len([g for g in cg.groups if g.members or g.producers]),
            "prunable_groups": len([g for g in cg.groups if g.prunable]),
            "excluded_groups": len(excluded),
            "not_prunable": dict(reasons.most_common(8)),
        }
        if tied:
            stats["constant_identities_bypassed"] = tied
        no_budget = (self.ratio == 0.0 and not self.head_ratio and self.target_macs in (None, 1.0)
                     and self.target_latency in (None, 1.0) and self.min_fidelity is None)
        if not candidates or no_budget:
            stats["pruned_groups"] = 0
            stats["skipped"] = ("no budget given (ratio, head_ratio, target_macs, target_latency): nothing to remove"
                                if no_budget else "no prunable channel group (see not_prunable)")
            return PassResult(bool(tied), stats, frozenset({"channel_groups"}))
        feeds = ctx.calibration
        if self.min_fidelity is not None and feeds is None:
            raise BadInputError("prune-channels: min_fidelity measures trial cuts and needs calibration data "
                                "(--calib)")
        model = ctx.export(graph)
        progress = getattr(ctx, "progress", None)
        base_kind = "recon" if self.importance in ("ablation", "obs") else self.importance
        act_stats = None
        if feeds is not None and (self.compensate or base_kind in ("auto", "act", "recon")):
            act_stats = activation_stats(model, cg, feeds.take(self.samples), set(candidates), progress)
        scores, used = unit_scores(cg, base_kind, model,
                                   feeds.take(self.samples) if feeds is not None else None, set(candidates),
                                   progress, act_stats)
        if self.importance == "obs" and feeds is not None:
            obs, done = obs_scores(cg, model, feeds.take(self.samples), set(candidates), self.min_keep,
                                   ctx.rng("prune-channels obs"), progress=progress)
            scores = np.where(np.isin(cg.unit_group, list(done)), obs, scores)
            used = "obs" if done else used
        if self.importance == "ablation" and feeds is not None:
            abl, done = ablation_scores(
                cg, model, list(feeds.take(self.sensitivity_samples)), set(candidates), relative_error,
                lambda units: removed_like_the_pass(cg, model, units, act_stats if self.compensate else None))
            in_done = np.isin(cg.unit_group, list(done))
            scores = np.where(in_done, abl, scores)
            used = "ablation" if done else used
        round_to = plan_mod.round_to_per_group(cg, candidates, graph, self.round_to)
        plans = plan_mod.make_plans(cg, candidates, scores, self.min_keep, round_to)
        allocation = self._allocation(feeds is not None)
        lat = self._latency_model(cg, model, ctx)
        held = None
        if self.min_fidelity is None:
            kept = self._allocate(cg, plans, allocation, model, ctx, act_stats, lat)
        else:
            kept, held = floor_mod.floor_cut(self, cg, plans, allocation, model, ctx, act_stats, lat, stats)
        removed = plan_mod.removal(cg, plans, kept)
        keep_el = cg.keep_elements(removed)
        if removed.size == 0:
            stats["pruned_groups"] = 0
            stats.setdefault("skipped", "no channel was removed: the budget was already met, or every prunable "
                                        "group is at its minimum (min_keep, round_to), or every removal was "
                                        "restored; a budget not met shows in the MACs column")
            return PassResult(False, stats, frozenset({"channel_groups"}))
        kept_positions = cg.kept_positions(removed)
        ctx.channel_map.record(kept_positions)
        pruned_groups = sorted({int(g) for g in cg.unit_group[removed]})
        later = {}
        deltas = {}
        if self.compensate and act_stats:
            deltas = bias_deltas(cg, act_stats, keep_el)
            later = apply_before(deltas)
        apply_stats = cg.apply(graph, removed)
        biases_added = apply_after(later, kept_positions) if later else 0
        graph.cleanup()
        stats.update({
            "importance": used,
            "allocation": allocation,
            "pruned_groups": len(pruned_groups),
            "units_removed": int(removed.size),
            "units_in_candidates": int(sum(p.n for p in plans)),
            "macs_ratio_estimate": round(cg.macs_after(keep_el) / cg.total_macs, 4) if cg.total_macs else 1.0,
            "params_removed": int(apply_stats["params_before"] - apply_stats["params_after"]),
            "constants_sliced": apply_stats["constants_sliced"] + apply_stats["constants_copied"],
            "kept_per_group": {str(g): int(kept[g]) for g in pruned_groups if g in kept},
            "biases_compensated": len(deltas),
            "biases_added": biases_added,
        })
        if lat is not None:
            full = lat.estimate(cg, np.ones(cg.n_elements, bool))
            stats["latency_ratio_estimate"] = round(lat.estimate(cg, keep_el) / full, 4) if full > 0 else 1.0
            stats["latency_model_mac_share"] = round(lat.share_of_macs, 3)
        if self.verify:
            _verify(graph, ctx)
        if held is not None:  # the floor on the cut graph itself (the trial computed the same outputs)
            stats["fidelity"] = round(floor_mod.measured_fidelity(ctx.export(graph), held), 6)
        log.info("prune-channels: removed %d units in %d groups, MACs x%.3f (estimate)", removed.size,
                 len(pruned_groups), stats["macs_ratio_estimate"])
        return PassResult(True, stats)

    def _allocation(self, have_data: bool) -> str:
        if self.allocation != "auto":
            if self.allocation == "sensitivity" and not have_data:
                log.warning("prune-channels: sensitivity allocation needs calibration data; using global")
                return "global"
            return self.allocation
        if self.target_macs is not None or self.target_latency is not None or self.min_fidelity is not None:
            return "sensitivity" if have_data else "global"
        return "uniform"

    def _allocate(self, cg: ChannelGroups, plans: list[plan_mod.GroupPlan], allocation: str, model, ctx,
                  act_stats: dict | None = None, lat=None) -> dict[int, int]:
        if self.head_ratio is not None:  # each kind on its own budget
            heads = {g.id for g in cg.groups if is_heads(g)}
            kept: dict[int, int] = {}
            for part, r in (([p for p in plans if p.gid in heads], self.head_ratio),
                            ([p for p in plans if p.gid not in heads], self.ratio)):
                if part:
                    kept |= self._allocate_ratio(cg, part, allocation, model, ctx, act_stats, lat, r)
            return kept
        return self._allocate_ratio(cg, plans, allocation, model, ctx, act_stats, lat, self.ratio)

    def _allocate_ratio(self, cg: ChannelGroups, plans: list[plan_mod.GroupPlan], allocation: str, model, ctx,
                        act_stats: dict | None, lat, ratio: float) -> dict[int, int]:
        if allocation == "uniform" or ratio == 0.0 and self.target_macs is None and lat is None:
            return plan_mod.uniform(plans, ratio)
        total_units = sum(p.n for p in plans)
        if self.target_macs is not None or lat is not None:
            meets = plan_mod.budget(cg, plans, lat, self.target_macs or 1.0, self.target_latency or 1.0)
        else:
            def meets(kept: dict[int, int]) -> bool:
                return sum(p.n - kept[p.gid] for p in plans) >= ratio * total_units

        if allocation == "global":
            return plan_mod.global_threshold(plans, meets)
        curves, saves = self.curves(cg, plans, model, ctx, act_stats, lat)
        return plan_mod.marginal(plans, curves, saves, meets)

    def curves(self, cg: ChannelGroups, plans: list[plan_mod.GroupPlan], model, ctx, act_stats: dict | None, lat):
        """Sensitivity curves and savings of every plan (measured once per run)."""
        feeds = list(ctx.calibration.take(self.sensitivity_samples))
        return sensitivity_curves(cg, plans, model, feeds, self.sensitivity_ratios,
                                  act_stats if self.compensate else None, lat,
                                  by_macs=self.target_macs is not None or self.min_fidelity is not None)

    def _latency_model(self, cg: ChannelGroups, model, ctx):
        if self.target_latency is None:
            return None
        if ctx.calibration is None:
            raise PassError("prune-channels: target_latency needs calibration data (one feed is profiled)")
        from .latency_model import fit

        return fit(model, cg, ctx.calibration.first(), profile=ctx.latency)


def is_heads(group) -> bool:
    """A group whose every unit spans several channels of its producer (attention heads: 12 units, 384 channels)."""
    return group.size > 0 and group.channels > group.size


def _reason_key(reason: str) -> str:
    """Group similar reasons for the stats ("reaches graph output X" -> "reaches graph output")."""
    for key in ("reaches graph output", "meets", "concatenated with", "is read inside a subgraph", "not understood"):
        if key in reason:
            return key if key != "meets" else "meets a tensor whose channels are fixed"
    return reason


def _verify(graph: gs.Graph, ctx: PassContext) -> None:
    from onnxcompress.analyses.channel_groups import random_feed
    from onnxcompress.data import model_inputs
    from onnxcompress.runtime import Session

    model = ctx.export(graph)
    feed = ctx.calibration.first() if ctx.calibration is not None else random_feed(
        model, {s.name: tuple(d if isinstance(d, int) else 1 for d in s.shape) for s in model_inputs(model)})
    try:
        with Session(model, optimize=False, what="pruned model") as s:
            s.run(feed)
    except Exception as exc:
        raise PassError(f"the pruned model does not run under onnxruntime: {exc}") from exc
