"""Row ranges (``quantize{mode=dynamic activation_ranges=row}``, ``row_ranges=[...]``, ``lift_to=row``): one
activation range per row, on the int8 kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ort_run
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from quantize_helpers import output_sqnr, signed_codes
from test_quantize_two_pass import K, N, chain_model, dynamic, feeds, gemm_model


def ort_all(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with every onnxruntime graph optimization on: its MatMulIntegerToFloat fusion must not change values."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def weight_of(q: onnx.ModelProto, name: str = "w0", layer: str = "mm0") -> np.ndarray:
    """The int8 weight as float: codes x per-column scale (a row layer stores the scale / 255 as its step)."""
    inits = {i.name: nh.to_array(i) for i in q.graph.initializer}
    codes, zp = inits[f"{name}_quantized"], inits[f"{name}_zero_point"]
    scale = inits[f"{name}_scale"].astype(np.float64) if f"{name}_scale" in inits else \
        inits[f"{layer}_row_weight_step"].astype(np.float64) * 255
    return signed_codes(codes, zp).astype(np.float64) * scale


def row_reference(x: np.ndarray, w_hat: np.ndarray) -> np.ndarray:
    """The module doc's arithmetic in numpy: each row rounded to 256 levels over its own [min, max]."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = np.maximum(hi - lo, 1e-30)
    q = np.clip(np.rint((x - lo) / d * 255), 0, 255)
    return (lo + d / 255 * q) @ w_hat


def outlier_feed(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 16, K)).astype(np.float32)
    x[0, 3] *= 60.0  # one token with large values: a tensor range coarsens the other 15 rows
    return {"x": x}


def test_row_ranges_compute_the_row_rounding_and_survive_ort_fusions():
    model = chain_model(layers=1)
    tensor_q, _ = dynamic(model)
    row_q, st = dynamic(model, activation_ranges="row")
    assert st["row_range_layers"] == 1 and st["nodes_quantized"]["MatMul"] == 1
    w_hat = weight_of(row_q)
    np.testing.assert_allclose(w_hat, weight_of(tensor_q), rtol=1e-6)  # the same int8 weight (step: scale / 255)
    ops = [n.op_type for n in row_q.graph.node]
    assert "DynamicQuantizeLinear" not in ops and ops.count("MatMulInteger") == 1 and "MatMul" not in ops
    row_err, tensor_err = [], []
    for seed in range(6):
        f = outlier_feed(seed)
        want = row_reference(f["x"].astype(np.float64), w_hat)
        got = ort_run(row_q, f)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
        # onnxruntime's own fusions (MatMulIntegerToFloat) on: the same values
        np.testing.assert_allclose(ort_all(row_q, f)[0], got, rtol=1e-4, atol=1e-4 * np.abs(got).max())
        exact = f["x"].astype(np.float64) @ w_hat
        quiet = np.arange(16) != 3
        row_err.append(np.abs(got - exact)[0, quiet].max())
        tensor_err.append(np.abs(ort_run(tensor_q, f)[0] - exact)[0, quiet].max())
    assert max(row_err) < max(tensor_err) / 10  # the quiet rows keep their own step


def test_a_constant_row_is_exact_and_rows_share_one_quantization_per_input():
    rng = np.random.default_rng(0)
    ws = [nh.from_array((rng.standard_normal((K, K)) / 8).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, K])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 4, K]) for i in range(3)], ws)
    for opset in (13, 18):  # ReduceMax's axes: an attribute before 18, an input from 18 on
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        q, st = dynamic(model, activation_ranges="row")
        ops = [n.op_type for n in q.graph.node]
        assert st["row_range_layers"] == 3 and ops.count("QuantizeLinear") == 1 and ops.count("ReduceMin") == 1
        # the three readers: one product over the joined weights, then a Split
        assert ops.count("MatMulInteger") == 1 and ops.count("Split") == 1 and ops.count("Mul") == 4
        joined = weight_of(q, "mm0_row_joined", "mm0")
        x = rng.standard_normal((1, 4, K)).astype(np.float32)
        x[0, 1] = 0.75  # a constant row: its offset carries it
        x[0, 2] = 0.0
        outs = ort_all(q, {"x": x})
        for i, y in enumerate(outs):
            assert np.isfinite(y).all()
            w_hat = joined[:, i * K:(i + 1) * K]
            np.testing.assert_allclose(w_hat, nh.to_array(ws[i]), atol=np.abs(nh.to_array(ws[i])).max() / 127)
            np.testing.assert_allclose(y[0, 1], x[0, 1].astype(np.float64) @ w_hat, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y[0, 2], 0.0, atol=1e-6)


