"""cluster{refit_rounds, fit_scales}: codebook, channel scales and assignment refined in the output metric."""

from __future__ import annotations

import numpy as np
from onnxcompress.passes.cluster.kmeans1d import kmeans_1d
from onnxcompress.passes.cluster.refine import fit_row_scales, refine

from onnxcompress.codebook_refit import objective


def _layer(rng, out=24, n_in=40, rows=400, sparse=False):
    x = rng.standard_normal((rows, n_in)) * rng.uniform(0.2, 3.0, n_in)  # inputs of very different energy
    x[:, :8] += x[:, 8:16]  # correlated inputs: error feedback has something to move
    m = rng.standard_normal((out, n_in)) * rng.uniform(0.3, 2.0, (out, 1))
    if sparse:
        m[np.abs(m) < 0.4] = 0.0
    return m, x.T @ x


def _snapped(cb, lab, sc):
    row_of = np.zeros(lab.shape[0], np.int64) if cb.shape[0] == 1 else np.arange(lab.shape[0])
    q = cb[row_of[:, None], lab]
    return q if sc is None else sc[:, None] * q


def test_more_rounds_and_scales_never_worse_and_keep_k_values(rng):
    m, gram = _layer(rng)
    sc0 = np.sqrt(np.mean(m**2, axis=1))
    cents, _ = kmeans_1d((m / sc0[:, None]).reshape(1, -1), 4)
    results = {}
    for rounds, fit in ((1, False), (4, False), (4, True)):
        cb, lab, sc, (first, best) = refine(m, cents, gram, row_scale=sc0, rounds=rounds, fit_scales=fit)
        f = objective(_snapped(cb, lab, sc), gram, target=m)
        assert np.isclose(f, best, rtol=1e-9) and best <= first
        assert np.unique(cb[0][lab]).size <= 4 and lab.max() < 4
        results[(rounds, fit)] = f
    assert results[(4, False)] <= results[(1, False)]
    assert results[(4, True)] < 0.95 * results[(1, False)]  # measurably better on this layer


def test_pruned_zeros_stay_zero_in_every_round(rng):
    m, gram = _layer(rng, sparse=True)
    zero = m == 0
    assert 0.2 < zero.mean() < 0.6
    cents, _ = kmeans_1d(m.reshape(1, -1), 8, fixed_zero=True)
    cb, lab, sc, _ = refine(m, cents, gram, zero_mask=zero, rounds=3)
    snapped = _snapped(cb, lab, sc)
    assert np.all(snapped[zero] == 0.0) and np.unique(snapped).size <= 8 and np.any(cb == 0.0)


def test_per_channel_codebooks(rng):
    m, gram = _layer(rng)
    cents, _ = kmeans_1d(m, 4)  # one row per output channel
    cb, lab, _, (first, best) = refine(m, cents, gram, rounds=3)
    assert cb.shape == (m.shape[0], 4) and best <= first
    snapped = _snapped(cb, lab, None)
    assert max(np.unique(r).size for r in snapped) <= 4


def test_fit_row_scales_is_the_least_squares_scale(rng):
    m, gram = _layer(rng, out=6)
    cb = np.array([[-1.5, -0.5, 0.5, 1.5]])
    lab = rng.integers(0, 4, m.shape)
    s = fit_row_scales(m, cb, lab, gram, np.ones(6))
    q = cb[0][lab]
    for o in range(6):  # d/ds (s q - m)^T G (s q - m) = 0 where the optimum is positive, else the old scale
        grid = np.linspace(-3, 3, 6001)
        f = [(t * q[o] - m[o]) @ gram @ (t * q[o] - m[o]) for t in grid]
        best = grid[int(np.argmin(f))]
        assert (np.isclose(s[o], best, atol=2e-3) if best > 0 else s[o] == 1.0)
