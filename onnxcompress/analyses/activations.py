"""Streaming access to intermediate activations under onnxruntime.

The model is copied with the requested intermediate tensors added as graph outputs, one ORT session is built, and
the calibration feeds are run one at a time. For each feed the caller gets the requested tensors and reduces them
on the spot (min/max, histograms, X^T X, ...); nothing is kept across feeds, so memory is bounded by one feed's
activations (``max_tensors_per_run`` splits very wide requests over several sessions, trading time for memory).

    for feed, acts in stream_activations(model, ["conv1_out", "relu2_out"], feeds):
        stats.update(acts["conv1_out"])

ORT graph optimizations are disabled in these sessions so the exposed tensors are exactly the graph's values (an
optimized session would fuse nodes and could not expose their intermediate outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import onnx

from onnxcompress.data import Feed, FeedSet
from onnxcompress.runtime import Session

log = logging.getLogger(__name__)


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (types left for ORT to infer)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input)}
    for n in names:
        if n in existing:
            continue
        vi = onnx.ValueInfoProto()
        if n in known and known[n].type.HasField("tensor_type"):
            vi.CopyFrom(known[n])
            vi.type.tensor_type.ClearField("shape")  # declared shapes can be wrong; ORT computes the real ones
        else:
            vi.name = n
        m.graph.output.append(vi)
        existing.add(n)
    return m


def stream_activations(
    model: onnx.ModelProto,
    names: list[str],
    feeds: FeedSet,
    *,
    max_tensors_per_run: int = 4096,
    progress: Callable | None = None,
    desc: str = "calibrate",
) -> Iterator[tuple[Feed, dict[str, np.ndarray]]]:
    """Yield ``(feed, {name: activation})`` for every feed; tensors of one feed only, never all feeds at once."""
    names = list(dict.fromkeys(names))
    chunks = [names[i:i + max_tensors_per_run] for i in range(0, len(names), max_tensors_per_run)] or [[]]
    if len(chunks) == 1:
        with Session(expose_outputs(model, chunks[0]), optimize=False, what="model with exposed activations") as s:
            it = progress(feeds, total=len(feeds), desc=desc) if progress else feeds
            for feed in it:
                outs = s.run(feed, chunks[0])
                yield feed, dict(zip(chunks[0], outs, strict=True))
        return
    sessions = [Session(expose_outputs(model, c), optimize=False) for c in chunks]
    try:
        it = progress(feeds, total=len(feeds), desc=desc) if progress else feeds
        for feed in it:
            acts: dict[str, np.ndarray] = {}
            for s, c in zip(sessions, chunks, strict=True):
                acts.update(zip(c, s.run(feed, c), strict=True))
            yield feed, acts
    finally:
        for s in sessions:
            s.close()


class RunningMinMax:
    """Per-tensor running min and max (optionally per channel along ``axis``)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | float | None = None
        self.max: np.ndarray | float | None = None

    def update(self, x: np.ndarray) -> None:
        if self.axis is None:
            lo, hi = float(np.min(x)), float(np.max(x))
        else:
            moved = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)


class SecondMoment:
    """Streaming X^T X (and X^T Y when given) over rows: the sufficient statistics of least squares."""

    def __init__(self) -> None:
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        x64 = x.astype(np.float64, copy=False)
        xtx = x64.T @ x64
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        if y is not None:
            xty = x64.T @ y.astype(np.float64, copy=False)
            self.xty = xty if self.xty is None else self.xty + xty
        self.rows += x.shape[0]
