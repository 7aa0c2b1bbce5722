"""Quantization arithmetic and streaming calibration: scales, zero points, per-channel axes, bias, histograms."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxcompress.passes.quantize import qparams_math as qm
from onnxcompress.passes.quantize.ort_int8_kernels import weight_axis

from onnxcompress.analyses.calibration import GrowingHistogram, TensorStats, choose_range


# ------------------------------------------------------------------------------------------ scale / zero point
def test_asymmetric_uint8_maps_range_ends_to_qmin_qmax():
    s, z = qm.scale_zero_point(-1.0, 3.0, qm.UINT8, symmetric=False)
    assert s == pytest.approx(4.0 / 255)
    assert z.dtype == np.uint8 and int(z) == round(1.0 / (4.0 / 255))
    q = qm.quantize(np.array([-1.0, 0.0, 3.0]), s, z, qm.UINT8)
    assert q[0] == 0 and q[2] == 255
    assert qm.dequantize(q, s, z)[1] == 0.0  # zero is exact


def test_asymmetric_range_is_widened_to_hold_zero():
    s, z = qm.scale_zero_point(2.0, 6.0, qm.UINT8, symmetric=False)
    assert int(z) == 0 and s == pytest.approx(6.0 / 255)
    s, z = qm.scale_zero_point(-6.0, -2.0, qm.INT8, symmetric=False)
    assert int(z) == 127 and s == pytest.approx(6.0 / 255)


def test_symmetric_int8_and_uint8():
    s, z = qm.scale_zero_point(-0.5, 2.54, qm.INT8, symmetric=True)
    assert int(z) == 0 and s == pytest.approx(2.54 / 127)
    s, z = qm.scale_zero_point(-0.5, 2.54, qm.UINT8, symmetric=True)
    assert int(z) == 128 and s == pytest.approx(2.54 / 127)


def test_degenerate_range_gets_a_positive_scale():
    s, z = qm.scale_zero_point(0.0, 0.0, qm.UINT8, symmetric=False)
    assert s > 0 and int(z) == 0
    s, z = qm.scale_zero_point(np.zeros(3), np.array([0.0, 1.0, 0.0]), qm.INT8, symmetric=True)
    assert np.all(s > 0) and s[1] == pytest.approx(1 / 127)


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-1e3, 1e3),
    width=st.floats(1e-3, 1e3),
    sym=st.booleans(),
    name=st.sampled_from(["uint8", "int8"]),
)
def test_property_scales_positive_zero_points_in_range_error_bounded(lo, width, sym, name):
    qt = qm.qtype(name)
    hi = lo + width
    s, z = qm.scale_zero_point(lo, hi, qt, sym)
    assert s > 0
    assert qt.qmin <= int(z) <= qt.qmax
    x = np.linspace(lo, hi, 97)
    xr = qm.dequantize(qm.quantize(x, s, z, qt), s, z)
    # inside the representable range the error is at most half a step (plus float32 rounding)
    assert np.max(np.abs(xr - x)) <= 0.5 * float(s) * (1 + 1e-4) + 1e-6 * max(abs(lo), abs(hi))


# ------------------------------------------------------------------------------------------ per-channel axes
def _node(op, w, **attrs):
    return gs.Node(
        op, inputs=[gs.Variable("x"), gs.Constant("w", w)], attrs=attrs, outputs=[gs.Variable("y")]
    )


@pytest.mark.parametrize(
    "op,shape,attrs,axis",
    [
        ("Conv", (8, 4, 3, 3), {}, 0),
        ("ConvTranspose", (4, 8, 3, 3), {}, 1),
        ("MatMul", (16, 32), {}, 1),
        ("Gemm", (16, 32), {}, 1),
        ("Gemm", (32, 16), {"transB": 1}, 0),
    ],
)
def test_per_channel_axis_is_the_output_channel(op, shape, attrs, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert weight_axis(_node(op, w, **attrs), w) == axis
    qw = qm.quantize_weight(w, qm.INT8, axis)
    assert qw.scale.shape == (shape[axis],)
    # each output channel uses its own max: the largest |q| of every channel is 127
    moved = np.moveaxis(qw.q.astype(np.int32), axis, 0).reshape(shape[axis], -1)
    assert np.all(np.abs(moved).max(axis=1) == 127)
    err = np.abs(qw.dequantized() - w)
    bound = np.expand_dims(qw.scale, tuple(i for i in range(w.ndim) if i != axis)) / 2
    assert np.all(err <= bound * (1 + 1e-5))


def test_per_tensor_weights_and_symmetric_zero_point():
    w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    qw = qm.quantize_weight(w, qm.INT8, None)
    assert qw.scale.shape == () and int(qw.zero_point) == 0
    assert qw.q.dtype == np.int8 and np.abs(qw.q).max() == 127


def test_bias_int32_scale_is_input_scale_times_weight_scale():
    b = np.array([0.5, -1.25, 3.0], np.float32)
    s_x, s_w = 0.02, np.array([0.01, 0.002, 0.5], np.float32)
    bq, sb = qm.quantize_bias(b, s_x, s_w)
    assert bq.dtype == np.int32
    np.testing.assert_allclose(sb, s_x * s_w, rtol=1e-6)
    np.testing.assert_allclose(bq * sb.astype(np.float64), b, atol=np.max(sb) / 2 + 1e-7)


def test_bias_overflow_raises_the_weight_scale():
    b = np.array([1e4, 1.0], np.float32)
    s_w = qm.fit_bias_scale(np.array([1e-9, 1e-3], np.float32), b, 1e-3)
    assert s_w[0] > 1e-9 and s_w[1] == pytest.approx(1e-3)
    bq, _ = qm.quantize_bias(b, 1e-3, s_w)
    assert abs(int(bq[0])) < 2**31 - 1


def test_blocked_int4_along_the_reduction_axis():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 12)).astype(np.float32)  # K=70: last block is partial
    qw = qm.quantize_weight_blocked(w, qm.INT4, axis=0, block_size=32)
    assert qw.scale.shape == (3, 12) and qw.q.shape == w.shape
    q = qw.q.astype(np.int8)
    assert q.min() >= -8 and q.max() <= 7
    rel = np.linalg.norm(qw.dequantized() - w) / np.linalg.norm(w)
    assert rel < 0.15


def test_pack_uint4_low_nibble_first():
    q = np.array([[1, 2, 15, 0]], np.uint8)
    assert qm.pack_uint4_rows(q).tolist() == [[0x21, 0x0F]]


def test_sqnr():
    x = np.ones(100)
    assert qm.sqnr_db(x, x) == float("inf")
    assert qm.sqnr_db(x, x * 1.1) == pytest.approx(20.0)


# ----------------------------------------------------------------------------------------------- calibration
def test_histogram_merges_exactly_when_the_range_grows():
    rng = np.random.default_rng(3)
    h = GrowingHistogram(max_bins=64)
    data = [rng.standard_normal(1000) * (1 + 5 * i) for i in range(6)]
    for d in data:
        h.update(d)
    assert h.counts.size <= 64 and h.total == 6000
    # every sample sits in the bin [k·w, (k+1)·w) the final grid assigns it
    allv = np.concatenate(data)
    direct = np.bincount(np.floor(allv / h.width).astype(np.int64) - h.start, minlength=h.counts.size)
    np.testing.assert_array_equal(direct, h.counts)


def test_histogram_accepts_variable_shapes_and_skips_nonfinite():
    st_ = TensorStats()
    for t in (7, 13, 2):
        x = np.linspace(-1, 2, 3 * t, dtype=np.float32).reshape(1, 3, t)
        st_.update(x, histogram=True, channel_sums=True)
    st_.update(np.array([np.inf, 0.5], np.float32), histogram=True, channel_sums=False)
    assert st_.min == -1 and st_.max == 2
    assert st_.channel_mean is not None and st_.channel_mean.shape == (3,)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_ranges_stay_within_min_max_and_hold_zero(method):
    rng = np.random.default_rng(4)
    st_ = TensorStats()
    for _ in range(5):
        x = np.concatenate([rng.standard_normal(4000), [40.0]]).astype(np.float32)  # one outlier
        st_.update(x, histogram=True, channel_sums=False)
    lo, hi = choose_range(st_, method, percentile=99.9)
    assert st_.min <= lo <= 0.0 <= hi <= st_.max
    if method == "minmax":
        assert (lo, hi) == (st_.min, st_.max)
    else:
        assert hi < 40.0  # the outlier is clipped


def test_one_sided_tensors_keep_zero_as_lower_bound():
    rng = np.random.default_rng(5)
    st_ = TensorStats()
    st_.update(
        np.maximum(rng.standard_normal(20000), 0).astype(np.float32), histogram=True, channel_sums=False
    )
    for method in ("percentile", "entropy", "mse"):
        lo, hi = choose_range(st_, method, percentile=99.99)
        assert lo == 0.0 and 0.5 < hi <= st_.max


def test_histogram_float32_path_bins_exactly_like_float64():
    rng = np.random.default_rng(8)
    x32 = (rng.standard_normal(50000) * 3 + 1).astype(np.float32)
    h32, h64 = GrowingHistogram(256), GrowingHistogram(256)
    h32.update(x32)
    h64.update(x32.astype(np.float64))
    assert h32.width == h64.width and h32.start == h64.start
    np.testing.assert_array_equal(h32.counts, h64.counts)
    direct = np.bincount(np.floor(x32.astype(np.float64) / np.float32(h32.width)).astype(np.int64) - h32.start)
    assert abs(int(np.abs(direct[: h32.counts.size] - h32.counts).sum())) <= 2  # at most edge-of-bin roundings


def test_channel_sums_on_any_axis_give_the_per_channel_mean():
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((2, t, 5)).astype(np.float32) for t in (3, 7)]  # MatMul input: channels last
    st_ = TensorStats()
    for x in xs:
        st_.update(x, histogram=False, channel_sums=-1)
    expected = np.concatenate([x.reshape(-1, 5) for x in xs]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(st_.channel_mean, expected, rtol=1e-6)
    assert TensorStats().channel_mean is None
