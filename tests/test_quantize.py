"""quantize pass: QDQ structure, ORT fusion into integer kernels, opset upgrade, numerics, mixed precision, refusal."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.quantize import Quantize
from quantize_helpers import WEIGHT_CODES, signed_codes

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError, PassError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.manager import PassManager


# ----------------------------------------------------------------------------------------------------- models
def _init(model: onnx.ModelProto, **arrays: np.ndarray) -> onnx.ModelProto:
    for name, a in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(a, name))
    onnx.checker.check_model(model)
    return model


@pytest.fixture(autouse=True)
def _own_latency_cache(tmp_path, monkeypatch):
    """Each test its own per-machine latency cache: stubbed timings never reach the user's cache, and a cached
    value from an earlier run never hides a measurement a test counts."""
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path / "latency-cache"))


def conv_net(opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu, depthwise Conv-Relu, pointwise Conv, residual Add, GAP, Gemm."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model(f"""<ir_version: 7, opset_import: ["" : {opset}]>
    g (float[1,3,16,16] x) => (float[1,10] y) {{
      c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r1 = Relu(c1)
      c2 = Conv<pads=[1,1,1,1], group=8>(r1, w2, b2)
      r2 = Relu(c2)
      c3 = Conv(r2, w3, b3)
      a = Add(c3, r1)
      p = GlobalAveragePool(a)
      f = Flatten(p)
      y = Gemm<transB=1>(f, w4, b4)
    }}""")
    return _init(
        m,
        w1=rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        b1=rng.standard_normal(8).astype(np.float32) * 0.1,
        w2=rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3,
        b2=rng.standard_normal(8).astype(np.float32) * 0.1,
        w3=rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3,
        b3=rng.standard_normal(8).astype(np.float32) * 0.1,
        w4=rng.standard_normal((10, 8)).astype(np.float32),
        b4=rng.standard_normal(10).astype(np.float32),
    )


def feeds_for(model: onnx.ModelProto, n: int = 8, seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


class SameSpeed(LatencyProfile):
    """Every model runs at 0.5x the float one, nothing is measured: float layers cost no latency, only size."""

    def measure(self, key, fn):
        self.replayed += 1
        return 0.0 if key.startswith("quantize/float-cost/") else 0.5  # paired differences / ratios


def quantize(model: onnx.ModelProto, feeds=None, latency=None, **options) -> tuple[onnx.ModelProto, dict]:
    options.setdefault("latency_guard", False)
    ctx = PassContext(calibration=load_feeds(feeds, model) if feeds is not None else None)
    if latency is not None:
        ctx.latency = latency
    result = PassManager([Quantize(**options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    """Op counts of the graph ORT actually runs (all optimizations, CPU EP)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ops(onnx.load(so.optimized_model_filepath))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# ------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "fast"},
        {"activation_type": "int16"},
        {"calibration": "kmeans"},
        {"percentile": 20.0},
        {"weight_bits": 2},
        {"weight_bits": 4, "mode": "static"},
        {"block_size": 48},
        {"min_cosine": 1.5},
        {"max_agreement_drop": -0.1},
        {"weight_format": "matmulnbits"},
        {"mixed_range_ratio": 0.5},
    ],
)
def test_bad_options_raise_value_error(bad):
    with pytest.raises(ValueError):
        Quantize(**bad)


def test_static_without_calibration_data_is_a_clear_error():
    # the manager checks every pass's needs before the first runs: a missing --calib is bad input (exit 2)
    with pytest.raises(BadInputError, match="calibration data"):
        quantize(conv_net())


# ------------------------------------------------------------------------------------------------- static
def test_static_structure_weights_bias_and_numerics(tmp_path):
    model = conv_net()
    feeds = feeds_for(model)
    q, stats = quantize(model, feeds, calibration="minmax")
    onnx.checker.check_model(q, full_check=True)
    c = ops(q)
    assert c["Conv"] == 3 and c["QuantizeLinear"] >= 4 and c["DequantizeLinear"] >= 10
    assert stats["nodes_quantized"]["Conv"] == 3 and stats["nodes_quantized"]["Gemm"] == 1
    assert stats["layers_kept_float"] == {}
    # weights are integer initializers read through DequantizeLinear(axis = output channel)
    for node in q.graph.node:
        if node.op_type == "Conv":
            dq_w = next(n for n in q.graph.node if n.output[0] == node.input[1])
            assert dq_w.op_type == "DequantizeLinear"
            codes = initializer(q, dq_w.input[0])
            assert codes.dtype in WEIGHT_CODES
            zp = initializer(q, dq_w.input[2]).reshape(-1, 1, 1, 1)
            assert np.abs(signed_codes(codes, zp)).max() <= 127  # symmetric
            assert onnx.helper.get_attribute_value(dq_w.attribute[0]) == 0
            # bias: int32 with scale = s_x * s_w
            dq_b = next(n for n in q.graph.node if n.output[0] == node.input[2])
            assert initializer(q, dq_b.input[0]).dtype == np.int32
            dq_x = next(n for n in q.graph.node if n.output[0] == node.input[0])
            s_x = initializer(q, dq_x.input[1])
            np.testing.assert_allclose(
                initializer(q, dq_b.input[1]), s_x * initializer(q, dq_w.input[1]), rtol=1e-6
            )
    assert stats["weight_bytes_after"] < stats["weight_bytes_before"]
    for f in feeds_for(model, 4, seed=99):
        assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.995


