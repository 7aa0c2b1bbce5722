"""cleanup pass: structure, stats and numerics (ORT, original vs cleaned) for each rewrite, plus negative cases."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ort_run, random_feeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cleanup import Cleanup

from onnxcompress.context import PassContext
from onnxcompress.manager import PassManager


def run_cleanup(model: onnx.ModelProto, **options):
    """(cleaned model, ledger row of the cleanup pass)."""
    result = PassManager([Cleanup(**options)], measure=False).run(model, PassContext())
    return result.model, result.ledger[-1]


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds=None, rtol=1e-5, atol=1e-5):
    feeds = feeds if feeds is not None else random_feeds(a)
    ra, rb = ort_run(a, feeds), ort_run(b, feeds)
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert [o.type.tensor_type.elem_type for o in a.graph.output] == [
        o.type.tensor_type.elem_type for o in b.graph.output
    ]
    for x, y in zip(ra, rb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def _arr(rng, *shape, positive=False):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def _bn_inits(rng, c, prefix="bn"):
    return [
        numpy_helper.from_array(_arr(rng, c), f"{prefix}_g"),
        numpy_helper.from_array(_arr(rng, c), f"{prefix}_b"),
        numpy_helper.from_array(_arr(rng, c), f"{prefix}_m"),
        numpy_helper.from_array(_arr(rng, c, positive=True), f"{prefix}_v"),
    ]


def _bn(inp, out, prefix="bn", eps=1e-3):
    return helper.make_node(
        "BatchNormalization",
        [inp, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
        [out],
        epsilon=eps,
    )


def _model(nodes, inputs, outputs, inits, opset=17, value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


# ------------------------------------------------------------------------------------------------ options
def test_options_validated():
    with pytest.raises(ValueError):
        Cleanup(fold_size_limit=-1)
    with pytest.raises(ValueError):
        Cleanup(max_rounds=0)
    with pytest.raises(ValueError):
        Cleanup(fold_batchnorm="yes")
    assert Cleanup.exact and Cleanup.name == "cleanup"


# ------------------------------------------------------------------------------------------ Identity/Dropout
def test_identity_in_the_middle_removed():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
        a = Relu(x)
        b = Identity(a)
        c = Identity(b)
        y = Sigmoid(c)
    }""")
    out, row = run_cleanup(m)
    assert ops(out)["Identity"] == 0
    assert row.pass_stats["identity_removed"] == 2 and row.modified
    assert_same_outputs(m, out)


def test_identity_feeding_graph_output_keeps_the_name():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
        a = Relu(x)
        y = Identity(a)
        z = Sigmoid(a)
    }""")
    out, row = run_cleanup(m)
    assert ops(out)["Identity"] == 0
    assert [o.name for o in out.graph.output] == ["y", "z"]
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["y"]
    sig = next(n for n in out.graph.node if n.op_type == "Sigmoid")
    assert list(sig.input) == ["y"]
    assert row.pass_stats["identity_removed"] == 1
    assert_same_outputs(m, out)


def test_identity_between_graph_input_and_output_is_kept():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
        y = Identity(x)
        z = Relu(x)
    }""")
    out, row = run_cleanup(m)
    assert ops(out)["Identity"] == 1
    assert not row.modified
    assert row.pass_stats["identity_kept_output_of_graph_input"] == 1
    assert [i.name for i in out.graph.input] == ["x"]
    assert_same_outputs(m, out)


