"""``allocation=sensitivity``: each layer's sparsity from its measured output-error curve.

Curve: layer l alone is pruned at each of ``levels`` (its mask from the pass's own scores, no OBS update) and the
model is run under ORT on a few calibration feeds; its error is the relative squared error of all outputs against
the unpruned model, e_l(s) = Σ_feeds Σ_outputs ||y_s - y||² / Σ ||y||² (e_l(0) = 0; linear between the measured
levels). ``error=channel`` instead averages the relative error of every output channel (axis 1 of an output of rank
>= 3; a lower-rank output is one channel), e_l(s) = mean_c Σ ||y_s,c - y_c||² / Σ ||y_c||²: an output that packs
quantities of very different scale (a YOLO head [1, 4 + K, A]: box coordinates in pixels next to class scores in
[0, 1], the scores 4e-8 of nudenet's output energy) is then not judged by its largest quantity alone. ``auto``
picks ``channel`` when, on the trial feeds' unpruned outputs, some float output of rank >= 3 has channels whose
energies Σ y_c² differ by more than ``SPREAD`` (1e4: amplitudes 100x apart; measured spreads: nudenet 7e13, ddddocr_det
20, PP-OCRv4 rec 1.15, silero_vad state 1), else ``output``.

Allocation: minimise Σ_l e_l(s_l) subject to Σ_l n_l s_l = S · Σ_l n_l (n_l: the layer's elements, S the target
sparsity). For a price λ each layer takes the s on a fine grid (0.01 steps up to the largest level) that minimises
e_l(s) - λ · s · n_l / N; λ is bisected until the layers' zeros reach the budget, and the last elements are spread
over the layers in proportion to their size, so the total is exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxcompress.runtime import Session, staged

log = logging.getLogger(__name__)


ERRORS = ("auto", "output", "channel")
#: per-channel energy ratio above which ``auto`` judges an output by its channels
SPREAD = 1e4


def channel_spread(base: list[list[np.ndarray]]) -> float:
    """The largest max / min ratio of per-channel (axis 1) output energy over the feeds, over the float outputs of
    rank >= 3 with one shape on every feed (1.0 when there is none); zero-energy channels are left out."""
    worst = 1.0
    for o in range(len(base[0]) if base else 0):
        ys = [np.asarray(ref[o]) for ref in base]
        if ys[0].dtype.kind != "f" or ys[0].ndim < 3 or any(y.shape != ys[0].shape for y in ys):
            continue
        energy = sum(np.sum(np.square(y.astype(np.float64)), axis=tuple(i for i in range(y.ndim) if i != 1))
                     for y in ys)
        live = energy[energy > 0]
        if live.size > 1:
            worst = max(worst, float(live.max() / live.min()))
    return worst


def output_error(sess: Session, feeds: list[dict], base: list[list[np.ndarray]], error: str = "output") -> float:
    """Relative squared error of the session's outputs against ``base`` over ``feeds``: pooled over every output
    (``output``) or the mean of the per-channel relative errors (``channel``, see the module docstring)."""
    num: dict[int, np.ndarray] = {}
    den: dict[int, np.ndarray] = {}
    for feed, ref in zip(feeds, base, strict=True):
        for o, (a, b) in enumerate(zip(ref, sess.run(feed), strict=True)):
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b, dtype=np.float64)
            if a.shape != b.shape or a.dtype.kind not in "fc":
                continue
            axes = tuple(i for i in range(a.ndim) if i != 1) if error == "channel" and a.ndim >= 3 else None
            n, d = np.sum(np.square(b - a), axis=axes), np.sum(np.square(a), axis=axes)
            num[o] = num.get(o, 0.0) + np.atleast_1d(n)
            den[o] = den.get(o, 0.0) + np.atleast_1d(d)
    if not num:
        return 0.0
    nums, dens = np.concatenate(list(num.values())), np.concatenate(list(den.values()))
    if error == "channel":
        live = dens > 0
        return float(np.mean(nums[live] / dens[live])) if live.any() else float(nums.sum())
    total = float(dens.sum())
    return float(nums.sum()) / total if total > 0 else float(nums.sum())


def measure_curves(model: onnx.ModelProto, names: list[str], zeroed_at: list, levels: tuple[float, ...],
                   feeds: list[dict], error: str = "output", info: dict | None = None) -> np.ndarray:
    """e[l, j]: the output error with tensor ``names[l]`` replaced by ``zeroed_at[l]()(levels[j])`` (a dense array),
    every other weight untouched. ``model`` is the current graph exported (weights as initializers, or references
    to memory-mapped files). ``zeroed_at[l]`` is called once, when layer l is measured, and its result dropped
    after: the caller can build a layer's state there, so memory holds one layer's state at a time. The model is
    staged once; each trial session gets the pruned array as an initializer override. Every session runs without
    graph optimisation (the base too, so the errors compare like with like): ORT's optimisations fold or fuse
    initializers (a Conv weight with a following BatchNorm) before an override applies, which would silently
    ignore it; unoptimised sessions also skip weight pre-packing (no second copy of the weights). ``error``: see
    the module docstring; ``info`` (a dict) receives the error used and the outputs' channel energy spread."""
    initializers = {t.name for t in model.graph.initializer}
    curves = np.zeros((len(names), len(levels)))
    with staged(model) as source:
        with Session(source, what="model for sensitivity", light=True) as s:
            base = [s.run(f) for f in feeds]
        spread = channel_spread(base)
        if error == "auto":
            error = "channel" if spread > SPREAD else "output"
        if info is not None:
            info.update(error=error, channel_energy_spread=float(f"{spread:.3g}"))
        for li, name in enumerate(names):
            if name not in initializers:
                curves[li] = np.inf
                continue
            zeroed = zeroed_at[li]()
            for j, level in enumerate(levels):
                with Session(source, what="sensitivity trial", light=True,
                             overrides={name: zeroed(level)}) as s:
                    curves[li, j] = output_error(s, feeds, base, error)
            del zeroed
    return curves


