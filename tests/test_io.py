"""Model I/O: Constant-node weights, subgraphs, external data safety, atomic writes, bad files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.errors import BadInputError
from tests.conftest import ort_run


def conv_model_with_constant_node() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"))
    scale = helper.make_node("Constant", [], ["s"], value_float=2.0)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    mul = helper.make_node("Mul", ["c", "s"], ["y"])
    g = helper.make_graph([const, scale, conv, mul], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def if_model() -> onnx.ModelProto:
    """An If whose branches hold Constant weights and read an outer-scope tensor."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        c = helper.make_node("Constant", [], [f"{name}_c"],
                             value=numpy_helper.from_array(np.full((3,), value, np.float32)))
        add = helper.make_node("Add", ["outer", f"{name}_c"], [f"{name}_out"])
        return helper.make_graph([c, add], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                                                    [3])])
    relu = helper.make_node("Relu", ["x"], ["outer"])
    cond = helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)
    gt = helper.make_node("Greater", ["s", "zero"], ["cond"])
    iff = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0))
    g = helper.make_graph([relu, cond, gt, iff], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                          initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    io.lift_constant_nodes(m)
    return io.to_model(io.to_graph(m), m)


def test_constant_node_weights_become_graphsurgeon_constants():
    model = conv_model_with_constant_node()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assert io.lift_constant_nodes(m) == 2
    graph = io.to_graph(m)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert isinstance(conv.inputs[1], gs.Constant)
    assert conv.inputs[1].values.shape == (4, 3, 3, 3)
    assert [n.op for n in graph.nodes] == ["Conv", "Mul"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out = io.to_model(graph, m)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("xval", [1.0, -1.0])
def test_subgraphs_survive_roundtrip_with_outer_scope_reads(xval):
    model = if_model()
    out = roundtrip(model)
    iff = next(n for n in out.graph.node if n.op_type == "If")
    then_g = next(a.g for a in iff.attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["Add"]  # the Constant became a subgraph initializer
    assert len(then_g.initializer) == 1
    onnx.checker.check_model(out, full_check=True)
    x = np.full((3,), xval, np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])


def test_iter_graphs_visits_nested_bodies():
    model = if_model()
    assert len(list(io.iter_graphs(model.graph))) == 3


def _save_external(model: onnx.ModelProto, folder, location: str = "m.onnx.data") -> str:
    path = folder / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model with external data rewrites the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return str(path)


def test_external_data_inside_folder_loads(tmp_path):
    model = conv_model_with_constant_node()
    io.lift_constant_nodes(model)
    path = _save_external(model, tmp_path)
    loaded = io.read_model(path)
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(ort_run(loaded, {"x": x})[0], ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("location", ["../x.data", "/etc/passwd", "sub/../../x.data"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    model = conv_model_with_constant_node()
    io.lift_constant_nodes(model)
    path = _save_external(model, tmp_path)
    m = onnx.load_model(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (tmp_path.parent / "x.data").write_bytes(b"\0" * 1024)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(m.SerializeToString())
    with pytest.raises(BadInputError, match="external data location"):
        io.read_model(bad)


def test_missing_external_file_is_a_clear_error(tmp_path):
    model = conv_model_with_constant_node()
    io.lift_constant_nodes(model)
    path = _save_external(model, tmp_path)
    os.remove(tmp_path / "m.onnx.data")
    with pytest.raises(BadInputError, match="not found"):
        io.read_model(path)


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model at all \x00\xff\xfe", b"\x08\x07"])
def test_non_onnx_files_are_refused(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BadInputError):
        io.read_model(p)


def test_truncated_model_is_refused(tmp_path):
    data = conv_model_with_constant_node().SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        io.read_model(p)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = conv_model_with_constant_node()
    out = tmp_path / "out.onnx"
    io.save_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert onnx.load_model(str(out)).SerializeToString() == model.SerializeToString()


def test_save_into_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        io.save_model(conv_model_with_constant_node(), tmp_path / "nope" / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_big_models_are_saved_with_external_data(tmp_path, monkeypatch):
    """Above the protobuf limit (lowered here) the writer switches to external data and ORT still loads it."""
    monkeypatch.setattr(io, "PROTO_LIMIT", 100)
    monkeypatch.setattr(io, "EXTERNAL_TENSOR_MIN_BYTES", 0)
    model = conv_model_with_constant_node()
    io.lift_constant_nodes(model)
    assert io.needs_external_data(model)
    out = tmp_path / "big.onnx"
    io.save_model(model, out)
    assert (tmp_path / "big.onnx.data").exists()
    loaded = io.read_model(out)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(ort_run(loaded, {"x": x})[0], ort_run(model, {"x": x})[0])
    from onnxcompress.runtime import Session

    with Session(model) as s:  # a "too big" ModelProto goes to ORT through a temporary folder
        np.testing.assert_allclose(s.run({"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert io.file_size_on_disk(out) > out.stat().st_size


def test_typed_attributes_and_optional_values_survive_roundtrip():
    """graphsurgeon drops TYPE_PROTO attributes and cannot export optional-typed values: io restores both."""
    elem = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    opt_type = helper.make_optional_type_proto(elem)
    node = helper.make_node("Optional", [], ["o"], type=elem)
    has = helper.make_node("OptionalHasElement", ["o"], ["y"])
    g = helper.make_graph([node, has], "g", [], [helper.make_tensor_value_info("y", TensorProto.BOOL, [])],
                          value_info=[helper.make_value_info("o", opt_type)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m = onnx.ModelProto()
    m.CopyFrom(model)
    io.prepare_for_import(m)
    out = io.to_model(io.to_graph(m), m)
    opt_node = next(n for n in out.graph.node if n.op_type == "Optional")
    assert [a.name for a in opt_node.attribute] == ["type"]
    onnx.checker.check_model(out, full_check=True)
    assert ort_run(out, {})[0] == ort_run(model, {})[0]


# ------------------------------------------------------------------------------------------- model_safety
def _mlp() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],  # paddle-style dynamic
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _write(tmp_path, model: onnx.ModelProto):
    p = tmp_path / "m.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def test_dynamic_dims_written_as_minus_one_are_accepted(tmp_path):
    assert io.read_model(_write(tmp_path, _mlp())).graph.input[0].name == "x"


@pytest.mark.parametrize("edit,match", [
    (lambda m: setattr(m.graph.initializer[0], "raw_data", m.graph.initializer[0].raw_data[:-4]), "raw_data holds 44"),
    (lambda m: m.graph.initializer[0].dims.__setitem__(0, 3_000_000), "raw_data holds 48"),
    (lambda m: m.graph.initializer[0].dims.__setitem__(0, -3), "negative dimension"),
    (lambda m: setattr(m.graph.initializer[0], "data_type", 77), "unknown data type"),
    (lambda m: m.graph.initializer[0].dims.extend([10**6, 10**6]), "declares 1.2e\\+13 elements"),
    (lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "w")), "defined twice"),
    (lambda m: m.graph.node.append(helper.make_node("Relu", ["x"], ["y"])), "produced twice"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 10**9)
     or m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 10**9), "more than onnxcompress"),
])
def test_malformed_models_are_refused_with_one_line(tmp_path, edit, match):
    m = _mlp()
    edit(m)
    with pytest.raises(BadInputError, match=match) as info:
        io.read_model(_write(tmp_path, m))
    assert "\n" not in str(info.value)


def _external_mlp(tmp_path, **entries) -> str:
    m = _mlp()
    t = m.graph.initializer[0]
    (tmp_path / "w.bin").write_bytes(t.raw_data + entries.pop("extra", b""))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "w.bin", **entries}.items():
        t.external_data.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    return str(_write(tmp_path, m))


@pytest.mark.parametrize("entries,match", [
    ({"offset": 4096}, "holds 0 bytes after offset 4096"),
    ({"offset": 0, "length": 4096}, "length 4096 does not match"),
    ({"offset": 8, "length": 48}, "lies past the end"),
    ({"offset": -8}, "negative"),
    ({"offset": "x"}, "not a number"),
    ({"extra": b"\0" * 16}, "holds 64 bytes after offset 0 and gives no length"),
    ({"location": "w\0.bin"}, "NUL byte"),
    ({"location": "C:\\w.bin"}, "absolute path"),
])
def test_external_entries_outside_the_file_are_refused(tmp_path, entries, match):
    if "location" in entries:
        path = _external_mlp(tmp_path)
        m = onnx.load_model(path, load_external_data=False)
        m.graph.initializer[0].external_data[0].value = entries["location"]
        path = str(_write(tmp_path, m))
    else:
        path = _external_mlp(tmp_path, **entries)
    with pytest.raises(BadInputError, match=match):
        io.read_model(path)


def test_external_data_with_exact_offset_and_length_loads(tmp_path):
    path = _external_mlp(tmp_path, offset=0, length=48)
    loaded = io.read_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  np.arange(12, dtype=np.float32).reshape(3, 4))


def test_external_data_save_streams_and_leaves_the_model_unchanged(tmp_path):
    """The writer moves each weight to the data file and back: the caller's proto is byte-identical afterwards,
    the file round-trips, and every tensor is 64-byte aligned in the data file."""
    model = conv_model_with_constant_node()
    io.lift_constant_nodes(model)
    model.graph.initializer.append(numpy_helper.from_array(np.arange(1000, dtype=np.float32), "unused_big"))
    before = model.SerializeToString()
    out = tmp_path / "ext.onnx"
    io.save_model(model, out, external_data=True)
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    raw = onnx.load_model(str(out), load_external_data=False)
    offsets = [int(e.value) for t in raw.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 64 == 0 for o in offsets)
    loaded = io.read_model(out)
    for t in model.graph.initializer:
        got = next(u for u in loaded.graph.initializer if u.name == t.name)
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(t))
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(ort_run(loaded, {"x": x})[0], ort_run(model, {"x": x})[0])
