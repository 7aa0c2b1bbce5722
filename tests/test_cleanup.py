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
    for flag in ("inline_if", "fold_conv_affine", "remove_noops", "merge_chains", "cse"):
        with pytest.raises(ValueError):
            Cleanup(**{flag: 1})
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


def _shape_const(model: onnx.ModelProto, node_op: str = "Reshape", idx: int = 1) -> list[int]:
    node = next(n for n in model.graph.node if n.op_type == node_op)
    init = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(init[node.input[idx]]).tolist()


def test_shape_of_dynamic_input_becomes_copy_dim():
    # the batch dim is dynamic: it is never folded to a number, but Reshape may copy it (0 = "same as the data's")
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
    assert ops(out) == {"Reshape": 1}
    assert _shape_const(out) == [0, -1]
    assert row.pass_stats["reshape_shapes_folded"] == 1
    for n in (1, 5):
        assert_same_outputs(m, out, feeds={"x": np.ones((n, 3, 4), np.float32)})


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
    assert ops(out) == {"Relu": 1, "Reshape": 1}
    assert _shape_const(out) == [0, -1]  # a copy of the runtime batch, not the declared 1
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
            st.sampled_from(
                [
                    "convbn",
                    "conv",
                    "bn",
                    "act",
                    "add",
                    "identity",
                    "gemmbn",
                    "noop",
                    "reshape2",
                    "dup",
                    "convaff",
                ]
            ),
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
        elif s == "noop":  # Mul by ones / Cast to its own type: both go
            if rng.integers(0, 2):
                inits.append(numpy_helper.from_array(np.ones(1, np.float32), f"{name}_one"))
                nodes.append(helper.make_node("Mul", [cur, f"{name}_one"], [name]))
            else:
                nodes.append(helper.make_node("Cast", [cur], [name], to=TensorProto.FLOAT))
        elif s == "dup":  # the same Relu twice: one goes
            nodes += [
                helper.make_node("Relu", [cur], [f"{name}_a"]),
                helper.make_node("Relu", [cur], [f"{name}_b"]),
                helper.make_node("Add", [f"{name}_a", f"{name}_b"], [name]),
            ]
        elif s == "reshape2":  # Reshape -> Reshape back: merged, then a no-op
            back = [2, c] if flat else [2, c, 3, 3]
            inits += [
                numpy_helper.from_array(np.array([2, -1], np.int64), f"{name}_s1"),
                numpy_helper.from_array(np.array(back, np.int64), f"{name}_s2"),
            ]
            nodes += [
                helper.make_node("Reshape", [cur, f"{name}_s1"], [f"{name}_r"]),
                helper.make_node("Reshape", [f"{name}_r", f"{name}_s2"], [name]),
            ]
        elif flat and s in ("convbn", "conv", "bn", "convaff"):
            nodes.append(helper.make_node("Relu", [cur], [name]))
        elif s == "convaff":  # Conv + per-channel Add or Mul: folded into the Conv
            op = "Add" if rng.integers(0, 2) else "Mul"
            inits += [
                numpy_helper.from_array(_arr(rng, c, c, 3, 3) * 0.3, f"{name}_w"),
                numpy_helper.from_array(_arr(rng, 1, c, 1, 1), f"{name}_k"),
            ]
            nodes += [
                helper.make_node("Conv", [cur, f"{name}_w"], [f"{name}_c"], pads=[1, 1, 1, 1]),
                helper.make_node(op, [f"{name}_c", f"{name}_k"], [name]),
            ]
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


_AFFINE_GRID_LIKE = """
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
    }"""


def test_static_size_feeding_an_if_condition():
    # onnx's AffineGrid expansion: Range reads a 1-element tensor from an If branch. Its condition is static: the If
    # is inlined by us (and the result must load in ORT with its optimisations on). Without our inlining, a static
    # Size that decides the condition is kept: ORT would inline the branch at load and re-run shape inference on it.
    m = parse(_AFFINE_GRID_LIKE)
    out, row = run_cleanup(m)
    assert ops(out) == {"Split": 1, "Range": 1}
    assert row.pass_stats["if_inlined"] == 1
    sess = ort.InferenceSession(
        out.SerializeToString(), providers=["CPUExecutionProvider"]
    )  # optimisations on
    np.testing.assert_array_equal(sess.run(None, {"size": np.array([3, 4], np.int64)})[0], np.arange(4))
    out2, row2 = run_cleanup(m, inline_if=False)
    assert ops(out2)["Size"] == 1
    assert row2.pass_stats["fold_skipped_if_condition"] == 1
    sess = ort.InferenceSession(out2.SerializeToString(), providers=["CPUExecutionProvider"])
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


