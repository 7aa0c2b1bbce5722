"""Dynamic int8 where onnxruntime clamps uint8 x int8 product pairs (AVX2 without VNNI): weights stored unsigned."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from onnxcompress.passes.quantize import u8s8_saturation as u8s8

from tests.quantize_helpers import quantize_on

K, N = 64, 16


def ort_out(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_unsigned_codes_dequantize_to_the_same_values():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (K, N)).astype(np.int8)
    z = rng.integers(-5, 6, N).astype(np.int8)
    u, uz = u8s8.unsigned_codes(q, z)
    assert u.dtype == np.uint8 and uz.dtype == np.uint8
    np.testing.assert_array_equal(u.astype(np.int32) - uz.astype(np.int32), q.astype(np.int32) - z.astype(np.int32))


def test_the_probe_reads_a_clamp_and_unsigned_weights_are_exact_on_this_machine():
    """The probe's exact answer is +-64; with its weights stored unsigned onnxruntime must give it on any CPU (the
    uint8 x uint8 kernel widens before multiplying). ``saturates`` says whether the int8 weights did."""
    probe = u8s8.probe_model()
    x = {"x": np.ones((1, u8s8.PROBE_K), np.float32)}
    signed = ort_out(probe, x).ravel()
    inits = {t.name: t for t in probe.graph.initializer}
    u, uz = u8s8.unsigned_codes(nh.to_array(inits["b"]), nh.to_array(inits["bz"]))
    inits["b"].CopyFrom(nh.from_array(u, "b"))
    inits["bz"].CopyFrom(nh.from_array(uz, "bz"))
    unsigned = ort_out(probe, x).ravel()
    np.testing.assert_allclose(unsigned, [64.0, -64.0], rtol=1e-4)
    clamped = not np.allclose(signed, [64.0, -64.0], rtol=1e-3)
    assert u8s8.saturates() == clamped
    if clamped:  # pairs of 255 * 127 clamp to 32767: about half of the sum is lost
        assert abs(signed[0]) < 0.6 * 64


def wide_mlp() -> onnx.ModelProto:
    """x [1, T, K] -> MatMul W [K, N]: weights near +-max in pairs, the input one-sided: the clamp's worst case."""
    rng = np.random.default_rng(1)
    w = np.where(rng.random((K, N)) < 0.5, 1.0, -1.0) * rng.uniform(0.8, 1.0, (K, N))
    w[1::2] = w[0::2]  # neighbouring reduction entries share a sign: their products add in the same 16-bit lane
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", N])],
                          [nh.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def emulate_exact(qmodel: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The dynamic chain in exact integer arithmetic: DynamicQuantizeLinear, then (x_q - z_x) (W_q - z_w) s_x s_w."""
    inits = {t.name: nh.to_array(t) for t in qmodel.graph.initializer}
    mm = next(n for n in qmodel.graph.node if n.op_type == "MatMulInteger")
    scale = next(n for n in qmodel.graph.node if n.op_type == "Mul" and n.input[1] in inits)
    wq, wz, ws = inits[mm.input[1]].astype(np.int64), inits[mm.input[3]].astype(np.int64), inits[scale.input[1]]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255.0)
    z = np.clip(np.round(-lo / s), 0, 255)
    xq = np.clip(np.round(x / s) + z, 0, 255).astype(np.int64)
    return ((xq - int(z)) @ (wq - wz)).astype(np.float64) * float(s) * ws.astype(np.float64)


@pytest.mark.parametrize("weight_type", ["int8", "uint8", "auto"])
def test_dynamic_weights_follow_the_option_and_unsigned_ones_compute_exactly(weight_type):
    model = wide_mlp()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.uniform(0.0, 1.0, (1, 8, K)).astype(np.float32)} for _ in range(4)]
    q, st = quantize_on(model, calib, mode="dynamic", smooth="none", weight_type=weight_type)
    unsigned = weight_type == "uint8" or (weight_type == "auto" and u8s8.saturates())
    mm = next(n for n in q.graph.node if n.op_type == "MatMulInteger")
    codes = next(t for t in q.graph.initializer if t.name == mm.input[1])
    assert codes.data_type == (TensorProto.UINT8 if unsigned else TensorProto.INT8)
    assert st["weight_type"].startswith("uint8" if unsigned else "int8")
    x = rng.uniform(0.0, 1.0, (1, 8, K)).astype(np.float32)
    got, exact = ort_out(q, {"x": x}).astype(np.float64), emulate_exact(q, x)
    if unsigned or not u8s8.saturates():
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    else:  # int8 weights on a clamping machine: the error the unsigned codes remove
        assert np.abs(got - exact).max() > 0.05 * np.abs(exact).max()


def test_static_weight_codes_are_chosen_by_how_close_ort_comes_to_the_qdq_maths():
    """The smoothing tests' toy with one weight entry 10x the others: on a clamping machine its fused int8-code
    model was 23.3 dB from the float model and its QDQ maths 32.2; uint8 codes close the gap, so auto takes them.
    Where ORT does not clamp, auto keeps int8 codes without measuring."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_quantize_smoothing import block, feeds, weight_spike

    model = weight_spike(block())
    calib = feeds(32, 1)
    q, st = quantize_on(model, calib, weight_rounding="nearest", smooth="none")
    codes = {t.data_type for t in q.graph.initializer if t.name.endswith("_quantized") or "w" in t.name}
    if not u8s8.saturates():
        assert st["weight_type"] == "int8"
        return
    q8, _ = quantize_on(model, calib, weight_rounding="nearest", smooth="none", weight_type="int8")
    from onnxcompress import io

    take, scores = u8s8.static_choice(io.to_graph(q8), lambda g: io.to_model(g, q8), calib)
    assert take and scores["uint8"] > scores["int8"] + u8s8.STATIC_MARGIN_DB
    assert st["weight_type"].startswith("uint8: ") and TensorProto.UINT8 in codes
    qu, _ = quantize_on(model, calib, weight_rounding="nearest", smooth="none", weight_type="uint8")
    assert q.SerializeToString() == qu.SerializeToString()  # auto made the uint8 model
