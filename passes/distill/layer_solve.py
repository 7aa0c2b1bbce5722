"""Solving one layer from its statistics and writing the result into the graph.

``solve_layer`` turns a layer's accumulated statistics into new weights (see ``ridge`` for the maths):

- least squares (``conv``, ``gemm``, ``matmul``): W as a [K, N] matrix with y = x @ W (Conv: W.reshape(Cout, -1)^T;
  Gemm: alpha and transB folded in, the bias scaled by beta), the bias as the last row; sparse weights (more than
  20% zeros) keep their support; the ridge is chosen on the held-out feeds (or fixed); the refit is kept only when
  it lowers the objective on all feeds; quantized weights are re-quantized and the bias re-solved for them:
  b = (X^T Y[bias row] - X^T X[bias row, :K] W_q) / n;
- depthwise Conv: the same per channel;
- bias correction (``bias``): b += mean(y_teacher - y_student) per output channel.

A Conv / ConvTranspose / Gemm without a bias is given a zero one (``<output>_bias``) to hold the fitted bias.
- a clustered weight (``cluster``'s scalar decode): its shared values and channel scales (``_solve_shared``), the
  indices kept, so the file keeps its size and each tensor its k values.

Returns (what was done, relative residual before, after): "ls", "ls shared" (a clustered weight), "bias", or the
reason the layer was skipped.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.codebook_refit import gram_product, refit_codebook

from .layers import Layer
from .normal_equations import Normal
from .ridge import objective, select_ridge, solve
from .weight_refs import WeightRef

log = logging.getLogger(__name__)

HELD_OUT = "held-out feeds prefer the current weights"


def solve_layer(L: Layer, *, ridge: float, max_inputs: int, bias_correction: bool = True,
                choose_ridge: bool = True) -> tuple[str, float, float] | None:
    """Refit (or bias-correct) ``L`` from ``L.stats`` / ``L.hold`` / ``L.bias_sum``; None when there is nothing to
    do. ``choose_ridge``: pick the ridge on the held-out statistics (``select_ridge``), else use ``ridge``."""
    if L.reason:
        log.debug("distill: %s skipped: %s", L.node.name, L.reason)
        return (L.reason, 0.0, 0.0)
    if L.kind == "bias":
        if L.bias_sum is None or not bias_correction:
            return None
        delta = L.bias_sum / max(L.bias_count, 1)
        b_ref = L.b or _add_bias(L)
        if b_ref is None:
            return ("no bias to correct", 0.0, 0.0)
        cur = b_ref.get().reshape(-1)
        if cur.size != delta.size:
            return ("bias shape", 0.0, 0.0)
        b_ref.set((cur + delta).reshape(b_ref.get().shape))
        return ("bias", 0.0, 0.0)
    st = L.stats
    if st is None or st.rows == 0:
        return ("no rows", 0.0, 0.0)
    hold, L.hold = L.hold, None
    w = L.w.get()
    has_bias = L.b is not None or L.kind in ("conv", "dwconv")
    if L.w.decode is not None:
        return _solve_shared(L, st, hold, w, has_bias, max_inputs)
    if L.kind == "dwconv":
        cur = w.reshape(w.shape[0], -1)
        b_cur = L.b.get().reshape(-1) if L.b is not None else np.zeros(w.shape[0])
        wb_cur = np.concatenate([cur, b_cur[:, None]], axis=1)
        fit = ridge_refit(st, hold, wb_cur, ridge, True, None, choose_ridge, L.node.name)
        if isinstance(fit, str):
            return (fit, 0.0, 0.0)
        new, st, before = fit
        w_eff = L.w.set(new[:, :-1].reshape(w.shape)).reshape(w.shape[0], -1)
        if L.w.quantized:  # bias for the re-quantized weights, per channel
            a, b = st.xtx, st.xty
            new[:, -1] = (b[:, -1] - np.einsum("ck,ck->c", a[:, -1, :-1], w_eff)) / np.maximum(
                a[:, -1, -1], 1
            )
        b_ref = L.b or _add_bias(L)
        b_ref.set(new[:, -1].reshape(b_ref.get().shape))
        return (
            "ls",
            relative_error(st, before),
            relative_error(st, objective(st, np.concatenate([w_eff, new[:, -1:]], axis=1))),
        )
    wm = to_matrix(L, w)  # [K, N]
    k = wm.shape[0]
    if k > max_inputs:
        return (f"more than {max_inputs} inputs", 0.0, 0.0)
    b_cur = bias_vector(L, wm.shape[1]) if has_bias else None
    wb_cur = np.concatenate([wm, b_cur[None, :]], axis=0) if has_bias else wm
    mask = None
    if np.any(wm == 0):  # pruned weights (any exact zero): keep the support, the zeros stay zeros
        mask = np.concatenate([wm != 0, np.ones((1, wm.shape[1]), bool)], axis=0) if has_bias else wm != 0
    fit = ridge_refit(st, hold, wb_cur, ridge, has_bias, mask, choose_ridge, L.node.name)
    if isinstance(fit, str):
        return (fit, 0.0, 0.0)
    new, st, before = fit
    w_eff = from_matrix(L, new[:k], w.shape)
    w_eff_m = to_matrix(L, L.w.set(w_eff))
    if has_bias:
        b_new = requantized_bias(st, k, w_eff_m) if L.w.quantized else new[k]
        set_bias(L, b_new)
        final = np.concatenate([w_eff_m, b_new[None, :]], axis=0)
    else:
        final = w_eff_m
    return ("ls", relative_error(st, before), relative_error(st, objective(st, final)))


def _fit_kept(fit, st: Normal, hold: Normal | None, wb_cur: np.ndarray):
    """``fit(stats) -> (codebook, scales, [M; b])`` on the training feeds, kept only if the held-out feeds'
    objective falls below the current weights' too; then fitted on all feeds and kept only if the objective falls.
    Returns (all feeds' statistics, the current objective, the fit), or the reason it was not kept."""
    if hold is not None and hold.rows and not objective(hold, fit(st)[2]) < objective(hold, wb_cur):
        return HELD_OUT
    st = st.merged(hold)
    before = objective(st, wb_cur)
    fitted = fit(st)
    return (st, before, fitted) if objective(st, fitted[2]) < before else "no improvement"


def _bias_rows(a: np.ndarray, b_rows: np.ndarray, k: int):
    """The bias row of the statistics in rows form: g = X^T 1 [K] (shared) or [C, K] (per row), n = 1^T 1, y_b =
    1^T Y per output row; ``a`` is X^T X [K+1, K+1] or [C, K+1, K+1], ``b_rows`` X^T Y per output row [N, K+1]."""
    return a[..., :k, k], np.maximum(a[..., k, k], 1.0), b_rows[:, k]


def _solve_shared(L: Layer, st: Normal, hold: Normal | None, w: np.ndarray, has_bias: bool,
                  max_inputs: int) -> tuple[str, float, float]:
    """A clustered weight, each output row m_o = s_o T[L_o] (``analyses.shared_values``: T the flat codebook, scalar
    or vector codes), refit in its shared values. With G the rows' Gram (one [K, K], or one per channel for a
    depthwise kernel) and B the rows' X^T Y, the bias row eliminated (G' = G - g g^T / n, B'_o = B_o - g y_b,o / n:
    the bias is free at every T): T by ``refit_codebook`` (conjugate gradients, labels fixed, zero centroids fixed),
    then each output's scale s_o = (u_o^T B'_o) / (u_o^T G'_o u_o) with u_o = T[L_o], then T again; the bias
    b_o = (y_b,o - g^T m_o) / n. Fitted on the training feeds first and kept only if ||X [M; b] - Y||^2 falls on the
    held-out feeds (``hold``) too, then fitted on all of them."""
    dec = L.w.decode
    depthwise = L.kind == "dwconv"

    def rows_of(m: np.ndarray) -> np.ndarray:
        """W-shaped ``m`` as rows [N, K]: a depthwise kernel's channels (its statistics are per channel: X^T X
        [C, K+1, K+1], X^T Y [C, K+1]), else the columns of y = x @ W's matrix (X^T X [K, K], X^T Y [K, N])."""
        return m.reshape(w.shape[0], -1) if depthwise else to_matrix(L, m).T

    labels = dec.labels.reshape(w.shape[0], -1) if depthwise else \
        (dec.labels if L.trans_b else dec.labels.T) if L.kind == "gemm" else \
        to_matrix(L, dec.labels.astype(np.float64)).astype(np.int64).T  # not rows_of: Gemm's alpha
    m_cur, scale_rows = rows_of(w), rows_of(dec.scales())  # [N, K]; gemm: alpha folded into both
    k = m_cur.shape[1]
    if not depthwise and k > max_inputs:
        return (f"more than {max_inputs} inputs", 0.0, 0.0)
    if not np.allclose(scale_rows, scale_rows[:, :1]):
        return ("clustered weight with scales along its inputs", 0.0, 0.0)
    book0 = dec.codebook()
    if labels.shape != m_cur.shape or not np.allclose(book0[labels] * scale_rows, m_cur, rtol=1e-5, atol=1e-7):
        return ("clustered weight in a layout not understood", 0.0, 0.0)
    has_bias = has_bias or depthwise
    stored_scale = dec.scale_shape() is not None and int(np.prod(dec.scale_shape())) == m_cur.shape[0]

    def stats_rows(stats: Normal) -> tuple[np.ndarray, np.ndarray]:
        return stats.xtx, (stats.xty if depthwise else stats.xty.T)

    def as_wb(m: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """Rows [N, K] (+ bias [N]) in the statistics' own layout (``ridge.objective``)."""
        if depthwise:
            return np.concatenate([m, bias[:, None]], axis=1)
        return m.T if bias is None else np.concatenate([m.T, bias[None, :]], axis=0)

    b_cur = (L.b.get().reshape(-1) if L.b is not None else np.zeros(m_cur.shape[0])) if depthwise else \
        (bias_vector(L, m_cur.shape[0]) if has_bias else None)
    wb_cur = as_wb(m_cur, b_cur)

    def fit(stats: Normal) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b_rows = stats_rows(stats)
        if has_bias:
            g, n, y_b = _bias_rows(a, b_rows, k)
            gram = a[..., :k, :k] - np.einsum("...i,...j->...ij", g, g) / np.asarray(n)[..., None, None]
            xty = b_rows[:, :k] - (y_b / n)[:, None] * g
        else:
            gram, xty = a, b_rows
        book, scale = book0.copy(), scale_rows[:, 0].copy()  # scale per output row, alpha included
        for rnd in range(2):
            book = refit_codebook(book[None, :], labels, gram, xty=xty.T, fixed=(book0 == 0)[None, :],
                                  row_scale=scale)[0][0]
            if rnd == 0 and stored_scale:
                u = book[labels]
                den = np.sum(gram_product(u, gram) * u, axis=1)
                scale = np.where(den > 0, np.sum(u * xty, axis=1) / np.where(den > 0, den, 1.0), scale)
        m = book[labels] * scale[:, None]
        return book, scale, as_wb(m, (y_b - np.sum(g * m, axis=1)) / n if has_bias else None)

    kept = _fit_kept(fit, st, hold, wb_cur)
    if isinstance(kept, str):
        return (kept, 0.0, 0.0)
    st, before, (book, scale, _) = kept
    alpha = L.alpha if L.kind == "gemm" else 1.0
    m_eff = rows_of(dec.set(book, (scale / alpha).reshape(dec.scale_shape()) if stored_scale else None))
    b_eff = None
    if has_bias:  # the bias for the stored (rounded) values
        g, n, y_b = _bias_rows(*stats_rows(st), k)
        b_eff = (y_b - np.sum(g * m_eff, axis=1)) / n
        set_bias(L, b_eff)
    return ("ls shared", relative_error(st, before), relative_error(st, objective(st, as_wb(m_eff, b_eff))))


def ridge_refit(st: Normal, hold: Normal | None, wb_cur: np.ndarray, ridge: float, n_bias: bool | int,
                mask: np.ndarray | None, choose_ridge: bool, label: str = "") -> tuple[np.ndarray, Normal, float] | str:
    """The ridge refit of the current rows ``wb_cur`` (weights, then ``n_bias`` bias rows): the ridge chosen on
    ``hold`` (or ``ridge``), solved on all feeds, kept only when it lowers the objective there. Returns (the new
    rows, the merged statistics, the objective before) or the reason it is not kept."""
    ridge_used = select_ridge(st, hold, ridge, n_bias, wb_cur, mask) if choose_ridge else ridge
    if ridge_used is None:
        return HELD_OUT
    st = st.merged(hold)
    new = solve(st, ridge_used, n_bias, mask, prior=wb_cur)
    before, after = objective(st, wb_cur), objective(st, new)
    if not after < before:
        log.debug("distill: %s: refit does not lower the objective (%.4g >= %.4g)", label, after, before)
        return "no improvement"
    return new, st, before


def requantized_bias(st: Normal, row: int, w_q: np.ndarray) -> np.ndarray:
    """The bias row ``row`` re-solved for the re-quantized weights ``w_q`` [K, N] (the weight rows fixed):
    b = (X^T Y[row] - X^T X[row, :K] W_q) / n."""
    k = w_q.shape[0]
    return (st.xty[row] - st.xtx[row, :k] @ w_q) / max(st.xtx[row, row], 1.0)


def relative_error(st: Normal, obj: float) -> float:
    """Residual energy relative to the target's: (||XW - Y||^2) / ||Y||^2."""
    return max(0.0, (obj + st.yty) / st.yty) if st.yty > 0 else 0.0


def to_matrix(L: Layer, w: np.ndarray) -> np.ndarray:
    """The layer's weight as [K, N] with y = x @ W (Gemm: alpha folded in)."""
    if L.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if L.kind == "gemm":
        return (w.T if L.trans_b else w) * L.alpha
    return w


def from_matrix(L: Layer, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if L.kind == "conv":
        return m.T.reshape(shape)
    if L.kind == "gemm":
        b = m / L.alpha
        return b.T if L.trans_b else b
    return m


def bias_vector(L: Layer, n: int) -> np.ndarray:
    if L.b is None:
        return np.zeros(n)
    b = L.b.get().reshape(-1)
    return b * L.beta if L.kind == "gemm" else b


def set_bias(L: Layer, b: np.ndarray, tied: bool = False) -> None:
    """Write the layer's bias (``tied``: in place, for every reader of a shared bias: ``tied_solve``)."""
    ref = L.b or _add_bias(L)
    if ref is None:
        return
    shape = ref.get().shape
    if L.kind == "gemm":
        b = b / L.beta
    ref.set(b.reshape(shape), tied)


def _add_bias(L: Layer) -> WeightRef | None:
    """Give a Conv / ConvTranspose / Gemm a zero bias input (float, like the layer's output)."""
    node = L.node
    if node.op not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    w = L.w.get()
    n = {
        "Conv": w.shape[0],
        "ConvTranspose": w.shape[1] * int(node.attrs.get("group", 1)),
        "Gemm": w.shape[0] if L.trans_b else w.shape[1],
    }[node.op]
    dtype = np.float32 if L.w.quantized or L.w.decode is not None else np.asarray(node.inputs[1].values).dtype
    const = gs.Constant(f"{node.outputs[0].name}_bias", np.zeros(n, dtype=dtype))
    while len(node.inputs) < 3:
        node.inputs.append(const)
    node.inputs[2] = const
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
        L.beta = 1.0
    L.b = WeightRef(node, 2)
    return L.b