# ---------------------------------------------------------------------------------------------- shape folding
def test_static_dim_of_a_dynamic_tensor_folds():
    # silero_vad: state is [2, batch, 128]; Gather(Shape(state), 0) is 2 whatever the batch
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, N, 4] state) => (float[2, M] y) <int64[1] zero = {0}, int64[1] minus1 = {-1}>
    {
        s = Shape(state)
        d0 = Gather(s, zero)
        shp = Concat<axis = 0>(d0, minus1)
        y = Reshape(state, shp)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Reshape": 1}
    assert _shape_const(out) == [2, -1]
    assert row.pass_stats["constants_folded"] >= 1
    assert_same_outputs(m, out, feeds={"state": np.ones((2, 3, 4), np.float32)})


def test_reshape_target_from_another_tensors_dims_stays():
    # z's dims say nothing provable about x's: the computed target stays computed
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[A, B] x, float[C, D] z) => (float[E, F] y) <int64[1] one = {1}, int64[1] two = {2}>
    {
        s = Shape(z)
        d = Slice(s, one, two)
        shp = Concat<axis = 0>(d, d)
        y = Reshape(x, shp)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == ops(m)
    assert not row.modified
    feeds = {"x": np.ones((3, 3), np.float32), "z": np.ones((5, 3), np.float32)}
    assert_same_outputs(m, out, feeds=feeds)


# ------------------------------------------------------------------------------------------------ constant If
def test_constant_if_inlined_and_nested_if_keeps_branch_value():
    # the condition is static (dim 0 of state is 2); the taken branch holds a value read by an If nested below it
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, N] state, float[2, N] x, bool d) => (float[2, N] y) <int64 zero = {0}, int64 two = {2}>
    {
        s = Shape(state)
        n = Gather(s, zero)
        c = Equal(n, two)
        y = If(c) <
            then_branch = t () => (float[2, N] a) {
                inner = Relu(x)
                a = If(d) <
                    then_branch = tt () => (float[2, N] p) { p = Neg(inner) },
                    else_branch = te () => (float[2, N] q) { q = Abs(inner) }
                >
            },
            else_branch = e () => (float[2, N] b) { b = Sigmoid(x) }
        >
    }""")
    out, row = run_cleanup(m)
    assert row.pass_stats["if_inlined"] == 1
    assert [n.op_type for n in out.graph.node] == ["Relu", "If"]  # the nested If decides at run time
    onnx.checker.check_model(out, full_check=True)
    for d in (True, False):
        feeds = {
            "state": np.ones((2, 3), np.float32),
            "x": np.array([[-1.0, 2.0, 0.5]] * 2, np.float32),
            "d": np.array(d),
        }
        assert_same_outputs(m, out, feeds=feeds)


def test_runtime_if_not_inlined():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    {
        y = If(c) <
            then_branch = t () => (float[2] a) { a = Relu(x) },
            else_branch = e () => (float[2] b) { b = Neg(x) }
        >
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"If": 1} and "if_inlined" not in row.pass_stats
    for c in (True, False):
        assert_same_outputs(m, out, feeds={"x": np.array([-1.0, 2.0], np.float32), "c": np.array(c)})


# -------------------------------------------------------------------------------------------------- no-op nodes
def test_noop_nodes_removed():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y)
    <float[3] ones = {1.0, 1.0, 1.0}, float one = {1.0}, float[1, 3] zeros = {0.0, 0.0, 0.0}, float zero = {0.0},
     int64[1] s0 = {0}, int64[1] big = {9223372036854775807}, int64[1] ax1 = {1}, int64[4] nopad = {0, 0, 0, 0},
     int64[2] shp = {2, 3}>
    {
        a = Relu(x)
        b = Cast<to = 1>(a)
        c = Transpose<perm = [0, 1]>(b)
        d = Mul(c, ones)
        e = Div(d, one)
        f = Add(zeros, e)
        g1 = Sub(f, zero)
        h = Slice(g1, s0, big, ax1)
        i = Pad(h, nopad)
        j = Concat<axis = 0>(i)
        k = Expand(j, shp)
        l = Reshape(k, shp)
        y = Sigmoid(l)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Relu": 1, "Sigmoid": 1}
    st = row.pass_stats
    for op in (
        "cast",
        "transpose",
        "mul",
        "div",
        "add",
        "sub",
        "slice",
        "pad",
        "concat",
        "expand",
        "reshape",
    ):
        assert st[f"noop_{op}_removed"] == 1, op
    assert_same_outputs(m, out)


def test_noop_lookalikes_stay():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[2, 3] y, int32[3] z, float[3] w, float[3] v, float[2, 3] u, float[3] t)
    <float[2, 3] ones = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0}, float zero = {0.0}, float one = {1.0},
     int64[1] m1 = {-1}, int64[1] lo = {-9223372036854775807}, int64[1] ax0 = {0}, int64[2] shp = {2, 3}>
    {
        y = Mul(x, ones)
        z = Cast<to = 6>(x)
        w = Sub(zero, x)
        v = Slice(x, m1, lo, ax0, m1)
        u = Expand(x, shp)
        t = Add(x, one)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == ops(m)
    assert not row.modified
    assert_same_outputs(m, out, feeds={"x": np.array([-1.5, 0.0, 2.5], np.float32)})


def test_cast_to_same_type_inside_an_if_branch_removed():
    # the branch's dtypes come from inferring the branch on its own (silero_vad: Cast(Not(..)) to bool)
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    {
        y = If(c) <
            then_branch = t () => (float[2] a) {
                nc = Not(c)
                b = Cast<to = 9>(nc)
                a = Where(b, x, x)
            },
            else_branch = e () => (float[2] r) { r = Neg(x) }
        >
    }""")
    out, row = run_cleanup(m)
    then_g = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["Not", "Where"]
    assert row.pass_stats["noop_cast_removed"] == 1
    for c in (True, False):
        assert_same_outputs(m, out, feeds={"x": np.array([-1.0, 2.0], np.float32), "c": np.array(c)})


