"""Residual Add -> LayerNormalization written as Sum where onnxruntime's fused SkipLayerNormalization is slower."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxcompress import ort_layernorm
from onnxcompress.context import PassContext

D = 48


def residual_model() -> onnx.ModelProto:
    """h = x W; y1 = LN(x + h) (a residual pair); y2 = LN(h + c) (a bias pair: onnxruntime fuses it too);
    y3 = Relu(x + x) (no LayerNormalization: not a pair)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((D, D)) / 7).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(D).astype(np.float32), "c"),
             nh.from_array(rng.standard_normal(D).astype(np.float32) + 1, "g"),
             nh.from_array(rng.standard_normal(D).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["x", "h"], ["s1"], name="residual"),
             helper.make_node("LayerNormalization", ["s1", "g", "b"], ["y1"], name="ln1", axis=-1),
             helper.make_node("Add", ["h", "c"], ["s2"], name="bias"),
             helper.make_node("LayerNormalization", ["s2", "g", "b"], ["y2"], name="ln2", axis=-1),
             helper.make_node("Add", ["x", "x"], ["s3"], name="double"),
             helper.make_node("Relu", ["s3"], ["y3"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, D])],
                          [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("y1", "y2", "y3")],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_only_adds_feeding_a_layernorm_are_candidates():
    g = gs.import_onnx(residual_model())
    assert [(n.name, w) for n, w in ort_layernorm.candidates(g)] == [("residual", D), ("bias", D)]


def test_sum_computes_the_same_bits_and_keeps_onnxruntime_from_fusing(tmp_path, monkeypatch):
    model = residual_model()
    assert "SkipLayerNormalization" in fused_ops(model, tmp_path)  # what onnxruntime does with the pair
    monkeypatch.setattr(ort_layernorm, "unfused_ratio", lambda ctx, rows, width: 0.25)
    g = gs.import_onnx(model)
    st = ort_layernorm.unfuse_if_faster(g, PassContext(), rows=5)
    assert st == {"pairs": 2, "shape_timed": [1, 5, D], "unfused_over_fused": 0.25, "unfused": True}
    out = gs.export_onnx(g)
    assert [n.op_type for n in out.graph.node].count("Sum") == 2
    assert "SkipLayerNormalization" not in fused_ops(out, tmp_path)
    x = {"x": np.random.default_rng(1).standard_normal((1, 5, D)).astype(np.float32)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    for a, b, c in zip(plain.run(None, x), new.run(None, x), ref.run(None, x), strict=True):
        np.testing.assert_array_equal(a, b)  # the unfused pair: the model's own maths, bit for bit
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-5)  # the fused kernel rounds differently, slightly


def test_the_graph_is_left_alone_where_the_fused_kernel_is_not_slower(monkeypatch):
    monkeypatch.setattr(ort_layernorm, "unfused_ratio", lambda ctx, rows, width: 0.95)
    g = gs.import_onnx(residual_model())
    st = ort_layernorm.unfuse_if_faster(g, PassContext())
    assert st["unfused"] is False and st["shape_timed"][1] == ort_layernorm.DEFAULT_ROWS
    assert [n.op for n in g.nodes].count("Sum") == 0


def test_the_pair_timing_is_a_real_measurement_recorded_in_the_latency_profile():
    ctx = PassContext()
    r = ort_layernorm.unfused_ratio(ctx, 8, D)
    assert r > 0 and ctx.latency.measured == 1
    assert ort_layernorm.unfused_ratio(ctx, 8, D) == r and ctx.latency.replayed == 1


def test_dynamic_quantize_applies_it_by_measurement_and_can_be_turned_off(monkeypatch):
    from onnxcompress.passes.quantize import Quantize

    from onnxcompress.manager import PassManager

    monkeypatch.setattr(ort_layernorm, "unfused_ratio", lambda ctx, rows, width: 0.3)
    for flag, sums in ((True, 2), (False, 0)):
        result = PassManager([Quantize(mode="dynamic", unfuse_skip_layernorm=flag)], measure=False).run(
            residual_model(), PassContext())
        assert [n.op_type for n in result.model.graph.node].count("Sum") == sums
        st = result.ledger[-1].pass_stats
        assert (st["skip_layernorm"]["shape_timed"] == [1, 5, D]) if flag else "skip_layernorm" not in st
