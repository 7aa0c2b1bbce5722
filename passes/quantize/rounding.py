"""Weight rounding optimised against the layer's output (``weight_rounding``): AdaRound's objective, solved in closed
form column by column (the optimal-brain-quantizer / GPTQ order), with scales chosen by the same output error.

For a layer ``y = W x`` (W: [N, K] — Conv output channels x im2col columns, MatMul/Gemm output features x inputs)
and the rows X [R, K] of the inputs it actually sees in the int8 model, the output error of integer weights Ŵ is

    E(Ŵ) = ||X (W − Ŵ)^T||² = Σ_o (w_o − ŵ_o) H (w_o − ŵ_o)^T,        H = X^T X (+ λ I, λ = 1% of mean diag H),

a sum over output channels of quadratic forms in the same H. Round-to-nearest minimises each weight's own error;
here the columns are quantized one at a time (largest ``H_jj`` first) and each column's rounding error
``e = (w_j − ŵ_j) / U_jj`` is pushed onto the columns not yet quantized, ``W[:, j+1:] −= e ⊗ U_j,j+1:``, with U the
upper Cholesky factor of ``H⁻¹`` (the closed-form optimal update of the remaining weights given the rounding of
column j). Vectorised over the N output channels; columns in blocks of ``BLOCK`` with one deferred update per block.

**Scales** per output channel (symmetric int8, ``[−127, 127]``): for each clipping ratio α in ``CLIP_GRID`` the
round-to-nearest weights at scale ``α · max|w_o| / 127`` are scored by ``E`` (not by the weight error alone), and
each channel keeps its best α; the rounding above then runs at those scales.

**Inputs**: H comes from the SHARED activation-statistics collector (``onnxcompress.analyses.activation_stats``:
``StatsRequest.second_moments``, im2col rows of ``onnxcompress.analyses.conv_rows`` for Conv) run on the all-int8
model — so every layer's H is built from the quantized inputs it will see, including the noise of every layer
before it. Layers are collected in chunks under a memory budget (``GRAM_BUDGET_BYTES``), each chunk in one
streaming run; a chunk's Gram matrices are dropped once its layers are solved.

**Bias**: the mean output shift of the new weights, ``(Ŵ − W) · E[x]`` with E[x] the mean design row (Σ X / R from
the same statistics), replaces the round-to-nearest bias correction of the layer (``bias_correction``); for a MatMul
it goes into the bias of the ``Add`` after it (``bias_correction.bias_add``, ``matmul_bias``). Without it the rounding
left its own shift in MiniLM-L6's outputs: weights-only embedding 27.5 dB, with it 30.7 (round-to-nearest 28.1).

**Which layers**: ``weight_rounding=output`` / ``auto``: every int8 anchor; ``matmul``: only the
MatMul/Gemm layers whose input has positions (rank >= 3, ``smoothing.positional``: a transformer's tokens, many rows
per feed), kept by the same measured outputs as ``auto``; a graph without one is left to round-to-nearest with no
build and no statistics run (a CNN's bytes do not change). Their H needs many rows per column: 16 MiniLM feeds
(~1,000 rows for K = 1,536) overfit (weights-only 28.5 dB), 64 feeds gave 30.7 (``rounding_samples``).

Anchors: Conv with group 1, Gemm (no transA, alpha 1), MatMul with a 2-D constant weight; per-channel weights only.
Depthwise and grouped Convs keep round-to-nearest (their H is one small matrix per channel; not collected).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.activation_stats import StatisticsStore, StatsRequest
from onnxcompress.analyses.conv_rows import conv_output_spatial, conv_rows

from . import qparams_math as qm
from .bias_correction import bias_add
from .ort_int8_kernels import attr, const_value, weight_axis, weight_slot
from .smoothing import positional, tensor_ranks

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun

log = logging.getLogger(__name__)

#: clipping ratios tried per output channel, scored on the output error
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
#: columns per block of the rounding loop
BLOCK = 128
#: Gram matrices held at once (float64); bigger sets of layers are collected in several streaming runs
GRAM_BUDGET_BYTES = 600 * 2**20
#: design rows per layer in total (spread evenly over the feeds), at least ``ROWS_PER_COLUMN`` x K
ROWS_TOTAL = 8192
ROWS_PER_COLUMN = 2
#: layers with more im2col columns than this keep round-to-nearest (H's accumulation, R·K² per layer, and its
#: inverse, K³, dominate the stage's time: 2304 = a 3x3 Conv over 256 channels)
MAX_COLUMNS = 2304
#: damping of H: this share of its mean diagonal
DAMP = 0.01


def as_rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """A stored weight as [N, K] float64 rows, one per output channel (the per-channel axis)."""
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1).astype(np.float64)
    if node.op == "Gemm" and attr(node, "transB", 0):
        return w.astype(np.float64)
    return w.T.astype(np.float64)


def weight_matrix(node: gs.Node) -> tuple[np.ndarray, int] | None:
    """(W as [N, K] rows, per-channel axis of the stored weight) for an anchor this module handles, else None."""
    ws = weight_slot(node)
    w = const_value(node.inputs[ws]) if ws is not None else None
    if w is None or w.dtype != np.float32:
        return None
    if node.op == "Conv" and (int(attr(node, "group", 1)) != 1 or w.ndim not in (3, 4)):
        return None
    if node.op == "Gemm" and (attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0 or w.ndim != 2):
        return None
    if node.op == "MatMul" and w.ndim != 2:
        return None
    return as_rows(node, w), weight_axis(node, w)


def to_stored(node: gs.Node, wm: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[N, K] rows back to the stored weight layout ``shape``."""
    if node.op == "Conv":
        return wm.reshape(shape)
    if node.op == "Gemm" and attr(node, "transB", 0):
        return wm.reshape(shape)
    return wm.T.reshape(shape)


