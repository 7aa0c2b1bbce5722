"""``score=obs``: SparseGPT-style pruning with the Optimal Brain Surgeon update (Frantar & Alistarh 2023).

A layer computes y = V x on calibration rows X; its output error after changing V to V' is
E = tr((V' - V) H (V' - V)^T), H = X^T X. Removing weight q of a row w (w_q -> 0) and re-fitting the rest of the row
optimally costs w_q² / [H^-1]_qq and moves the row by

    w <- w - (w_q / [H^-1]_qq) · H^-1[:, q].

SparseGPT applies this column by column, left to right, for all rows at once: after column q is settled, the inverse
Hessian of the remaining columns is the Schur complement, and its rows are exactly the rows of the upper Cholesky
factor U of H^-1 (H^-1 = U^T U). So with U computed once, column q's error err = (w_q - q_q) / U_qq (q_q: the pruned
value, 0 or w_q) updates the later columns by w[:, q:] -= err ⊗ U[q, q:]. Columns are handled in blocks of ``block``:
inside a block one column at a time (vectorised over all rows; no loop over weights), the block's accumulated errors
then update every later column in one matrix product, W[:, end:] -= Err · U[block, end:].

Mask selection is adaptive, as in SparseGPT: at the start of each block the block's entries are ranked by the OBS
saliency w² / U_qq² of the *current* (already updated) weights, and the block's share of the zeros goes: per row
(``row`` scope) or over the whole block (``layer``), the counts spread over the blocks by rounding the cumulative
target, so the total is exact. With N:M the M-column group starting at column q is decided when q is reached.

H is damped by ``damp`` · mean(diag H) (a column the calibration data never excites gets the damping only: its
weights are the cheapest to remove). The relative calibration error of a result is tr(D H D^T) / tr(V H V^T),
D = V' - V (``relative_error``), reported before (the same mask, no update) and after the update.
"""

from __future__ import annotations

import numpy as np

from .masks import ranks, row_counts


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    d = np.diag(h)
    lam = damp * float(d.mean()) if d.size and d.mean() > 0 else 1.0
    out = h + lam * np.eye(h.shape[0])
    dead = d <= 0
    if dead.any():
        out[dead, dead] += 1.0
    return out


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper U with H^-1 = U^T U (H symmetric positive definite, already damped), from ONE Cholesky factorisation:
    with P the reversal permutation and P H P = L L^T, U = P L^-1 P is upper triangular and
    U^T U = P L^-T L^-1 P = P (P H P)^-1 P = H^-1."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    l_inv = np.linalg.solve(lower, np.eye(h.shape[0]))
    return np.ascontiguousarray(l_inv[::-1, ::-1])


def saliency(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """w_ij² / [H^-1]_jj (H^-1 = U^T U, so [H^-1]_jj = Σ_i U_ij²): the output error of removing each weight alone
    with the optimal re-fit of its row."""
    return np.square(v) / np.sum(np.square(u), axis=0)[None, :]


def relative_error(v: np.ndarray, v_new: np.ndarray, h: np.ndarray) -> float:
    d = v_new - v
    base = float(np.sum((v @ h) * v))
    return float(np.sum((d @ h) * d)) / base if base > 0 else 0.0


def obs_prune(v: np.ndarray, u: np.ndarray, *, k: int = 0, scope: str = "row", nm: tuple[int, int] | None = None,
              block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Prune V [rows, cols] with the OBS update, U the upper Cholesky factor of the damped H^-1
    (``inverse_cholesky_upper``): ``k`` zeros (unstructured, per ``scope``) or the N:M pattern. Returns (new V with
    exact zeros, mask of the zeros)."""
    w = v.astype(np.float64).copy()
    rows, cols = w.shape
    mask = np.zeros((rows, cols), dtype=bool)
    per_row = row_counts(k, rows, cols) if nm is None and scope == "row" else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        err1 = np.zeros_like(w1)
        m1 = np.zeros_like(w1, dtype=bool)
        if nm is None:
            sal = np.square(w1) / np.square(d)[None, :]
            if per_row is not None:
                take = (np.rint(per_row * i2 / cols) - np.rint(per_row * i1 / cols)).astype(np.int64)
                m1 = ranks(sal, axis=1) < take[:, None]
            else:
                take = int(round(k * i2 / cols)) - int(round(k * i1 / cols))
                m1 = ranks(sal, axis=None) < take
        n, m_ = nm if nm is not None else (0, 0)
        for i in range(i2 - i1):
            if nm is not None and (i1 + i) % m_ == 0:
                g = np.square(w1[:, i:i + m_]) / np.square(d[i:i + m_])[None, :]
                m1[:, i:i + m_] = ranks(g, axis=1) < (m_ - n)
            col = w1[:, i]
            q = np.where(m1[:, i], 0.0, col)
            e = (col - q) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w1[m1] = 0.0
        w[:, i1:i2] = w1
        mask[:, i1:i2] = m1
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, mask