def test_ort_fuses_every_conv_and_the_residual_into_integer_kernels(tmp_path):
    model = conv_net()
    q, _ = quantize(model, feeds_for(model))
    opt = optimized_ops(q, tmp_path)
    assert opt["QLinearConv"] == 3 and opt["Conv"] == 0 and opt["FusedConv"] == 0
    assert opt["QLinearAdd"] == 1 and opt["QLinearGlobalAveragePool"] == 1
    assert opt["Relu"] == 0  # absorbed by the Q after it
    # the head's Gemm becomes an integer GEMM too (QGemm, float output)
    assert opt["QGemm"] + opt["MatMulIntegerToFloat"] + opt["DynamicQuantizeMatMul"] == 1


def test_int8_activations_and_symmetric_option():
    model = conv_net()
    feeds = feeds_for(model)
    q, _ = quantize(model, feeds, activation_type="int8", symmetric_activations=True)
    zps = [initializer(q, n.input[2]) for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 for z in zps)
    # symmetric: zero point 0, except Relu outputs, which stay one-sided (zero point at qmin) so ORT drops the Relu
    assert all(int(z) in (0, -128) for z in zps) and any(int(z) == 0 for z in zps)
    f = feeds[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.99


def test_per_tensor_weights_need_no_opset_upgrade():
    model = conv_net(opset=11)
    q, stats = quantize(model, feeds_for(model), per_channel=False)
    assert "opset_upgrade" not in stats
    assert next(i.version for i in q.opset_import if i.domain == "") == 11
    assert all(not n.attribute for n in q.graph.node if n.op_type == "DequantizeLinear")


def test_opset_upgrade_for_per_channel_keeps_attribute_ops_valid():
    # opset 11: Squeeze/Unsqueeze/Split take attributes (inputs from 13)
    rng = np.random.default_rng(3)
    m = onnx.parser.parse_model("""<ir_version: 6, opset_import: ["" : 11]>
    g (float[1,4,8,8] x) => (float[1,6,8,8] y) {
      c = Conv<pads=[1,1,1,1]>(x, w, b)
      u = Unsqueeze<axes=[0]>(c)
      s = Squeeze<axes=[0]>(u)
      p, q = Split<axis=1, split=[2,4]>(s)
      r = Relu(q)
      y = Concat<axis=1>(p, r)
    }""")
    model = _init(
        m,
        w=rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3,
        b=rng.standard_normal(6).astype(np.float32),
    )
    q, stats = quantize(model, feeds_for(model), calibration="minmax")
    assert stats["opset_upgrade"] == "11 -> 13"
    assert next(i.version for i in q.opset_import if i.domain == "") == 13
    onnx.checker.check_model(q, full_check=True)
    assert any(n.op_type == "Squeeze" and len(n.input) == 2 for n in q.graph.node)  # axes became an input
    f = feeds_for(model, 1, seed=5)[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.999


def test_affine_after_conv_is_folded_and_scalar_div_absorbed(tmp_path):
    # PP-LCNet style: Conv -> Mul(k) -> Add(k) -> hardswish as x*clip(x+3,0,6)/6 -> Conv
    rng = np.random.default_rng(4)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
      c = Conv<pads=[1,1,1,1]>(x, w, b)
      m = Mul(k, c)
      a = Add(m, k2)
      t = Add(a, three)
      cl = Clip(t, zero, six)
      h = Mul(a, cl)
      d = Div(h, six)
      y = Conv(d, w2, b2)
    }""")
    model = _init(
        m,
        w=rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
        b=rng.standard_normal(4).astype(np.float32),
        k=np.array([1.7], np.float32),
        k2=np.array([0.4], np.float32),
        three=np.array(3.0, np.float32),
        zero=np.array(0.0, np.float32),
        six=np.array(6.0, np.float32),
        w2=rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        b2=np.zeros(4, np.float32),
    )
    q, stats = quantize(model, feeds_for(model), calibration="minmax")
    assert stats["affine_folded_into_conv"] == 2 and stats["scalars_absorbed"] == 1
    assert ops(q)["Div"] == 0
    opt = optimized_ops(q, tmp_path)
    assert opt["QLinearConv"] == 2 and opt["QLinearAdd"] == 1 and opt["QLinearMul"] == 1
    assert opt["Clip"] == 0 and opt["Div"] == 0
    f = feeds_for(model, 1, seed=8)[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.995


def test_conv_transpose_weights_are_stored_int8_along_axis_1():
    rng = np.random.default_rng(14)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,3,16,16] y) {
      c = Conv<pads=[1,1,1,1]>(x, w, b)
      r = Relu(c)
      y = ConvTranspose<strides=[2,2], kernel_shape=[2,2]>(r, wt, bt)
    }""")
    model = _init(
        m,
        w=rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
        b=np.zeros(6, np.float32),
        wt=rng.standard_normal((6, 3, 2, 2)).astype(np.float32),
        bt=rng.standard_normal(3).astype(np.float32),
    )
    q, stats = quantize(model, feeds_for(model), calibration="minmax")
    assert stats["weights_only_float_ops"] == 1
    ct = next(n for n in q.graph.node if n.op_type == "ConvTranspose")
    dq = next(n for n in q.graph.node if n.output[0] == ct.input[1])
    assert dq.op_type == "DequantizeLinear" and onnx.helper.get_attribute_value(dq.attribute[0]) == 1
    assert initializer(q, dq.input[0]).dtype == np.int8 and initializer(q, dq.input[1]).shape == (3,)
    f = feeds_for(model, 1, seed=15)[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.995


def test_concat_of_mixed_ranges_stays_float():
    # a YOLO-like head: pixel-scale boxes next to 0-1 scores
    rng = np.random.default_rng(5)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,6,8,8] y) {
      a = Conv(x, wa, ba)
      b = Conv(x, wb, bb)
      s = Sigmoid(b)
      y = Concat<axis=1>(a, s)
    }""")
    model = _init(
        m,
        wa=rng.standard_normal((2, 4, 1, 1)).astype(np.float32) * 100,
        ba=np.full(2, 300, np.float32),
        wb=rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        bb=np.zeros(4, np.float32),
    )
    q, stats = quantize(model, feeds_for(model), calibration="minmax")
    concat = next(n for n in q.graph.node if n.op_type == "Concat")
    assert not any(i.endswith("_dequantized") and "Concat" in i for i in concat.output)
    assert stats["nodes_quantized"].get("Concat", 0) == 0
    f = feeds_for(model, 1, seed=9)[0]
    ref, got = ort_run(model, f)[0], ort_run(q, f)[0]
    # the scores keep their resolution: well under one uint8 step of the box range (600/255)
    assert np.max(np.abs(ref[:, 2:] - got[:, 2:])) < 0.02


def test_excluded_layers_stay_float_with_a_reason():
    model = conv_net()
    q, stats = quantize(model, feeds_for(model), exclude=("Gemm",))
    assert "Gemm" not in stats["nodes_quantized"]
    assert list(stats["layers_kept_float"].values()) == ["excluded by the user"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse", "auto"])
def test_every_calibration_method_gives_a_close_model(method):
    model = conv_net(seed=2)
    feeds = feeds_for(model, 6)
    q, stats = quantize(model, feeds, calibration=method, bias_correction=False)
    assert stats["calibration"] in ("minmax", "percentile", "entropy", "mse")
    f = feeds_for(model, 1, seed=11)[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.98


def test_calibration_with_variable_input_shapes():
    model = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,N] x) => (float[1,8,N] y) {
      y = Conv<pads=[1,1]>(x, w, b)
    }""")
    rng = np.random.default_rng(6)
    model = _init(model, w=rng.standard_normal((8, 4, 3)).astype(np.float32), b=np.zeros(8, np.float32))
    feeds = [{"x": rng.standard_normal((1, 4, n)).astype(np.float32)} for n in (5, 17, 40, 9)]
    for method in ("percentile", "entropy", "mse"):
        q, _ = quantize(model, feeds, calibration=method)
        f = {"x": rng.standard_normal((1, 4, 23)).astype(np.float32)}
        assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.99


