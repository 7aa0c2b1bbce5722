"""Calibration statistics of activations, streamed over the calibration feeds with bounded memory.

One ORT session (optimizations off) exposes the requested tensors; each feed's activations are reduced
on the spot into, per tensor (one pass over the data for everything the quantizer needs):

- exact running ``min`` / ``max``;
- a **fixed-width histogram that grows by merging** (of at most ``HIST_MAX_SAMPLES`` evenly strided values of each
  activation: the cost of big detector feature maps stays bounded, the tails keep hundreds of samples): bins are ``[k·w, (k+1)·w)`` for integer ``k`` (the grid is
  anchored at 0). When a feed brings values outside the current bins and the span would exceed ``max_bins``, the
  width doubles and adjacent bins merge exactly (``k -> floor(k / 2)``), so no sample is ever re-binned
  approximately and inputs of any shape (variable sequence lengths, image sizes) are fine. Memory: ``max_bins``
  counts per tensor, whatever the number of feeds;
- optionally the per-channel sum (axis 1, or -1 for MatMul/Gemm inputs) for bias correction.

Ranges ``[lo, hi]`` for quantization are then chosen per tensor from the statistics (``choose_range``):

- ``minmax``: the exact ``[min, max]``;
- ``percentile``: the quantiles ``(1 − p)/2`` and ``(1 + p)/2`` of the histogram's CDF (``p`` = ``percentile``/100),
  never crossing 0 and never outside ``[min, max]``;
- ``mse``: the range minimising the expected squared error of quantize-dequantize over the histogram,
  ``E = Σ_i n_i · e(c_i)`` with ``e(c) = Δ²/12`` inside the range (uniform rounding noise, ``Δ`` the step) and
  ``(c − clip(c))²`` outside: first a shared shrink factor of both ends, then each end alone (coordinate descent);
- ``entropy``: the clipping threshold minimising ``KL(P || Q)`` between the clipped reference distribution ``P``
  (outliers folded into the edge bin) and ``Q``, ``P`` re-quantized to the target number of levels with each level's
  mass spread evenly over its non-empty bins (the TensorRT calibration rule). One-sided for non-negative tensors,
  on ``|x|`` otherwise (the threshold then clips both ends).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress.data import FeedSet

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")


class GrowingHistogram:
    """Histogram on the grid ``[k·w, (k+1)·w)``; doubles ``w`` (merging bin pairs) to stay within ``max_bins``."""

    def __init__(self, max_bins: int = 2048):
        if max_bins < 16 or max_bins % 2:
            raise ValueError("max_bins must be an even number >= 16")
        self.max_bins = max_bins
        self.width: float | None = None
        self.start = 0  # index k of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)

    def _merge(self) -> None:
        """Double the bin width: bin k goes to floor(k / 2)."""
        start, counts = self.start, self.counts
        if start % 2:  # align so that pairs (2j, 2j+1) sit together
            counts = np.concatenate([[0], counts])
            start -= 1
        if counts.size % 2:
            counts = np.concatenate([counts, [0]])
        self.counts = counts.reshape(-1, 2).sum(axis=1)
        self.start = start // 2
        self.width *= 2.0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add the samples of ``x``; ``lo``/``hi`` (its finite min and max, when the caller already knows them and
        ``x`` holds finite values only) skip recomputing them."""
        x = np.asarray(x).ravel()
        if x.size == 0:
            return
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        if lo is None or hi is None:
            finite = np.isfinite(x)
            if not finite.all():
                x = x[finite]
                if x.size == 0:
                    return
            lo, hi = float(x.min()), float(x.max())
        if self.width is None:
            span = max(hi - lo, abs(hi), abs(lo), 1e-30)
            # start with room to grow 4x before the first merge
            self.width = span / (self.max_bins / 4)
            self.start = int(np.floor(lo / self.width))
        k_lo, k_hi = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
        cur_lo = self.start if self.counts.size else k_lo
        cur_hi = self.start + self.counts.size - 1 if self.counts.size else k_hi
        new_lo, new_hi = min(cur_lo, k_lo), max(cur_hi, k_hi)
        while new_hi - new_lo + 1 > self.max_bins:
            if self.counts.size:
                self._merge()
            else:
                self.width *= 2.0
            k_lo, k_hi = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
            cur_lo = self.start if self.counts.size else k_lo
            cur_hi = self.start + self.counts.size - 1 if self.counts.size else k_hi
            new_lo, new_hi = min(cur_lo, k_lo), max(cur_hi, k_hi)
        if not self.counts.size:
            self.start = new_lo
            self.counts = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        elif new_lo < self.start or new_hi > self.start + self.counts.size - 1:
            grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
            off = self.start - new_lo
            grown[off : off + self.counts.size] = self.counts
            self.counts, self.start = grown, new_lo
        self.counts += np.bincount(self._bin_index(x), minlength=self.counts.size)

    def _bin_index(self, x: np.ndarray) -> np.ndarray:
        """``floor(x / w) − start`` clipped to the bins. In float32 when every bin index is exactly representable
        there (``|k| < 2^24``: floor and the integer subtraction are then exact, and this path is ~5x faster than
        going through int64), else in float64."""
        n = self.counts.size
        k_max = max(abs(self.start), abs(self.start + n))
        dt = np.float32 if (x.dtype == np.float32 and k_max < 1 << 24) else np.float64
        y = np.divide(x, dt(self.width), dtype=dt)
        np.floor(y, out=y)
        y -= dt(self.start)
        np.clip(y, 0, n - 1, out=y)  # float rounding at the very edge
        return y.astype(np.intp)

    # ----------------------------------------------------------------------------------------------- views
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.counts.size + 1, dtype=np.float64)) * self.width

    def centers(self) -> np.ndarray:
        return (self.start + np.arange(self.counts.size, dtype=np.float64) + 0.5) * self.width

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """Counts of |x| on bins ``[j·w, (j+1)·w)``, j >= 0 (negative bin k folds onto j = −k − 1)."""
        k = self.start + np.arange(self.counts.size)
        j = np.where(k >= 0, k, -k - 1)
        out = np.zeros(int(j.max()) + 1 if j.size else 0, dtype=np.int64)
        np.add.at(out, j, self.counts)
        return out, float(self.width)


