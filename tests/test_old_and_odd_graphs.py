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


def compressed(capsys, tmp_path, model: onnx.ModelProto, x: np.ndarray, *pipeline: str):
    """(source path, written model) of ``onnxcompress compress`` on ``model`` with calibration {"x": x}."""
    src, out = tmp_path / "in.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", x=x)
    code, _, err = run(capsys, "compress", src, "-o", out, *pipeline, "--calib", tmp_path / "calib.npz", "--no-latency")
    assert code == 0, err
    return src, onnx.load(str(out))


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
    x = rng.standard_normal((16, 1, 32)).astype(np.float32)
    src, model = compressed(capsys, tmp_path, opset9_mlp(rng), x, "--recipe", "int8-dynamic")
    out = tmp_path / "o.onnx"
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 11
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    a, b = ref.run(None, {"x": x[:, 0]})[0], got.run(None, {"x": x[:, 0]})[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # int8 rounding, not a different function


def shadowing_if_model() -> onnx.ModelProto:
    """y = If(true){x + k_branch} + k, the branch's own initializer named ``k`` like the outer one (checker and ORT
    accept it; inside the branch ORT reads the branch's ``k`` = 2, outside the outer ``k`` = -1)."""
    def vi(n):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])

    then_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["o_then"])], "then", [], [vi("o_then")],
                               [nh.from_array(np.full((3,), 2.0, np.float32), "k")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["o_else"])], "else", [], [vi("o_else")])
    g = helper.make_graph([helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
                           helper.make_node("Add", ["r", "k"], ["y"])], "g", [vi("x")], [vi("y")],
                          [nh.from_array(np.array(True), "c"), nh.from_array(np.full((3,), -1.0, np.float32), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_a_branch_initializer_named_like_an_outer_one_keeps_its_own_values(tmp_path, capsys):
    """graphsurgeon keeps one tensor per name across scopes: the branch read the outer k and cleanup's exact check
    failed (exit 4, relative error 0.85). The inner initializer is renamed before import (onnxcompress.scopes)."""
    from onnxcompress import io
    from onnxcompress.scopes import unshadow_initializers

    model = shadowing_if_model()
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(want, x + 2.0 - 1.0, rtol=1e-6)  # ORT: the branch's own k
    renamed, count = unshadow_initializers(model)
    assert count == 1 and renamed is not model
    then_g = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert [i.name for i in then_g.initializer] == ["k"]  # the caller's model is not modified
    back = io.to_model(io.to_graph(model), model)
    got = ort.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    src = tmp_path / "if.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=np.stack([x, -x]))
    code, _, err = run(capsys, "compress", src, "-o", tmp_path / "o.onnx", "--passes", "cleanup", "--calib",
                       tmp_path / "c.npz", "--no-latency")
    assert code == 0, err
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert not any(n.op_type == "If" for n in out.graph.node)  # inlined: the condition is constant
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_static_int8_of_a_model_that_also_outputs_its_input(tmp_path, capsys):
    """A graph input listed as a graph output too: the quantize pass renamed the input to 'x_float' (to give the
    output's name to the dequantized copy) and its own calibration run failed on the missing feed (exit 3)."""
    rng = np.random.default_rng(0)
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])  # noqa: E731
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [vi("x")], [vi("y"), vi("x")],
                          [nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    x = rng.standard_normal((16, 1, 8)).astype(np.float32)
    _, q = compressed(capsys, tmp_path, helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), x,
                      "--passes", "quantize{latency_guard=false}")
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["y", "x"]
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    y, x_out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[0]})
    np.testing.assert_array_equal(x_out, x[0])  # the passthrough output is the input itself
    ref = x[0] @ nh.to_array(g.initializer[0])
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_token_ids_past_the_table_are_bad_data_not_a_pass_failure(tmp_path, capsys):
    """ids >= the vocabulary: the original model cannot run; this failed inside quantize's calibration (exit 3,
    'pass quantize failed') or as an internal error. Now exit 2 naming the data, the sample and the table."""
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
                           helper.make_node("Gather", ["emb", "ids64"], ["e"]),
                           helper.make_node("MatMul", ["e", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                          [nh.from_array(rng.standard_normal((10, 8)).astype(np.float32), "emb"),
                           nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    src = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    ids = rng.integers(0, 10, (8, 1, 4)).astype(np.int32)
    np.savez(tmp_path / "ok.npz", ids=ids)
    ids[5, 0, 2] = 12
    np.savez(tmp_path / "bad.npz", ids=ids)
    for passes in ("cleanup", "cleanup,quantize"):
        out = tmp_path / "o.onnx"
        code, _, err = run(capsys, "compress", src, "-o", out, "--passes", passes, "--calib", tmp_path / "bad.npz",
                           "--no-latency")
        assert code == 2 and not out.exists(), err
        assert err.strip().splitlines()[-1] == (f"onnxcompress: error: {tmp_path / 'bad.npz'} sample 5: input 'ids' "
                                                "holds 12, outside the 10 entries of 'emb' it indexes (Gather): the "
                                                "original model cannot run on it")
    code, _, err = run(capsys, "compress", src, "-o", tmp_path / "o.onnx", "--passes", "cleanup", "--calib",
                       tmp_path / "ok.npz", "--no-latency")
    assert code == 0, err


def test_a_dim_name_no_input_uses_is_an_error_not_a_silent_no_op(tmp_path, capsys):
    """--dim nosuch=4 (or a wrong case, Seq for seq) was ignored with exit 0 while --shape nosuch=... exited 2."""
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
                          [nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    for cmd in (["compress", src, "-o", tmp_path / "o.onnx", "--passes", "cleanup", "--no-latency"], ["inspect", src]):
        code, _, err = run(capsys, *cmd, "--dim", "Seq=8")
        assert code == 2, err
        assert err.strip().splitlines()[-1] == ("onnxcompress: error: --dim names no symbolic input dim: Seq (the "
                                                "model's symbolic dims: batch, seq)")
        code, out, err = run(capsys, *cmd, "--dim", "seq=8")
        assert code == 0, err


def test_a_model_whose_only_layers_have_no_integer_kernel_says_why_nothing_was_quantized(tmp_path):
    """Conv3d: the skip reason said 'no Conv/MatMul/Gemm with a constant float weight' although it has two."""
    from onnxcompress import api

    rng = np.random.default_rng(0)
    w1 = nh.from_array(rng.standard_normal((4, 2, 3, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = nh.from_array(rng.standard_normal((2, 4, 3, 3, 3)).astype(np.float32) * 0.2, "w2")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1] * 6),
                           helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 6)], "c3",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6, 6])], [w1, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = {"x": rng.standard_normal((4, 1, 2, 6, 6, 6)).astype(np.float32)}
    res = api.compress(model, "quantize{latency_guard=false}", calibration=calib, validate=False, measure=False)
    st = res.ledger[-1].pass_stats
    assert st["skipped"].startswith("nothing to quantize in the main graph: every candidate layer kept float (")
    assert "rank" in st["skipped"] and ": 2)" in st["skipped"]
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Relu", "Conv"]
