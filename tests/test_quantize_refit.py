"""quantize{weight_rounding=refit}: each layer refit so that on its int8-model input it reproduces the float layer's
output (passes/quantize/refit.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.quantize.refit import blocks, heldout_error, paired_model, ridge_fit
from onnxcompress.passes.quantize.rounding import round_columns

from onnxcompress.analyses.activation_stats import Gram
from onnxcompress.api import compress
from onnxcompress.data import load_feeds
from onnxcompress.runtime import Session

MODELS = Path(__file__).resolve().parents[1] / "models"


def _rows(rng: np.random.Generator, r: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float rows and their 'quantized' version: coarse rounding (step 0.25) plus a clipped top channel."""
    mix = np.eye(k) + 0.3 * np.random.default_rng(99).standard_normal((k, k))
    xf = rng.standard_normal((r, k)) @ mix + 0.4
    xq = np.round(xf / 0.25) * 0.25
    xq[:, 0] = np.minimum(xq[:, 0], 0.5)
    return xf, xq


def _gram(xf: np.ndarray, xq: np.ndarray) -> Gram:
    x = np.concatenate([xf, xq], axis=1)
    return Gram(x.T @ x, x.sum(axis=0), x.shape[0])


def test_moments_and_heldout_error_match_the_rows():
    rng = np.random.default_rng(0)
    k, n = 12, 5
    xf, xq = _rows(rng, 500, k)
    w, b = rng.standard_normal((n, k)), rng.standard_normal(n)
    h, c, f = blocks(_gram(xf, xq), k, with_bias=True)
    ones = np.ones((500, 1))
    xq1, xf1 = np.hstack([xq, ones]), np.hstack([xf, ones])
    np.testing.assert_allclose(h, xq1.T @ xq1, rtol=1e-10)
    np.testing.assert_allclose(c, xq1.T @ xf1, rtol=1e-10)
    np.testing.assert_allclose(f, xf1.T @ xf1, rtol=1e-10)
    wbar = np.hstack([w, b[:, None]])
    v = wbar + 0.1 * rng.standard_normal(wbar.shape)
    direct = np.sum((xq1 @ v.T - xf1 @ wbar.T) ** 2)
    assert np.isclose(heldout_error(v, wbar, h, c, f), direct, rtol=1e-9)


def test_refit_undoes_the_input_error_on_held_out_rows_and_the_bias_column_absorbs_rounding():
    rng = np.random.default_rng(1)
    k, n = 16, 8
    xf, xq = _rows(rng, 3000, k)
    xf_t, xq_t = _rows(rng, 1000, k)
    w, b = rng.standard_normal((n, k)) * 0.3, rng.standard_normal(n)
    wbar = np.hstack([w, b[:, None]])
    h, c, _ = blocks(_gram(xf, xq), k, with_bias=True)
    ht, ct, ft = blocks(_gram(xf_t, xq_t), k, with_bias=True)
    v = ridge_fit(wbar, h, c, 1e-3 * np.mean(np.diag(h)[:k]))
    # the float weights on the quantized input (what round-to-nearest aims at) vs the refit, on held-out rows
    gain = 10 * np.log10(heldout_error(wbar, wbar, ht, ct, ft) / heldout_error(v, wbar, ht, ct, ft))
    assert gain > 3.0, gain
    # integers for v with the bias column free: integer weights, unrounded bias, and better than rounding alone
    s = np.abs(v[:, :k]).max(axis=1) / 127
    q = round_columns(v, h, s, free=1)
    assert np.array_equal(q[:, :k], np.rint(q[:, :k])) and np.abs(q[:, :k]).max() <= 127
    assert not np.array_equal(q[:, k], np.rint(q[:, k]))
    rtn = np.hstack([np.clip(np.rint(v[:, :k] / s[:, None]), -127, 127) * s[:, None], v[:, k:]])
    assert heldout_error(q * s[:, None], wbar, ht, ct, ft) < heldout_error(rtn, wbar, ht, ct, ft)


def test_paired_model_concatenates_the_float_and_the_int8_input_under_ort():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "k")
    fm = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"], name="m"),
                                              helper.make_node("Relu", ["t"], ["y"], name="r")], "f", [x], [y], [two]),
                           opset_imports=[helper.make_opsetid("", 13)])
    three = numpy_helper.from_array(np.array(3.0, np.float32), "k")
    qm = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"], name="m"),
                                              helper.make_node("Relu", ["t"], ["y"], name="r")], "q", [x], [y], [three]),
                           opset_imports=[helper.make_opsetid("", 13)])
    pm = paired_model(fm, qm, {"pair": ("t", "t", -1)})
    pm.graph.output.append(helper.make_tensor_value_info("pair", TensorProto.FLOAT, [1, 6]))
    onnx.checker.check_model(pm)
    feed = {"x": np.array([[1.0, -2.0, 0.5]], np.float32)}
    (out,) = Session(pm).run(feed, ["pair"])
    np.testing.assert_allclose(out, np.concatenate([2 * feed["x"], 3 * feed["x"]], axis=1))


def _sqnr(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    r, o = np.concatenate([a.ravel() for a in ref]), np.concatenate([a.ravel() for a in out])
    return float(10 * np.log10(np.sum(r**2) / np.sum((r - o) ** 2)))


def test_refit_beats_round_to_nearest_on_held_out_feeds_of_the_bundled_model():
    model, calib = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"
    m = onnx.load(model)
    feeds = list(load_feeds(MODELS / "digits_val.npz", m))[:64]
    out_name = m.graph.output[0].name
    ref = [Session(m).run(f, [out_name])[0] for f in feeds]
    scores, stats = {}, {}
    for wr in ("nearest", "refit"):
        r = compress(model, f"quantize{{weight_rounding={wr} latency_guard=false auto_float_db=0}}", calibration=calib,
                     validate=False, measure=False)
        stats[wr] = r.ledger[-1].pass_stats
        s = Session(r.model)
        scores[wr] = _sqnr(ref, [s.run(f, [out_name])[0] for f in feeds])
    wr_stats = stats["refit"]["weight_rounding"]
    assert wr_stats["layers"] >= 1 and wr_stats["stages"] >= 2, wr_stats
    assert scores["refit"] > scores["nearest"] + 1.0, scores


def test_stages_follow_depth_so_no_layer_is_fit_before_a_refit_layer_upstream():
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.quantize.refit import stage_groups

    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,2,4,4] x) => (float[1,2,4,4] y) {
      a = Conv(x, w)
      r = Relu(a)
      b = Conv(r, w)
      c = Conv(r, w)
      s = Add(b, c)
      y = Conv(s, w)
    }""")
    m.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"))
    g = gs.import_onnx(m)
    g.toposort()
    convs = [n for n in g.nodes if n.op == "Conv"]
    todo = [(n.outputs[0].name, n, np.ones((2, 2))) for n in convs]
    stages = [sorted(item[0] for item in st) for st in stage_groups(g, todo)]
    assert stages == [["a"], ["b", "c"], ["y"]]
