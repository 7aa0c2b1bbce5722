"""Ridge solves of distill's layer refits, on the streamed normal equations (``normal_equations.Normal``).

A layer computes y = W x + b on rows: Conv on im2col patches (``onnxcompress.analyses.conv_rows``: one row per
output position, columns Cin*k, C order of W[:, c, i, j]), Gemm/MatMul on the rows of its input. With X the
student's input rows (an extra column of ones when the layer has a bias) and Y the teacher's output rows (restricted
to the kept output channels):

    [W; b] = argmin ||X [W; b] - Y||^2 + lambda ||W - W0||^2 = (X^T X + lambda I')^{-1} (X^T Y + lambda I' W0),
    lambda = ridge * mean(diag(X^T X)), W0 the current weights (the bias is not penalised): directions the
    calibration data does not excite keep their weights instead of collapsing to 0.

Only X^T X and X^T Y are accumulated, feed by feed; a random subset of rows per feed (output positions for Conv)
bounds the cost. Variants:

- depthwise Conv: one small system per channel (k x k, batched);
- sparse weights (after ``prune-weights``): each output column is solved on its own support, zeros stay zero;
- quantized weights (a DequantizeLinear of constant integers): the float solution is re-quantized on the existing
  scale/zero-point grid, then the bias is re-solved for the quantized weights:
  b = (sum Y - (sum X) W_q) / n from the same statistics;
- a refit is kept only if it lowers the objective on the accumulated statistics;
- ridge selection (``select_ridge``): every 4th feed is held out; lambda is chosen among ridge x {1, 10, 100, 1000}
  by the held-out objective ||X_h W - Y_h||^2 = tr(W^T A_h W) - 2 tr(W^T B_h) + const, and the current weights win
  when no refit beats them there; the chosen lambda is then solved on all feeds. With few rows per unknown (MiniLM:
  ~1.3k tokens for a 1014-input FFN projection) a weak ridge interpolates the calibration tokens and the refit
  generalises worse than the pruned weights it replaces.

Layers that cannot be refit this way (ConvTranspose, grouped Conv, very wide inputs) get bias correction:
b += mean(Y_teacher - Y_student) per output channel.
"""

from __future__ import annotations

import numpy as np

from .normal_equations import Normal


def solve(
    stats: Normal,
    ridge: float,
    has_bias: bool,
    mask: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """Ridge solution of the accumulated system, shrunk towards ``prior`` (the current weights) rather than 0:
    (X^T X + lambda I') W = X^T Y + lambda I' W_prior. A weight whose input never fires on the calibration data keeps
    its value. ``mask`` [K(+1), N] restricts each column's support (zeros stay zeros)."""
    a = stats.xtx
    b = stats.xty
    k = a.shape[-1] - (1 if has_bias else 0)
    if stats.per_channel:
        diag = np.einsum("ckk->ck", a)[:, :k]
        lam = ridge * np.maximum(diag.mean(axis=1), 1e-12)
        reg = np.zeros(a.shape[:2])
        reg[:, :k] = lam[:, None]
        rhs = b + (reg * prior if prior is not None else 0.0)
        a_reg = a + reg[:, :, None] * np.eye(a.shape[-1])[None] + 1e-12 * np.eye(a.shape[-1])
        return np.linalg.solve(a_reg, rhs[..., None])[..., 0]
    lam = ridge * max(float(np.mean(np.diag(a)[:k])), 1e-12)
    reg = np.zeros(a.shape[0])
    reg[:k] = lam
    a_reg = a + np.diag(reg + 1e-12)
    rhs = b + (reg[:, None] * prior if prior is not None else 0.0)
    if mask is None:
        return _sym_solve(a_reg, rhs)
    out = np.zeros_like(rhs)
    for j in range(rhs.shape[1]):
        s = np.flatnonzero(mask[:, j])
        if s.size:
            out[s, j] = _sym_solve(a_reg[np.ix_(s, s)], rhs[s, j])
    return out


RIDGE_GRID = (1.0, 10.0, 100.0, 1000.0)


def select_ridge(fit: Normal, hold: Normal | None, ridge: float, has_bias: bool, prior: np.ndarray,
                 mask: np.ndarray | None = None) -> float | None:
    """The ridge (from ``ridge`` x ``RIDGE_GRID``) whose solution on ``fit`` has the lowest objective on ``hold``;
    None when the current weights ``prior`` do at least as well there (no refit generalises). Without held-out rows:
    ``ridge``."""
    if hold is None or hold.rows == 0 or fit.rows == 0:
        return ridge
    best, best_obj = None, objective(hold, prior)
    for r in (ridge * g for g in RIDGE_GRID):
        obj = objective(hold, solve(fit, r, has_bias, mask, prior=prior))
        if obj < best_obj:
            best, best_obj = r, obj
    return best


def _sym_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        c = np.linalg.cholesky(a)
        z = np.linalg.solve(c, b)
        return np.linalg.solve(c.T, z)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def objective(stats: Normal, wb: np.ndarray) -> float:
    """||X wb - Y||^2 from the statistics (dense only), up to the constant ||Y||^2."""
    a, b = stats.xtx, stats.xty
    if stats.per_channel:
        return float(np.einsum("ck,ckl,cl->", wb, a, wb) - 2 * np.einsum("ck,ck->", wb, b))
    return float(np.sum(wb * (a @ wb)) - 2 * np.sum(wb * b))
