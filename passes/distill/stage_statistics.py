"""One stage's statistics: the calibration feeds streamed once through the student and the teacher.

For the layers of one stage, ``stream_stage_statistics`` runs every feed through the student (each layer's input x,
the student's own output for bias-corrected layers, the other branch of a residual target) and the teacher (each
layer's target y, or the residual sum it feeds), one feed in memory at a time, and reduces it on the spot to each
layer's normal equations (``Normal``: X^T X, X^T Y) — or, for bias correction, to sum(y_teacher - y_student) per
channel. With ridge selection (``select_ridge``, at least 4 feeds) every 4th feed goes into the held-out statistics.

Rows per feed (``rows_per_feed``): a random subset — output positions for a Conv (im2col patches,
``onnxcompress.analyses.conv_rows``), tokens / rows for Gemm and MatMul — of ``rows`` in total (0: 32 per unknown,
within 16k..64k and ~4e11 multiply-adds for X^T X) spread evenly over the feeds, at least 16 per feed.

Row weights (``ln_weight``): when the layer's target is a residual sum s that feeds LayerNormalization over the last
axis, row t (a token) of X and Y is multiplied by w_t = (1 / std_t(s_teacher)) / mean(1 / std(s_teacher)): the error
LayerNorm passes on is e / std(s).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxcompress.analyses.conv_rows import conv_rows
from onnxcompress.runtime import Session

from .layers import Layer
from .normal_equations import Normal


def stream_stage_statistics(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    layers: list[Layer],
    feeds,
    rng: np.random.Generator,
    *,
    rows: int = 0,
    select_ridge: bool = True,
) -> None:
    """Stream ``feeds`` once through ``student`` and ``teacher`` and accumulate every layer's fit statistics
    (``L.stats``, held-out ``L.hold``, or ``L.bias_sum`` / ``L.bias_count``); a layer whose activations cannot be
    matched gets ``L.reason`` and is left out from then on. The only place a stage reads calibration data."""
    s_names = sorted(
        {L.x for L in layers}
        | {L.y for L in layers if L.kind == "bias"}
        | {L.res_other for L in layers if L.res_other}
    )
    t_names = sorted({L.res_out or L.y for L in layers})
    n_feeds = len(feeds)
    with (
        Session(_expose(student, s_names), what="student") as ss,
        Session(_expose(teacher, t_names), what="teacher") as ts,
    ):
        holdout = select_ridge and n_feeds >= 4
        for i, feed in enumerate(feeds):
            hold = holdout and i % 4 == 3
            xs = dict(zip(s_names, ss.run(feed, s_names), strict=True))
            ys = dict(zip(t_names, ts.run(feed, t_names), strict=True))
            for L in layers:
                if L.reason:
                    continue
                try:
                    add_feed_rows(L, xs, ys, n_feeds, rng, hold, rows)
                except _Skip as exc:
                    L.reason = str(exc)


def add_feed_rows(L: Layer, xs: dict, ys: dict, n_feeds: int, rng: np.random.Generator, hold: bool = False,
                  rows_budget: int = 0) -> None:
    """Add one feed's rows to the layer's statistics: ``xs`` the student's tensors, ``ys`` the teacher's."""
    x = np.asarray(xs[L.x], dtype=np.float64)
    yt = np.asarray(ys[L.res_out or L.y], dtype=np.float64)
    axis = L.out_axis % yt.ndim
    row_w = _ln_row_weights(yt, L.ln_axis, axis) if L.res_out and L.ln_axis is not None else None
    if L.kept_out is not None:
        yt = np.take(yt, L.kept_out, axis=axis)
    if L.res_out:  # the part of the teacher's residual sum this layer must supply
        other = np.asarray(xs[L.res_other], dtype=np.float64)
        if other.shape != yt.shape:
            other = (
                np.broadcast_to(other, yt.shape)
                if np.broadcast_shapes(other.shape, yt.shape) == yt.shape
                else None
            )
            if other is None:
                raise _Skip("residual branch shape differs from the teacher's sum")
        yt = yt - other
    if L.kind == "bias":
        ysv = np.asarray(xs[L.y], dtype=np.float64)
        if ysv.shape != yt.shape:
            raise _Skip("student and teacher outputs differ in shape")
        diff = np.moveaxis(yt - ysv, axis, 0).reshape(yt.shape[axis], -1)
        L.bias_sum = diff.sum(axis=1) + (L.bias_sum if L.bias_sum is not None else 0.0)
        L.bias_count += diff.shape[1]
        return
    w = L.w.get()
    has_bias = L.b is not None or L.kind in ("conv", "dwconv")
    if L.kind in ("conv", "dwconv"):
        cout = w.shape[0]
        if yt.shape[1] != cout:
            raise _Skip("output channels do not match the teacher (no channel map)")
        k_cols = int(np.prod(w.shape[1:]))
        rows = rows_per_feed(rows_budget, k_cols + 1, n_feeds)
        patches, pos = conv_rows(x, L.node, w.shape, list(yt.shape[2:]), rows, rng)
        yr = np.moveaxis(yt, 1, -1)[pos]  # [R, Co]
        if L.kind == "conv":
            xr = patches.reshape(patches.shape[0], -1)
            if has_bias:
                xr = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
            _stats(L, hold).update(xr, yr)
        else:
            cin = patches.shape[1]
            m = cout // cin
            per = patches[:, np.arange(cout) // m].reshape(patches.shape[0], cout, -1)  # [R, Co, k]
            per = np.transpose(per, (1, 0, 2))
            per = np.concatenate([per, np.ones(per.shape[:2] + (1,))], axis=2)
            _stats(L, hold, per_channel=True).update(per, yr.T)
        return
    # gemm / matmul: rows of the input
    if L.kind == "gemm":
        xr = x.T if L.trans_a else x
    else:
        xr = x.reshape(-1, x.shape[-1])
    yr = np.moveaxis(yt, axis, -1).reshape(-1, yt.shape[axis])
    n_out = w.shape[0] if (L.kind == "gemm" and L.trans_b) else w.shape[-1]
    if yr.shape[1] != n_out or yr.shape[0] != xr.shape[0]:
        raise _Skip("output features do not match the teacher (no channel map)")
    rw = row_w.reshape(-1) if row_w is not None and not (L.kind == "gemm" and L.trans_a) else None
    rows = rows_per_feed(rows_budget, xr.shape[1] + 1, n_feeds)
    if rows < xr.shape[0]:
        pick = rng.choice(xr.shape[0], rows, replace=False)
        xr, yr = xr[pick], yr[pick]
        rw = rw[pick] if rw is not None else None
    if has_bias:
        xr = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
    if rw is not None:
        xr, yr = xr * rw[:, None], yr * rw[:, None]
    _stats(L, hold).update(xr, yr)


def rows_per_feed(rows_budget: int, cols: int, n_feeds: int) -> int:
    """Design rows drawn from each feed for a layer with ``cols`` unknowns per output."""
    total = rows_budget or int(min(65536, max(16384, 32 * cols), 4e11 / (cols * cols)))
    return max(16, math.ceil(total / max(n_feeds, 1)))


class _Skip(Exception):
    """A layer whose student and teacher tensors cannot be matched: its message becomes the layer's skip reason."""


