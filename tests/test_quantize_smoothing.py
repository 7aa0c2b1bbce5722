"""quantize{smooth}: SmoothQuant-style channel factors moved from MatMul inputs into their weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run
from onnx import numpy_helper
from onnxcompress.passes.quantize.smoothing import factors
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on

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


def test_smoothing_lifts_the_sqnr_of_outlier_channels_and_auto_leaves_even_channels_alone():
    model = block()
    held_out = feeds(8, 5)
    q0, _ = run(model)
    q1, s1 = run(model, smooth="auto")
    assert s1["smoothing"]["smoothed"] == 2
    assert sqnr(model, q1, held_out) > sqnr(model, q0, held_out) + 3.0
    even = block()
    for t in even.graph.initializer:
        if t.name in ("g1", "g2"):
            t.CopyFrom(numpy_helper.from_array(np.ones(K, np.float32), t.name))
    _, s2 = run(even, smooth="auto")
    assert s2["smoothing"]["smoothed"] == 0 and set(s2["smoothing"]["not_smoothed_ratio"]) == {"n1", "n2"}


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
