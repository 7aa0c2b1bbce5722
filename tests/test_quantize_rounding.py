"""quantize{weight_rounding}: scales and rounding chosen against each layer's output (passes/quantize/rounding.py)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ort_run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize.rounding import channel_scales, output_error, round_columns
from quantize_helpers import WEIGHT_CODES

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager


def _correlated_inputs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    return rng.standard_normal((rows, k)) @ mix + 0.5


def test_rounding_against_the_output_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    k, n = 96, 40
    x_all = _correlated_inputs(rng, 6000, k)
    x, xt = x_all[:4000], x_all[4000:]  # fit rows, held-out rows
    h = x.T @ x
    w = rng.standard_normal((n, k)) * 0.1
    s = np.abs(w).max(axis=1) / 127
    rtn = np.clip(np.rint(w / s[:, None]), -127, 127) * s[:, None]
    q = round_columns(w, h, s)
    assert np.array_equal(q, np.rint(q)) and q.min() >= -127 and q.max() <= 127
    gain_db = 10 * np.log10(output_error(w, rtn, h) / output_error(w, q * s[:, None], h))
    assert gain_db > 3.0
    # the error is measured on the layer's real output too (held-out rows)
    assert np.sum((xt @ (w - q * s[:, None]).T) ** 2) < np.sum((xt @ (w - rtn).T) ** 2)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 40), st.integers(1, 12), st.integers(0, 10_000))
def test_with_uncorrelated_unit_inputs_it_is_round_to_nearest(k, n, seed):
    """H = I: no error feedback between columns, so every weight rounds to nearest."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k))
    s = np.abs(w).max(axis=1) / 127
    q = round_columns(w, np.eye(k) / (1 + 0.01), s)  # the damping adds 1% of the mean diagonal back
    assert np.array_equal(q, np.clip(np.rint(w / s[:, None]), -127, 127))


def test_scales_clip_a_weight_whose_input_is_always_zero():
    rng = np.random.default_rng(2)
    k = 20
    x = rng.standard_normal((1000, k))
    x[:, 0] = 0.0
    w = rng.standard_normal((3, k)) * 0.1
    w[:, 0] = 5.0  # sets max|w| but never reaches the output
    s = channel_scales(w, x.T @ x)
    assert np.all(s < 0.75 * 5.0 / 127 + 1e-12)  # the smallest clipping ratio of the grid wins


def _net(seed: int = 0) -> onnx.ModelProto:
    """Conv (4->16, 3x3) -> Relu -> Conv (16->8, 3x3) -> MatMul head; input channel 3 is always 0 in the feeds and
    the first Conv's weights on it are large: round-to-nearest wastes its int8 range on them."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,12,12] x) => (float[1,8,12,6] y) {
      c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r1 = Relu(c1)
      c2 = Conv<pads=[1,1,1,1]>(r1, w2, b2)
      y = MatMul(c2, w3)
    }""")
    w1 = rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3
    w1[:, 3] = 4.0
    arrays = {
        "w1": w1,
        "b1": rng.standard_normal(16).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.15,
        "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
        "w3": rng.standard_normal((12, 6)).astype(np.float32) * 0.4,
    }
    for name, a in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(a, name))
    onnx.checker.check_model(m)
    return m


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    xs = np.random.default_rng(seed).standard_normal((n, 1, 4, 12, 12)).astype(np.float32)
    xs[:, :, 3] = 0.0
    return [{"x": x} for x in xs]


def _quantize(model, **options):
    ctx = PassContext(calibration=load_feeds(_feeds(16, 3), model))
    result = PassManager([Quantize(latency_guard=False, auto_float_db=0, **options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats, ctx


def _sqnr(model, q, feeds) -> float:
    r = np.concatenate([ort_run(model, f)[0].ravel() for f in feeds]).astype(np.float64)
    c = np.concatenate([ort_run(q, f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - c) ** 2)))


def test_optimised_rounding_lifts_the_model_sqnr_under_ort_and_uses_the_shared_statistics():
    model = _net()
    q0, s0, _ = _quantize(model, calibration="minmax", weight_rounding="nearest")
    q1, s1, ctx = _quantize(model, weight_rounding="output", calibration="minmax")
    wr = s1["weight_rounding"]
    assert wr["layers"] == 3 and wr["kept"] and wr["skipped"] == {}
    assert "weight_rounding" not in s0
    held_out = _feeds(8, 99)
    assert _sqnr(model, q1, held_out) > _sqnr(model, q0, held_out) + 1.5
    # the Gram matrices came from the shared collector: one calibration run for ranges, one for the rounding
    assert ctx.counters["calibration_runs"] >= 1
    # the stored weights are int8 with per-channel scales, the first Conv's scales clipped below max|w| / 127
    inits = {t.name: numpy_helper.to_array(t) for t in q1.graph.initializer}
    w1_scale = next(v for k, v in inits.items() if k.startswith("w1") and k.endswith("_scale"))
    assert w1_scale.shape == (16,) and np.all(w1_scale < 4.0 / 127)
    assert any(v.dtype in WEIGHT_CODES and v.shape == (16, 4, 3, 3) for v in inits.values())


def test_auto_keeps_round_to_nearest_when_the_outputs_do_not_improve():
    """An identity-like 1x1 Conv on white inputs: H is diagonal, so the optimised weights equal round-to-nearest's
    (or lose to it on the evaluation feeds) and auto keeps round-to-nearest."""
    rng = np.random.default_rng(5)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,12,12] x) => (float[1,4,12,12] y) {
      y = Conv(x, w, b)
    }""")
    m.graph.initializer.extend([
        numpy_helper.from_array((np.eye(4) + rng.standard_normal((4, 4)) * 0.01).astype(np.float32)[:, :, None, None],
                                "w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ])
    q, stats, _ = _quantize(m, calibration="minmax", weight_rounding="auto")
    wr = stats["weight_rounding"]
    assert not wr["kept"] or wr["layers"] == 0
    q_nearest, _, _ = _quantize(m, calibration="minmax", weight_rounding="nearest")
    for f in _feeds(4, 8):  # the same integer weights and biases: the same outputs (names may differ)
        assert np.array_equal(ort_run(q, f)[0], ort_run(q_nearest, f)[0])


def test_channel_scales_never_emit_a_scale_below_min_scale():
    """A ~0 row (a dead channel after a ridge refit) gets the degenerate scale, all integers 0, not 1e-30 / 127:
    its int32 bias scale squared would underflow float32 (inf gradients in distill's QAT)."""
    from onnxcompress.passes.quantize import qparams_math as qm
    from onnxcompress.passes.quantize.rounding import channel_scales, round_columns

    wm = np.array([[1.0, -0.5, 0.25], [1e-30, -2e-31, 0.0], [0.0, 0.0, 0.0]])
    h = np.eye(3) + 0.1
    s = channel_scales(wm, h)
    assert np.all(s > qm.MIN_SCALE)
    assert s[0] <= 1.0 / 127 + 1e-12 and np.isclose(s[1], s[2])
    q = round_columns(wm, h, s)
    assert np.all(q[1:] == 0) and np.abs(q[0]).max() >= 80
