"""Graphs as other exporters and older opsets write them: each pass must handle them or refuse in one line.

Found by running every recipe and pass over hand-made and torch-exported models that are not in the corpus
(opset-9 MLPs, ...); each test is one such model, run through the CLI as a user would.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxcompress.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def opset9_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x [N, 32] -> Gemm -> Relu -> Gemm -> y [N, 10], opset 9 (as old exporters wrote it)."""
    w1 = nh.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.2, "w1")
    b1 = nh.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b1")
    w2 = nh.from_array(rng.standard_normal((10, 64)).astype(np.float32) * 0.2, "w2")
    b2 = nh.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "b2")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w1, b1, w2, b2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])


def test_dynamic_int8_upgrades_an_opset_9_model_to_opset_11(tmp_path, capsys):
    """DynamicQuantizeLinear is opset 11: the pass upgraded to 10 and the checker refused the result (exit 4)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "mlp9.onnx"
    onnx.save(opset9_mlp(rng), src)
    x = rng.standard_normal((16, 1, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", src, "-o", out, "--recipe", "int8-dynamic", "--calib",
                       tmp_path / "calib.npz", "--no-latency")
    assert code == 0, err
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 11
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    a, b = ref.run(None, {"x": x[:, 0]})[0], got.run(None, {"x": x[:, 0]})[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # int8 rounding, not a different function
