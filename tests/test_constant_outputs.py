"""An original whose output does not depend on its input: the fidelity report says so (agreement with it is empty)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxcompress.cli import main


def model_with_a_constant_output() -> onnx.ModelProto:
    """x [N, 8] -> y = x W (depends on x) and z = x 0 + b (the same on every feed)."""
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    zero = nh.from_array(np.zeros((8, 4), np.float32), "zero")
    b = nh.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("MatMul", ["x", "zero"], ["z0"], name="mm0"),
             helper.make_node("Add", ["z0", "b"], ["z"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])], [w, zero, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_validate_and_compress_warn_about_outputs_the_original_computes_identically(tmp_path, capsys):
    from onnxcompress.data import load_feeds
    from onnxcompress.validate import compare_models

    model = model_with_a_constant_output()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    x = np.random.default_rng(1).standard_normal((6, 1, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    rep = compare_models(model, model, load_feeds(str(tmp_path / "val.npz"), model))
    assert rep.constant_outputs == ["z"] and rep.to_dict()["constant_outputs"] == ["z"]
    one = compare_models(model, model, load_feeds([{"x": x[0]}], model))
    assert one.constant_outputs == []  # one feed proves nothing either way
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup", "--val",
                 str(tmp_path / "val.npz"), "--no-latency"])
    err = capsys.readouterr().err
    assert code == 0 and "output z is the same on all 6 feeds" in err and "output y" not in err
    assert "the same on all 6 feeds" in (tmp_path / "o.onnx.report.md").read_text()
    code = main(["validate", str(src), str(tmp_path / "o.onnx"), "--data", str(tmp_path / "val.npz")])
    assert code == 0 and "output z is the same" in capsys.readouterr().err
