"""Weights refit against the float model (``weight_rounding=refit``): AdaQuant's layer objective in closed form,
stage after stage, so each layer's integers also absorb the error its quantized input already carries.

For a layer ``y = W x + b`` (W: [N, K] rows as in ``rounding``) let X_f be the rows of its input in the float model
and X_q the rows at the same positions of the same feeds in the current int8 model (every activation rounding and
every layer before it quantized). With a column of ones appended to both when the layer has a bias slot
(``W̄ = [W, b]``), the refit asks for

    min_V ||X_q V^T − X_f W̄^T||² + λ·m·||V − W̄||²       (m: mean diagonal of X_q^T X_q)

    V^T = W̄^T + (H + λ m I)^-1 (C − H) W̄^T,        H = X_q^T X_q,  C = X_q^T X_f,

i.e. the float layer's output as the target, not the quantized weights' own (``weight_rounding=output`` fits
``X_q W^T``): ``C − H = −X_q^T (X_q − X_f)`` is how the input error correlates with the input, and the refit
undoes the part of it a linear map can. λ is chosen per layer from ``RIDGES`` on held-out feeds (every 4th of the
``refit_samples`` calibration feeds, all by default: the error ``Σ_o v_o H' v_o^T − 2 v_o C' w̄_o^T + w̄_o F' w̄_o^T`` from the held-out
moments, F = X_f^T X_f). The integers are then chosen for V like ``rounding`` does (per-channel clip scale by the
output error, columns rounded in order with error feedback, ``round_columns``), the bias column last and unrounded:
it takes the feedback of every rounded column, so the bias absorbs the mean of the rounding error too. A layer keeps
its round-to-nearest weights (and bias correction) unless the refit integers do better on the held-out feeds.

**Moments**: all four blocks come from ONE Gram matrix of the shared collector
(``onnxcompress.analyses.activation_stats``): a paired model runs the float and the int8 model side by side on the
same inputs (``paired_model``: the int8 model's tensors renamed) and concatenates the two inputs of each layer
(channels for Conv, the last axis for MatMul/Gemm), so the design rows are ``[x_f | x_q]`` and their Gram is
``[[F, C^T], [C, H]]``.

**When**: after the automatic float-layer search, with its float layers in place (a refit made first compensates
the very roundings that search would take out, and then hides them from it). **Stages** by depth (``stage_groups``): a
layer is fit on the int8 model with every refit layer upstream of it already in place, so each refit sees the
inputs it will get; layers of one depth share a stage (one paired run over the fit feeds, one over the held-out).

Anchors as ``rounding``: Conv with group 1, Gemm, MatMul with a 2-D constant weight, at most
``rounding.MAX_COLUMNS`` input columns.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxcompress.analyses.activation_stats import StatisticsStore, StatsRequest

from . import qparams_math as qm
from .ort_int8_kernels import bias_slot, const_value, weight_axis, weight_slot
from .rounding import (
    GRAM_BUDGET_BYTES,
    MAX_COLUMNS,
    ROWS_PER_COLUMN,
    ROWS_TOTAL,
    as_rows,
    channel_scales,
    round_columns,
    rows_fn,
    to_stored,
    weight_matrix,
)

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.data import FeedSet

    from .run_view import QuantizeRun

log = logging.getLogger(__name__)

#: ridge strengths tried per layer (times the mean diagonal of H), chosen on the held-out feeds
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: every HOLDOUT-th feed of the refit's feeds scores the ridges and the refit against round-to-nearest
HOLDOUT = 4
#: prefix of the int8 model's tensors in the paired model
PREFIX = "int8::"


def paired_model(float_model: onnx.ModelProto, q_model: onnx.ModelProto,
                 taps: dict[str, tuple[str, str, int]]) -> onnx.ModelProto:
    """The float and the int8 model side by side on the same graph inputs; for each ``key -> (float tensor, int8
    tensor, axis)`` a Concat of the two along ``axis`` named ``key`` (the int8 model's other names get ``PREFIX``).
    Models with control-flow bodies are not paired (their bodies read outer names): ValueError."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in q_model.graph.node
           for a in n.attribute):
        raise ValueError("control-flow bodies")
    keep = {i.name for i in q_model.graph.input}

    def rn(name: str) -> str:
        return name if not name or name in keep else PREFIX + name

    g = onnx.GraphProto()
    g.CopyFrom(float_model.graph)
    for init in q_model.graph.initializer:
        t = g.initializer.add()
        t.CopyFrom(init)
        t.name = rn(init.name)
    for n in q_model.graph.node:
        m = g.node.add()
        m.CopyFrom(n)
        m.name = PREFIX + n.name
        m.input[:] = [rn(x) for x in n.input]
        m.output[:] = [rn(x) for x in n.output]
    for key, (tf, tq, axis) in taps.items():
        g.node.append(helper.make_node("Concat", [tf, rn(tq)], [key], name=key, axis=axis))
    del g.value_info[:]
    opsets = {o.domain: o.version for o in float_model.opset_import}
    for o in q_model.opset_import:
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(float_model.ir_version, q_model.ir_version)
    return model


