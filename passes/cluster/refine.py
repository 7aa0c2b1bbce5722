"""Codebook, assignment and channel scales refined together in the layer's output metric (alternating).

For a layer y = M x with Gram G = X^T X from calibration data, a clustered weight m̂_oi = s_o C[r(o), L_oi] is
judged by the output error  F(C, L, s) = sum_o (m̂_o - m_o)^T G (m̂_o - m_o)  (``codebook_refit.objective``).
F is minimised by block coordinate descent, every step a closed form or a greedy step that does not raise F much:

1. C | L, s: least squares over the k shared values (``refit_codebook``: the output is linear in C);
2. s | C, L (``fit_scales``, channel scales only): one scalar per output, s_o = q_o^T G m_o / q_o^T G q_o with
   q_o = C[r(o), L_o] (kept where that is not positive);
3. L | C, s: re-assignment with error feedback through the inverse Gram (``obs_assign``; GPTQ with the codebook).

Step 3 is not a minimiser of F (it is greedy, column by column), so every round's F is measured and the best
(C, L, s) seen is returned; rounds stop when F improves by less than ``tol`` (relative) or after ``rounds``. With
``rounds=1`` this is the single assignment + refit of earlier versions. Exact zeros of a pruned tensor stay on the
fixed zero entry in every round; the labels index at most k values per codebook row throughout.
"""

from __future__ import annotations

import numpy as np

from onnxcompress.codebook_refit import objective, refit_codebook

from .obs_assign import obs_assign


def _sorted_assign(m: np.ndarray, cb: np.ndarray, gram: np.ndarray, sc: np.ndarray | None,
                   zero_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    cbs = np.sort(cb, axis=1)
    zl = np.argmax(cbs == 0.0, axis=1) if zero_mask is not None else None
    return cbs, obs_assign(m, cbs, gram, row_scale=sc, zero_mask=zero_mask, zero_label=zl)


def fit_row_scales(m: np.ndarray, cb: np.ndarray, labels: np.ndarray, gram: np.ndarray,
                   sc: np.ndarray) -> np.ndarray:
    """s_o minimising (s_o q_o - m_o)^T G (s_o q_o - m_o) for q_o = C[r(o), L_o]; the old s_o where not > 0."""
    row_of = np.zeros(m.shape[0], np.int64) if cb.shape[0] == 1 else np.arange(m.shape[0])
    q = cb[row_of[:, None], labels]
    qg = q @ gram
    num, den = np.sum(qg * m, axis=1), np.sum(qg * q, axis=1)
    new = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.where((den > 0) & (new > 0), new, sc)


def refine(
    m: np.ndarray,
    cents: np.ndarray,
    gram: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    row_scale: np.ndarray | None = None,
    zero_mask: np.ndarray | None = None,
    rounds: int = 1,
    fit_scales: bool = False,
    tol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, float]]:
    """Refine the sorted codebook ``cents`` [R, k] of the matrix view ``m`` [out, in]. ``labels`` [out, in]: a
    given assignment (else the first one is ``obs_assign``'s). Returns (codebook [R, k], labels [out, in], row
    scales or None, (F of the first assignment with its k-means values, best F))."""
    g = np.asarray(gram, np.float64)
    row_of = np.zeros(m.shape[0], np.int64) if cents.shape[0] == 1 else np.arange(m.shape[0])
    sc = None if row_scale is None else np.asarray(row_scale, np.float64).copy()

    def f(cb: np.ndarray, lab: np.ndarray, s: np.ndarray | None) -> float:
        q = cb[row_of[:, None], lab]
        return objective(q if s is None else s[:, None] * q, g, target=m)

    cb = np.asarray(cents, np.float64)
    if labels is None:
        cb, labels = _sorted_assign(m, cb, g, sc, zero_mask)
    first, best, prev = None, None, None
    for r in range(max(rounds, 1)):
        fixed = (cb == 0.0) if zero_mask is not None else None
        cb, before, after = refit_codebook(cb, labels, g, target=m, fixed=fixed, row_scale=sc)
        cb = np.asarray(cb, np.float64)
        first = before if first is None else first
        if fit_scales and sc is not None:
            sc = fit_row_scales(m, cb, labels, g, sc)
            after = f(cb, labels, sc)
        if best is None or after < best[0]:
            best = (after, cb.copy(), labels.copy(), None if sc is None else sc.copy())
        if prev is not None and prev - after < tol * max(prev, 1e-300):
            break
        prev = after
        if r + 1 < rounds:
            cb, labels = _sorted_assign(m, cb, g, sc, zero_mask)
    _, cb, labels, sc = best
    return cb, labels, sc, (float(first), float(best[0]))