def test_bias_correction_reduces_the_output_mean_shift():
    model = conv_net(seed=3)
    feeds = feeds_for(model, 8)
    evals = feeds_for(model, 8, seed=21)

    def mean_shift(q):
        return np.mean([np.abs(np.mean(ort_run(q, f)[0] - ort_run(model, f)[0])) for f in evals])

    q0, _ = quantize(model, feeds, calibration="minmax", bias_correction=False, weight_rounding="nearest")
    q1, stats = quantize(model, feeds, calibration="minmax", bias_correction=True, weight_rounding="nearest")
    assert stats["bias_corrected_layers"] >= 3
    assert mean_shift(q1) <= mean_shift(q0) * 1.05


def test_equalization_is_exact_in_float_and_keeps_the_model_close():
    model = conv_net(seed=4)
    feeds = feeds_for(model, 6)
    q, stats = quantize(model, feeds, equalize=True, calibration="minmax")
    assert stats["cle_pairs"] >= 1
    f = feeds[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.99


# ------------------------------------------------------------------------------------------ mixed precision
def deep_mlp(layers: int = 6, width: int = 32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    body, arrays = [], {}
    prev = "x"
    for i in range(layers):
        body.append(f"m{i} = MatMul({prev}, w{i})")
        body.append(f"r{i} = Relu(m{i})" if i < layers - 1 else f"y = Identity(m{i})")
        w = rng.standard_normal((width, width)) / np.sqrt(width) * 1.4
        if i == 2:
            w[:, 0] *= 40.0  # one outlier column: this layer's output range swamps its other channels
        arrays[f"w{i}"] = w.astype(np.float32)
        prev = f"r{i}"
    text = (
        f'<ir_version: 7, opset_import: ["" : 13]>\ng (float[4,{width}] x) => (float[4,{width}] y) {{\n'
        + "\n".join(body)
        + "\n}"
    )
    return _init(onnx.parser.parse_model(text), **arrays)


def test_mixed_precision_keeps_the_fewest_sensitive_layers_float_to_meet_the_target():
    model = deep_mlp()
    feeds = feeds_for(model, 16)
    _, stats0 = quantize(model, feeds, calibration="minmax", bias_correction=False, auto_float_db=0)
    base = stats0["score_on_calibration"]["cosine"]
    target = 1.0 - (1.0 - base) / 4  # demand 4x less error than all-int8 gives
    q, stats = quantize(
        model,
        feeds,
        calibration="minmax",
        bias_correction=False,
        min_cosine=target,
        eval_samples=16,
        auto_float_db=0,
    )
    mp = stats["mixed_precision"]
    assert mp["met"] is True
    assert 1 <= mp["layers_float"] < mp["layers_total"]
    assert stats["score_on_calibration"]["cosine"] >= target
    kept = stats["layers_kept_float"]
    assert len(kept) == mp["layers_float"] and all("mixed precision" in r for r in kept.values())
    got = np.mean([cosine(ort_run(model, f)[0], ort_run(q, f)[0]) for f in feeds])
    assert got >= target - 1e-6


def test_auto_float_keeps_the_layer_that_adds_most_noise_float():
    model = deep_mlp()
    feeds = feeds_for(model, 16)
    q0, s0 = quantize(model, feeds, calibration="minmax", auto_float_db=0)
    # one of six equal layers float costs 12% of the float model's bytes: allow 0.1 per dB (no latency cost)
    q1, s1 = quantize(model, feeds, SameSpeed(), calibration="minmax", auto_float_cost_per_db=0.1)
    auto = s1["auto_float"]
    assert auto["feature_sqnr_db_all_int8"] < 30 and len(auto["kept_float"]) == 1
    layer = auto["kept_float"][0]
    assert auto["top_gains_db"][layer] >= 1.0
    assert s1["layers_kept_float"][layer].startswith("kept float automatically")
    (rec,) = s1["kept_float"]
    assert rec["layer"] == layer and rec["latency_cost"] == 0 and 0.1 < rec["size_cost"] < 0.13
    # at the default 0.05 per dB the same 2 dB do not pay for 12% of the size
    _, s2 = quantize(model, feeds, SameSpeed(), calibration="minmax")
    assert s2["auto_float"]["kept_float"] == [] and "size" in s2["auto_float"]["rejected"][0]["reason"]
    assert s1["score_on_calibration"]["feature_sqnr_db"] > s0["score_on_calibration"]["feature_sqnr_db"] + 1.0


def test_auto_float_does_nothing_on_an_accurate_model():
    model = conv_net()
    _, stats = quantize(model, feeds_for(model))
    assert stats["layers_kept_float"] == {} and "auto_float" not in stats


def test_offset_before_an_unpadded_conv_is_folded_into_its_bias():
    rng = np.random.default_rng(12)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,6,8,8] y) {
      c = Conv<pads=[1,1,1,1]>(x, w, b)
      r = Relu(c)
      a = Add(r, k)
      y = Conv<group=2>(a, w2, b2)
    }""")
    model = _init(
        m,
        w=rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
        b=rng.standard_normal(4).astype(np.float32),
        k=rng.standard_normal((4, 1, 1)).astype(np.float32),
        w2=rng.standard_normal((6, 2, 1, 1)).astype(np.float32),
        b2=rng.standard_normal(6).astype(np.float32),
    )
    q, stats = quantize(model, feeds_for(model), calibration="minmax")
    assert stats["offset_folded_into_next_conv"] == 1
    assert ops(q)["Add"] == 0
    f = feeds_for(model, 1, seed=13)[0]
    assert cosine(ort_run(model, f)[0], ort_run(q, f)[0]) > 0.99
    # the fold itself is exact (float graph, no quantization)
    from onnxcompress.passes.quantize.prepare import fold_offset_into_next_conv

    from onnxcompress import io
    from onnxcompress.naming import graph_names as tensor_names

    g = io.to_graph(model)
    assert fold_offset_into_next_conv(g, tensor_names(g)) == 1
    folded = io.to_model(g, model)
    np.testing.assert_allclose(ort_run(folded, f)[0], ort_run(model, f)[0], rtol=1e-5, atol=1e-5)


def test_mixed_precision_target_already_met_changes_nothing():
    model = conv_net()
    q, stats = quantize(model, feeds_for(model), min_cosine=0.5)
    assert stats["mixed_precision"]["layers_float"] == 0 if "mixed_precision" in stats else True
    assert stats["layers_kept_float"] == {}


# --------------------------------------------------------------------------------------- already quantized
def already_quantized() -> onnx.ModelProto:
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[2,4] x) => (float[2,3] y) {
      xq, xs, xz = DynamicQuantizeLinear(x)
      acc = MatMulInteger(xq, w, xz)
      f = Cast<to=1>(acc)
      y = Mul(f, xs)
    }""")
    return _init(m, w=np.ones((4, 3), np.int8))


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_refuses_an_already_quantized_model(mode):
    model = already_quantized()
    with pytest.raises(PassError, match="already quantized.*DynamicQuantizeLinear"):
        quantize(model, [{"x": np.ones((2, 4), np.float32)}], mode=mode)