def test_row_ranges_on_a_gemm_with_transb_alpha_and_bias():
    model = gemm_model()
    tensor_q, _ = dynamic(model)
    row_q, st = dynamic(model, row_ranges=["gemm"])
    assert st["row_range_layers"] == 1
    fs = [{"x": outlier_feed(s)["x"][0]} for s in range(6)]
    assert output_sqnr(model, row_q, fs) > output_sqnr(model, tensor_q, fs) + 6.0  # pooled: the loud row dominates
    for f in fs:  # alpha and beta·C as the float Gemm has them, fusions on or off
        np.testing.assert_allclose(ort_all(row_q, f)[0], ort_run(row_q, f)[0], rtol=1e-4, atol=1e-4)


def test_row_range_options_are_checked():
    from onnxcompress.passes.quantize import Quantize

    from onnxcompress.errors import PassError

    model = chain_model(layers=2)
    with pytest.raises(PassError, match="row_ranges=.*no dynamically quantized MatMul/Gemm named nope"):
        dynamic(model, row_ranges=["nope"])
    with pytest.raises(ValueError, match="both two_pass and in row_ranges"):
        Quantize(mode="dynamic", two_pass=["mm0"], row_ranges=["mm0"])
    with pytest.raises(ValueError, match="row ranges need mode=dynamic"):
        Quantize(mode="static", activation_ranges="row")
    with pytest.raises(ValueError, match="activation_ranges"):
        Quantize(mode="dynamic", activation_ranges="channel")
    q, st = dynamic(model, row_ranges=["mm1"])  # only the named layer
    ops = [n.op_type for n in q.graph.node]
    assert st["row_range_layers"] == 1 and ops.count("DynamicQuantizeLinear") == 1 and ops.count("QuantizeLinear") == 1


def test_lift_to_row_meets_a_target_with_rows_and_auto_keeps_a_model_that_meets_it():
    model = chain_model(layers=3)
    calib, held_out = feeds(16, 1), feeds(16, 5)
    q0, _ = dynamic(model, calib)
    base = output_sqnr(model, q0, calib)
    all_rows, _ = dynamic(model, calib, activation_ranges="row")
    ceiling = output_sqnr(model, all_rows, calib)
    assert ceiling > base + 3.0  # heavy-tailed tokens: rows help
    target = base + (ceiling - base) / 2
    q, st = dynamic(model, calib, min_sqnr_db=target, lift_to="row")
    mp = st["mixed_precision"]
    assert mp["met"] and mp["float_layers"] == [] and 1 <= len(mp["row_range_layers"]) <= 3
    assert list(mp["ladders"]) == ["row"] and mp["row_range_layers"][0] == max(mp["gains_db"], key=mp["gains_db"].get)
    assert set(st["layers_lifted"]) == set(mp["row_range_layers"])
    assert all(r.startswith("row ranges") and "met" in r for r in st["layers_lifted"].values())
    assert output_sqnr(model, q, held_out) > output_sqnr(model, q0, held_out) + 1.5
    # auto: the tensor pipeline and the row one both searched; the kept model meets the target
    qa, sa = dynamic(model, calib, min_sqnr_db=target, latency_cache="off")
    search = sa["ranges_search"]
    assert set(search) >= {"tensor", "row", "chosen"} and search["row"]["met"]
    assert sa["mixed_precision"]["met"] and output_sqnr(model, qa, calib) >= target - 0.01
    if search["tensor"]["met"]:
        assert set(search["latency_ratio"]) == {"tensor", "row"}
        assert search["chosen"] == min(search["latency_ratio"], key=search["latency_ratio"].get)
    else:
        assert search["chosen"] == "row"


