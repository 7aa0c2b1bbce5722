"""Index inputs checked against the tables they index, before any model runs on the data.

A graph input read directly (or through a Cast) as the indices of a ``Gather`` of a constant table — token ids into
an embedding — must lie in [-n, n) for the table's n entries along the Gather's axis, or onnxruntime refuses the
ORIGINAL model on that feed. Found by running ids past the vocabulary: the first model run was inside a pass, so
the run failed as "pass quantize failed" (exit 3) or as an internal error, with ORT's own log line before it. Here
the data are refused as bad input (exit 2), naming the data set, the sample, the input and the table. Only models
with such inputs read their feeds for it (token feeds are small); others cost nothing.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress.data import FeedSet
from onnxcompress.errors import BadInputError


def index_limits(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """Graph input -> (entries n, table name) of the smallest constant table it indexes in the main graph."""
    g = model.graph
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[n.output[0]] = tuple(n.attribute[0].t.dims)
    cast_of = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast" and n.input and n.input[0] in inputs}
    limits: dict[str, tuple[int, str]] = {}
    for n in g.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[0] not in shapes:
            continue
        src = n.input[1] if n.input[1] in inputs else cast_of.get(n.input[1])
        shape = shapes[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if src is None or not shape or not -len(shape) <= axis < len(shape):
            continue
        rows = int(shape[axis])
        if src not in limits or rows < limits[src][0]:
            limits[src] = (rows, n.input[0])
    return limits


def check_index_ranges(model: onnx.ModelProto, *feed_sets: FeedSet | None) -> None:
    """``BadInputError`` at the first feed whose index input lies outside its table (``index_limits``); each
    distinct, real (not made-up) feed set is read once."""
    sets = [f for i, f in enumerate(feed_sets) if f is not None and not f.synthetic
            and not any(f is g for g in feed_sets[:i])]
    limits = index_limits(model) if sets else {}
    if not limits:
        return
    for feeds in sets:
        for i, feed in enumerate(feeds):
            for name, (rows, table) in limits.items():
                if name not in feed or not np.issubdtype(np.asarray(feed[name]).dtype, np.integer):
                    continue
                ids = np.asarray(feed[name])
                if ids.size == 0:
                    continue
                lo, hi = int(ids.min()), int(ids.max())
                if lo < -rows or hi >= rows:
                    bad = hi if hi >= rows else lo
                    raise BadInputError(f"{feeds.source} sample {i}: input '{name}' holds {bad}, outside the {rows} "
                                        f"entries of '{table}' it indexes (Gather): the original model cannot run "
                                        "on it")


__all__ = ["check_index_ranges", "index_limits"]