def test_already_quantized_ignore_leaves_integer_parts_alone():
    model = already_quantized()
    q, stats = quantize(model, [{"x": np.ones((2, 4), np.float32)}], already_quantized="ignore")
    assert ops(q) == ops(model)
    assert "nothing to quantize" in stats["skipped"]


def test_refuses_the_real_ddddocr_old_model():
    from benchmarks.vision import cached_file

    path = cached_file("ddddocr_old")
    if not path.exists():
        pytest.skip(
            "ddddocr common_old.onnx is not in the real-model cache (python -m benchmarks.models fetch)"
        )
    model = onnx.load(str(path))
    with pytest.raises(PassError, match="already quantized.*ConvInteger"):
        PassManager([Quantize(mode="dynamic")], measure=False, gate=False).run(model, PassContext())


# ----------------------------------------------------------------------------------- dynamic / weight-only
def mlp_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,8,64] x, int64[1,8] ids) => (float[1,8,64] y, float[8,32] z) {
      e = Gather(emb, ids)
      h = Add(x, e)
      m = MatMul(h, w1)
      a = Add(m, b1)
      r = Relu(a)
      y = MatMul(r, w2)
      f = Reshape(y, shp)
      z = Gemm<transB=1>(f, w3, b3)
    }""")
    return _init(
        m,
        emb=rng.standard_normal((1100, 64)).astype(np.float32) * 0.1,
        w1=rng.standard_normal((64, 128)).astype(np.float32) * 0.1,
        b1=rng.standard_normal(128).astype(np.float32) * 0.1,
        w2=rng.standard_normal((128, 64)).astype(np.float32) * 0.1,
        shp=np.array([8, 64], np.int64),
        w3=rng.standard_normal((32, 64)).astype(np.float32) * 0.1,
        b3=rng.standard_normal(32).astype(np.float32),
    )


def mlp_feed(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((1, 8, 64)).astype(np.float32),
        "ids": rng.integers(0, 1100, (1, 8)).astype(np.int64),
    }


def test_dynamic_mode_fuses_into_dynamic_quantize_matmul(tmp_path):
    model = mlp_model()
    q, stats = quantize(model, mode="dynamic")
    assert stats["nodes_quantized"] == {"MatMul": 2, "Gemm": 1, "Gather": 1}
    c = ops(q)
    assert c["DynamicQuantizeLinear"] == 3 and c["MatMulInteger"] == 3 and c["MatMul"] == 0
    opt = optimized_ops(q, tmp_path)
    assert opt["DynamicQuantizeMatMul"] == 3 and opt["MatMul"] == 0
    f = mlp_feed(1)
    for a, b in zip(ort_run(model, f), ort_run(q, f), strict=True):
        assert cosine(a, b) > 0.999
    assert stats["weight_bytes_after"] < stats["weight_bytes_before"] * 0.35


def test_weight_only_int8_per_channel():
    model = mlp_model()
    q, stats = quantize(model, mode="weight_only")
    assert stats["nodes_quantized"]["MatMul"] == 2
    f = mlp_feed(2)
    for a, b in zip(ort_run(model, f), ort_run(q, f), strict=True):
        assert cosine(a, b) > 0.9999


def test_weight_only_int4_blocked_dq_at_opset_21_becomes_matmulnbits(tmp_path):
    model = mlp_model()
    q, stats = quantize(model, mode="weight_only", weight_bits=4, block_size=32)
    assert stats["opset_upgrade"] == "13 -> 21"
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all({a.name for a in n.attribute} == {"axis", "block_size"} for n in dqs)
    assert any(t.data_type == onnx.TensorProto.INT4 for t in q.graph.initializer)
    opt = optimized_ops(q, tmp_path)
    assert opt["MatMulNBits"] == 2
    f = mlp_feed(3)
    for a, b in zip(ort_run(model, f), ort_run(q, f), strict=True):
        assert cosine(a, b) > 0.99


def test_weight_only_int4_as_matmulnbits_op():
    model = mlp_model()
    q, stats = quantize(model, mode="weight_only", weight_bits=4, weight_format="matmulnbits")
    c = ops(q)
    assert c["MatMulNBits"] == 2 and c["MatMul"] == 0
    assert list(stats["layers_kept_float"].values()) == ["MatMulNBits replaces MatMul only"]
    f = mlp_feed(4)
    for a, b in zip(ort_run(model, f), ort_run(q, f), strict=True):
        assert cosine(a, b) > 0.99


def test_file_shrinks_about_4x_when_weights_dominate(tmp_path):
    rng = np.random.default_rng(9)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,64,8,8] x) => (float[1,256,8,8] y) {
      a = Conv(x, w1, b1)
      r = Relu(a)
      y = Conv(r, w2, b2)
    }""")
    model = _init(
        m,
        w1=rng.standard_normal((256, 64, 3, 3)).astype(np.float32) * 0.05,
        b1=np.zeros(256, np.float32),
        w2=rng.standard_normal((256, 256, 1, 1)).astype(np.float32) * 0.05,
        b2=np.zeros(256, np.float32),
    )
    q, _ = quantize(model, feeds_for(model, 4), calibration="minmax")
    ratio = len(q.SerializeToString()) / len(model.SerializeToString())
    assert 0.24 < ratio < 0.30