def test_every_layer_in_rows_with_a_target_lifts_to_float():
    model = chain_model(layers=3)
    calib = feeds(16, 1)
    rows, _ = dynamic(model, calib, activation_ranges="row")
    target = output_sqnr(model, rows, calib) + 3.0
    q, st = dynamic(model, calib, activation_ranges="row", min_sqnr_db=target)
    mp = st["mixed_precision"]
    assert list(mp["ladders"]) == ["float"] and mp["met"] and len(mp["float_layers"]) >= 1
    assert st["row_range_layers"] == 3 - len(mp["float_layers"])
    assert [n.op_type for n in q.graph.node].count("MatMul") == len(mp["float_layers"])
    assert output_sqnr(model, q, calib) >= target - 0.01


def test_a_matmul_bias_add_joins_the_row_sum():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
                           helper.make_node("Add", ["h", "b"], ["y"], name="bias")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])],
                          [nh.from_array(w, "w0"), nh.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, st = dynamic(model, activation_ranges="row")
    ops = [n.op_type for n in q.graph.node]
    assert st["row_range_layers"] == 1 and ops.count("Sum") == 1 and ops.count("Add") == 0
    w_hat = weight_of(q)
    for seed in range(3):
        f = outlier_feed(seed)
        want = row_reference(f["x"].astype(np.float64), w_hat) + b
        got = ort_all(q, f)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_a_named_layer_kept_float_for_a_reason_is_not_an_unknown_name():
    """Two layers read one weight; the ladder lifting one to float keeps the other float too (one copy), and a
    row or two-pass request for it is reported, not an error (an unseen torch TransformerEncoder export)."""
    rng = np.random.default_rng(5)
    w = nh.from_array((rng.standard_normal((K, K)) / 8).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm0"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "w"], ["y"], name="mm1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, K])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for option in ("row_ranges", "two_pass"):
        q, st = dynamic(model, exclude=["mm0"], **{option: ["mm1"]})
        assert "also read by" in st["layers_kept_float"]["mm1"]
        assert [n.op_type for n in q.graph.node].count("MatMul") == 2


def test_readers_of_one_input_with_different_widths_and_biases_share_one_product():
    rng = np.random.default_rng(8)
    w0, w1 = (rng.standard_normal((K, n)).astype(np.float32) / 8 for n in (N, 2 * N))
    b0 = rng.standard_normal(N).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
                           helper.make_node("Add", ["h0", "b0"], ["y0"], name="bias0"),
                           helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, K])],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 16, N]),
                           helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 16, 2 * N])],
                          [nh.from_array(w0, "w0"), nh.from_array(b0, "b0"), nh.from_array(w1, "w1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, st = dynamic(model, activation_ranges="row")
    ops = [n.op_type for n in q.graph.node]
    assert st["row_range_layers"] == 2 and ops.count("MatMulInteger") == 1 and ops.count("Split") == 1
    joined = weight_of(q, "mm0_row_joined", "mm0")
    x = np.concatenate([outlier_feed(s)["x"] for s in (1, 2)])  # batch 2: each row its own range
    y0, y1 = ort_all(q, {"x": x})
    np.testing.assert_allclose(y0, row_reference(x.astype(np.float64), joined[:, :N]) + b0, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(y1, row_reference(x.astype(np.float64), joined[:, N:]), rtol=1e-4, atol=1e-3)


def test_a_bias_held_by_a_constant_node_joins_the_sum_too():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    g = helper.make_graph([helper.make_node("Constant", [], ["b"], value=nh.from_array(b, "bv"), name="bconst"),
                           helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
                           helper.make_node("Add", ["h", "b"], ["y"], name="bias")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])], [nh.from_array(w, "w0")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, _ = dynamic(model, activation_ranges="row")
    assert [n.op_type for n in q.graph.node].count("Add") == 0
    f = outlier_feed(3)
    np.testing.assert_allclose(ort_all(q, f)[0], row_reference(f["x"].astype(np.float64), weight_of(q)) + b,
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_row_ranges_with_either_weight_code_type(weight_type):
    """uint8 codes (zero point 128) are what AVX2 machines without VNNI get: the offsets use the codes minus it."""
    q, st = dynamic(chain_model(layers=1), activation_ranges="row", weight_type=weight_type)
    assert st["weight_type"] == weight_type
    w_hat = weight_of(q)
    for seed in range(3):
        f = outlier_feed(seed)
        want = row_reference(f["x"].astype(np.float64), w_hat)
        np.testing.assert_allclose(ort_all(q, f)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
