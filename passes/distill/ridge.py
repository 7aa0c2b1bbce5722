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
- sparse weights (after ``prune-weights``): each output column is solved on its own support (one LU solve per
  column, ``masked_solve``), zeros stay zero;
- quantized weights (a DequantizeLinear of constant integers): the float solution is re-quantized on the existing
  scale/zero-point grid, then the bias is re-solved for the quantized weights:
  b = (sum Y - (sum X) W_q) / n from the same statistics;
- a refit is kept only if it lowers the objective on the accumulated statistics;
- ridge selection (``select_ridge``): every 4th feed is held out; lambda is chosen among ridge x {1, 10, 100, 1000}
  by the held-out objective ||X_h W - Y_h||^2 = tr(W^T A_h W) - 2 tr(W^T B_h) + const, and the current weights win
  when no refit beats them there; the chosen lambda is then solved on all feeds. The objective is a sum over output
  columns, so with sparse weights (one system per column) it is estimated on ``SELECT_COLUMNS`` evenly spaced
  columns: the selection then costs 4 x 64 column solves instead of 4 x N (MiniLM-L3 after 50% pruning: the
  refit's solves took 247 of its 272 s, 4/5 of them in the selection). With few rows per unknown (MiniLM:
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
    has_bias: bool | int,
    mask: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """Ridge solution of the accumulated system, shrunk towards ``prior`` (the current weights) rather than 0:
    (X^T X + lambda I') W = X^T Y + lambda I' W_prior. A weight whose input never fires on the calibration data keeps
    its value. ``has_bias``: the last row is a bias, not penalised (an int: that many last rows, the biases of a tied
    weight's readers, ``tied_solve``). ``mask`` [K(+1), N] restricts each column's support (zeros stay zeros); with a mask, ``columns`` solves
    only those output columns (the rest of the result is 0)."""
    a = stats.xtx
    b = stats.xty
    k = a.shape[-1] - int(has_bias)  # a count of free rows is accepted too: one bias row per tied reader
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
    return masked_solve(a_reg, rhs, mask, columns)


#: output columns the held-out objective is estimated on when each column is its own system (sparse weights)
SELECT_COLUMNS = 64


def masked_solve(a_reg: np.ndarray, rhs: np.ndarray, mask: np.ndarray,
                 columns: np.ndarray | None = None) -> np.ndarray:
    """Solve a_reg[S_j, S_j] w_j = rhs[S_j, j] for every column j (``columns``: only those; the others stay 0), S_j
    the rows where ``mask[:, j]``. One LU solve per column (2/3 s^3 flops): a Cholesky followed by NumPy's general
    solves of its triangles costs 5/3 s^3 (measured 2.3x slower at s = 384), and gathering the columns' systems into
    batched stacks was slower still (the gather, 1 thread)."""
    out = np.zeros_like(rhs)
    for j in range(rhs.shape[1]) if columns is None else columns:
        s = np.flatnonzero(mask[:, j])
        if s.size:
            sub = a_reg[np.ix_(s, s)]
            try:
                out[s, j] = np.linalg.solve(sub, rhs[s, j])
            except np.linalg.LinAlgError:
                out[s, j] = np.linalg.lstsq(sub, rhs[s, j], rcond=None)[0]
    return out


RIDGE_GRID = (1.0, 10.0, 100.0, 1000.0)


def select_ridge(fit: Normal, hold: Normal | None, ridge: float, has_bias: bool, prior: np.ndarray,
                 mask: np.ndarray | None = None) -> float | None:
    """The ridge (from ``ridge`` x ``RIDGE_GRID``) whose solution on ``fit`` has the lowest objective on ``hold``;
    None when the current weights ``prior`` do at least as well there (no refit generalises). Without held-out rows:
    ``ridge``."""
    if hold is None or hold.rows == 0 or fit.rows == 0:
        return ridge
    cols = None
    if mask is not None and mask.shape[1] > SELECT_COLUMNS:
        cols = np.unique(np.round(np.linspace(0, mask.shape[1] - 1, SELECT_COLUMNS)).astype(np.int64))
    best, best_obj = None, objective(hold, prior, cols)
    for r in (ridge * g for g in RIDGE_GRID):
        obj = objective(hold, solve(fit, r, has_bias, mask, prior=prior, columns=cols), cols)
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


def objective(stats: Normal, wb: np.ndarray, columns: np.ndarray | None = None) -> float:
    """||X wb - Y||^2 from the statistics (dense only), up to the constant ||Y||^2; ``columns``: the part of it
    those output columns contribute (the objective is a sum over columns)."""
    a, b = stats.xtx, stats.xty
    if columns is not None and not stats.per_channel:
        w = wb[:, columns]
        return float(np.sum(w * (a @ w)) - 2 * np.sum(w * b[:, columns]))
    if stats.per_channel:
        return float(np.einsum("ck,ckl,cl->", wb, a, wb) - 2 * np.einsum("ck,ck->", wb, b))
    return float(np.sum(wb * (a @ wb)) - 2 * np.sum(wb * b))
