"""distill's masked ridge solves (sparse weights: one system per output column) and the column-sampled ridge
selection, against direct NumPy references."""

from __future__ import annotations

import numpy as np
from onnxcompress.passes.distill.normal_equations import Normal
from onnxcompress.passes.distill.ridge import SELECT_COLUMNS, masked_solve, objective, select_ridge, solve


def _problem(k: int = 40, n: int = 150, rows: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) * rng.uniform(0.1, 3.0, size=k)
    w_true = rng.normal(size=(k, n))
    y = x @ w_true + 0.5 * rng.normal(size=(rows, n))
    mask = rng.random((k, n)) < 0.5
    mask[:, 3] = False  # a column with no support stays 0
    st = Normal()
    st.update(x, y)
    return st, mask, rng


def test_masked_solve_equals_each_columns_own_least_squares():
    st, mask, _ = _problem()
    a = st.xtx + np.eye(st.xtx.shape[0])
    got = masked_solve(a, st.xty, mask)
    assert np.all(got[~mask] == 0)
    for j in (0, 1, 3, 77, 149):
        s = np.flatnonzero(mask[:, j])
        ref = np.zeros(a.shape[0])
        if s.size:
            ref[s] = np.linalg.solve(a[np.ix_(s, s)], st.xty[s, j])
        np.testing.assert_allclose(got[:, j], ref, rtol=1e-10, atol=1e-12)
    cols = np.array([5, 9])
    part = masked_solve(a, st.xty, mask, cols)
    np.testing.assert_array_equal(part[:, cols], got[:, cols])
    assert not np.any(np.delete(part, cols, axis=1))


def test_objective_is_a_sum_over_columns():
    st, _, rng = _problem(seed=1)
    w = rng.normal(size=st.xty.shape)
    cols = np.arange(w.shape[1])
    halves = objective(st, w, cols[::2]) + objective(st, w, cols[1::2])
    assert np.isclose(halves, objective(st, w), rtol=1e-9)


def test_sampled_selection_picks_the_full_selections_ridge():
    """The held-out objective on SELECT_COLUMNS evenly spaced columns ranks the ridges like all columns do."""
    rng = np.random.default_rng(3)
    k, n = 60, 200
    x = rng.normal(size=(160, k)) * rng.uniform(0.1, 3.0, size=k)
    y = x @ rng.normal(size=(k, n)) + 2.0 * rng.normal(size=(160, n))  # few rows, noisy: the ridge matters
    fit, hold = Normal(), Normal()
    fit.update(x[:80], y[:80])
    hold.update(x[80:], y[80:])
    mask = rng.random((k, n)) < 0.6
    prior = np.zeros((k, n))
    assert n > SELECT_COLUMNS
    chosen = select_ridge(fit, hold, 1e-2, False, prior, mask)

    def held_out(r: float) -> float:
        return objective(hold, solve(fit, r, False, mask, prior=prior))

    grid = [1e-2 * g for g in (1.0, 10.0, 100.0, 1000.0)]
    assert chosen == min(grid, key=held_out)
    assert held_out(chosen) < objective(hold, prior)