# ------------------------------------------------------------------------------------------------------ chains
@pytest.mark.parametrize("opset", [11, 17])
def test_view_chains_merged(opset):
    axes = "<axes = [1]>" if opset < 13 else ""
    axes2 = "<axes = [-1]>" if opset < 13 else ""
    a1, a2 = ("", "") if opset < 13 else (", ax1", ", axm1")
    m = parse(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 3, 4] x) => (float[2, 1, 12, 1, 1] y, float[4, 2, 3] z, float[2, 3, 4] w)
    <int64[2] s1 = {{2, 12}}, int64[3] s2 = {{0, 3, 4}}, int64[3] s3 = {{0, 12, 1}}, int64[1] ax1 = {{1}},
     int64[1] axm1 = {{-1}}>
    {{
        r1 = Reshape(x, s1)
        r2 = Reshape(r1, s2)
        r3 = Reshape(r2, s3)
        u1 = Unsqueeze{axes}(r3{a1})
        y = Unsqueeze{axes2}(u1{a2})
        t1 = Transpose<perm = [1, 2, 0]>(x)
        z = Transpose<perm = [1, 2, 0]>(t1)
        t3 = Transpose<perm = [2, 0, 1]>(x)
        t4 = Transpose<perm = [1, 2, 0]>(t3)
        w = Relu(t4)
    }}""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Reshape": 1, "Unsqueeze": 1, "Transpose": 1, "Relu": 1}
    st = row.pass_stats
    assert st["reshape_chain_merged"] == 2 and st["unsqueeze_chain_merged"] == 1
    assert st["transpose_chain_merged"] == 1 and st["transpose_pair_removed"] == 1
    assert_same_outputs(m, out)


