"""Exact 1-D (weighted) k-means, vectorised over rows: Lloyd's algorithm on sorted values with prefix sums.

Each row r (one tensor, or one output channel) holds values v_1 <= ... <= v_n (sorted once) with weights w_i > 0.
In one dimension the points nearest to a centroid form a contiguous run of the sorted values, whatever the weights
(w_i scales the cost w_i (v_i - c)^2 of every choice of c alike), so with sorted centroids c_1 <= ... <= c_k:

* assignment: segment j holds the values in [m_{j-1}, m_j), m_j = (c_j + c_{j+1}) / 2 — ``searchsorted`` of the
  midpoints in the sorted values, O(k log n) per row;
* update: c_j = sum_seg(w v) / sum_seg(w) from the prefix sums S_w, S_wv: O(k) per row.

One iteration is O(k log n) after the O(n log n) sort, for all rows at once (rows are moved to disjoint intervals,
row r onto [2r, 2r + 1], so one ``searchsorted`` over the flattened values answers every row). Lloyd stops when no
boundary moves (a fixed point: every value is nearest to its own centroid and every centroid is its segment's
weighted mean). A centroid whose segment is empty keeps its value and is unused.

A fixed centroid at 0 (``fixed_zero``: the tensor was pruned) never moves, so exact zeros stay exact zeros and
values nearer to 0 than to any other centroid join them.

Inits: ``linear`` (k values evenly spaced over [min, max]; TFMOT's measured best default: it keeps the rare large
weights their own centroids), ``density`` (the weighted quantiles (j + 1/2) / k of the values: centroids where the
weights are dense), ``kmeans++`` (D^2 sampling on at most 65536 values of the row, seeded).
"""

from __future__ import annotations

import numpy as np

INITS = ("linear", "density", "kmeans++")