def test_inference_dropout_removed_training_dropout_kept():
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    train_on = numpy_helper.from_array(np.array(True), "train_on")
    train_off = numpy_helper.from_array(np.array(False), "train_off")
    nodes = [
        helper.make_node("Dropout", ["x", "ratio"], ["a"]),
        helper.make_node("Dropout", ["a", "ratio", "train_off"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Dropout", ["x", "ratio", "train_on"], ["t"]),
        helper.make_node("Dropout", ["x"], ["u", "mask"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["t", "u"], ["tu"]),
        helper.make_node("Add", ["tu", "maskf"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3]), _vi("z", [2, 3])], [ratio, train_on, train_off])
    out, row = run_cleanup(m)
    assert ops(out)["Dropout"] == 2  # training-mode one and the one whose mask is used
    assert row.pass_stats["dropout_removed"] == 2
    assert row.pass_stats["dropout_kept_training_mode"] == 1
    assert row.pass_stats["dropout_kept_mask_used"] == 1
    feeds = random_feeds(m)
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(m, feeds)[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------- dead code
def test_dead_nodes_removed_unused_inputs_kept():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, float[2, 3] unused) => (float[2, 3] y) <float[3] w = {1.0, 2.0, 3.0}, float[3] dead_w = {4.0, 5.0, 6.0}>
    {
        y = Add(x, w)
        d1 = Mul(x, dead_w)
        d2 = Relu(d1)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Add": 1}
    assert [i.name for i in out.graph.input] == ["x", "unused"]
    assert {t.name for t in out.graph.initializer} == {"w"}
    assert row.pass_stats["dead_nodes_removed"] == 2
    assert_same_outputs(m, out)


def test_if_subgraph_reading_outer_tensor_keeps_it():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) <float[2] w = {1.0, 2.0}>
    {
        outer = Relu(x)
        unused = Sigmoid(x)
        y = If(c) <
            then_branch = t () => (float[2] a) { i = Identity(outer)  a = Add(i, w) },
            else_branch = e () => (float[2] b) { b = Identity(outer) }
        >
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Relu": 1, "If": 1}
    if_node = out.graph.node[-1]
    then_g = next(a.g for a in if_node.attribute if a.name == "then_branch")
    else_g = next(a.g for a in if_node.attribute if a.name == "else_branch")
    assert [n.op_type for n in then_g.node] == ["Add"]  # inner Identity bypassed
    # the else branch's Identity reads the outer scope and is the branch output: it stays
    assert [n.op_type for n in else_g.node] == ["Identity"]
    assert row.pass_stats["dead_nodes_removed"] == 1
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(m, feeds)[0])


def test_value_from_one_branch_used_in_a_nested_if():
    # silero_vad pattern: a value made inside an If branch is read by an If nested below it
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c, bool d) => (float[2] y)
    {
        y = If(c) <
            then_branch = t () => (float[2] a) {
                inner = Relu(x)
                junk = Sigmoid(x)
                a = If(d) <
                    then_branch = tt () => (float[2] p) { p = Neg(inner) },
                    else_branch = te () => (float[2] q) { q = Abs(inner) }
                >
            },
            else_branch = e () => (float[2] b) { b = Identity(x) }
        >
    }""")
    out, row = run_cleanup(m)
    onnx.checker.check_model(out, full_check=True)
    for c in (True, False):
        for d in (True, False):
            feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(c), "d": np.array(d)}
            np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(m, feeds)[0])
    assert row.pass_stats.get("dead_nodes_removed") == 1  # the Sigmoid


# ------------------------------------------------------------------------------------------ constant folding
def test_constant_subexpression_folded():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {0.5, 0.5, 0.5}>
    {
        s = Add(a, b)
        t = Sqrt(s)
        y = Mul(x, t)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Mul": 1}
    assert row.pass_stats["constants_folded"] == 2
    assert_same_outputs(m, out)


def test_shape_of_static_input_folded():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[2, 12] y) <int64[1] zero = {0}, int64[1] minus1 = {-1}>
    {
        s = Shape(x)
        n = Gather(s, zero)
        shp = Concat<axis = 0>(n, minus1)
        y = Reshape(x, shp)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Reshape": 1}
    assert row.pass_stats["constants_folded"] == 3
    assert_same_outputs(m, out)


def test_shape_of_dynamic_input_not_folded():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4] x) => (float[N, 12] y) <int64[1] zero = {0}, int64[1] minus1 = {-1}>
    {
        s = Shape(x)
        n = Gather(s, zero)
        shp = Concat<axis = 0>(n, minus1)
        y = Reshape(x, shp)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == ops(m)
    assert not row.modified
    assert_same_outputs(m, out, feeds={"x": np.ones((5, 3, 4), np.float32)})


def test_wrong_declared_shapes_are_not_trusted():
    # ddddocr lesson: the declared shapes of an intermediate and of the output say batch 1; the real batch is dynamic
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"]),
        helper.make_node("Concat", ["n", "minus1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["r", "shp"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    m = _model(
        nodes,
        [_vi("x", ["N", 3, 4])],
        [_vi("y", [1, 12])],
        inits,
        value_info=[_vi("r", [1, 3, 4]), _vi("s", [3], TensorProto.INT64)],
    )
    out, row = run_cleanup(m)
    assert ops(out)["Shape"] == 1
    assert not row.modified
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)}
    assert ort_run(out, feeds)[0].shape == (3, 12)
    assert_same_outputs(m, out, feeds=feeds)


def test_inflating_tile_not_folded():
    tile_src = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16), "src")
    reps = numpy_helper.from_array(np.array([4096, 1], np.int64), "reps")
    nodes = [helper.make_node("Tile", ["src", "reps"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    m = _model(nodes, [_vi("x", [4096, 16])], [_vi("y", [4096, 16])], [tile_src, reps])
    out, row = run_cleanup(m)
    assert ops(out)["Tile"] == 1
    assert not row.modified
    assert row.pass_stats["fold_skipped_too_large"] == 1
    assert sum(t.ByteSize() for t in out.graph.initializer) < 1024
    # a generous limit lets it fold
    out2, row2 = run_cleanup(m, fold_size_limit=1 << 20)
    assert ops(out2)["Tile"] == 0 and row2.pass_stats["constants_folded"] == 1
    assert_same_outputs(m, out2)


def test_random_and_dequantize_not_folded():
    q = numpy_helper.from_array(np.arange(-4, 4, dtype=np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    shape_src = numpy_helper.from_array(np.zeros(8, np.float32), "shape_src")
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
        helper.make_node("RandomNormalLike", ["shape_src"], ["noise"], seed=1.0),
        helper.make_node("Mul", ["noise", "x"], ["nx"]),
        helper.make_node("Add", ["x", "w"], ["y"]),
    ]
    m = _model(nodes, [_vi("x", [8])], [_vi("y", [8]), _vi("nx", [8])], [q, scale, shape_src])
    out, row = run_cleanup(m)
    assert ops(out)["DequantizeLinear"] == 1 and ops(out)["RandomNormalLike"] == 1
    assert not row.modified


# ------------------------------------------------------------------------------------------------ BN folding
def _conv_bn_model(rng, *, bias=True, group=1, transpose=False, cin=4, cout=6, opset=17):
    if transpose:
        w = _arr(rng, cin, cout // group, 3, 3)
        conv = helper.make_node(
            "ConvTranspose",
            ["x", "w"] + (["b"] if bias else []),
            ["c"],
            group=group,
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        )
    else:
        w = _arr(rng, cout, cin // group, 3, 3)
        conv = helper.make_node(
            "Conv", ["x", "w"] + (["b"] if bias else []), ["c"], group=group, pads=[1, 1, 1, 1]
        )
    inits = [numpy_helper.from_array(w, "w")] + _bn_inits(rng, cout)
    if bias:
        inits.append(numpy_helper.from_array(_arr(rng, cout), "b"))
    nodes = [conv, _bn("c", "y")]
    return _model(nodes, [_vi("x", [2, cin, 5, 5])], [_vi("y", ["n", "c", "h", "w"])], inits, opset=opset)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=False),
        dict(group=2),
        dict(transpose=True),
        dict(transpose=True, group=2, bias=False),
        dict(opset=9),
    ],
)
def test_bn_folded_into_conv(rng, kw):
    m = _conv_bn_model(rng, **kw)
    out, row = run_cleanup(m)
    assert ops(out)["BatchNormalization"] == 0
    assert row.pass_stats["bn_folded"] == 1
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(m, out)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (3, 1), (3, 6)])
def test_bn_folded_into_gemm(rng, trans_b, c_shape):
    w = _arr(rng, 6, 5) if trans_b else _arr(rng, 5, 6)
    inits = [numpy_helper.from_array(w, "w")] + _bn_inits(rng, 6)
    ins = ["x", "w"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(_arr(rng, *c_shape), "c"))
        ins.append("c")
    nodes = [helper.make_node("Gemm", ins, ["g"], transB=trans_b, alpha=0.7, beta=1.3), _bn("g", "y")]
    m = _model(nodes, [_vi("x", [3, 5])], [_vi("y", [3, 6])], inits)
    out, row = run_cleanup(m)
    assert ops(out) == {"Gemm": 1}
    assert row.pass_stats["bn_folded"] == 1
    assert_same_outputs(m, out)


def test_bn_not_folded_when_conv_output_has_two_consumers(rng):
    m = _conv_bn_model(rng)
    m.graph.node.append(helper.make_node("Relu", ["c"], ["z"]))
    m.graph.output.append(_vi("z", ["n", "c", "h", "w"]))
    out, row = run_cleanup(m)
    assert ops(out)["BatchNormalization"] == 1
    assert row.pass_stats["bn_kept_producer_output_shared"] == 1
    assert_same_outputs(m, out)


def test_bn_not_folded_when_weight_is_graph_input(rng):
    m = _conv_bn_model(rng)
    w = next(t for t in m.graph.initializer if t.name == "w")
    m.graph.initializer.remove(w)
    m.graph.input.append(_vi("w", [6, 4, 3, 3]))
    out, row = run_cleanup(m)
    assert ops(out)["BatchNormalization"] == 1
    assert not row.modified
    assert row.pass_stats["bn_kept_weight_not_constant"] == 1
    feeds = random_feeds(m)
    assert_same_outputs(m, out, feeds=feeds)


def test_bn_without_linear_producer_stays(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), _bn("r", "y")]
    m = _model(nodes, [_vi("x", [2, 6, 3, 3])], [_vi("y", [2, 6, 3, 3])], _bn_inits(rng, 6))
    out, row = run_cleanup(m)
    assert ops(out)["BatchNormalization"] == 1
    assert row.pass_stats["bn_kept_no_linear_producer"] == 1


def test_bn_fold_with_shared_weight_does_not_touch_the_other_conv(rng):
    m = _conv_bn_model(rng)
    m.graph.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1]))
    m.graph.output.append(_vi("c2", ["n", "c", "h", "w"]))
    out, row = run_cleanup(m)
    assert row.pass_stats["bn_folded"] == 1
    conv2 = next(n for n in out.graph.node if n.output[0] == "c2")
    assert conv2.input[1] == "w"
    assert_same_outputs(m, out)


def test_bn_fold_can_be_switched_off(rng):
    m = _conv_bn_model(rng)
    out, row = run_cleanup(m, fold_batchnorm=False)
    assert ops(out)["BatchNormalization"] == 1 and not row.modified


# --------------------------------------------------------------------------------------------- deduplication
def test_duplicate_initializers_merged():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    inits = [
        numpy_helper.from_array(a, "a"),
        numpy_helper.from_array(a.copy(), "b"),
        numpy_helper.from_array(np.array([1.0, 2.0, 4.0], np.float32), "c"),
        numpy_helper.from_array(np.array([-0.0, 2.0, 3.0], np.float32), "negzero"),
        numpy_helper.from_array(np.array([0.0, 2.0, 3.0], np.float32), "poszero"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "a"], ["p"]),
        helper.make_node("Mul", ["p", "b"], ["q"]),
        helper.make_node("Sub", ["q", "c"], ["r"]),
        helper.make_node("Div", ["r", "negzero"], ["r2"]),
        helper.make_node("Div", ["r2", "poszero"], ["y"]),
    ]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], inits)
    out, row = run_cleanup(m)
    assert {t.name for t in out.graph.initializer} == {"a", "c", "negzero", "poszero"}  # bytes differ: kept
    assert row.pass_stats["initializers_deduplicated"] == 1
    assert_same_outputs(m, out)
    # a second run has nothing left to do
    _, row2 = run_cleanup(out)
    assert not row2.modified


# ---------------------------------------------------------------------------------------- property: chains
_ACTS = ["Relu", "Sigmoid", "Tanh"]


@st.composite
def chains(draw):
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    steps = draw(
        st.lists(
            st.sampled_from(["convbn", "conv", "bn", "act", "add", "identity", "gemmbn"]),
            min_size=1,
            max_size=6,
        )
    )
    c = c0 = draw(st.sampled_from([2, 4]))
    nodes, inits, cur, k = [], [], "x", 0
    flat = False
    for s in steps:
        k += 1
        name = f"t{k}"
        if s == "gemmbn":
            if not flat:
                nodes.append(helper.make_node("Flatten", [cur], [f"{name}_f"]))
                cur, flat, c = f"{name}_f", True, c * 9
            tb = int(rng.integers(0, 2))
            w = _arr(rng, c, c) * 0.3
            inits += [
                numpy_helper.from_array(w, f"{name}_w"),
                numpy_helper.from_array(_arr(rng, c), f"{name}_c"),
            ]
            inits += _bn_inits(rng, c, f"{name}_bn")
            nodes += [
                helper.make_node("Gemm", [cur, f"{name}_w", f"{name}_c"], [f"{name}_g"], transB=tb),
                _bn(f"{name}_g", name, f"{name}_bn"),
            ]
        elif flat and s in ("convbn", "conv", "bn"):
            nodes.append(helper.make_node("Relu", [cur], [name]))
        elif s in ("convbn", "conv"):
            inits.append(numpy_helper.from_array(_arr(rng, c, c, 3, 3) * 0.3, f"{name}_w"))
            out = f"{name}_c" if s == "convbn" else name
            nodes.append(helper.make_node("Conv", [cur, f"{name}_w"], [out], pads=[1, 1, 1, 1]))
            if s == "convbn":
                inits += _bn_inits(rng, c, f"{name}_bn")
                nodes.append(_bn(out, name, f"{name}_bn"))
        elif s == "bn":
            inits += _bn_inits(rng, c, f"{name}_bn")
            nodes.append(_bn(cur, name, f"{name}_bn"))
        elif s == "act":
            nodes.append(helper.make_node(_ACTS[int(rng.integers(0, 3))], [cur], [name]))
        elif s == "add":
            nodes.append(helper.make_node("Add", [cur, "x" if not flat else cur], [name]))
        else:
            nodes.append(helper.make_node("Identity", [cur], [name]))
        cur = name
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    out_shape = [2, c] if flat else [2, c0, 3, 3]
    return _model(nodes, [_vi("x", [2, c0, 3, 3])], [_vi("y", out_shape)], inits)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_cleanup_is_idempotent_and_exact(model):
    out, row = run_cleanup(model)
    assert_same_outputs(model, out, rtol=1e-4, atol=1e-4)
    assert len(out.graph.node) <= len(model.graph.node)
    assert ops(out)["Identity"] <= 1
    again, row2 = run_cleanup(out)
    assert not row2.modified, row2.pass_stats
    assert len(again.graph.node) == len(out.graph.node)


# ------------------------------------------------------------------------------------------------ real model
_CACHE = Path.home() / ".cache" / "onnxcompress" / "files"


@pytest.mark.realmodel
def test_real_ppocr_cls_exact():
    path = _CACHE / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.exists():
        pytest.skip("ppocr_cls not in the model cache (benchmarks/models.py fetch)")
    m = onnx.load(str(path))
    out, row = run_cleanup(m)
    assert row.pass_stats["bn_folded"] >= 30
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 48, 192)).astype(np.float32)}
    ref, got = ort_run(m, feeds), ort_run(out, feeds)
    for a, b in zip(ref, got, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(a))))


def test_static_size_feeding_an_if_condition_not_folded():
    # onnx's AffineGrid expansion: Range reads a 1-element tensor from an If branch. A constant condition lets ORT
    # inline the branch at load, and its shape inference then rejects the Range the model ran fine with.
    m = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[2] size) => (int64[N] y) <int64 two = {2}, int64 zero = {0}, int64 one = {1}>
    {
        n = Size(size)
        is2 = Equal(n, two)
        w = If(is2) <
            then_branch = t () => (int64[1] a) { a0, a = Split<num_outputs = 2>(size) },
            else_branch = e () => (int64[1] b) { b = Identity(size) }
        >
        y = Range(zero, w, one)
    }""")
    out, row = run_cleanup(m)
    assert ops(out)["Size"] == 1
    assert row.pass_stats["fold_skipped_if_condition"] == 1
    sess = ort.InferenceSession(
        out.SerializeToString(), providers=["CPUExecutionProvider"]
    )  # optimisations on
    np.testing.assert_array_equal(sess.run(None, {"size": np.array([3, 4], np.int64)})[0], np.arange(4))


def test_loop_body_identities_and_constants():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, int64 trip) => (float[2] y) <float[2] a = {1.0, 2.0}, float[2] b = {3.0, 4.0}, bool t = {1}>
    {
        y = Loop(trip, t, x) <body = body (int64 i, bool c_in, float[2] acc_in) => (bool c_out, float[2] acc_out) {
            c_out = Identity(c_in)
            ab = Add(a, b)
            s = Add(acc_in, ab)
            acc_out = Identity(s)
        }>
    }""")
    out, row = run_cleanup(m)
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "body")
    assert [n.op_type for n in body.node] == [
        "Identity",
        "Add",
    ]  # c_out passthrough stays; acc_out renamed onto Add
    assert [o.name for o in body.output] == ["c_out", "acc_out"]
    assert row.pass_stats["identity_removed"] == 1 and row.pass_stats["constants_folded"] == 1
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.array([0.5, -1.0], np.float32), "trip": np.array(3, np.int64)}
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(m, feeds)[0])
