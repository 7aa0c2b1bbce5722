"""quantize{depthwise_equalization}: per-channel activation ranges moved into Conv -> depthwise Conv weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize.depthwise_equalization import HEADROOM, factors, pairs
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds

C = 8


def stem(between: str = "", spread: float = 60.0, seed: int = 0) -> onnx.ModelProto:
    """Conv (channel c scaled by spread^(c/7): ranges 1x..60x) -> [between] -> depthwise 3x3 Conv -> 1x1 Conv."""
    rng = np.random.default_rng(seed)
    mid = f"t = {between}(a)" if between else "t = Identity(a)"
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,12,12] x) => (float[1,{C},12,12] y) {{
      a = Conv<pads=[1,1,1,1]>(x, w1, b1)
      {mid}
      d = Conv<pads=[1,1,1,1], group={C}>(t, wd, bd)
      y = Conv(d, w3)
    }}""")
    gains = spread ** (np.arange(C) / (C - 1))
    w1 = (rng.standard_normal((C, 3, 3, 3)) * 0.3 * gains[:, None, None, None]).astype(np.float32)
    wd = (rng.standard_normal((C, 1, 3, 3)) * 0.3 / gains[:, None, None, None]).astype(np.float32)
    arrays = {"w1": w1, "b1": (0.05 * gains).astype(np.float32), "wd": wd, "bd": np.full(C, 0.01, np.float32),
              "w3": (rng.standard_normal((C, C, 1, 1)) * 0.3).astype(np.float32)}
    add_initializers(m, arrays)
    if not between:  # no op between: the depthwise Conv reads the Conv's output directly
        g = gs.import_onnx(m)
        ident = next(n for n in g.nodes if n.op == "Identity")
        conv_d = next(n for n in g.nodes if n.op == "Conv" and n.attrs.get("group", 1) == C)
        conv_d.inputs[0] = ident.inputs[0]
        ident.outputs.clear()
        g.cleanup().toposort()
        m = gs.export_onnx(g)
    onnx.checker.check_model(m)
    return m


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return normal_feeds((1, 3, 12, 12), n, seed)


def quantize(model, **options):
    return quantize_on(model, feeds(16, 1), **{"weight_rounding": "nearest", **options})


sqnr = output_sqnr


def test_pairs_need_a_homogeneous_op_and_a_single_reader():
    assert len(pairs(gs.import_onnx(stem("")))) == 1
    assert len(pairs(gs.import_onnx(stem("Relu")))) == 1
    assert pairs(gs.import_onnx(stem("Sigmoid"))) == []  # not homogeneous
    m = stem("Relu")
    m.graph.output.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None))
    assert pairs(gs.import_onnx(m)) == []  # the Conv's output is read elsewhere too


def test_factors_equalize_ranges_and_estimate_the_noise_gain():
    lo, hi = np.array([-1.0, -0.1, 0.0, 0.0]), np.array([1.0, 0.1, 0.0, 0.5])
    w = np.ones((4, 1, 3, 3), np.float32)
    k, gain = factors(lo, hi, w)
    h = HEADROOM
    np.testing.assert_allclose(k, [1.0, 10.0 / h, 1.0, 2.0 / h])  # narrow channels reach 1/h of the widest
    # step 2/255 before and after; weight energy 9 per channel: 4·9 -> 9·(1 + 1/k1² + 1 + 1/k3²)
    assert gain == pytest.approx(10 * np.log10(4 / (2 + (h / 10) ** 2 + (h / 2) ** 2)), abs=1e-6)
    _, even = factors(np.full(4, -1.0), np.full(4, 1.0), w)
    assert even == pytest.approx(0.0)


@pytest.mark.parametrize("between", ["", "Relu"])
def test_rewrite_is_exact_in_float_and_lifts_the_int8_sqnr(between):
    model = stem(between)
    q_off, st_off = quantize(model)  # off by default
    q_on, st_on = quantize(model, depthwise_equalization=True)
    rec = st_on["depthwise_equalization"]
    assert rec["pairs"] == 1 and len(rec["rewritten"]) == 1 and next(iter(rec["rewritten"].values())) >= 3.0
    assert "depthwise_equalization" not in st_off
    fs = feeds(6, 9)
    # float rewrite: the prepared graph (before Q/DQ) computes the same function
    from onnxcompress.passes.quantize.depthwise_equalization import equalize_depthwise
    from onnxcompress.passes.quantize.static_run import StaticRun

    g = gs.import_onnx(model)
    run = StaticRun(Quantize(), g, PassContext(calibration=load_feeds(feeds(16, 1), model)))
    equalize_depthwise(run, g, set())
    rewritten = gs.export_onnx(g)
    for f in fs:
        np.testing.assert_allclose(ort_run(rewritten, f)[0], ort_run(model, f)[0], rtol=1e-4, atol=1e-4)
    assert sqnr(model, q_on, fs) > sqnr(model, q_off, fs) + 6.0


def test_even_channels_are_left_alone():
    model = stem("Relu", spread=1.0)
    q_on, st = quantize(model, depthwise_equalization=True)
    q_off, _ = quantize(model)
    assert st["depthwise_equalization"]["rewritten"] == {}
    assert q_on.SerializeToString() == q_off.SerializeToString()


def test_an_equalized_tensor_keeps_its_whole_range_under_a_clipping_range_rule():
    from onnxcompress.passes.quantize.depthwise_equalization import equalize_depthwise
    from onnxcompress.passes.quantize.static_run import StaticRun

    from onnxcompress.analyses.activations import expose_outputs

    model = stem("")
    q, st = quantize(model, calibration="mse", depthwise_equalization=True)
    assert st["depthwise_equalization"]["rewritten"]
    scale = next(numpy_helper.to_array(i) for i in q.graph.initializer if i.name == "a_scale")
    # the rewritten graph's "a" over the calibration feeds: min/max -> uint8 scale
    g = gs.import_onnx(model)
    run = StaticRun(Quantize(), g, PassContext(calibration=load_feeds(feeds(16, 1), model)))
    equalize_depthwise(run, g, set())
    assert run.full_range == {"a"}
    m = expose_outputs(gs.export_onnx(g), ["a"])
    vals = [ort_run(m, f)[1] for f in feeds(16, 1)]
    lo, hi = min(0.0, min(v.min() for v in vals)), max(0.0, max(v.max() for v in vals))
    assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-4)