def _init(sv: np.ndarray, sw: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Initial centroids [R, k], sorted, from the sorted values ``sv`` [R, n] with weights ``sw``."""
    rows, n = sv.shape
    lo, hi = sv[:, :1], sv[:, -1:]
    if init == "linear":
        return lo + (hi - lo) * (np.arange(k) / max(k - 1, 1))[None, :]
    if init == "density":
        cw = np.cumsum(np.broadcast_to(sw, sv.shape), axis=1)
        shift = 2.0 * np.arange(rows)[:, None]
        target = (((np.arange(k) + 0.5) / k)[None, :] + shift).ravel()
        pos = np.searchsorted((cw / cw[:, -1:] + shift).ravel(), target).reshape(rows, k)
        pos = pos - (np.arange(rows) * n)[:, None]
        return np.take_along_axis(sv, np.clip(pos, 0, n - 1), axis=1)
    if init == "kmeans++":
        out = np.empty((rows, k))
        for r in range(rows):  # per row (a channel or the tensor), per centroid: never per value
            v = sv[r]
            if n > 65536:
                v = v[np.sort(rng.choice(n, 65536, replace=False))]
            cents = [v[rng.integers(len(v))]]
            d2 = (v - cents[0]) ** 2
            for _ in range(1, k):
                tot = d2.sum()
                c = v[rng.integers(len(v))] if tot <= 0 else v[np.searchsorted(np.cumsum(d2), rng.random() * tot)
                                                              .clip(0, len(v) - 1)]
                cents.append(c)
                d2 = np.minimum(d2, (v - c) ** 2)
            out[r] = np.sort(cents)
        return out
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def kmeans_1d(
    values: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    *,
    init: str = "linear",
    fixed_zero: bool = False,
    max_iter: int = 100,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each row of ``values`` [R, n] to ``k`` centroids.

    Returns (centroids [R, k] float64 sorted ascending, labels [R, n] uint8/uint16 indexing them). With
    ``fixed_zero`` one centroid is exactly 0 and stays there. ``weights`` (same shape, > 0) make it weighted."""
    v = np.atleast_2d(np.asarray(values))
    rows, n = v.shape
    if k < 1 or n < 1:
        raise ValueError("k and the row length must be >= 1")
    if weights is None:
        sv = np.sort(v, axis=1).astype(np.float64)
        sw = np.ones((1, n))
    else:
        order = np.argsort(v, axis=1)
        sv = np.take_along_axis(v, order, axis=1).astype(np.float64)
        sw = np.take_along_axis(np.broadcast_to(np.asarray(weights, np.float64), v.shape), order, axis=1)
    rng = rng or np.random.default_rng(0)
    k_free = k - 1 if fixed_zero else k
    cents = _init(sv, sw, max(k_free, 1), init, rng) if k_free > 0 else np.zeros((rows, 0))
    if fixed_zero:
        cents = np.sort(np.concatenate([cents, np.zeros((rows, 1))], axis=1), axis=1)
        is_zero = np.zeros_like(cents, dtype=bool)
        is_zero[np.arange(rows), np.argmax(cents == 0.0, axis=1)] = True
    else:
        is_zero = np.zeros_like(cents, dtype=bool)
    # rows onto disjoint intervals [2r, 2r + 1] so one searchsorted serves every row
    lo, hi = sv[:, :1], sv[:, -1:]
    span = np.where(hi > lo, hi - lo, 1.0)
    shift = 2.0 * np.arange(rows)[:, None]
    flat = ((sv - lo) / span + shift).ravel()
    zeros = np.zeros((rows, 1))
    if weights is None:
        cw = np.broadcast_to(np.arange(n + 1, dtype=np.float64), (rows, n + 1))
        cwv = np.concatenate([zeros, np.cumsum(sv, axis=1)], axis=1)
    else:
        cw = np.concatenate([zeros, np.cumsum(sw, axis=1)], axis=1)
        cwv = np.concatenate([zeros, np.cumsum(sw * sv, axis=1)], axis=1)
    bounds = None
    for _ in range(max_iter):
        mid = (cents[:, 1:] + cents[:, :-1]) / 2.0  # [R, k-1]
        b = np.searchsorted(flat, ((mid - lo) / span + shift).ravel(), side="left").reshape(rows, -1)
        b = b - (np.arange(rows) * n)[:, None]
        b = np.concatenate([np.zeros((rows, 1), np.int64), np.clip(b, 0, n), np.full((rows, 1), n)], axis=1)
        if bounds is not None and np.array_equal(b, bounds):
            break
        bounds = b
        seg_w = np.take_along_axis(cw, b[:, 1:], 1) - np.take_along_axis(cw, b[:, :-1], 1)
        seg_wv = np.take_along_axis(cwv, b[:, 1:], 1) - np.take_along_axis(cwv, b[:, :-1], 1)
        new = np.where(seg_w > 0, seg_wv / np.where(seg_w > 0, seg_w, 1.0), cents)
        cents = np.where(is_zero, 0.0, new)
        order_c = np.argsort(cents, axis=1, kind="stable")  # a mean stays inside its segment: already sorted
        cents = np.take_along_axis(cents, order_c, 1)
        is_zero = np.take_along_axis(is_zero, order_c, 1)
    # final labels: the nearest final centroid, by the same midpoints and the same row shift as the boundaries
    mid = ((cents[:, 1:] + cents[:, :-1]) / 2.0 - lo) / span + shift
    labels = np.searchsorted(mid.ravel(), ((v - lo) / span + shift).ravel(), side="right").reshape(rows, n)
    labels -= (np.arange(rows) * (k - 1))[:, None]
    return cents, labels.astype(np.uint8 if k <= 256 else np.uint16)


def snap(centroids: np.ndarray, labels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The clustered values: centroids [R, k] (cast to ``dtype`` first, as stored) indexed by labels [R, n]."""
    c = np.asarray(centroids).astype(dtype)
    return np.take_along_axis(c, labels.astype(np.int64), axis=1)
