"""The noise-floor benchmark's measuring helpers: the 8-bit grid step, the padding mask, the worst-output SQNR."""

import numpy as np

from benchmarks.metric_floor import content_mask, input_level, worst_fidelity


def test_input_level_recovers_the_8bit_grid_of_a_normalised_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 3, 40, 50))
    std = np.array([0.5, 0.25, 0.2])[None, :, None, None]
    x = ((pixels / 255.0 - 0.5) / std).astype(np.float32)
    # the smallest channel step is channel 0's: 1 / 255 / 0.5
    assert abs(input_level(x) - 1 / 255 / 0.5) < 1e-6


def test_content_mask_strips_constant_edge_padding_only():
    rng = np.random.default_rng(1)
    x = np.zeros((1, 3, 20, 30), np.float32)
    x[:, :, 2:15, 0:21] = rng.random((1, 3, 13, 21))  # image top-left area, padding right / below / 2 rows above
    x[:, :, 8, 5] = 0.0  # an interior pixel equal to the pad value stays content
    m = content_mask(x)
    assert m[2:15, :21].all() and m.sum() == 13 * 21
    assert m[0:2].sum() == 0 and m[15:].sum() == 0 and m[:, 21:].sum() == 0


def test_content_mask_keeps_a_full_image():
    x = np.random.default_rng(2).random((1, 3, 8, 8)).astype(np.float32)
    assert content_mask(x).all()


def test_worst_fidelity_is_the_noisier_output():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=1000), rng.normal(size=(4, 5))
    ref = [[a, b]]
    cand = [[a + 0.01 * rng.normal(size=1000), b + 0.1 * rng.normal(size=(4, 5))]]
    sqnr, cos = worst_fidelity(ref, cand)
    expect = 10 * np.log10(np.sum(b ** 2) / np.sum((cand[0][1] - b) ** 2))
    assert abs(sqnr - expect) < 1e-9 and cos < 1.0
