"""``prune-layers``: remove whole residual blocks, transformer layers, plain stages and no-op layers.

Units come from the removable-unit analysis (``onnxcompress.analyses.blocks``): each is a pair (entry x, exit y)
of equal shape, removed by the bypass y := x; the nodes that die with it go, and their weights with them.

1. No-op layers (kind ``noop``: identity Conv/Gemm/MatMul, inverse Transposes, Reshape round trips, zero Pad, same
   type Cast, x*1, x+0) are bypassed first: exact, and not counted in the budget.
2. Greedy removal, one unit per step. At each step the units of the current model are found again (a removal
   changes what is left: nested and overlapping units disappear), pre-ranked by block influence (1 - cos(x, y),
   ShortGPT), and the ``trials`` lowest are each bypassed alone and measured under ORT: the relative output error
   against the model the pass received, on ``samples`` calibration feeds (batched along the batch axis where the
   model allows). The unit whose removal changes the outputs least goes; the next step measures again on the
   model without it (removals interact).
3. Budgets: ``layers=k`` units, ``ratio`` of the units (rounded), ``target_latency`` (remove until the measured ORT
   latency, through ``ctx.latency``, is <= target x the input's), ``min_fidelity`` (never let the worst output's
   cosine against the input model drop below it; alone it removes while that holds, with another budget it is a
   floor). Removing every unit is refused: a budget that needs it is a ``BadInputError`` naming the maximum.
   ``rank``: with a latency budget (``auto``) a step takes the unit with the least added error per MAC it removes,
   (e(S + u) - e(S)) / max(MACs(u) / MACs(model), 1e-4) (the knapsack greedy: units differ 100x in cost, and the
   least-error unit is often one that buys no time); otherwise the least error e(S + u). The pre-rank by block
   influence is divided by the same MAC share.
4. The chosen bypasses are applied to the graph and dead code is dropped (the removed units' weights are not in
   the file). Every entry tensor x that now feeds a bypassed unit's consumers is recorded in ``ctx.channel_map``
   with all its positions kept, so ``distill`` after this pass sees the layers after a removed unit as changed and
   refits them to the teacher (its residual targets absorb what the removed unit added).

Stats: every unit (kind, role, entry, exit, nodes, params, block influence, measured error alone), the steps
(unit removed, error and cosine after it, latency ratio when measured, trials, seconds), what was removed, and the
candidates not removable with their reasons.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import io
from onnxcompress.analyses.blocks import (
    KINDS,
    RemovableUnits,
    RemovableUnitsAnalysis,
    Unit,
    element_types,
    find_units,
)
from onnxcompress.analyses.blocks_graph import bypass_graph, bypass_model
from onnxcompress.context import PassContext
from onnxcompress.errors import BadInputError, PassError
from onnxcompress.output_cosine import worst_cosine
from onnxcompress.output_error import relative_output_error as output_error
from onnxcompress.pass_base import Pass, PassResult, option, register

from .trials import batch_feeds, block_influence, latency_ratio, run_outputs

log = logging.getLogger(__name__)

RANKS = ("auto", "error", "per_mac")
#: a unit's MAC share is floored at this (a unit of pooling / activations only is ranked by a tiny share, not 0)
MIN_MAC_SHARE = 1e-4


@register
@dataclass(frozen=True)
class PruneLayers(Pass):
    name: ClassVar[str] = "prune-layers"
    description: ClassVar[str] = ("remove whole residual blocks / transformer layers / stages whose bypass changes "
                                  "the outputs least on calibration data (greedy, re-measured), and no-op layers; "
                                  "follow with distill")
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})
    preserves: ClassVar[frozenset[str]] = frozenset()

    layers: int = option(0, "number of units to remove (0: none, only no-op layers)")
    ratio: float = option(0.0, "fraction of the candidate units to remove (rounded)", search=(0.05, 0.5, 0.05))
    target_latency: float | None = option(None, "remove units until the measured ORT latency is <= this fraction "
                                                "of the input model's (recorded in the latency profile)")
    min_fidelity: float | None = option(None, "floor on the worst output's cosine against the input model: alone, "
                                              "remove units while it holds; with another budget, stop before it "
                                              "breaks")
    kinds: tuple[str, ...] = option(("residual", "transformer", "stage", "noop"),
                                    "unit kinds that may go: residual, transformer, attention, ffn (sub-blocks of "
                                    "a transformer layer), stage, noop")
    exclude: tuple[str, ...] = option((), "units to keep: glob patterns on entry/exit tensor or node names")
    samples: int = option(16, "calibration feeds each trial is measured on")
    trials: int = option(12, "candidates measured per step (lowest block influence first); 0 = all")
    rank: str = option("auto", "what a step minimises: error (output change), per_mac (output change per MAC the "
                               "unit removes), auto (per_mac with target_latency, else error)")

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise ValueError(f"target_latency must be in (0, 1], got {self.target_latency}")
        if self.min_fidelity is not None and not 0.0 < self.min_fidelity <= 1.0:
            raise ValueError(f"min_fidelity must be in (0, 1], got {self.min_fidelity}")
        if sum([self.layers > 0, self.ratio > 0, self.target_latency is not None]) > 1:
            raise ValueError("give one of layers, ratio, target_latency (min_fidelity may go with any)")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kinds {bad}; known: {', '.join(KINDS)}")
        if self.samples < 1 or self.trials < 0:
            raise ValueError("samples must be >= 1 and trials >= 0")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")

    def needs_calibration(self) -> bool:
        return self._budgeted()

    def _budgeted(self) -> bool:
        return self.layers > 0 or self.ratio > 0 or self.target_latency is not None or self.min_fidelity is not None

    # ------------------------------------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ru: RemovableUnits = ctx.analysis(RemovableUnitsAnalysis, graph)
        stats: dict = {"units": [_describe(u) for u in ru.units],
                       "not_removable": _reasons(ru), "noops_removed": [], "removed": [], "steps": []}
        noops = [u for u in ru.units if u.kind == "noop" and "noop" in self.kinds and not self._excluded(u)]
        if noops:
            bypass_graph(graph, [(u.entry, u.exit) for u in noops])
            stats["noops_removed"] = [f"{u.role}: {u.entry} -> {u.exit}" for u in noops]
        cands = self._candidates(ru)
        stats["candidates"] = len(cands)
        if not self._budgeted():
            stats["skipped"] = "no budget given (layers, ratio, target_latency, min_fidelity): only no-op layers go"
            return PassResult(bool(noops), stats)
        if not cands:
            stats["skipped"] = ("no removable unit of kinds " + ",".join(self.kinds) + " ("
                            + (", ".join(f"{k}: {v}" for k, v in stats["not_removable"].items()) or "none found")
                            + "): model unchanged")
            log.info("prune-layers: %s", stats["skipped"])
            return PassResult(bool(noops), stats)
        found = Counter(u.kind for u in ru.units if u.kind != "noop" and u.kind in self.kinds)
        n_all = sum(found.values())
        k_max = min(len(cands), n_all - 1)  # excluded units stay, so all candidates may go when there are some
        want = self.layers or (round(self.ratio * len(cands)) if self.ratio else None)
        if want is not None and want > k_max:
            raise BadInputError(f"prune-layers: removing {want} units would remove every unit; the model has "
                                f"{n_all} removable unit{'s' if n_all != 1 else ''} ("
                                + ", ".join(f"{c} {k}" for k, c in sorted(found.items()))
                                + f"; {len(cands)} not excluded): at most {k_max}")
        if ctx.calibration is None:
            raise PassError("prune-layers: measuring units needs calibration data (--calib)")
        removed = self._greedy(graph, ctx, want, k_max, stats)
        if not removed:
            return PassResult(bool(noops), stats)
        bypass_graph(graph, removed)
        _record_changed(ctx, ctx.export(graph), ctx.calibration.first(), [e for e, _ in removed])
        stats["params_removed"] = int(sum(s["params"] for s in stats["steps"]))
        return PassResult(True, stats)

    def _excluded(self, u: Unit) -> bool:
        names = [u.entry, u.exit, *u.nodes]
        return any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in names)

    def _candidates(self, ru: RemovableUnits) -> list[Unit]:
        return [u for u in ru.units if u.kind != "noop" and u.kind in self.kinds and not self._excluded(u)]

    def _greedy(self, graph: gs.Graph, ctx: PassContext, want: int | None, k_max: int, stats: dict
                ) -> list[tuple[str, str]]:
        model = ctx.export(graph)
        feeds = list(ctx.calibration.take(self.samples))
        batches = batch_feeds(feeds, model)
        base = run_outputs(model, batches)
        lat_feed = feeds[0]
        if self.target_latency is not None:
            floor = latency_ratio(ctx.latency, model, bypass_model(model, [(u.entry, u.exit) for u in
                                                                           self._candidates(_units(model, feeds[0]))]),
                                  lat_feed)
            stats["latency_all_removed"] = floor
            if floor > self.target_latency:
                raise BadInputError(f"prune-layers: target_latency={self.target_latency} is below what removing "
                                    f"every unit reaches ({floor:.3f} of the input's latency, measured)")
        per_mac = self.rank == "per_mac" or (self.rank == "auto" and self.target_latency is not None)
        total_macs = unit_mac_shares(model, [], feeds[0], None) if per_mac else None
        stats["rank"] = "per_mac" if per_mac else "error"
        first = {}
        prev_err = 0.0
        removed: list[tuple[str, str]] = []
        current = model
        while want is None or len(removed) < want:
            t0 = time.perf_counter()
            cands = self._candidates(_units(current, feeds[0]))
            if not cands or (want is None and len(removed) >= k_max):
                stats["stopped"] = "no candidate left" if not cands else f"at most {k_max} of the units may go"
                break
            bi = block_influence(current, [(u.entry, u.exit) for u in cands], batches[:2])
            share = (unit_mac_shares(current, cands, feeds[0], total_macs) if per_mac
                     else np.ones(len(cands)))
            order = np.argsort(np.asarray(bi) / share, kind="stable")
            measured = order[: self.trials] if self.trials else order
            best = None
            for j in measured.tolist():
                u = cands[j]
                outs = run_outputs(bypass_model(current, [(u.entry, u.exit)]), batches)
                err, cos = output_error(base, outs), worst_cosine(base, outs)
                if not removed:
                    first[(u.kind, u.entry, u.exit)] = (bi[j], err, cos)
                cost = (err - prev_err) / share[j]  # per_mac: the error this removal adds, per MAC share
                cost = cost if np.isfinite(cost) else np.inf  # a non-finite output is the worst, never kept
                if best is None or cost < best[4]:
                    best = (u, err, cos, share[j], cost)
            u, err, cos, sh, _ = best
            prev_err = err
            if self.min_fidelity is not None and cos < self.min_fidelity:
                stats["stopped"] = f"the next removal ({u.kind} {u.exit}) gives cosine {cos:.4f} < min_fidelity"
                break
            current = bypass_model(current, [(u.entry, u.exit)])
            removed.append((u.entry, u.exit))
            step = {"kind": u.kind, "role": u.role, "entry": u.entry, "exit": u.exit, "nodes": len(u.nodes),
                    "params": u.params, "error": round(err, 6), "cosine": round(cos, 6),
                    "trials": int(len(measured)), "candidates": len(cands)}
            if per_mac:
                step["mac_share"] = round(float(sh), 6)
            if self.target_latency is not None:
                step["latency_ratio"] = latency_ratio(ctx.latency, model, current, lat_feed)
            step["seconds"] = round(time.perf_counter() - t0, 2)
            stats["steps"].append(step)
            log.info("prune-layers: step %d removes %s %s (error %.4g, cosine %.4f)", len(removed), u.kind, u.exit,
                     err, cos)
            if self.target_latency is not None and step["latency_ratio"] <= self.target_latency:
                break
        else:
            stats["stopped"] = f"budget of {want} units reached"
        if self.target_latency is not None and (not stats["steps"] or
                                                stats["steps"][-1].get("latency_ratio", 1.0) > self.target_latency):
            raise BadInputError(f"prune-layers: target_latency={self.target_latency} not reached with {len(removed)} "
                                f"of {k_max + 1} units removed (at most {k_max} may go): reached "
                                f"{stats['steps'][-1]['latency_ratio'] if stats['steps'] else 1.0}")
        for d in stats["units"]:
            m = first.get((d["kind"], d["entry"], d["exit"]))
            if m is not None:
                d["block_influence"], d["error_alone"], d["cosine_alone"] = (round(m[0], 6), round(m[1], 6),
                                                                             round(m[2], 6))
        stats["removed"] = [f"{s['kind']}: {s['entry']} -> {s['exit']}" for s in stats["steps"]]
        return removed


def unit_mac_shares(model, units: list[Unit], feed: dict, total: float | None) -> np.ndarray | float:
    """Each unit's MACs (its nodes' sum at ``feed``'s shapes) over ``total`` (the input model's MACs), floored at
    ``MIN_MAC_SHARE``; with ``total=None`` the model's own MAC total."""
    from onnxcompress.analyses.macs import count_macs

    mc = count_macs(model, {k: tuple(v.shape) for k, v in feed.items()}, feed)
    if total is None:
        return float(max(mc.total, 1))
    macs = np.array([sum(mc.by_node.get(n, 0) for n in u.nodes) for u in units], dtype=np.float64)
    return np.maximum(macs / total, MIN_MAC_SHARE)


