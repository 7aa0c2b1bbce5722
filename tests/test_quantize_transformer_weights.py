"""The weights of transformer layers (issue 12, MiniLM-L6): bias correction through ``MatMul -> Add(bias)``
(``matmul_bias``), output-fitted rounding of positional MatMuls (``weight_rounding=matmul``) and a smoothing
strength per input (``smoothing_strength``, ``smooth=per_input`` / ``smooth_per_input``)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ort_run
from onnxcompress.passes.quantize.smoothing import factors
from onnxcompress.passes.quantize.smoothing_strength import choose_strengths, joint_error
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on

K, N, T = 48, 32, 24


def linear(w: np.ndarray, b: np.ndarray, mix: np.ndarray | None = None) -> onnx.ModelProto:
    """``y = (x [@ mix]) @ w + b`` on ``x`` [1, T, K], as transformer exports write a linear layer (MatMul -> Add);
    ``mix`` correlates the input's channels (a first MatMul)."""
    body = "h = MatMul(x, mix)\n      m = MatMul(h, w)" if mix is not None else "m = MatMul(x, w)"
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{T},{K}] x) => (float[1,{T},{w.shape[1]}] y) {{
      {body}
      y = Add(m, b)
    }}""")
    add_initializers(model, {"w": w, "b": b, **({"mix": mix} if mix is not None else {})})
    onnx.checker.check_model(model)
    return model


def offset_feeds(n: int, seed: int, offset: float) -> list[dict[str, np.ndarray]]:
    return [{"x": f["x"] * 0.5 + offset} for f in normal_feeds((1, T, K), n, seed)]


def test_matmul_bias_takes_the_weight_errors_mean_shift_into_the_add():
    """Inputs with a large common offset: every output channel's weight rounding error times that offset is a
    constant shift, which the Add's bias absorbs (``matmul_bias``); off, the bias is left as it was."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    w[3] *= 25.0  # one large row: every column's scale is coarse, so its rounding error is large
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    model = linear(w, b)
    calib, held = offset_feeds(32, 1, 4.0), offset_feeds(16, 2, 4.0)
    q_off, s_off = quantize_on(model, calib, weight_rounding="nearest", smooth="none", matmul_bias=False)
    q_on, s_on = quantize_on(model, calib, weight_rounding="nearest", smooth="none", matmul_bias=True)
    assert s_off.get("bias_corrected_layers", 0) == 0 and s_on["bias_corrected_layers"] == 1
    assert output_sqnr(model, q_on, held) > output_sqnr(model, q_off, held) + 3.0