#: histogram samples taken from one activation at most (an evenly strided subset of a larger one; min/max stay
#: exact over every value): 64 feeds x 2^18 keeps ~17M samples per tensor, ~170 in each 99.999% tail
HIST_MAX_SAMPLES = 1 << 18


def _subsample(x: np.ndarray, cap: int) -> np.ndarray:
    """Every ``k``-th value of ``x`` (``k`` odd, so the stride does not lock onto even image/channel strides)."""
    flat = x.ravel()
    if flat.size <= cap:
        return flat
    k = -(-flat.size // cap)
    k += 1 - k % 2
    return flat[::k]


@dataclass
class TensorStats:
    """What calibration learned about one tensor."""

    min: float = np.inf
    max: float = -np.inf
    hist: GrowingHistogram | None = None
    samples: int = 0
    channel_sum: np.ndarray | None = None
    channel_count: int = 0
    _extra: dict = field(default_factory=dict, repr=False)

    def update(self, x: np.ndarray, histogram: bool, channel_sums: bool | int) -> None:
        """Fold one activation in. ``channel_sums``: True (axis 1), an axis (e.g. -1 for MatMul inputs) or False."""
        if x.size == 0 or not np.issubdtype(x.dtype, np.floating):
            return
        xmin, xmax = float(x.min()), float(x.max())
        if not (np.isfinite(xmin) and np.isfinite(xmax)):  # inf/nan say nothing about the range to represent
            x = x[np.isfinite(x)]  # (a nan anywhere makes min/max nan, so finite extremes mean finite data)
            if x.size == 0:
                return
            xmin, xmax = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, xmin), max(self.max, xmax)
        self.samples += 1
        if histogram:
            if self.hist is None:
                self.hist = GrowingHistogram(self._extra.get("bins", 2048))
            self.hist.update(_subsample(x, HIST_MAX_SAMPLES), xmin, xmax)
        axis = 1 if channel_sums is True else (None if channel_sums is False else int(channel_sums))
        if axis is not None and x.ndim >= 2 and not self._extra.get("no_means"):
            axis %= x.ndim
            s = np.sum(x, axis=tuple(i for i in range(x.ndim) if i != axis), dtype=np.float64)
            if self.channel_sum is None:
                self.channel_sum, self.channel_count = s, x.size // x.shape[axis]
            elif self.channel_sum.shape != s.shape:  # channel count changed between feeds: no means
                self._extra["no_means"] = True
                self.channel_sum = None
            else:
                self.channel_sum = self.channel_sum + s
                self.channel_count += x.size // x.shape[axis]

    @property
    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or self._extra.get("no_means") or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count