def test_latency_guard_leaves_a_slower_model_float(monkeypatch):
    import onnxcompress.latency as latency

    calls = []

    def fake(models, feed, **kw):
        calls.append(list(models))
        return {"float": 1.0, "int8": 1.5}

    monkeypatch.setattr(latency, "measure_latency", fake)
    model = conv_net()
    q, stats = quantize(model, feeds_for(model), latency_guard=True)
    assert "slower" in stats["skipped"] and ops(q)["QuantizeLinear"] == 0
    # whole models are measured twice (short, then long as 1.5 is no clear win): the full placement and the
    # depthwise-float one; the 3 Convs once each as one-layer pairs; every Conv measured slower in int8, so no
    # "slow layers float" candidate (it would be the float graph)
    assert len(calls) == 2 + 3 + 2 and all(c == ["float", "int8"] for c in calls)
    assert len(stats["latency_layer_ratios"]) == 3


def test_latency_guard_keeps_float_the_convs_whose_int8_kernel_is_slower(monkeypatch):
    from onnxcompress.passes.quantize import layer_speed as speed

    import onnxcompress.latency as latency

    by_input = {"x": 2.5, "r1": 0.4, "r2": 0.5}  # the first Conv's integer kernel loses, the others win
    monkeypatch.setattr(
        speed, "int8_speed_ratios", lambda convs, shapes, **kw: {n.name: by_input[n.inputs[0].name] for n in convs}
    )
    measured = []

    def fake(models, feed, **kw):
        m = models["int8"]
        quantized = {n.input[0] for n in m.graph.node if n.op_type == "Conv" and n.input[1].endswith("dequantized")}
        measured.append(len(quantized))
        return {"float": 1.0, "int8": 1.2 if len(quantized) == 3 else 0.7}

    monkeypatch.setattr(latency, "measure_latency", fake)
    model = conv_net()
    q, stats = quantize(model, feeds_for(model), latency_guard=True)
    assert stats["latency_ratio_measured"] == 1.2 and stats["latency_ratio_slow_layers_float"] == 0.7
    conv_w = [n.input[1] for n in q.graph.node if n.op_type == "Conv"]
    assert "w1" in conv_w and "w2" not in conv_w and "w3" not in conv_w  # only the first Conv's weight is float
    first = next(n.name for n in q.graph.node if n.op_type == "Conv" and n.input[1] == "w1")
    assert stats["layers_kept_float"][first].startswith("kept float for speed")
    ref = ort_run(model, feeds_for(model, 1)[0])[0]
    assert cosine(ref, ort_run(q, feeds_for(model, 1)[0])[0]) > 0.99