def test_weight_rounding_matmul_fits_positional_matmuls_and_keeps_it_where_the_outputs_gain():
    """Correlated input channels (``mix``) and a coarse weight scale: rounding with error feedback across the
    columns (H = XᵀX of the int8 model's inputs) lowers the output error; kept by the measured outputs."""
    rng = np.random.default_rng(1)
    low = rng.standard_normal((K, 8)) @ rng.standard_normal((8, K))  # channels correlated through 8 directions
    mix = (low * 0.3 + 0.3 * np.eye(K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    w[7] *= 20.0
    model = linear(w, np.zeros(N, np.float32), mix)
    calib, held = normal_feeds((1, T, K), 48, 3), normal_feeds((1, T, K), 16, 4)
    q0, s0 = quantize_on(model, calib, smooth="none", matmul_bias=True, weight_rounding="nearest")
    q1, s1 = quantize_on(model, calib, smooth="none", matmul_bias=True, weight_rounding="matmul")
    wr = s1["weight_rounding"]
    assert "weight_rounding" not in s0
    assert wr["mode"] == "matmul" and wr["kept"] and wr["layers"] == 2
    assert wr["score_optimised"]["sqnr_db"] > wr["score_nearest"]["sqnr_db"] + 0.1  # in-sample: what decided
    assert output_sqnr(model, q1, held) > output_sqnr(model, q0, held) + 1.0  # held out


def test_weight_rounding_matmul_leaves_a_cnn_exactly_as_nearest():
    """No MatMul/Gemm reads an input with positions (Convs, a pooled Gemm head): nothing is rounded, no build or
    statistics run is added, the bytes are round-to-nearest's."""
    rng = np.random.default_rng(3)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,10] y) {
      c = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r = Relu(c)
      p = GlobalAveragePool(r)
      f = Flatten<axis=1>(p)
      y = Gemm<transB=1>(f, wg, bg)
    }""")
    add_initializers(m, {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                         "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
                         "wg": rng.standard_normal((10, 8)).astype(np.float32) * 0.3,
                         "bg": rng.standard_normal(10).astype(np.float32) * 0.1})
    fs = normal_feeds((1, 4, 8, 8), 8, 2)
    q_near, _ = quantize_on(m, fs, weight_rounding="nearest", matmul_bias=False, smooth_per_input=False)
    q_new, s_new = quantize_on(m, fs, weight_rounding="matmul", matmul_bias=True, smooth_per_input=True)
    assert "weight_rounding" not in s_new and "smoothing" not in s_new
    assert q_new.SerializeToString() == q_near.SerializeToString()


def simulated_error(x: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    """The rounding the quantizer builds, done in NumPy: ``x/s`` uint8 over its min/max, ``diag(s) w`` int8 per
    output channel; the output error energy per row."""
    xs, ws = x / s, w * s[:, None]
    lo, hi = min(0.0, xs.min()), max(0.0, xs.max())
    step = (hi - lo) / 255.0
    xq = (np.clip(np.rint((xs - lo) / step), 0, 255)) * step + lo
    sc = np.abs(ws).max(axis=0) / 127.0
    wq = np.clip(np.rint(ws / sc), -127, 127) * sc
    return float(np.sum((xq @ wq - x @ w) ** 2) / x.shape[0])


def stats_of(x: np.ndarray) -> dict[str, np.ndarray]:
    sigma = x.T @ x / x.shape[0]
    return {"rms": np.sqrt(np.diag(sigma)), "sigma": sigma, "lo": x.min(axis=0), "hi": x.max(axis=0)}


def test_per_input_strength_follows_the_measured_joint_error_and_turns_smoothing_off_where_it_only_costs():
    """Two inputs: ``outliers`` has three channels 30x the others (smoothing pays); ``spiked`` has even channels and
    one weight entry 10x the largest (strengths up to 0.5 amplify the channel that entry reads: none pays). The
    predicted joint error ranks the strengths as the rounding done in NumPy measures them."""
    rng = np.random.default_rng(5)
    x_out = rng.standard_normal((4096, K))
    x_out[:, [2, 17, 30]] *= 30.0
    x_even = rng.standard_normal((4096, K))
    w_out = rng.standard_normal((K, N)) / np.sqrt(K)
    w_sp = rng.standard_normal((K, N)) / np.sqrt(K)
    w_sp[5, 3] = 10.0 * np.abs(w_sp).max()
    stats = {"outliers": stats_of(x_out), "spiked": stats_of(x_even)}
    grid = (None, 0.3, 0.5)
    chosen = choose_strengths({"outliers": [w_out], "spiked": [w_sp]}, stats, factors, grid)
    assert chosen["outliers"][0] == 0.5 and chosen["spiked"][0] is None  # decided off: both strengths cost
    assert set(chosen["spiked"][2]) == {"none", "0.3", "0.5"}
    for name, x, w in (("outliers", x_out, w_out), ("spiked", x_even, w_sp)):
        w_max = np.abs(w).max(axis=1)
        cands = {a: (np.ones(K) if a is None else factors(stats[name]["rms"], w_max, a)) for a in grid}
        pred = {a: joint_error([w], stats[name]["sigma"], stats[name]["lo"], stats[name]["hi"], s)
                for a, s in cands.items()}
        real = {a: simulated_error(x, w, s) for a, s in cands.items()}
        assert sorted(grid, key=lambda a: pred[a]) == sorted(grid, key=lambda a: real[a])
        assert min(grid, key=lambda a: real[a]) == chosen[name][0]
        for a in cands:  # the closed form predicts the measured error within 10%
            assert 0.9 < pred[a] / real[a] < 1.1


def test_smooth_auto_screens_the_per_input_strengths_beside_the_global_ones():
    """``smooth_per_input``: one more all-int8 screen (``alpha per input``); the decision keeps the best measured."""
    from test_quantize_smoothing import block, feeds, sqnr

    model = block()
    held = feeds(16, 5)
    q, st = quantize_on(model, feeds(16, 1), weight_rounding="nearest", smooth="auto", smooth_per_input=True)
    sm = st["smoothing"]
    screen = {k: v["sqnr_db"] for k, v in sm["all_int8_by_strength"].items()}
    assert list(screen) == ["not smoothed", "alpha=0.5", "alpha=0.65", "alpha=0.8", "alpha per input"]
    best = max(screen, key=screen.get)
    assert sm["decision"] == "smoothed" and list(sm["measured"]) == ["not smoothed", best]
    q_none, _ = quantize_on(model, feeds(16, 1), weight_rounding="nearest", smooth="none")
    assert sqnr(model, q, held) > sqnr(model, q_none, held) + 3.0
    q_pi, s_pi = quantize_on(model, feeds(16, 1), weight_rounding="nearest", smooth="per_input")
    assert s_pi["smoothing"]["alpha"] == "per-input" and set(s_pi["smoothing"]["alphas"]) == {"n1", "n2"}
    if best == "alpha per input":
        assert sm["alpha"] == "per input" and q.SerializeToString() == q_pi.SerializeToString()


def test_weight_rounding_matmul_not_kept_takes_the_matmul_bias_correction_back():
    """White inputs (H diagonal: the fitted rounding is round-to-nearest's, no gain at the outputs): not kept, and
    the MatMul bias corrections go with it, so the model computes what round-to-nearest without them does."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = linear(w, (rng.standard_normal(N) * 0.1).astype(np.float32))
    calib, held = normal_feeds((1, T, K), 32, 1), normal_feeds((1, T, K), 4, 2)
    q, st = quantize_on(model, calib, smooth="none", weight_rounding="matmul", matmul_bias=True)
    q_old, _ = quantize_on(model, calib, smooth="none", weight_rounding="nearest", matmul_bias=False)
    assert st["weight_rounding"]["kept"] is False and st["bias_corrected_layers"] == 1
    for f in held:
        np.testing.assert_array_equal(ort_run(q, f)[0], ort_run(q_old, f)[0])