def _units(model, feed: dict) -> RemovableUnits:
    """The removable units of a ModelProto at the shapes of ``feed``."""
    from onnxcompress.analyses.channel_groups import static_shapes
    from onnxcompress.data import feed_shapes

    g = io.to_graph(model)
    return find_units(g, static_shapes(model, feed_shapes(feed), feed), element_types(model))


def _describe(u: Unit) -> dict:
    return {"id": u.id, "kind": u.kind, "role": u.role, "entry": u.entry, "exit": u.exit, "nodes": len(u.nodes),
            "params": u.params, "parent": u.parent}


def _reasons(ru: RemovableUnits) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in ru.rejected:
        key = f"{r['kind']}: {r['reason']}"
        out[key] = out.get(key, 0) + 1
    return out


def _record_changed(ctx: PassContext, model, feed: dict, entries: list[str]) -> None:
    """Record every bypass entry with all its positions kept (``ChannelMap``): distill then treats the layers
    reading it as changed (their input is no longer what the teacher's layer reads)."""
    from onnxcompress.analyses.channel_groups import static_shapes
    from onnxcompress.data import feed_shapes

    shapes = static_shapes(model, feed_shapes(feed), feed)
    for name in dict.fromkeys(entries):
        prev = ctx.channel_map.positions.get(name, {})
        if prev:
            ctx.channel_map.record({name: {a: np.arange(len(v)) for a, v in prev.items()}})
            continue
        shape = shapes.get(name)
        if not shape:
            continue
        axis = 1 if len(shape) == 4 else len(shape) - 1
        if isinstance(shape[axis], int) and shape[axis] > 0:
            ctx.channel_map.record({name: {axis: np.arange(shape[axis])}})