def rows_fn(node: gs.Node, w_shape: tuple[int, ...], per_feed: int, seed: int):
    """Design rows of ``node``'s input activation: im2col patches at random output positions (Conv) or the rows of
    the last axis (MatMul/Gemm), at most ``per_feed`` per feed."""
    rng = np.random.default_rng(seed)

    if node.op == "Conv":

        def conv(x: np.ndarray) -> np.ndarray:
            out_sp = conv_output_spatial(node, w_shape, tuple(x.shape[2:]))
            patches, _ = conv_rows(np.asarray(x, np.float32), node, w_shape, out_sp, per_feed, rng)
            return patches.reshape(patches.shape[0], -1)

        return conv

    def dense(x: np.ndarray) -> np.ndarray:
        r = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        if r.shape[0] > per_feed:
            r = r[rng.choice(r.shape[0], per_feed, replace=False)]
        return r

    return dense


def channel_scales(wm: np.ndarray, h: np.ndarray, grid=CLIP_GRID) -> np.ndarray:
    """Per output channel, the symmetric int8 scale ``α · max|w| / 127`` (α in ``grid``) with the least output
    error ``(w − ŵ) H (w − ŵ)^T`` of round-to-nearest. A row whose scale would fall to ``qparams_math.MIN_SCALE``
    or below (zero, or ~0 as a ridge refit leaves a dead channel) gets scale 1/127, all integers 0, as
    ``scale_zero_point`` does. Measured on PP-OCRv4 rec with ``weight_rounding=refit``: dead channels refit to rows of
    max |w| 6.7e-39 and 3.2e-38 (scales ~1e-41, denormal); their int32 bias b / (s_x · s_w) was inf in float32 and
    distill's QAT on that model had a NaN loss from its first evaluation on (nothing trained)."""
    m = np.abs(wm).max(axis=1)
    tiny = m * min(grid) / 127.0 <= qm.MIN_SCALE
    if np.any(tiny & (m > 0)):
        log.info("channel_scales: %d of %d rows ~0 (max |w| %.3g): degenerate scale", int(np.sum(tiny & (m > 0))),
                 m.size, float(m[tiny].max()))
    m = np.where(tiny, 1.0, m)
    best = np.full(wm.shape[0], np.inf)
    scale = m / 127.0
    h32 = h.astype(np.float32)  # a ranking of a few candidates: float32 products are plenty
    for a in grid:
        s = a * m / 127.0
        e = (wm - np.clip(np.rint(wm / s[:, None]), -127, 127) * s[:, None]).astype(np.float32)
        err = np.einsum("ok,ok->o", e @ h32, e).astype(np.float64)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, s, scale)
    return scale


