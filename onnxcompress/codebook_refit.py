"""Least-squares refit of shared values with the assignments fixed (the codebook analogue of a layer refit).

A layer y = M x (M [out, in], the weight's matrix view, ``layouts``) whose weights are shared values
M_oi = C[r(o), L_oi] (codebook rows r(o): one row for a per-tensor codebook, r(o) = o per channel; L the labels)
(times a fixed s_o per output with channel scales) is fit on calibration rows X with Gram G = X^T X:

    min_C  sum_o || X (m̂_o - m_o) ||^2   =  sum_o (m̂_o - m_o)^T G (m̂_o - m_o)          (target weights M)
    min_C  sum_o || X m̂_o - y_o ||^2     =  sum_o m̂_o^T G m̂_o - 2 m̂_o^T (X^T Y)_o + c    (teacher outputs Y)

Both are quadratics in C with the same Hessian and right-hand sides b = S(M G) resp. b = S((X^T Y)^T), where S
scatters an [out, in] array onto the codebook: S(A)[r, c] = sum_{o: r(o) = r} sum_{i: L_oi = c} A_oi. The
Hessian-vector product is H V = S(V[r, L] G): one [out, in] x [in, in] product, never the [C k, C k] matrix.
Solved by Jacobi-preconditioned conjugate gradients from the current values (CG decreases the quadratic at every
step, so the refit never ends worse than k-means on the calibration objective; it is returned only if lower).
Fixed entries (the exact zero of a pruned tensor) and unused entries are not unknowns. The labels do not change,
so the result still has at most k distinct values per codebook row.

``distill`` calls ``refit_codebook`` with its own X^T X and X^T Y of the student's input and the teacher's output
(``xty``) to refit the shared values instead of the raw weights. A depthwise layer has one Gram per output row
(G [out, in, in]: each channel sees its own input channel): the same quadratic with m̂_o^T G_o m̂_o, the
Hessian-vector product one batched [in] x [in, in] product per row.
"""

from __future__ import annotations

import numpy as np


def _scatter(a: np.ndarray, flat_idx: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(flat_idx, weights=a.reshape(-1), minlength=size)


def gram_product(m: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Rows of ``m`` [out, in] times the Gram: one shared [in, in], or one per row [out, in, in]."""
    return np.einsum("oi,oij->oj", m, gram) if gram.ndim == 3 else m @ gram


def objective(m_hat: np.ndarray, gram: np.ndarray, target: np.ndarray | None = None,
              xty: np.ndarray | None = None) -> float:
    """sum_o (m̂_o - m_o)^T G (m̂_o - m_o) (``target``) or sum_o m̂_o^T G m̂_o - 2 m̂_o^T (X^T Y)_o (``xty``)."""
    if xty is not None:
        return float(np.sum(gram_product(m_hat, gram) * m_hat) - 2.0 * np.sum(m_hat * xty.T))
    d = m_hat - target
    return float(np.sum(gram_product(d, gram) * d))


def refit_codebook(
    codebook: np.ndarray,
    labels: np.ndarray,
    gram: np.ndarray,
    *,
    target: np.ndarray | None = None,
    xty: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
    row_scale: np.ndarray | None = None,
    iters: int = 50,
    tol: float = 1e-10,
) -> tuple[np.ndarray, float, float]:
    """Refit ``codebook`` [R, k] for the matrix-view labels [out, in] (R = 1 or R = out) on Gram [in, in] (or one
    per row, [out, in, in]: depthwise).

    ``target`` [out, in] (the weights to reproduce) or ``xty`` [in, out] (X^T Y of the teacher's outputs);
    ``fixed`` [R, k] bool marks entries that keep their value; ``row_scale`` [out]: m̂_oi = s_o C[r(o), L_oi] (channel
    scales; S then scatters s_o A_oi). Returns (codebook, objective before, after)."""
    if (target is None) == (xty is None):
        raise ValueError("give exactly one of target and xty")
    out, n_in = labels.shape
    rows, k = codebook.shape
    g = np.asarray(gram, np.float64)
    row_of = np.zeros(out, np.int64) if rows == 1 else np.arange(out)
    flat = (row_of[:, None] * k + labels.astype(np.int64)).reshape(-1)
    size = rows * k
    c0 = codebook.astype(np.float64).reshape(-1)
    sc = np.ones((out, 1)) if row_scale is None else np.asarray(row_scale, np.float64).reshape(out, 1)
    b = _scatter(sc * gram_product(target, g), flat, size) if xty is None else \
        _scatter(sc * np.asarray(xty, np.float64).T, flat, size)
    # unknowns: used, not fixed entries
    used = np.bincount(flat, minlength=size) > 0
    free = used & ~(fixed.reshape(-1) if fixed is not None else np.zeros(size, bool))
    gdiag = np.einsum("oii->oi", g) if g.ndim == 3 else np.diag(g)[None, :]
    diag = _scatter(sc**2 * gdiag, flat, size)
    precond = np.where(free & (diag > 0), 1.0 / np.where(diag > 0, diag, 1.0), 0.0)

    def hv(v: np.ndarray) -> np.ndarray:
        return _scatter(sc * gram_product(sc * v.reshape(rows, k)[row_of[:, None], labels], g), flat, size)

    def obj(c: np.ndarray) -> float:
        m_hat = sc * c.reshape(rows, k)[row_of[:, None], labels]
        return objective(m_hat, g, target, xty)

    before = obj(c0)
    x = c0.copy()
    r = np.where(free, b - hv(x), 0.0)
    z = precond * r
    p = z.copy()
    rz = float(r @ z)
    r0 = max(rz, 1e-300)
    for _ in range(iters):
        if rz <= tol * r0:
            break
        hp = np.where(free, hv(p), 0.0)
        php = float(p @ hp)
        if php <= 0:
            break
        alpha = rz / php
        x += alpha * p
        r -= alpha * hp
        z = precond * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    after = obj(x)
    if not np.isfinite(after) or after >= before:
        return codebook.copy(), before, before
    return x.reshape(rows, k).astype(codebook.dtype), before, after