def test_slice_chain_merged_on_disjoint_axes_only():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 6, 8] x) => (float[4, 2, 3] y, float[4, 6, 2] z)
    <int64[1] one = {1}, int64[1] two = {2}, int64[1] three = {3}, int64[1] five = {5}, int64[1] big = {100}>
    {
        a = Slice(x, one, five, one)
        y = Slice(a, two, five, two)
        b = Slice(x, one, big, two)
        z = Slice(b, two, big, two, two)
    }""")
    out, row = run_cleanup(m)
    assert ops(out)["Slice"] == 3  # y's two Slices merge; z's slice the same axis twice and stay
    assert row.pass_stats["slice_chain_merged"] == 1
    assert_same_outputs(m, out)


def test_transpose_of_size_one_axes_feeding_reshape_merges():
    # ddddocr: LSTM output [T, 2, 1, C] -> Transpose(0, 2, 1, 3) -> Reshape: the Transpose moves only a size-1 axis
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[T, 2, 1, 3] x, float[T, 2, 4] p) => (float[T, 6] y, float[2, T, 4] z) <int64[2] s = {0, 6}>
    {
        t = Transpose<perm = [0, 2, 1, 3]>(x)
        y = Reshape(t, s)
        z = Transpose<perm = [1, 0, 2]>(p)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Reshape": 1, "Transpose": 1}  # z's Transpose moves real data: it stays
    assert row.pass_stats["transpose_as_reshape"] == 1
    feeds = {"x": np.arange(30, dtype=np.float32).reshape(5, 2, 1, 3), "p": np.ones((5, 2, 4), np.float32)}
    assert_same_outputs(m, out, feeds=feeds)


# -------------------------------------------------------------------------------------------------------- CSE
def test_common_subexpressions_merged():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) <float[3] c1 = {1.0, 2.0, 3.0}, float[3] c2 = {1.0, 2.0, 3.0}>
    {
        a = Relu(x)
        b = Relu(x)
        p = Mul(a, c1)
        q = Mul(b, c2)
        y = Add(p, q)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert row.pass_stats["cse_nodes_merged"] == 2
    assert_same_outputs(m, out)


def test_cse_leaves_random_different_attrs_and_outputs():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z, float[2, 3] s, float[2, 3] o1, float[2, 3] o2)
    {
        r1 = RandomUniformLike<seed = 1.0>(x)
        r2 = RandomUniformLike<seed = 1.0>(x)
        y = Add(r1, r2)
        z = Softmax<axis = 0>(x)
        s = Softmax<axis = 1>(x)
        o1 = Relu(x)
        o2 = Relu(x)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == ops(m)
    assert "cse_nodes_merged" not in row.pass_stats
    feeds = random_feeds(m)
    got, want = ort_run(out, feeds), ort_run(m, feeds)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_cse_in_a_branch_reuses_the_outer_value():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y, float[2] r)
    {
        r = Relu(x)
        y = If(c) <
            then_branch = t () => (float[2] a) { i = Relu(x)  a = Neg(i) },
            else_branch = e () => (float[2] b) { j = Relu(x)  b = Abs(j) }
        >
    }""")
    out, row = run_cleanup(m)
    assert row.pass_stats["cse_nodes_merged"] == 2
    for br in ("then_branch", "else_branch"):
        sub = next(a.g for a in out.graph.node[-1].attribute if a.name == br)
        assert [n.op_type for n in sub.node] in (["Neg"], ["Abs"])
        assert sub.node[0].input[0] == "r"
    for c in (True, False):
        assert_same_outputs(m, out, feeds={"x": np.array([-1.0, 2.0], np.float32), "c": np.array(c)})


