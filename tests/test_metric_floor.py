"""The noise-floor benchmark's worst-output SQNR / cosine."""

import numpy as np

from benchmarks.metric_floor import worst_fidelity


def test_worst_fidelity_is_the_noisier_output():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=1000), rng.normal(size=(4, 5))
    ref = [[a, b]]
    cand = [[a + 0.01 * rng.normal(size=1000), b + 0.1 * rng.normal(size=(4, 5))]]
    sqnr, cos = worst_fidelity(ref, cand)
    expect = 10 * np.log10(np.sum(b ** 2) / np.sum((cand[0][1] - b) ** 2))
    assert abs(sqnr - expect) < 1e-9 and cos < 1.0


def test_integer_outputs_are_not_scored():
    ref = [[np.arange(5), np.ones(3)]]
    cand = [[np.arange(5)[::-1].copy(), np.ones(3) * 1.1]]
    sqnr, _ = worst_fidelity(ref, cand)
    assert abs(sqnr - 20.0) < 1e-9  # only the float output: 10 log10(3 / 0.03)
