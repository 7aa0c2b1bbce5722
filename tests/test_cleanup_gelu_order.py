"""cleanup's GELU operand order: the dynamo export's erf GELU rewritten so onnxruntime fuses it into one kernel."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import apply_passes
from onnx import TensorProto, helper
from onnx import numpy_helper as nh


def gelu_model(outer_reads_x: bool = True) -> onnx.ModelProto:
    """y = x * (0.5 * (1 + erf(x / sqrt 2))) as torch's dynamo exporter writes it (x = h W + b)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(32).astype(np.float32), "b"),
             nh.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
             nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["x"]),
             helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["p"]),
             helper.make_node("Mul", ["x" if outer_reads_x else "m", "p"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_the_gelu_is_reordered_exactly_and_onnxruntime_then_fuses_it(tmp_path):
    from onnxcompress.passes.cleanup import Cleanup

    model = gelu_model()
    assert "Erf" in optimized_ops(model, tmp_path)  # as exported: five element-wise kernels
    out = apply_passes(model, Cleanup())
    assert "Erf" not in optimized_ops(out, tmp_path)  # one fused kernel
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"h": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32) * 3}
    a, b = (ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for m in (model, out))
    np.testing.assert_array_equal(a, b)  # the rewrite itself is exact


def test_a_product_that_is_not_a_gelu_is_left_alone():
    from onnxcompress.passes.cleanup import Cleanup

    model = gelu_model(outer_reads_x=False)
    out = apply_passes(model, Cleanup())
    muls = [list(n.input) for n in out.graph.node if n.op_type == "Mul"]
    assert ["half", "a"] in muls or any("half" in m for m in muls)
    assert not any(m[-1] == "half" for m in muls)
