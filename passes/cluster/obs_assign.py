"""Codebook assignment with error feedback (GPTQ / Optimal Brain Quantization with a codebook as the grid).

Nearest-centroid assignment rounds every weight on its own. For a layer y = M x with Gram H = X^T X (damped by
``damp`` x its mean diagonal), assigning the input columns one at a time and moving each column's rounding error onto
the columns not yet assigned keeps the output error sum_o ||X (m_o - m̂_o)||^2 far lower (Frantar et al. 2022):
with U the upper Cholesky factor of H^-1,

    q_j = nearest(w_j),   e_j = (w_j - q_j) / U_jj,   w_{j+1:} -= e_j U_{j, j+1:}

processed in blocks of ``block`` columns (within a block column by column, then one product updates the rest).
"nearest" is the nearest value of the row's codebook (times the row's channel scale); weights that were exactly zero
in a pruned tensor are assigned the fixed zero whatever the feedback made of them. Vectorised over the output rows:
the Python loop runs over input columns, never over weights.
"""

from __future__ import annotations

import numpy as np


def upper_inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    d = float(np.mean(np.diag(h))) or 1.0
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = d
    for scale in (damp, 10 * damp, 100 * damp, 1.0):
        try:
            hd = h + scale * d * np.eye(h.shape[0])
            inv = np.linalg.inv(hd)
            return np.linalg.cholesky(inv).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Gram matrix not positive definite")


def obs_assign(
    m: np.ndarray,
    cents: np.ndarray,
    gram: np.ndarray,
    *,
    row_scale: np.ndarray | None = None,
    zero_mask: np.ndarray | None = None,
    zero_label: np.ndarray | None = None,
    damp: float = 0.01,
    block: int = 128,
) -> np.ndarray:
    """Labels [out, in] for the matrix view ``m`` with sorted codebook rows ``cents`` [R, k] (R = 1 or out),
    channel scales ``row_scale`` [out] and pruned positions ``zero_mask`` [out, in] assigned ``zero_label`` [R]."""
    out, n_in = m.shape
    w = np.array(m, dtype=np.float64)
    sc = np.ones(out) if row_scale is None else np.asarray(row_scale, np.float64)
    rows = cents.shape[0]
    mids = (cents[:, 1:] + cents[:, :-1]) / 2.0
    u = upper_inverse_cholesky(np.asarray(gram, np.float64), damp)
    labels = np.zeros((out, n_in), np.int64)

    def nearest(col: np.ndarray) -> np.ndarray:
        v = col / sc
        if rows == 1:
            return np.searchsorted(mids[0], v, side="right")
        return (v[:, None] >= mids).sum(axis=1)

    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        err = np.zeros((out, b1 - b0))
        for j in range(b0, b1):
            lab = nearest(w[:, j])
            if zero_mask is not None:
                z = zero_mask[:, j]
                lab = np.where(z, zero_label if rows == 1 else zero_label, lab) if z.any() else lab
            labels[:, j] = lab
            q = cents[0, lab] if rows == 1 else cents[np.arange(out), lab]
            e = (w[:, j] - sc * q) / u[j, j]
            err[:, j - b0] = e
            w[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
        if b1 < n_in:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return labels