def float_bias(node: gs.Node, n_out: int) -> np.ndarray | None:
    """The layer's float bias as [N] (zeros for a Conv without one), or None when it has no 1-D bias slot."""
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = const_value(node.inputs[2])
            return None if b is None else np.asarray(b, np.float64).reshape(-1)
        return np.zeros(n_out)
    slot = bias_slot(node)
    if node.op == "Gemm" and slot is not None and float(node.attrs.get("beta", 1.0)) == 1.0:
        b = const_value(node.inputs[slot])
        if b is not None and b.shape == (n_out,):
            return np.asarray(b, np.float64)
    return None


def blocks(g, k: int, with_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, C, F) of the paired rows' Gram ``g`` (2K columns: float then int8), each with the ones column appended
    when ``with_bias``: H = X_q^T X_q, C = X_q^T X_f, F = X_f^T X_f."""
    x = g.xtx
    f, c, h = x[:k, :k], x[k:, :k], x[k:, k:]
    if not with_bias:
        return h, c, f
    sf, sq, r = g.row_sum[:k], g.row_sum[k:], float(g.rows)

    def aug(m: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        return np.block([[m, col[:, None]], [row[None, :], np.array([[r]])]])

    return aug(h, sq, sq), aug(c, sq, sf), aug(f, sf, sf)


def heldout_error(v: np.ndarray, wbar: np.ndarray, h: np.ndarray, c: np.ndarray, f: np.ndarray) -> float:
    """``||X_q V^T − X_f W̄^T||²`` from held-out moments."""
    return float(np.einsum("ok,ok->", v @ h, v) - 2 * np.einsum("ok,ok->", v @ c, wbar)
                 + np.einsum("ok,ok->", wbar @ f, wbar))


def ridge_fit(wbar: np.ndarray, h: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """V with ``V^T = W̄^T + (H + λ I)^-1 (C − H) W̄^T``."""
    a = h.copy()
    a[np.diag_indices(a.shape[0])] += lam
    return wbar + np.linalg.solve(a, (c - h) @ wbar.T).T


def solve_layer(run: QuantizeRun, name: str, node: gs.Node, wm: np.ndarray, fit, held, out: dict) -> None:
    """One layer: ridge chosen on ``held``, integers for the refit weights, kept when they beat round-to-nearest
    on ``held``; records ``run.rounded`` / ``run.bias_shift`` and ``out[name]`` (held-out dB gain, ridge)."""
    k = wm.shape[1]
    b = float_bias(node, wm.shape[0])
    with_bias = b is not None
    h, c, _ = blocks(fit, k, with_bias)
    hh, ch, fh = blocks(held, k, with_bias)
    wbar = np.concatenate([wm, b[:, None]], axis=1) if with_bias else wm
    m = float(np.mean(np.diag(h)[:k])) or 1.0
    fits = {lam: ridge_fit(wbar, h, c, lam * m) for lam in RIDGES}
    errs = {lam: heldout_error(v, wbar, hh, ch, fh) for lam, v in fits.items()}
    lam = min(errs, key=errs.get)
    v = fits[lam]
    scale = channel_scales(v[:, :k], h[:k, :k])
    qi = round_columns(v, h, scale, free=1 if with_bias else 0)
    vq = qi * scale[:, None]
    w = np.asarray(node.inputs[weight_slot(node)].values, np.float32)
    axis = weight_axis(node, w)
    rtn = as_rows(node, qm.quantize_weight(w, qm.INT8, axis).dequantized())
    if with_bias:
        rtn = np.concatenate([rtn, (b + run.bias_shift.get(name, 0.0))[:, None]], axis=1)
    e_rtn, e_new = heldout_error(rtn, wbar, hh, ch, fh), heldout_error(vq, wbar, hh, ch, fh)
    if not e_new < e_rtn:
        out[name] = {"kept": "nearest", "heldout_db": round(10 * np.log10(max(e_rtn, 1e-30) / max(e_new, 1e-30)), 2)}
        return
    q_stored = to_stored(node, np.rint(qi[:, :k]), w.shape).astype(np.int8)
    s32 = scale.astype(np.float32)
    run.rounded[name] = qm.QuantizedWeight(q_stored, s32, np.zeros(s32.shape, np.int8), axis)
    if with_bias:
        run.bias_shift[name] = vq[:, k] - b
    out[name] = {"kept": "refit", "ridge": lam,
                 "heldout_db": round(10 * np.log10(max(e_rtn, 1e-30) / max(e_new, 1e-30)), 2)}


def stage_groups(graph: gs.Graph, todo: list) -> list[list]:
    """``todo`` (graph order) in stages by depth: a layer's stage is one more than the deepest refit layer upstream
    of it, so no layer is fit on inputs that a refit in its own stage changes afterwards (a layer fit on its
    predecessor's round-to-nearest error and then fed the refit predecessor corrects an error that is gone: on
    ddddocr_det six stages by count took the layer outputs from ~10 dB to below 0 dB). A stage is split further when
    its Gram matrices exceed ``GRAM_BUDGET_BYTES``."""
    refit = {id(item[1]) for item in todo}
    depth: dict[int, int] = {}
    for n in graph.nodes:  # graph order is topological (``StaticRun.base`` is toposorted)
        d = 0
        for t in n.inputs:
            for p in t.inputs:
                d = max(d, depth.get(id(p), 0) + (1 if id(p) in refit else 0))
        depth[id(n)] = d
    by_depth: dict[int, list] = {}
    for item in todo:
        by_depth.setdefault(depth.get(id(item[1]), 0), []).append(item)
    groups: list[list] = []
    for d in sorted(by_depth):
        cur: list = []
        size = 0
        for item in by_depth[d]:
            k2 = 2 * item[2].shape[1] + 2
            if cur and size + 16 * k2 * k2 > GRAM_BUDGET_BYTES:  # the fit and the held-out Gram
                groups.append(cur)
                cur, size = [], 0
            cur.append(item)
            size += 16 * k2 * k2
        groups.append(cur)
    return groups


def split_feeds(feeds: FeedSet) -> tuple[FeedSet, FeedSet]:
    """(fit feeds, held-out feeds: every ``HOLDOUT``-th) of ``feeds``."""
    from onnxcompress.data import FeedSet

    n = len(feeds)
    held_idx = {i for i in range(n) if i % HOLDOUT == HOLDOUT - 1} if n >= HOLDOUT else set()

    def pick(held: bool):
        def gen():
            for i, f in enumerate(feeds):
                if (i in held_idx) == held:
                    yield f
        return gen

    n_held = len(held_idx)
    if not n_held:  # too few feeds to hold any out: score on the fit feeds
        return feeds, feeds
    return (FeedSet(pick(False), feeds.inputs, feeds.source, n - n_held, feeds.synthetic),
            FeedSet(pick(True), feeds.inputs, feeds.source, n_held, feeds.synthetic))


def refit_layers(run: QuantizeRun, layers: list[str]) -> dict:
    """The stage (module docstring) for ``layers`` (int8 anchors of ``run.base``, in graph order); fills
    ``run.rounded`` / ``run.bias_shift`` and returns its stats."""
    t0 = time.perf_counter()
    base_nodes = {n.name: n for n in run.base.nodes if n.name}
    order = {n.name: i for i, n in enumerate(run.base.nodes)}
    todo, skipped = [], {}
    for name in sorted(layers, key=lambda x: order.get(x, 0)):
        node = base_nodes.get(name)
        wmx = weight_matrix(node) if node is not None else None
        if wmx is None:
            skipped[name] = "depthwise/grouped Conv or an unusual weight: round-to-nearest"
        elif wmx[0].shape[1] > MAX_COLUMNS:
            skipped[name] = f"{wmx[0].shape[1]} input columns: round-to-nearest"
        else:
            todo.append((name, node, wmx[0]))
    fit_feeds, held_feeds = split_feeds(run.feeds(run.p.refit_samples))
    results: dict[str, dict] = {}
    groups = stage_groups(run.base, todo)
    for gi, group in enumerate(groups):
        q_model = run.export(run.build().graph)
        q_inputs = {n.name: n.input[0] for n in q_model.graph.node if n.name and n.input}
        taps, rows = {}, {}
        for i, (name, node, wm) in enumerate(group):
            if name not in q_inputs:
                skipped[name] = "not quantized in the int8 model"
                continue
            w_shape = tuple(np.shape(node.inputs[weight_slot(node)].values))
            axis = 1 if node.op == "Conv" else -1
            key = f"refit_pair::{name}"
            taps[key] = (node.inputs[0].name, q_inputs[name], axis)
            paired_shape = (w_shape[0], 2 * w_shape[1], *w_shape[2:]) if node.op == "Conv" else w_shape
            per_feed = max(16, -(-max(ROWS_TOTAL, ROWS_PER_COLUMN * wm.shape[1]) // max(len(fit_feeds), 1)))
            rows[key] = (node, paired_shape, per_feed, 2000 + 7 * gi + i)
        if not taps:
            continue
        try:
            model = paired_model(run.float_model, q_model, taps)
        except ValueError as exc:
            return {"layers": 0, "skipped": {"*": f"not refit: {exc}"}, "seconds": round(time.perf_counter() - t0, 2)}
        grams = []
        for feeds, label in ((fit_feeds, "fit"), (held_feeds, "held-out")):
            store = StatisticsStore(model, feeds, run.ctx, f"paired float/int8 model (refit {label})")
            req = StatsRequest(samples=len(feeds))
            for key, (node, shape, per_feed, seed) in rows.items():
                req.second_moments[key] = (key, rows_fn(node, shape, per_feed, seed))
            store.get(req)
            grams.append(store)
        for name, node, wm in group:
            key = f"refit_pair::{name}"
            if key not in rows:
                continue
            gf, gh = grams[0].gram(key, samples=len(fit_feeds)), grams[1].gram(key, samples=len(held_feeds))
            if gf is None or gh is None or gf.rows == 0:
                skipped[name] = "no input rows collected"
                continue
            solve_layer(run, name, node, wm, gf, gh, results)
    gains = np.array([r["heldout_db"] for r in results.values() if r["kept"] == "refit"])
    return {
        "layers": int(gains.size),
        "kept_nearest": sorted(n for n, r in results.items() if r["kept"] == "nearest"),
        "skipped": skipped,
        "stages": len(groups),
        "heldout_db_gain_median": round(float(np.median(gains)), 2) if gains.size else None,
        "ridges": {str(r): sum(1 for x in results.values() if x.get("ridge") == r) for r in RIDGES},
        "samples": {"fit": len(fit_feeds), "held_out": len(held_feeds)},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def refit_stage(run: QuantizeRun, ref) -> None:
    """``weight_rounding=refit`` after the float-layer search: refit the int8 layers of the current build (the
    automatically float layers in place, so no refit compensates an error that a float layer removes), record the
    model's score before and after in ``run.stats["weight_rounding"]``."""
    from . import fidelity as fid

    b = run.build()
    before = fid.score_model(ref, run.export(b.graph))
    stats = refit_layers(run, b.plan.int8_anchor_names())
    after = fid.score_model(ref, run.export(run.build().graph))
    stats["score_nearest"] = {k: round(v, 5) for k, v in before.items()}
    stats["score_refit"] = {k: round(v, 5) for k, v in after.items()}
    stats["note"] = "scores on the evaluation feeds, which include the refit's feeds (in-sample)"
    run.stats["weight_rounding"] = stats


__all__ = ["blocks", "heldout_error", "paired_model", "refit_layers", "refit_stage", "ridge_fit", "split_feeds"]
