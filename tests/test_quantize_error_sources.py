"""quantize{explain}: which activation roundings cost a static int8 model's outputs most (error_sources)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ort_run
from onnx import helper, numpy_helper
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize.error_sources import activation_roundings, without_rounding
from quantize_helpers import signed_codes

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager

C = 8


def chain(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Conv. The first Conv's channel 0 is 300x the others and the second Conv
    ignores it: one per-tensor range spent on a channel that does not matter, every other channel of that tensor
    rounded to a few levels."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{C},10,10] x) => (float[1,{C},10,10] y) {{
      a = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r = Relu(a)
      c = Conv<pads=[1,1,1,1]>(r, w2, b2)
      s = Relu(c)
      y = Conv<pads=[1,1,1,1]>(s, w3, b3)
    }}""")
    w1 = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.2
    w1[0] *= 300.0
    w2 = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.2
    w2[:, 0] = 0.0
    w3 = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.2
    for name, a in {"w1": w1, "w2": w2, "w3": w3, "b1": np.full(C, 0.1, np.float32),
                    "b2": np.full(C, 0.1, np.float32), "b3": np.zeros(C, np.float32)}.items():
        m.graph.initializer.append(numpy_helper.from_array(a, name))
    onnx.checker.check_model(m)
    return m


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, C, 10, 10)).astype(np.float32)} for _ in range(n)]


def quantize(model: onnx.ModelProto, **options):
    options = {"latency_guard": False, "auto_float_db": 0, "weight_rounding": "nearest", "calibration": "minmax",
               "bias_correction": False, **options}
    ctx = PassContext(calibration=load_feeds(feeds(16, 1), model))
    result = PassManager([Quantize(**options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def sqnr(ref: onnx.ModelProto, cand: onnx.ModelProto, fs) -> float:
    r = np.concatenate([ort_run(ref, f)[0].ravel() for f in fs]).astype(np.float64)
    c = np.concatenate([ort_run(cand, f)[0].ravel() for f in fs]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - c) ** 2)))


def qdq(ratio: float) -> onnx.ModelProto:
    """y = DQ(Q(x; 0.05, 128); 0.05·ratio, 128) read twice (two DQs of one Q), as the placement absorbs a scalar."""
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "s2", "z"], ["xd"]),
         helper.make_node("DequantizeLinear", ["xq", "s2", "z"], ["xe"]),
         helper.make_node("Add", ["xd", "xe"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.asarray(0.05, np.float32), "s"),
         numpy_helper.from_array(np.asarray(0.05 * ratio, np.float32), "s2"),
         numpy_helper.from_array(np.asarray(128, np.uint8), "z")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_taking_a_rounding_out_reads_the_float_tensor_times_the_absorbed_scalar():
    x = {"x": np.random.default_rng(3).uniform(-5, 5, (1, 64)).astype(np.float32)}
    for ratio in (1.0, 0.25):
        m = qdq(ratio)
        assert activation_roundings(m) == ["x"]
        rounded = ort_run(m, x)[0]
        exact = ort_run(without_rounding(m, {"x"}), x)[0]
        np.testing.assert_allclose(exact, 2 * ratio * x["x"], rtol=1e-6)
        assert np.max(np.abs(rounded - exact)) > 1e-3 * ratio  # the original does round
        assert not [n for n in without_rounding(m, {"x"}).graph.node if n.op_type in ("QuantizeLinear",
                                                                                      "DequantizeLinear")]
    # a tensor not asked for is left as it is
    m = qdq(0.25)
    np.testing.assert_array_equal(ort_run(without_rounding(m, {"other"}), x)[0], ort_run(m, x)[0])


def test_without_every_activation_rounding_only_the_weights_differ_from_float():
    model = chain()
    q, _ = quantize(model)
    tensors = activation_roundings(q)
    assert len(tensors) >= 3
    fs = feeds(4, 7)
    weights_only = without_rounding(q, set(tensors))
    assert sqnr(model, weights_only, fs) > sqnr(model, q, fs) + 10.0
    # weights only: the float model with each weight replaced by its dequantized int8 value (ORT, same result)
    vals = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    deq = {}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in vals and vals[n.input[0]].ndim == 4:
            s = vals[n.input[1]].reshape(-1, 1, 1, 1)
            z = vals[n.input[2]].reshape(-1, 1, 1, 1) if len(n.input) > 2 and n.input[2] in vals else None
            deq[n.output[0]] = (signed_codes(vals[n.input[0]], z).astype(np.float32) * s).astype(np.float32)
    assert len(deq) == 3
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    by_order = list(deq.values())
    for i, name in enumerate(("w1", "w2", "w3")):
        for init in ref.graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(by_order[i], name))
    for f in fs:
        a, b = ort_run(weights_only, f)[0], ort_run(ref, f)[0]
        assert np.max(np.abs(a - b)) <= 2e-3 * np.max(np.abs(b)) + 0.2  # biases are int32-rounded in the QDQ model


def test_explain_ranks_the_tensor_whose_range_is_wasted_first_and_changes_no_byte():
    model = chain()
    q0, _ = quantize(model)
    q, stats = quantize(model, explain=3)
    assert q.SerializeToString() == q0.SerializeToString()
    es = stats["error_sources"]
    assert es["activation_tensors"] >= 3 and len(es["top"]) == 3
    top = es["top"][0]
    assert top["tensor"] == "r"  # the Relu output carrying the 300x channel
    assert top["gain_db"] > 6.0 and top["gain_db"] > es["top"][1]["gain_db"] + 3.0
    assert es["weights_only_int8"][es["scored_by"]] > es["int8"][es["scored_by"]] + 6.0


def test_explain_is_validated():
    import pytest

    with pytest.raises(ValueError, match="explain"):
        Quantize(explain=-1)