def allocate(curves: np.ndarray, levels: tuple[float, ...], sizes: list[int], sparsity: float) -> list[int]:
    """Zero counts per layer (summing to round(sparsity · Σ sizes)) that minimise the summed curve errors."""
    n = np.asarray(sizes, dtype=np.float64)
    total = float(n.sum())
    k = int(round(sparsity * total))
    top = max(levels)
    grid = np.round(np.arange(0.0, top + 1e-9, 0.01), 4)
    xs = np.concatenate([[0.0], np.asarray(levels, dtype=np.float64)])
    err = np.stack([np.interp(grid, xs, np.concatenate([[0.0], np.maximum(c, 0.0)])) for c in curves])
    if k >= top * total:
        return [int(round(top * x)) for x in n]

    def pick(lam: float) -> np.ndarray:
        cost = err - lam * grid[None, :] * (n[:, None] / total)
        return grid[np.argmin(cost, axis=1)]

    lo, hi = 0.0, 1.0
    while (pick(hi) * n).sum() < k and hi < 1e12:
        hi *= 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (pick(mid) * n).sum() >= k:
            hi = mid
        else:
            lo = mid
    s = pick(hi)
    counts = np.floor(s * n).astype(np.int64)
    cap = np.floor(top * n).astype(np.int64)
    diff = k - int(counts.sum())
    # spread the rest (or the excess) in proportion to size, within [0, cap]
    while diff != 0:
        room = (cap - counts) if diff > 0 else counts
        if room.sum() == 0:
            break
        share = np.floor(abs(diff) * room / room.sum()).astype(np.int64)
        if share.sum() == 0:
            share[np.argmax(room)] = 1
        share = np.minimum(share, room)
        counts += share if diff > 0 else -share
        diff = k - int(counts.sum())
    log.debug("sensitivity allocation: %s", np.round(counts / n, 3).tolist())
    return [int(c) for c in counts]