@pytest.mark.parametrize("all_int8, fallback, kept", [(0.93, 0.7, "fallback"), (0.93, 0.96, "all"),
                                                       (0.8, 0.5, "all")])
def test_latency_guard_compares_a_not_clearly_faster_model_with_its_slow_convs_float(monkeypatch, all_int8,
                                                                                     fallback, kept):
    from onnxcompress.passes.quantize import layer_speed as speed

    import onnxcompress.latency as latency

    by_input = {"x": 2.5, "r1": 0.4, "r2": 0.5}
    monkeypatch.setattr(
        speed, "int8_speed_ratios", lambda convs, shapes, **kw: {n.name: by_input[n.inputs[0].name] for n in convs}
    )

    def fake(models, feed, **kw):
        m = models["int8"]
        quantized = {n.input[0] for n in m.graph.node if n.op_type == "Conv" and n.input[1].endswith("dequantized")}
        return {"float": 1.0, "int8": all_int8 if len(quantized) == 3 else fallback}

    monkeypatch.setattr(latency, "measure_latency", fake)
    model = conv_net()
    q, stats = quantize(model, feeds_for(model), latency_guard=True)
    conv_w = [n.input[1] for n in q.graph.node if n.op_type == "Conv"]
    if all_int8 < 0.85:  # clearly faster: kept without looking at the layers
        assert "latency_ratio_slow_layers_float" not in stats and "w1" not in conv_w
    elif kept == "fallback":
        assert stats["latency_ratio_slow_layers_float"] == fallback and "w1" in conv_w and "w2" not in conv_w
    else:  # the fallback measured no faster than the all-int8 model, which beats float: all int8
        assert stats["latency_ratio_slow_layers_float"] == fallback and "w1" not in conv_w