def round_columns(wm: np.ndarray, h: np.ndarray, scale: np.ndarray, free: int = 0) -> np.ndarray:
    """Integer weights [N, K] (−127..127) at per-row ``scale`` minimising ``Σ_o (w_o − ŵ_o) H (w_o − ŵ_o)^T`` column
    by column with error feedback (module docstring). The last ``free`` columns (a bias column of ones) are not
    rounded: they come last, take the feedback of every rounded column and are returned as ``w / scale``, unrounded."""
    n, k = wm.shape
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    order = np.argsort(-np.diag(h)[: k - free], kind="stable")
    order = np.concatenate([order, np.arange(k - free, k)])
    inv_order = np.argsort(order)
    w = wm[:, order].copy()
    hp = h[np.ix_(order, order)]
    try:
        u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        hp[np.diag_indices(k)] += 0.1 * float(np.mean(np.diag(hp)))
        u = np.linalg.cholesky(np.linalg.inv(hp)).T
    s = scale[:, None]
    q = np.zeros_like(w)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].copy()
        errs = np.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = wb[:, j]
            qc = col / s[:, 0] if b0 + j >= k - free else np.clip(np.rint(col / s[:, 0]), -127, 127)
            q[:, b0 + j] = qc
            e = (col - qc * s[:, 0]) / ub[j, j]
            wb[:, j + 1 :] -= np.outer(e, ub[j, j + 1 :])
            errs[:, j] = e
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return q[:, inv_order]