def collect_statistics(
    model: onnx.ModelProto,
    names: Iterable[str],
    feeds: FeedSet,
    *,
    histograms: bool = True,
    channel_sums: Iterable[str] | dict[str, int] = (),
    max_bins: int = 2048,
    max_tensors_per_run: int = 4096,
    threads: int = 1,
    fetch: Iterable[str] = (),
    on_feed: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    progress: Callable | None = None,
) -> dict[str, TensorStats]:
    """Stream ``feeds`` through ``model`` and reduce the named tensors to ``TensorStats``.

    One pass over the data gives everything: ranges, histograms and the per-channel means that bias correction
    needs (``channel_sums``: names -> channel axis, or names whose axis is 1). ``threads``: intra-op threads of
    the session (0: onnxruntime's default, every core; 1 by default: on a shared machine a second, spinning
    thread was measured to make calibration 1.5-2x slower, not faster). ``fetch``: more tensors (graph outputs,
    ...) run along and handed, with the reduced ones, to ``on_feed(index, {name: array})`` for every feed — so a
    caller that needs them for its first feeds does not run the model again."""
    from onnxcompress.analyses.activations import expose_outputs
    from onnxcompress.runtime import Session

    sums = dict(channel_sums) if isinstance(channel_sums, dict) else dict.fromkeys(channel_sums, 1)
    reduced = list(dict.fromkeys([*names, *sums]))
    fetch = list(fetch)
    if not reduced and not fetch:
        return {}
    stats = {n: TensorStats(_extra={"bins": max_bins}) for n in reduced}
    names = list(dict.fromkeys([*reduced, *fetch]))
    t0 = time.perf_counter()
    chunks = [names[i : i + max_tensors_per_run] for i in range(0, len(names), max_tensors_per_run)]
    sessions = [
        Session(expose_outputs(model, c), threads=threads, optimize=False, what="model with exposed activations")
        for c in chunks
    ]
    n_feeds = 0
    try:
        it = progress(feeds, total=len(feeds), desc="calibrate") if progress else feeds
        for feed in it:
            acts: dict[str, np.ndarray] = {}
            for s, c in zip(sessions, chunks, strict=True):
                acts.update(zip(c, s.run(feed, c), strict=True))
            for n, st in stats.items():
                st.update(np.asarray(acts[n]), histograms, sums.get(n, False))
            if on_feed is not None:
                on_feed(n_feeds, acts)
            n_feeds += 1
    finally:
        for s in sessions:
            s.close()
    log.info("calibration: %d tensors over %d feeds in %.2fs", len(reduced), n_feeds, time.perf_counter() - t0)
    return stats


# ------------------------------------------------------------------------------------------------ range rules
def choose_range(
    st: TensorStats, method: str, *, levels: int = 256, symmetric: bool = False, percentile: float = 99.999
) -> tuple[float, float]:
    """The quantization range ``[lo, hi]`` of a tensor by ``method`` (see the module docstring)."""
    if not np.isfinite(st.min) or not np.isfinite(st.max):
        return 0.0, 0.0
    lo, hi = min(st.min, 0.0), max(st.max, 0.0)
    if method == "minmax" or st.hist is None or st.hist.total == 0 or hi == lo:
        return lo, hi
    if method == "percentile":
        return _percentile_range(st, percentile)
    if method == "mse":
        return _mse_range(st, levels, symmetric)
    if method == "entropy":
        return _entropy_range(st, levels, symmetric)
    raise ValueError(f"unknown calibration method {method!r}; known: {METHODS}")


def _percentile_range(st: TensorStats, percentile: float) -> tuple[float, float]:
    h = st.hist
    cdf = np.cumsum(h.counts, dtype=np.float64)
    total = cdf[-1]
    tail = (1.0 - percentile / 100.0) / 2.0 * total
    edges = h.edges()
    lo_i = int(np.searchsorted(cdf, tail, side="right"))
    hi_i = int(np.searchsorted(cdf, total - tail, side="left"))
    lo = float(edges[min(lo_i, h.counts.size - 1)])
    hi = float(edges[min(hi_i + 1, h.counts.size)])
    lo = min(max(lo, st.min), 0.0)
    hi = max(min(hi, st.max), 0.0)
    return lo, hi