def test_layer_speed_pair_is_one_qlinearconv_and_ratios_are_measured(tmp_path):
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.quantize.layer_speed import conv_pair, int8_speed_ratios

    g = gs.import_onnx(conv_net())
    convs = [n for n in g.nodes if n.op == "Conv"]
    for i, n in enumerate(convs):
        n.name = f"c{i + 1}"
    dw = next(n for n in convs if n.attrs.get("group", 1) > 1)
    f, q = conv_pair(dw, (1, 8, 16, 16))
    assert optimized_ops(q, tmp_path)["QLinearConv"] == 1
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    assert ort_run(f, {"x": x})[0].shape == (1, 8, 16, 16)
    ratios = int8_speed_ratios(convs, {"x": (1, 3, 16, 16), "r1": (1, 8, 16, 16)}, budget_s=0.02)
    assert set(ratios) == {"c1", "c2"} and all(r > 0 for r in ratios.values())  # c3's input shape is unknown


def test_float_patch_rewires_one_layer_and_restores_the_model():
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.quantize.float_patch import FloatPatcher

    model = conv_net()
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    q, _ = quantize(model, feeds_for(model), calibration="minmax", auto_float_db=0)
    before = q.SerializeToString()
    patcher = FloatPatcher(q, gs.import_onnx(model))
    feeds = feeds_for(model, 8, seed=11)
    ref = [ort_run(model, f)[0] for f in feeds]

    def mse(m: onnx.ModelProto) -> float:
        return float(np.mean([np.mean((ort_run(m, f)[0] - r) ** 2) for f, r in zip(feeds, ref, strict=True)]))

    with patcher.float_layer("n0") as m:
        c1 = next(n for n in m.graph.node if n.name == "n0")
        assert list(c1.input)[:2] == ["x", "n0__float_input_1"]
        mse_patched = mse(m)
    assert q.SerializeToString() == before
    real, _ = quantize(model, feeds_for(model), calibration="minmax", auto_float_db=0, exclude=("n0",))
    # the first layer in float: less noise than all-int8, about as much as a real build with it float
    assert mse_patched < mse(q)
    assert abs(mse_patched - mse(real)) < 0.1 * mse(real)


