"""quantize{smooth}: SmoothQuant-style channel factors moved from MatMul inputs into their weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run
from onnx import numpy_helper
from onnxcompress.passes.quantize.smoothing import factors
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on, signed_codes

K = 32


def block(seed: int = 0) -> onnx.ModelProto:
    """LayerNorm whose output feeds two MatMuls (q, v) and a residual Add; then a MatMul on the Add (LN only read
    by the MatMul there). LayerNorm gammas with three channels 40x the others: outlier channels."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,16,{K}] x) => (float[1,16,{K}] y) {{
      n1 = LayerNormalization<axis=-1>(x, g1, b1)
      q = MatMul(n1, wq)
      v = MatMul(n1, wv)
      s = Add(q, v)
      r = Add(s, n1)
      n2 = LayerNormalization<axis=-1>(r, g2, b2)
      y = MatMul(n2, wo)
    }}""")
    g1 = np.ones(K, np.float32)
    g1[[3, 11, 20]] = 40.0
    g2 = np.ones(K, np.float32)
    g2[[5, 9]] = 30.0
    arrays = {
        "g1": g1, "b1": (rng.standard_normal(K) * 0.1).astype(np.float32),
        "g2": g2, "b2": (rng.standard_normal(K) * 0.1).astype(np.float32),
        "wq": (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32),
        "wv": (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32),
        "wo": (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32),
    }
    add_initializers(m, arrays)
    onnx.checker.check_model(m)
    return m


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return normal_feeds((1, 16, K), n, seed)


def run(model, **options):
    return quantize_on(model, feeds(16, 1), **{"weight_rounding": "nearest", **options})


sqnr = output_sqnr


def test_smoothing_is_exact_in_float_and_placed_where_the_consumers_allow():
    from onnxcompress.passes.quantize.smoothing import candidates

    model = block()
    g = gs.import_onnx(model)
    assert set(candidates(g)) == {"n1", "n2"}
    q, stats = run(model, smooth="all")
    sm = stats["smoothing"]
    assert sm["smoothed"] == 2 and sm["channel_ratio"]["n1"] > 8
    # n1 also feeds the residual Add: a Mul feeds the MatMuls; n2 feeds only the MatMul: folded into its LayerNorm
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("Mul") == 1
    ln2 = [n for n in q.graph.node if n.op_type == "LayerNormalization"][1]
    assert ln2.input[1].endswith("_smooth")
    # the float graph the pass quantized is the original function: check by smoothing alone, nothing quantized
    q_float, _ = run(model, smooth="all", exclude=("MatMul",))
    for f in feeds(4, 9):
        np.testing.assert_allclose(ort_run(q_float, f)[0], ort_run(model, f)[0], rtol=1e-4, atol=1e-4)


def weight_spike(model: onnx.ModelProto, factor: float = 10.0) -> onnx.ModelProto:
    """``block`` with even LayerNorm gammas and one weight entry per MatMul ``factor`` x the largest: smoothing then
    amplifies the activation channel that entry reads (its row's max is large) for one output column's gain."""
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t).copy()
        if t.name in ("g1", "g2"):
            a = np.ones(K, np.float32)
        if t.name in ("wq", "wv", "wo"):
            a[2, 5] = factor * np.abs(a).max()
        t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    return model


def test_auto_measures_each_strength_and_smooths_where_outlier_channels_make_it_pay():
    model = block()
    held_out = feeds(16, 5)
    q0, s0 = run(model, smooth="none")
    q1, s1 = run(model)  # smooth=auto: the default
    sm = s1["smoothing"]
    assert "smoothing" not in s0  # smooth=none: one quantization
    screen = {k: v["sqnr_db"] for k, v in sm["all_int8_by_strength"].items()}
    assert list(screen) == ["not smoothed", "alpha=0.5", "alpha=0.65", "alpha=0.8"]
    best = max(screen, key=screen.get)  # the toys have no float layers: all-int8 is the finished model
    assert sm["decision"] == "smoothed" and sm["smoothed"] == 2 and best == f"alpha={sm['alpha']:g}"
    meas = sm["measured"]
    assert list(meas) == ["not smoothed", best] and set(sm["seconds"]) == {"not smoothed", *screen}
    assert meas[best]["sqnr_db"] > meas["not smoothed"]["sqnr_db"] + 3.0  # in-sample: what decided
    # the kept model is smooth=all's quantization at the chosen strength, and better held out
    q_all, _ = run(model, smooth="all", smooth_alpha=sm["alpha"])
    assert q1.SerializeToString() == q_all.SerializeToString()
    assert sqnr(model, q1, held_out) > sqnr(model, q0, held_out) + 3.0


def test_auto_keeps_the_graph_unsmoothed_where_smoothing_measures_worse():
    model = weight_spike(block())
    calib, held_out = feeds(32, 1), feeds(16, 5)
    q_none, _ = quantize_on(model, calib, weight_rounding="nearest", smooth="none")
    q_all, _ = quantize_on(model, calib, weight_rounding="nearest", smooth="all")  # alpha 0.5
    q, st = quantize_on(model, calib, weight_rounding="nearest", smooth="auto", smooth_alphas=(0.5,))
    sm = st["smoothing"]
    assert sm["decision"] == "not smoothed" and sm["smoothed"] == 0 and sm["alpha"] is None
    screen = sm["all_int8_by_strength"]  # the screen stops it: no second float-layer search
    assert list(sm["measured"]) == ["not smoothed"]
    assert screen["not smoothed"]["sqnr_db"] > screen["alpha=0.5"]["sqnr_db"] + 0.5
    # held out too: smoothing at 0.5 is worse here, and auto is exactly smooth=none's quantization
    assert sqnr(model, q_none, held_out) > sqnr(model, q_all, held_out) + 0.5
    assert q.SerializeToString() == q_none.SerializeToString()
    assert not any(i.name.endswith("_smooth") for i in q.graph.initializer)


def test_auto_measures_the_strength_where_it_decides_the_sign():
    """The same weight spike: alpha 0.5 amplifies the spiked row's activation channel and loses; 0.8 divides the
    channels by their own RMS almost alone, shrinks the spiked row less and wins. The grid's measurement finds it,
    and held out agrees (64 calibration feeds: the amplified channel's range generalises)."""
    model = weight_spike(block())
    calib, held_out = feeds(64, 1), feeds(16, 5)
    q, st = quantize_on(model, calib, weight_rounding="nearest", smooth="auto")
    sm = st["smoothing"]
    screen = {k: v["sqnr_db"] for k, v in sm["all_int8_by_strength"].items()}
    assert sm["alpha"] == 0.8 and screen["alpha=0.8"] == max(screen.values())
    assert screen["alpha=0.5"] < screen["not smoothed"] < screen["alpha=0.8"]
    assert sm["measured"]["not smoothed"]["sqnr_db"] < sm["measured"]["alpha=0.8"]["sqnr_db"]
    held = {a: sqnr(model, quantize_on(model, calib, weight_rounding="nearest", smooth="all", smooth_alpha=a)[0],
                    held_out) for a in (0.5, 0.8)}
    q_none, _ = quantize_on(model, calib, weight_rounding="nearest", smooth="none")
    assert held[0.5] < sqnr(model, q_none, held_out) < held[0.8] == pytest.approx(sqnr(model, q, held_out))


def test_auto_on_a_cnn_with_a_pooled_gemm_head_is_one_quantization_identical_to_none():
    """Convs are no candidates, and a classifier head's pooled features ([batch, K]: one row per input) are not
    either (``positional``): smooth=auto quantizes once, byte for byte as smooth=none."""
    from onnxcompress.passes.quantize.smoothing import candidates, tensor_ranks

    rng = np.random.default_rng(3)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,10] y) {
      c = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r = Relu(c)
      c2 = Conv<pads=[1,1,1,1]>(r, w2, b2)
      p = GlobalAveragePool(c2)
      f = Flatten<axis=1>(p)
      y = Gemm<transB=1>(f, wg, bg)
    }""")
    add_initializers(m, {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                         "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
                         "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
                         "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
                         "wg": rng.standard_normal((10, 8)).astype(np.float32) * 0.3,
                         "bg": rng.standard_normal(10).astype(np.float32) * 0.1})
    g = gs.import_onnx(m)
    assert set(candidates(g)) == {"f"} and candidates(g, tensor_ranks(m)) == {}  # rank 2: one row per input
    fs = normal_feeds((1, 4, 8, 8), 8, 2)
    q_none, s_none = quantize_on(m, fs, smooth="none")
    q_auto, s_auto = quantize_on(m, fs, smooth="auto")
    assert "smoothing" not in s_auto and s_auto["nodes_quantized"] == s_none["nodes_quantized"]
    assert s_auto["nodes_quantized"]["Conv"] == 2
    assert q_auto.SerializeToString() == q_none.SerializeToString()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_factors_balance_activation_and_weight_ranges(alpha):
    rms = np.array([1.0, 100.0, 4.0, 0.0])
    w = np.array([1.0, 1.0, 0.25, 2.0])
    s = factors(rms, w, alpha)
    assert s[3] == 1.0  # a channel that is never active keeps factor 1
    ok = slice(0, 3)
    expect = rms[ok] ** alpha / w[ok] ** (1 - alpha)
    expect /= np.exp(np.mean(np.log(expect)))
    np.testing.assert_allclose(s[ok], expect)
    if alpha == 0.5:  # the activation's channel spread shrinks from 100x to 10x
        assert (rms[1] / s[1]) / (rms[0] / s[0]) == pytest.approx(10.0)


def test_smooth_none_from_a_pipeline_text_turns_smoothing_off():
    from onnxcompress.pipeline import parse_pipeline

    (q,) = parse_pipeline("quantize{smooth=none}")
    assert q.smooth == "none"
    assert parse_pipeline("quantize")[0].smooth == "auto"


# ------------------------------------------------------------------------------- dynamic mode with calibration
def dynamic(model, calib=None, **options):
    """quantize{mode=dynamic} of ``model``; ``calib``: calibration feeds (None: the pass gets no data)."""
    from onnxcompress.passes.quantize import Quantize

    from onnxcompress.context import PassContext
    from onnxcompress.data import load_feeds
    from onnxcompress.manager import PassManager

    ctx = PassContext(calibration=load_feeds(calib, model) if calib is not None else None)
    result = PassManager([Quantize(mode="dynamic", **options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def test_dynamic_mode_smooths_by_measurement_when_given_calibration_data():
    model = block()
    calib, held_out = feeds(16, 1), feeds(16, 5)
    q_plain, s_plain = dynamic(model)  # no data: dynamic quantization as always, nothing smoothed
    assert "smoothing" not in s_plain
    q_none, _ = dynamic(model, calib, smooth="none")
    assert q_none.SerializeToString() == q_plain.SerializeToString()
    q, st = dynamic(model, calib)  # smooth=auto, the default
    sm = st["smoothing"]
    trials = {k: v["sqnr_db"] for k, v in sm["dynamic_by_strength"].items()}
    assert list(trials) == ["not smoothed", "alpha=0.5", "alpha=0.65", "alpha=0.8"]
    best = max(trials, key=trials.get)
    assert sm["decision"] == "smoothed" and best == f"alpha={sm['alpha']:g}" and sm["smoothed"] == 2
    assert trials[best] > trials["not smoothed"] + 3.0  # in-sample: what decided
    # every MatMul is still quantized dynamically; the kept model is smooth=all's at the chosen strength
    c = [n.op_type for n in q.graph.node]
    assert c.count("MatMul") == 0 and c.count("DynamicQuantizeLinear") == 3
    q_all, st_all = dynamic(model, calib, smooth="all", smooth_alpha=sm["alpha"])
    assert st_all["smoothing"]["decision"] == "smoothed" and "dynamic_by_strength" not in st_all["smoothing"]
    assert q.SerializeToString() == q_all.SerializeToString()
    assert sqnr(model, q, held_out) > sqnr(model, q_plain, held_out) + 3.0  # held out too


def test_dynamic_smoothing_keeps_the_graph_where_no_strength_measures_better():
    """Even gammas (no activation outliers) and a weak strength, which moves the weights' spread into the
    activations: every trial measures worse than the plain dynamic model, which is kept."""
    model = weight_spike(block())
    calib = feeds(32, 1)
    q_plain, _ = dynamic(model)
    q, st = dynamic(model, calib, smooth_alphas=(0.1, 0.25))
    sm = st["smoothing"]
    trials = {k: v["sqnr_db"] for k, v in sm["dynamic_by_strength"].items()}
    assert max(trials["alpha=0.1"], trials["alpha=0.25"]) < trials["not smoothed"] - 1.0
    assert sm["decision"] == "not smoothed" and sm["alpha"] is None
    assert q.SerializeToString() == q_plain.SerializeToString()


def test_dynamic_smoothing_needs_inputs_with_positions():
    """A classifier head reads [batch, K]: one row per feed, no smoothing candidate; quantized as without data."""
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{K}] x) => (float[1,8] y) {{ y = MatMul(x, w) }}""")
    add_initializers(m, {"w": (rng.standard_normal((K, 8)) / np.sqrt(K)).astype(np.float32)})
    q, st = dynamic(m, normal_feeds((1, K), 8, 1))
    assert st["smoothing"]["decision"] == "not smoothed" and "positions" in st["smoothing"]["reason"]
    assert q.SerializeToString() == dynamic(m)[0].SerializeToString()