def _stats(L: Layer, hold: bool, per_channel: bool = False) -> Normal:
    """The layer's fit statistics, or its held-out ones."""
    attr = "hold" if hold else "stats"
    if getattr(L, attr) is None:
        setattr(L, attr, Normal(per_channel=per_channel))
    return getattr(L, attr)


def _ln_row_weights(sum_t: np.ndarray, ln_axis: int, out_axis: int) -> np.ndarray | None:
    """1 / std of the teacher's residual sum over the LayerNorm axis, one weight per row of the fit (the rows are
    the positions along every other axis, the layer's output axis being the last), normalised to mean 1."""
    if ln_axis % sum_t.ndim != out_axis:
        return None
    std = np.sqrt(sum_t.var(axis=out_axis) + 1e-5)
    w = 1.0 / std
    return w / w.mean()


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The part of ``model`` needed for ``names``, with exactly those as outputs (nodes with subgraphs: whole)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    has_sub = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute
    )
    if not has_sub:
        producer = {o: i for i, n in enumerate(g.node) for o in n.output}
        need = set()
        stack = [n for n in names if n in producer]
        seen = set(stack)
        while stack:
            t = stack.pop()
            i = producer.get(t)
            if i is None or i in need:
                continue
            need.add(i)
            for inp in g.node[i].input:
                if inp and inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        keep = [n for i, n in enumerate(g.node) if i in need]
        del g.node[:]
        g.node.extend(keep)
        used = {x for n in keep for x in n.input}
        inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(inits)
    del g.output[:]
    for n in names:
        g.output.append(onnx.ValueInfoProto(name=n))
    return m