# ---------------------------------------------------------------------------------------- latency profile
def _static_run(model: onnx.ModelProto, latency) -> tuple[onnx.ModelProto, dict, PassContext]:
    from onnxcompress.pipeline import parse_pipeline

    ctx = PassContext(calibration=load_feeds(feeds_for(model), model), latency=latency)
    result = PassManager(parse_pipeline("cleanup,quantize{mode=static}"), measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats, ctx


def test_latency_guard_replays_its_profile_byte_for_byte():
    from onnxcompress.latency_profile import LatencyProfile

    model = conv_net()
    first, stats1, ctx1 = _static_run(model, LatencyProfile())
    assert ctx1.latency.measured > 0 and stats1["latency_measurements"]["measured"] == ctx1.latency.measured
    replay = LatencyProfile(ctx1.latency.to_dict(), replay_only=True)
    second, stats2, ctx2 = _static_run(model, replay)
    assert second.SerializeToString() == first.SerializeToString()
    assert ctx2.latency.measured == 0 and stats2["latency_measurements"]["measured"] == 0
    assert stats2["latency_measurements"]["replayed"] == stats1["latency_measurements"]["measured"]


def test_latency_guard_returns_the_float_model_when_the_profile_says_int8_is_slower():
    from onnxcompress.passes.quantize.layer_speed import conv_speed_key

    from onnxcompress import io
    from onnxcompress.latency_profile import LatencyProfile

    class Int8Slower(LatencyProfile):
        """Every ratio asked for is 2.0 (int8 twice as slow), nothing is measured."""

        def measure(self, key, fn):
            self.entries[key] = 2.0
            self.replayed += 1
            return 2.0

    model = conv_net()
    q, stats, ctx = _static_run(model, Int8Slower())
    assert "slower" in stats["skipped"] and ops(q)["QuantizeLinear"] == 0 and ops(q)["Conv"] == 3
    # the keys asked for: each Conv layer by weight shape / attributes / input shape, and two whole candidates
    # (the full placement, then depthwise Convs float; every layer is slow, so no "slow layers float" candidate)
    shapes = {"x": (1, 3, 16, 16), "r1": (1, 8, 16, 16), "r2": (1, 8, 16, 16)}
    convs = [n for n in io.to_graph(model).nodes if n.op == "Conv"]
    layer_keys = {conv_speed_key(n, shapes[n.inputs[0].name]) for n in convs}
    assert len(layer_keys) == 3 and layer_keys <= set(ctx.latency.entries)
    model_keys = [k for k in ctx.latency.entries if k not in layer_keys]
    assert len(model_keys) == 2 and all(k.startswith("quantize/model-ratio/") for k in model_keys)
    # the same decisions from a plain profile holding those ratios, replayed strictly
    replayed, stats2, ctx2 = _static_run(model, LatencyProfile(ctx.latency.to_dict(), replay_only=True))
    assert replayed.SerializeToString() == q.SerializeToString() and ctx2.latency.measured == 0
    assert stats2["latency_measurements"] == {"measured": 0, "replayed": 5, "machine_cache": 0}



# ----------------------------------------------------------------------------------- weights with other readers
def _shared_weight_model(other: str) -> onnx.ModelProto:
    """h = Gather(E, ids) [1, 64]; logits = Gemm(h, E, transB=1) [1, 1024] (tied) — or E also read by a Slice."""
    rng = np.random.default_rng(0)
    e = (rng.standard_normal((1024, 64)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("Gemm", ["h", "E"], ["logits"], transB=1, name="proj")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1024])]
    inits = [numpy_helper.from_array(e, "E")]
    if other == "slice":
        nodes.append(helper.make_node("Slice", ["E", "s0", "s1"], ["rows"], name="rows"))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, [2, 64]))
        inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
                  numpy_helper.from_array(np.array([2], np.int64), "s1")]
    g = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])], outputs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_tied_embedding_and_projection_are_both_stored_int8(mode):
    model = _shared_weight_model("tied")
    q, stats = quantize(model, mode=mode)
    assert stats["nodes_quantized"] == {"Gemm": 1, "Gather": 1}
    assert not [t.name for t in q.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims == [1024, 64]]
    feed = {"ids": np.array([5], np.int64)}
    assert cosine(ort_run(model, feed)[0], ort_run(q, feed)[0]) > 0.999


def test_a_weight_another_op_reads_stays_float_for_every_reader():
    """E is also read by a Slice: an int8 copy for the Gemm would sit beside the float E (5 bytes per value)."""
    model = _shared_weight_model("slice")
    q, stats = quantize(model, mode="weight_only")
    assert "Gemm" not in stats["nodes_quantized"]
    assert stats["layers_kept_float"] == {"proj": "its weight is also read by Slice 'rows': kept float (one copy)"}
    assert next(n for n in q.graph.node if n.op_type == "Gemm").input[1] == "E"