def ffn(seed: int = 0) -> onnx.ModelProto:
    """A transformer FFN on token rows: x [1, 64, K] -> MatMul + bias -> Relu -> MatMul + bias; inputs with a few
    large channels, so H = X^T X is far from a multiple of I (where output-aware rounding differs from nearest)."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,64,{K}] x) => (float[1,64,{K}] y) {{
      a = MatMul(x, w1)
      b = Add(a, b1)
      r = Relu(b)
      c = MatMul(r, w2)
      y = Add(c, b2)
    }}""")
    add_initializers(m, {
        "w1": (rng.standard_normal((K, 2 * K)) / np.sqrt(K)).astype(np.float32),
        "b1": (rng.standard_normal(2 * K) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((2 * K, K)) / np.sqrt(2 * K)).astype(np.float32),
        "b2": (rng.standard_normal(K) * 0.1).astype(np.float32),
    })
    return m


def ffn_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    gain = np.ones(K, np.float32)
    gain[[1, 7]] = 6.0
    fixed = np.random.default_rng(123)  # one distribution for every seed: correlated channels
    mix = (np.eye(K) + 0.5 * fixed.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [{"x": ((rng.standard_normal((1, 64, K)).astype(np.float32) @ mix) * gain).astype(np.float32)}
            for _ in range(n)]


def test_dynamic_weight_rounding_against_outputs_lowers_the_layer_error_and_shifts_the_bias():
    model = ffn()
    calib, held_out = ffn_feeds(32, 1), ffn_feeds(16, 5)
    q_near, s_near = dynamic(model, calib, smooth="none")
    assert "weight_rounding" not in s_near  # nearest: the default
    q, st = dynamic(model, calib, smooth="none", weight_rounding="output")
    wr = st["weight_rounding"]
    assert wr["kept"] and wr["layers"] == 2 and wr["rows"] == 32 * 64
    ints = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_quantized")}
    near = {t.name: numpy_helper.to_array(t) for t in q_near.graph.initializer if t.name.endswith("_quantized")}
    assert set(ints) == set(near) and len(ints) == 2
    assert all(np.abs(signed_codes(ints[k])).max() <= 127 for k in ints)
    assert any((ints[k] != near[k]).mean() > 0.05 for k in ints)  # not round-to-nearest
    biases = {t.name for t in q.graph.initializer if t.name.endswith("_rounded")}
    assert len(biases) == 2  # both bias Adds carry their layer's mean shift
    # the layer's own output error on held-out rows (float inputs): what the rounding minimises
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.concatenate([f["x"].reshape(-1, K) for f in held_out]).astype(np.float64)

    def layer_error(qm_: onnx.ModelProto) -> float:
        init = {t.name: numpy_helper.to_array(t) for t in qm_.graph.initializer}
        codes = signed_codes(init["w1_quantized"], init.get("w1_zero_point"))
        w_hat = codes.astype(np.float64) * init["w1_scale"].astype(np.float64)
        return float(np.sum((x @ (w_hat - arrays["w1"])) ** 2))

    assert layer_error(q) < 0.8 * layer_error(q_near)  # measured 0.70x
    assert sqnr(model, q, held_out) > sqnr(model, q_near, held_out)  # the model's outputs: not worse
    # auto keeps it only by measurement: here it measures better, so the same model
    q_auto, st_auto = dynamic(model, calib, smooth="none", weight_rounding="auto")
    assert st_auto["weight_rounding"]["kept"]
    assert st_auto["weight_rounding"]["score_rounded"]["sqnr_db"] > st_auto["weight_rounding"]["score_nearest"]["sqnr_db"]
    assert q_auto.SerializeToString() == q.SerializeToString()


def test_dynamic_mixed_precision_keeps_the_most_sensitive_layers_float_until_the_target():
    from onnxcompress.errors import BadInputError, PassError

    model = block()
    calib, held_out = feeds(16, 1), feeds(16, 5)
    q0, s0 = dynamic(model, calib, smooth="none")
    base = sqnr(model, q0, calib)
    q_easy, s_easy = dynamic(model, calib, smooth="none", min_sqnr_db=base - 3.0)  # met by the all-int8 model
    mp = s_easy["mixed_precision"]
    assert mp["met"] and mp["float_layers"] == [] and mp["builds"] == 1
    assert q_easy.SerializeToString() == q0.SerializeToString()
    q, st = dynamic(model, calib, smooth="none", min_sqnr_db=base + 6.0, lift_to="float")
    mp = st["mixed_precision"]
    assert mp["met"] and 1 <= len(mp["float_layers"]) < 3 and mp["score"]["sqnr_db"] >= base + 6.0
    # the first layer kept float is the one whose float version alone gains most
    assert mp["float_layers"][0] == max(mp["gains_db"], key=mp["gains_db"].get)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3 - len(mp["float_layers"]) and ops.count("MatMul") == len(
        mp["float_layers"])
    assert sqnr(model, q, held_out) > sqnr(model, q0, held_out) + 3.0
    with pytest.raises(BadInputError, match="needs calibration data"):  # refused before the pass runs
        dynamic(model, None, min_cosine=0.999)
    with pytest.raises(PassError, match="leave_one_out only"):  # a search dynamic mode does not have
        dynamic(model, calib, sensitivity="greedy_cost", max_latency=0.5)


def test_dynamic_rounding_reports_the_layer_output_error_it_removed():
    _, st = dynamic(ffn(), ffn_feeds(32, 1), smooth="none", weight_rounding="output")
    assert st["weight_rounding"]["output_error_db_gain_median"] > 1.0


def test_dynamic_weight_rounding_without_data_says_it_rounded_to_nearest(caplog):
    q, st = dynamic(ffn(), None, weight_rounding="matmul")
    assert st["weight_rounding"] == {"kept": False, "reason": "no calibration data: round-to-nearest"}
    assert "no calibration data" in caplog.text
    assert q.SerializeToString() == dynamic(ffn(), None)[0].SerializeToString()


def test_dynamic_rounding_reuses_the_chosen_smoothing_trial():
    """With smoothing trials, the graph ends equal to the chosen trial's, so its rounded weights and rounded score
    are reused (no second statistics run); the model is byte-equal to rounding the chosen strength from scratch."""
    model = ffn()
    calib = ffn_feeds(32, 1)
    q, st = dynamic(model, calib, weight_rounding="auto")
    sm, wr = st["smoothing"], st["weight_rounding"]
    assert wr.get("reused_from_smoothing") and wr["score_rounded"] == sm["dynamic_by_strength"][sm["chosen"]]
    fixed = {"smooth": "none"} if sm["alpha"] is None else {"smooth": "all", "smooth_alpha": sm["alpha"]}
    q_fresh, st_fresh = dynamic(model, calib, weight_rounding="auto", **fixed)
    assert "reused_from_smoothing" not in st_fresh["weight_rounding"]
    assert st_fresh["weight_rounding"]["kept"] == wr["kept"]
    assert q.SerializeToString() == q_fresh.SerializeToString()
