"""Mixed bit-widths from the measured sensitivity of the user's model (``cluster{target_error=...}``).

Every clustered tensor t gets a level l_t from the ladder  b0 -> b0 + 1 -> b0 + 2 (-> 4) -> 8 -> float  (b0: the pass's ``bits``, or
more where ``max_error`` already raised it; a product-quantized table: v<d> -> v<d'> (shorter blocks) .. -> 8 -> float), each level with its bytes on disk B_t(l) (the planned storage) and its
measured effect on the model: e_t(l) = relative output error (``onnxcompress.output_error``) of the model with t
alone at level l and every other tensor float, on a few calibration feeds. The model's error with every tensor at
its level is predicted additively, E = sum_t e_t(l_t) (small, independent perturbations; it is verified below).

Greedy allocation: while E > target, move the tensor with the largest e_t(l_t) / (B_t(next) - B_t(l_t)) — the most
error per extra byte — one rung up (its next level is clustered and measured only then: lazily). With a byte ``budget``
(``size_budget``: bits per weight, all-in) only the upgrades that still fit are made. When E <= target (or no
upgrade fits) the model with all levels together is measured; if its error E* is still above the target, the working target is
scaled by target / E* and the greedy continues (at most ``ROUNDS`` times). The result is reported as measured.

All trials run in ONE onnxruntime session: the clustered tensors are made overridable initializers (also graph
inputs), and each trial feeds the snapped values of the tensors it changes — bit-exactly what the decode subgraph
computes (``storage``), without building a model per trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress.output_error import relative_output_error

log = logging.getLogger(__name__)

ROUNDS = 4
FLOAT = 32  # the "level" of a tensor left float


def ladder(b0: int) -> list[int]:
    """Levels from b0 up, in order: b0 + 1, b0 + 2 (capped at 8), 4 (from a 1-bit base), 8, then float."""
    out = [b0]
    for b in (min(b0 + 1, 8), min(b0 + 2, 8), 4, 8, FLOAT):
        if b > out[-1]:
            out.append(b)
    return out


@dataclass
class Trials:
    """One ORT session of the model with the tensors ``names`` overridable; ``error(over)`` runs the feeds with the
    arrays in ``over`` (name -> values) in place of those tensors."""

    model: onnx.ModelProto
    names: list[str]
    feeds: list[dict]
    base: list[list[np.ndarray]] = field(default_factory=list)
    runs: int = 0

    def __post_init__(self) -> None:
        from onnxcompress.runtime import Session

        inits = {i.name: i for i in self.model.graph.initializer}
        have = {i.name for i in self.model.graph.input}
        for n in self.names:
            if n in inits and n not in have:
                t = inits[n]
                self.model.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
        self.session = Session(self.model, what="model for cluster sensitivity")
        self.inputs = set(self.session.input_names)
        self.base = [self._run(f, {}) for f in self.feeds]

    def _run(self, feed: dict, over: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return self.session.sess.run(None, {**{k: v for k, v in feed.items() if k in self.inputs}, **over})

    def error(self, over: dict[str, np.ndarray]) -> float:
        return relative_output_error(self.base, [self._run(f, over) for f in self.feeds])

    def close(self) -> None:
        self.session.close()


def allocate(trials: Trials, levels: dict[str, dict], make_level, target: float | None, budget: int | None = None,
             rungs: dict[str, list] | None = None) -> tuple[dict[str, int | str], dict]:
    """Choose a level per tensor. ``levels[name][level] = (bytes, snapped values or None for float)`` holds the
    levels known so far (at least the first); ``make_level(name, level)`` clusters a tensor at a new level and returns
    (bytes, snapped). ``rungs[name]``: the tensor's ladder, first level first (default ``ladder`` of its smallest
    bits; a product-quantized table's levels are "v<d>" strings). ``budget``: bytes the tensors may take in all;
    only upgrades that fit are made (without a ``target``: until none fits). Returns ({name: level}, stats)."""
    rungs = rungs or {name: ladder(min(lv)) for name, lv in levels.items()}
    err: dict[str, dict] = {}
    for name, lv in levels.items():
        b0 = rungs[name][0]
        err[name] = {b0: trials.error({name: lv[b0][1]})}
    cur = {name: rungs[name][0] for name in levels}
    work, measured, rounds = (0.0 if target is None else target), None, 0
    spent = sum(levels[n][b][0] for n, b in cur.items())
    while True:
        while sum(err[n][cur[n]] for n in cur) > work:
            best, best_gain = None, -1.0
            for n, b in cur.items():
                rung = rungs[n]
                nxt = rung[rung.index(b) + 1] if b != FLOAT else None
                if nxt is None or err[n][b] <= 0:
                    continue
                if nxt not in levels[n]:
                    levels[n][nxt] = make_level(n, nxt)
                extra = max(levels[n][nxt][0] - levels[n][b][0], 1)
                if budget is not None and spent + extra > budget:
                    continue
                gain = err[n][b] / extra
                if gain > best_gain:
                    best, best_gain = (n, nxt), gain
            if best is None:
                break
            n, nxt = best
            spent += levels[n][nxt][0] - levels[n][cur[n]][0]
            cur[n] = nxt
            if nxt not in err[n]:
                err[n][nxt] = 0.0 if nxt == FLOAT else trials.error({n: levels[n][nxt][1]})
        measured = trials.error({n: levels[n][b][1] for n, b in cur.items() if b != FLOAT})
        rounds += 1
        predicted = sum(err[n][cur[n]] for n in cur)
        log.info("cluster allocation round %d: predicted %.3g, measured %.3g, target %s", rounds, predicted,
                 measured, "none (a size)" if target is None else f"{target:.3g}")
        if target is None or measured <= target or rounds >= ROUNDS or all(b == FLOAT for b in cur.values()):
            break
        work = min(work, predicted) * target / measured
    stats = {"target_error": target, "output_error": measured, "bytes_allocated": spent, "allocation_rounds": rounds,
             "trial_runs": trials.runs, "floats_kept": sum(b == FLOAT for b in cur.values())}
    return cur, stats