# ------------------------------------------------------------------------------------------------ Conv affine
@pytest.mark.parametrize(
    "op,shape",
    [
        ("Add", (1, 6, 1, 1)),
        ("Add", (6, 1, 1)),
        ("Add", ()),
        ("Sub", (1, 6, 1, 1)),
        ("Mul", (1, 6, 1, 1)),
        ("Mul", (6, 1, 1)),
        ("Mul", ()),
    ],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_conv_affine_folded(rng, op, shape, transpose):
    m = _conv_bn_model(rng, transpose=transpose)
    m.graph.node[1].CopyFrom(helper.make_node(op, ["c", "k"], ["y"]))
    m.graph.initializer.append(numpy_helper.from_array(_arr(rng, *shape), "k"))
    out, row = run_cleanup(m)
    assert ops(out) == {"ConvTranspose" if transpose else "Conv": 1}
    assert row.pass_stats[f"conv_{op.lower()}_folded"] == 1
    assert_same_outputs(m, out, rtol=1e-4, atol=1e-5)


def test_conv_affine_lookalikes_stay(rng):
    m = _conv_bn_model(rng)
    del m.graph.node[1:]
    inits = {
        "k_spatial": _arr(rng, 1, 6, 5, 5),  # varies over space: not a bias
        "k_vec": _arr(rng, 1),  # a [1]-shaped scale: onnxruntime does not fuse it, neither do we
        "k_shared": _arr(rng, 1, 6, 1, 1),
    }
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    m.graph.node.extend(
        [
            helper.make_node("Add", ["c", "k_spatial"], ["y"]),
            helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c2", "k_vec"], ["y2"]),
            helper.make_node("Conv", ["x", "w"], ["c3"], pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("Add", ["c3", "k_shared"], ["y3"]),
        ]
    )
    for name in ("y2", "y3", "c3"):
        m.graph.output.append(_vi(name, ["n", "c", "h", "w"]))
    onnx.checker.check_model(m)
    out, row = run_cleanup(m)
    assert ops(out) == {"Conv": 3, "Add": 2, "Mul": 1}
    assert not any(k.startswith("conv_") and k.endswith("_folded") for k in row.pass_stats)
    assert_same_outputs(m, out)


def test_concat_of_concat_and_vector_reshape():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, float[2, 1] p) => (float[2, 6] y, float[N] v) <int64[1] m1 = {-1}, int64[1] m1b = {-1}>
    {
        a = Concat<axis = 1>(x, p)
        y = Concat<axis = -1>(a, p, p)
        f = Reshape(x, m1)
        v = Reshape(f, m1b)
    }""")
    out, row = run_cleanup(m)
    assert ops(out) == {"Concat": 1, "Reshape": 1}
    assert len(out.graph.node[0].input) == 4 or len(out.graph.node[1].input) == 4
    assert row.pass_stats["concat_chain_merged"] == 1
    assert_same_outputs(m, out)


def test_declared_output_shape_of_wrong_rank_corrected():
    # ddddocr: the output is declared [1, seqlen]; once the Reshape target is a constant [0, 1, -1], shape
    # inference sees rank 3 and the checker would reject the declared rank 2: the declaration is corrected
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"]),
        helper.make_node("Concat", ["n", "one", "minus1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    m = _model(nodes, [_vi("x", ["T", 4])], [_vi("y", [1, "seqlen"])], inits)
    out, row = run_cleanup(m)
    assert ops(out) == {"Reshape": 1}
    assert row.pass_stats["declared_shapes_corrected"] == 1
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 3 and dims[1].dim_value == 1 and dims[2].dim_value == 4
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.ones((5, 4), np.float32)}
    assert ort_run(out, feeds)[0].shape == (5, 1, 4)
    assert_same_outputs(m, out, feeds=feeds)


def test_dynamic_quantize_lstm_output_shape_is_computed(rng):
    # ddddocr_old: a com.microsoft DynamicQuantizeLSTM, whose output dims follow LSTM's rule, feeds the
    # Transpose(0, 2, 1, 3) + Reshape chain: with its dims known the chain becomes one Reshape with a constant target
    h, i = 4, 3
    inits = [
        numpy_helper.from_array(rng.integers(-50, 50, (2, i, 4 * h)).astype(np.int8), "w"),
        numpy_helper.from_array(rng.integers(-50, 50, (2, h, 4 * h)).astype(np.int8), "r"),
        numpy_helper.from_array(np.full(2, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
        numpy_helper.from_array(np.full(2, 0.01, np.float32), "rs"),
        numpy_helper.from_array(np.zeros(2, np.int8), "rz"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    nodes = [
        helper.make_node(
            "DynamicQuantizeLSTM",
            ["x", "w", "r", "", "", "", "", "", "ws", "wz", "rs", "rz"],
            ["y"],
            domain="com.microsoft",
            hidden_size=h,
            direction="bidirectional",
        ),
        helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["t"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n0"]),
        helper.make_node("Gather", ["s", "one"], ["n1"]),
        helper.make_node("Concat", ["n0", "n1", "minus1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["t", "shp"], ["z"]),
    ]
    g = helper.make_graph(nodes, "g", [_vi("x", ["T", 1, i])], [_vi("z", None)], inits)
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    m.ir_version = 8
    out, row = run_cleanup(m)
    assert ops(out) == {"DynamicQuantizeLSTM": 1, "Reshape": 1}
    assert _shape_const(out) == [0, 1, -1]
    feeds = {"x": rng.standard_normal((5, 1, i)).astype(np.float32)}
    assert_same_outputs(m, out, feeds=feeds)


@pytest.mark.parametrize("opset", [11, 17])
def test_squeeze_unsqueeze_pairs_cancel(opset):
    def call(op, src, axes):
        if opset < 13:
            return f"{op}<axes = {axes}>({src})"
        name = "ax_" + "_".join(str(a).replace("-", "m") for a in axes)
        return f"{op}({src}, {name})"

    m = parse(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 1, 3] x) => (float[2, 1, 3] y, float[2, 1, 3] z, float[2, 3, 1] w)
    <int64[1] ax_1 = {{1}}, int64[1] ax_3 = {{3}}, int64[1] ax_m1 = {{-1}}, int64[1] ax_m2 = {{-2}}>
    {{
        r1 = Relu(x)
        a = {call("Unsqueeze", "r1", [-1])}
        y = {call("Squeeze", "a", [3])}
        r2 = Neg(x)
        b = {call("Squeeze", "r2", [1])}
        z = {call("Unsqueeze", "b", [-2])}
        r3 = Abs(x)
        c = {call("Squeeze", "r3", [1])}
        w = {call("Unsqueeze", "c", [-1])}
    }}""")
    out, row = run_cleanup(m)
    assert row.pass_stats["squeeze_pair_removed"] == 2  # y is Relu(x), z is Neg(x); w moves the 1: it stays
    assert ops(out) == {"Relu": 1, "Neg": 1, "Abs": 1, "Squeeze": 1, "Unsqueeze": 1}
    assert_same_outputs(m, out)