def _expected_sq_error(
    centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int
) -> np.ndarray:
    """Expected squared error for each candidate range (vectorised over candidates)."""
    step = (hi - lo) / (levels - 1)
    c = centers[None, :]
    clipped = np.clip(c, lo[:, None], hi[:, None])
    outside = (c - clipped) ** 2
    inside = (c >= lo[:, None]) & (c <= hi[:, None])
    err = np.where(inside, (step**2 / 12.0)[:, None], outside)
    return err @ counts.astype(np.float64)


def _mse_range(st: TensorStats, levels: int, symmetric: bool) -> tuple[float, float]:
    h = st.hist
    centers, counts = h.centers(), h.counts
    nz = counts > 0
    centers, counts = centers[nz], counts[nz]
    lo0, hi0 = min(st.min, 0.0), max(st.max, 0.0)
    if symmetric:
        m = max(-lo0, hi0)
        alphas = np.linspace(0.05, 1.0, 96)
        cand_lo, cand_hi = -m * alphas, m * alphas
        err = _expected_sq_error(centers, counts, cand_lo, cand_hi, levels)
        k = int(np.argmin(err))
        return float(max(cand_lo[k], lo0)), float(min(cand_hi[k], hi0))
    alphas = np.linspace(0.05, 1.0, 96)
    err = _expected_sq_error(centers, counts, lo0 * alphas, hi0 * alphas, levels)
    k = int(np.argmin(err))
    lo, hi = lo0 * alphas[k], hi0 * alphas[k]
    for _ in range(2):  # refine each end alone
        if hi0 > 0:
            cand = np.linspace(max(hi * 0.5, 1e-30), hi0, 64)
            e = _expected_sq_error(centers, counts, np.full_like(cand, lo), cand, levels)
            hi = float(cand[int(np.argmin(e))])
        if lo0 < 0:
            cand = np.linspace(lo0, min(lo * 0.5, -1e-30), 64)
            e = _expected_sq_error(centers, counts, cand, np.full_like(cand, hi), levels)
            lo = float(cand[int(np.argmin(e))])
    return float(lo), float(hi)


def _kl_threshold(counts: np.ndarray, levels: int, n_candidates: int = 128) -> int:
    """Index i (number of bins kept) minimising KL(P_i || Q_i); TensorRT's entropy calibration rule."""
    n = counts.size
    if n <= levels:
        return n
    counts = counts.astype(np.float64)
    cands = np.unique(np.linspace(levels, n, n_candidates).astype(np.int64))
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum counts[i:]
    best_i, best_kl = n, np.inf
    for i in cands:
        p = counts[:i].copy()
        p[-1] += tail[i]
        # merge the i bins into ``levels`` groups, spread each group's mass over its non-empty bins
        group = (np.arange(i) * levels) // i
        src = counts[:i]
        mass = np.bincount(group, weights=src, minlength=levels)
        nonzero = np.bincount(group, weights=(src > 0).astype(np.float64), minlength=levels)
        q = np.where(src > 0, mass[group] / np.maximum(nonzero[group], 1.0), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p /= ps
        q /= qs
        mask = p > 0
        # bins where P > 0 but Q == 0 (outliers folded into the last bin) get a small floor
        qm = np.maximum(q[mask], 1e-12)
        kl = float(np.sum(p[mask] * np.log(p[mask] / qm)))
        if kl < best_kl:
            best_kl, best_i = kl, int(i)
    return best_i


def _entropy_range(st: TensorStats, levels: int, symmetric: bool) -> tuple[float, float]:
    h = st.hist
    lo0, hi0 = min(st.min, 0.0), max(st.max, 0.0)
    if lo0 >= 0.0:  # one-sided: bins from 0 upwards (empty bins below the first sample included)
        counts = np.concatenate([np.zeros(max(h.start, 0), np.int64), h.counts[max(-h.start, 0) :]])
        i = _kl_threshold(counts, levels)
        return 0.0, float(min(hi0, i * h.width))
    abs_counts, w = h.abs_histogram()
    half = levels // 2 if (symmetric or lo0 < 0) else levels
    i = _kl_threshold(abs_counts, half)
    t = i * w
    return float(max(lo0, -t)), float(min(hi0, t))
