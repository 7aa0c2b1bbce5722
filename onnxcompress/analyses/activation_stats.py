"""Activation statistics: one collector, shared by every pass, streamed over the calibration feeds once per need.

``ctx.analysis(ActivationStatistics, graph)`` is the statistics store of the *current graph* (dropped when a pass
changes the graph, like any analysis); ``teacher_statistics(ctx)`` is the store of the *original model*, valid for
the whole run. A pass asks a store for what it needs with one ``StatsRequest``:

- ``ranges``: tensors reduced to exact running min / max (and, with ``histograms``, the merging fixed-width
  histogram of ``onnxcompress.analyses.calibration``: bins ``[k·w, (k+1)·w)`` that double ``w`` to stay bounded);
- ``channel_means``: tensor -> channel axis: E[x_c] over every other axis and every feed (bias correction);
- ``second_moments``: key -> (tensor, rows): the Gram matrix G = Σ_feeds R(x)^T R(x) of design rows R(x) built from
  the tensor (``rows`` maps an activation to a 2-D [rows, features] array: channels-last for MatMul/Gemm inputs, im2col
  rows for a Conv), plus the row count and Σ R(x) — the layer Hessian X^T X of least-squares refits and of OBS
  pruning, and the input-channel norms ||x_j||² = G_jj of activation-aware scores (Wanda).

Everything already in the store is reused; everything missing is collected in ONE streaming run (one ORT session,
optimizations off, the needed tensors exposed as outputs), reducing each feed on the spot: memory is one feed's
activations plus the reductions, whatever the number of feeds. ``ctx.counters["calibration_runs"]`` counts the runs,
so "statistics are collected once" is checkable. A ``capture`` callback sees every feed's exposed tensors during the
run (e.g. quantize keeps the float reference outputs of its first feeds) and forces a run even when all reductions are
cached.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx

from onnxcompress.analyses.calibration import TensorStats, collect_statistics

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from onnxcompress.context import PassContext
    from onnxcompress.data import FeedSet

log = logging.getLogger(__name__)

RowsFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class StatsRequest:
    ranges: list[str] = field(default_factory=list)
    histograms: bool = False
    channel_means: dict[str, int] = field(default_factory=dict)
    #: key -> (tensor name, rows function); the key names the row construction (e.g. "conv1:im2col")
    second_moments: dict[str, tuple[str, RowsFn]] = field(default_factory=dict)
    #: more tensors exposed during the run and handed to ``capture`` (graph outputs, ...)
    fetch: list[str] = field(default_factory=list)
    capture: Callable[[int, dict[str, np.ndarray]], None] | None = None
    #: the first ``samples`` calibration feeds (None: all); statistics over different feed counts are kept apart
    samples: int | None = None


@dataclass
class Gram:
    """Σ R^T R, Σ R and the number of rows R over all feeds (float64)."""

    xtx: np.ndarray
    row_sum: np.ndarray
    rows: int

    @property
    def channel_sq_norms(self) -> np.ndarray:
        """||x_j||² per feature column: the diagonal of X^T X."""
        return np.diag(self.xtx).copy()


class StatisticsStore:
    """The statistics of ONE model on the calibration feeds (``feeds``), collected on demand and kept."""

    def __init__(self, model: onnx.ModelProto, feeds: FeedSet, ctx: PassContext, label: str):
        self.model = model
        self.feeds = feeds
        self.ctx = ctx
        self.label = label
        # every entry is keyed by the number of feeds it was collected over first
        self.ranges: dict[tuple[int, str], TensorStats] = {}
        self.histograms: set[tuple[int, str]] = set()
        self.means: dict[tuple[int, str, int], np.ndarray | None] = {}
        self.grams: dict[tuple[int, str], Gram] = {}

    def _n(self, samples: int | None) -> int:
        return len(self.feeds) if samples is None else min(samples, len(self.feeds))

    def _missing(self, req: StatsRequest) -> StatsRequest:
        n = self._n(req.samples)
        return StatsRequest(
            ranges=[t for t in req.ranges
                    if (n, t) not in self.ranges or (req.histograms and (n, t) not in self.histograms)],
            histograms=req.histograms,
            channel_means={t: a for t, a in req.channel_means.items() if (n, t, a) not in self.means},
            second_moments={k: v for k, v in req.second_moments.items() if (n, k) not in self.grams},
            fetch=list(req.fetch),
            capture=req.capture,
            samples=req.samples,
        )

    def get(self, req: StatsRequest) -> StatisticsStore:
        """Make sure everything ``req`` asks for is in the store (at most one streaming run); returns the store."""
        todo = self._missing(req)
        if not (todo.ranges or todo.channel_means or todo.second_moments or todo.capture):
            return self
        self._collect(todo)
        return self

    def _collect(self, req: StatsRequest) -> None:
        grams: dict[str, list] = {k: [None, None, 0] for k in req.second_moments}
        gram_tensors = [t for t, _ in req.second_moments.values()]

        def on_feed(i: int, acts: dict[str, np.ndarray]) -> None:
            for key, (tensor, rows_fn) in req.second_moments.items():
                r = np.asarray(rows_fn(np.asarray(acts[tensor])), dtype=np.float64)
                acc = grams[key]
                xtx, rs = r.T @ r, r.sum(axis=0)
                acc[0] = xtx if acc[0] is None else acc[0] + xtx
                acc[1] = rs if acc[1] is None else acc[1] + rs
                acc[2] += r.shape[0]
            if req.capture is not None:
                req.capture(i, acts)

        n = self._n(req.samples)
        feeds = self.feeds if n == len(self.feeds) else self.feeds.take(n)
        names = list(dict.fromkeys([*req.ranges]))
        stats = collect_statistics(
            self.model, names, feeds, histograms=req.histograms, channel_sums=dict(req.channel_means),
            fetch=list(dict.fromkeys([*gram_tensors, *req.fetch])), on_feed=on_feed,
            progress=self.ctx.progress,
        ) if (names or req.channel_means or gram_tensors or req.capture) else {}
        self.ctx.counters["calibration_runs"] += 1
        log.info("%s statistics: %d ranges, %d channel means, %d Gram matrices in one run", self.label,
                 len(req.ranges), len(req.channel_means), len(req.second_moments))
        for t in req.ranges:
            if t in stats:
                self.ranges[(n, t)] = stats[t]
                if req.histograms:
                    self.histograms.add((n, t))
        for t, axis in req.channel_means.items():
            st = stats.get(t)
            self.means[(n, t, axis)] = st.channel_mean if st is not None else None
        for key, (xtx, rs, rows) in grams.items():
            if xtx is not None:
                self.grams[(n, key)] = Gram(xtx, rs, rows)

    # --------------------------------------------------------------------------------------------- answers
    def range_of(self, tensor: str, samples: int | None = None) -> TensorStats | None:
        return self.ranges.get((self._n(samples), tensor))

    def channel_mean(self, tensor: str, axis: int = 1, samples: int | None = None) -> np.ndarray | None:
        return self.means.get((self._n(samples), tensor, axis))

    def gram(self, key: str, samples: int | None = None) -> Gram | None:
        return self.grams.get((self._n(samples), key))

    def drop_grams(self, keys: Iterable[str], samples: int | None = None) -> int:
        """Forget the Grams of ``keys`` over ``samples`` feeds (a pass that moves on to more feeds no longer needs
        the first ones: MiniLM-L6's cluster Grams are ~150 MB a set); returns the bytes freed."""
        n, freed = self._n(samples), 0
        for key in keys:
            g = self.grams.pop((n, key), None)
            if g is not None:
                freed += g.xtx.nbytes + g.row_sum.nbytes
        return freed


def model_fingerprint(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:20]


class ActivationStatistics:
    """``ctx.analysis(ActivationStatistics, graph)``: the statistics store of the current graph."""

    name: ClassVar[str] = "activation_statistics"

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> StatisticsStore:
        if ctx.calibration is None:
            from onnxcompress.errors import PassError

            raise PassError("activation statistics need calibration data (--calib)")
        return StatisticsStore(ctx.export(graph), ctx.calibration, ctx, "current graph")


def teacher_statistics(ctx: PassContext) -> StatisticsStore:
    """The statistics store of the ORIGINAL model: valid for the whole run (the teacher never changes)."""
    store = ctx.run_cache.get("teacher_statistics")
    if store is None:
        if ctx.calibration is None:
            from onnxcompress.errors import PassError

            raise PassError("teacher statistics need calibration data (--calib)")
        from onnxcompress import io

        teacher = ctx.original_model()
        io.lift_constant_nodes(teacher)
        store = ctx.run_cache["teacher_statistics"] = StatisticsStore(teacher, ctx.calibration, ctx,
                                                                      "original model")
    return store