def output_error(wm: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    e = wm - wq
    return float(np.einsum("ok,ok->", e @ h, e))


def round_layers(run: QuantizeRun, model: onnx.ModelProto, layers: list[str]) -> dict:
    """Optimised rounding of ``layers`` (anchor names of the prepared float graph ``run.base``, all quantized in the
    exported all-int8 ``model``); fills ``run.rounded`` (name -> ``QuantizedWeight``) and the bias shifts, returns
    the stage's stats."""
    t0 = time.perf_counter()
    base_nodes = {n.name: n for n in run.base.nodes if n.name}
    q_inputs = {n.name: n.input[0] for n in model.graph.node if n.name and n.input}
    todo = []
    skipped: dict[str, str] = {}
    for name in layers:
        node = base_nodes.get(name)
        wmx = weight_matrix(node) if node is not None else None
        if wmx is None:
            skipped[name] = "depthwise/grouped Conv or an unusual weight: round-to-nearest"
            continue
        if wmx[0].shape[1] > MAX_COLUMNS:
            skipped[name] = f"{wmx[0].shape[1]} input columns: round-to-nearest"
            continue
        if name not in q_inputs:
            skipped[name] = "not in the quantized model"
            continue
        todo.append((name, node, wmx))
    feeds = run.feeds(run.p.rounding_samples)
    n_feeds = len(feeds)
    improved: dict[str, float] = {}
    solve_seconds: dict[str, float] = {}
    chunk: list = []
    chunk_bytes = 0

    def flush() -> None:
        nonlocal chunk, chunk_bytes
        if not chunk:
            return
        store = StatisticsStore(model, feeds, run.ctx, "all-int8 model (rounding)")
        req = StatsRequest(samples=n_feeds)
        for i, (name, node, (wm, _)) in enumerate(chunk):
            k = wm.shape[1]
            total = max(ROWS_TOTAL, ROWS_PER_COLUMN * k)
            per_feed = max(16, -(-total // max(n_feeds, 1)))
            w_shape = tuple(np.shape(node.inputs[weight_slot(node)].values))
            req.second_moments[f"{name}:rows"] = (q_inputs[name], rows_fn(node, w_shape, per_feed, 1000 + i))
        store.get(req)
        for name, node, (wm, _axis) in chunk:
            g = store.gram(f"{name}:rows", samples=n_feeds)
            if g is None or g.rows == 0:
                skipped[name] = "no input rows collected"
                continue
            t_layer = time.perf_counter()
            solve_layer(run, name, node, wm, g.xtx, g.row_sum / g.rows, improved)
            solve_seconds[name] = time.perf_counter() - t_layer
        chunk, chunk_bytes = [], 0

    for item in todo:
        k = item[2][0].shape[1]
        size = 8 * k * k
        if chunk and chunk_bytes + size > GRAM_BUDGET_BYTES:
            flush()
        chunk.append(item)
        chunk_bytes += size
    flush()
    gains = np.array(list(improved.values())) if improved else np.zeros(0)
    return {
        "layers": len(improved),
        "skipped": skipped,
        "output_error_db_gain_median": round(float(np.median(gains)), 2) if gains.size else None,
        "output_error_db_gain_min": round(float(gains.min()), 2) if gains.size else None,
        "samples": n_feeds,
        "seconds_solving": round(sum(solve_seconds.values()), 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def solve_layer(
    run: QuantizeRun, name: str, node: gs.Node, wm: np.ndarray, h: np.ndarray, mean_row: np.ndarray,
    improved: dict[str, float],
) -> None:
    """Scales and rounding of one layer from its H; kept only when its output error beats round-to-nearest."""
    ws = weight_slot(node)
    w = np.asarray(node.inputs[ws].values, np.float32)
    axis = weight_axis(node, w)
    rtn_rows = as_rows(node, qm.quantize_weight(w, qm.INT8, axis).dequantized())
    scale = channel_scales(wm, h)
    qi = round_columns(wm, h, scale)
    wq = qi * scale[:, None]
    e_rtn, e_new = output_error(wm, rtn_rows, h), output_error(wm, wq, h)
    if not e_new < e_rtn:
        return
    improved[name] = 10 * np.log10(e_rtn / e_new) if e_new > 0 else 99.0
    q_stored = to_stored(node, qi, w.shape).astype(np.int8)
    s32 = scale.astype(np.float32)
    run.rounded[name] = qm.QuantizedWeight(q_stored, s32, np.zeros(s32.shape, np.int8), axis)
    shift = (wq - wm) @ mean_row  # the output mean the new weights move, per output channel
    if run.p.bias_correction and (node.op in ("Conv", "Gemm") or (run.p.matmul_bias and bias_add(node) is not None)):
        run.bias_shift[name] = -shift



def positional_matmuls(run: QuantizeRun, layers: list[str]) -> list[str]:
    """The MatMul/Gemm layers of ``layers`` whose input has positions (rank >= 3: a transformer's tokens; see
    ``smoothing.positional``): many rows per feed, so their H is well sampled on the calibration feeds."""
    ranks = tensor_ranks(run.float_model)
    nodes = {n.name: n for n in run.base.nodes if n.name}
    keep = []
    for name in layers:
        n = nodes.get(name)
        if n is not None and n.op in ("MatMul", "Gemm") and n.inputs and positional(n.inputs[0], ranks.get(n.inputs[0].name)):
            keep.append(name)
    return keep


def optimise_rounding(run: QuantizeRun, ref) -> None:
    """The stage: round the all-int8 model's layers against their outputs; with ``weight_rounding=auto`` keep it only
    when the model's outputs on the evaluation feeds are better than with round-to-nearest
    (``float_cost.outputs_better``). Stats under ``run.stats["weight_rounding"]``."""
    from . import fidelity as fid
    from .float_cost import outputs_better

    only = None
    if run.p.weight_rounding == "matmul":
        only = set(positional_matmuls(run, [n.name for n in run.base.nodes if n.name]))
        if not only:  # nothing to round (CNNs): no build, the model is quantized exactly as with nearest
            drop_matmul_shifts(run)
            return
    cached = run.all_int8
    if cached is not None and cached[0] == run.method and not run.auto_float:
        plan, model_rtn = cached[1], cached[2]
    else:
        b = run.build()
        plan, model_rtn = b.plan, run.export(b.graph)
    layers = [n for n in plan.int8_anchor_names() if only is None or n in only]
    saved_shift = dict(run.bias_shift)
    stats = round_layers(run, model_rtn, layers)
    run.stats["weight_rounding"] = stats
    if not run.rounded:
        stats["kept"] = False
        return
    b = run.build()
    model_r = run.export(b.graph)
    sc_rtn, sc_r = fid.score_model(ref, model_rtn), fid.score_model(ref, model_r)
    stats["score_nearest"] = {k: round(v, 5) for k, v in sc_rtn.items()}
    stats["score_optimised"] = {k: round(v, 5) for k, v in sc_r.items()}
    keep = bool(run.p.weight_rounding == "output" or outputs_better(sc_r, sc_rtn))
    stats["mode"] = run.p.weight_rounding
    stats["kept"] = keep
    if keep:
        run.all_int8 = (run.method, b.plan, model_r)
    else:
        run.rounded.clear()
        run.bias_shift.clear()
        run.bias_shift.update(saved_shift)
        run.all_int8 = (run.method, plan, model_rtn)
        if run.p.weight_rounding == "matmul":
            drop_matmul_shifts(run)


def drop_matmul_shifts(run: QuantizeRun) -> None:
    """``weight_rounding=matmul`` without a kept rounding: the MatMul bias corrections (``matmul_bias``) go too, so
    the model is the round-to-nearest one of the twelfth session's default (PP-OCRv4 rec, rounding not kept: with
    them its hard-line agreement moved 0.266 -> 0.234, 2 of 64 lines, for +0.0 dB). The cached all-int8 model
    carried them: it is built again when needed."""
    nodes = {n.name: n for n in run.base.nodes if n.name}
    gone = [k for k in run.bias_shift if k in nodes and nodes[k].op == "MatMul"]
    for k in gone:
        del run.bias_shift[k]
    if gone:
        run.all_int8 = None

__all__ = ["as_rows", "channel_scales", "optimise_rounding", "output_error", "round_columns", "round_layers",
           "weight_matrix"]
