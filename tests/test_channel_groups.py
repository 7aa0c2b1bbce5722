"""Channel-group analysis: coupling rules on tiny graphs, blocking reasons, and the pruning == zeroing property."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.analyses.channel_groups import (
    analyse,
    connected_components,
    describe_groups,
    reshape_blocks,
    static_shapes,
)
from onnxcompress.analyses.channel_groups.layout import (
    Layout,
    clamp_index,
    expand,
    part_bounds,
    simplify,
    varies_along,
)
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


# ------------------------------------------------------------------------------------------- graph builder
class Net:
    """Builds small random CNNs with onnx.helper (He-initialised weights, BN with positive variances)."""

    def __init__(self, seed: int, c_in: int = 3, hw: int = 8):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0
        self.c_in, self.hw0 = c_in, hw

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, base: str, arr: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        fan = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(2.0 / fan)).astype(np.float32)
        ins = [x, self.const("w", w)]
        if bias:
            ins.append(self.const("b", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)))
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)[0]

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        ins = [x, self.const("g", r.uniform(0.5, 1.5, c).astype(np.float32)),
               self.const("be", (0.1 * r.standard_normal(c)).astype(np.float32)),
               self.const("mu", (0.1 * r.standard_normal(c)).astype(np.float32)),
               self.const("var", r.uniform(0.5, 1.5, c).astype(np.float32))]
        return self.node("BatchNormalization", ins)[0]

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])[0]

    def cbr(self, x: str, cin: int, cout: int, k: int = 3) -> str:
        return self.relu(self.bn(self.conv(x, cin, cout, k), cout))

    # --- blocks: (x, c, hw) -> (y, c', hw')
    def block(self, kind: str, x: str, c: int, hw: int) -> tuple[str, int, int]:
        r = self.rng
        if kind == "cbr":
            cout = int(r.integers(4, 9))
            return self.cbr(x, c, cout), cout, hw
        if kind == "residual":
            h = self.cbr(x, c, c)
            h = self.bn(self.conv(h, c, c), c)
            return self.relu(self.node("Add", [x, h])[0]), c, hw
        if kind == "depthwise":
            m = int(r.integers(1, 3))
            y = self.relu(self.bn(self.conv(x, c, c * m, 3, group=c), c * m))
            return y, c * m, hw
        if kind == "se":
            mid = max(2, c // 2)
            s = self.node("GlobalAveragePool", [x])[0]
            s = self.relu(self.conv(s, c, mid, 1))
            s = self.node("HardSigmoid", [self.conv(s, mid, c, 1)], alpha=0.2, beta=0.5)[0]
            return self.node("Mul", [x, s])[0], c, hw
        if kind == "concat":
            ca, cb = int(r.integers(2, 6)), int(r.integers(2, 6))
            a = self.cbr(x, c, ca)
            b = self.conv(x, c, cb, 1)
            if r.random() < 0.5:
                return self.node("Concat", [a, b, x], axis=1)[0], ca + cb + c, hw
            return self.node("Concat", [a, b], axis=1)[0], ca + cb, hw
        if kind == "split":
            ca, cb = int(r.integers(2, 6)), int(r.integers(2, 6))
            y = self.cbr(x, c, ca + cb)
            p0, p1 = self.node("Split", [y, self.const("split", np.array([ca, cb], np.int64))], 2, axis=1)
            p0 = self.cbr(p0, ca, ca)
            return self.node("Concat", [p1, p0], axis=1)[0], ca + cb, hw
        if kind == "maxpool":
            if hw < 4:
                return x, c, hw
            return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])[0], c, hw // 2
        raise ValueError(kind)

    def head(self, kind: str, x: str, c: int, hw: int) -> str:
        r = self.rng
        n_out = 5
        if kind == "gap":
            f = self.node("Flatten", [self.node("GlobalAveragePool", [x])[0]], axis=1)[0]
            feat = c
        elif kind == "reshape":
            f = self.node("Reshape", [x, self.const("shape", np.array([1, c * hw * hw], np.int64))])[0]
            feat = c * hw * hw
        else:
            f = self.node("Flatten", [x], axis=1)[0]
            feat = c * hw * hw
        hidden = int(r.integers(4, 9))
        w1 = (r.standard_normal((hidden, feat)) * math.sqrt(2.0 / feat)).astype(np.float32)
        h = self.node("Gemm", [f, self.const("fc", w1), self.const("fcb", np.zeros(hidden, np.float32))],
                      transB=1)[0]
        h = self.relu(h)
        w2 = (r.standard_normal((hidden, n_out)) * math.sqrt(1.0 / hidden)).astype(np.float32)
        return self.node("Gemm", [h, self.const("out", w2)])[0]

    def build(self, blocks: list[str], head: str) -> onnx.ModelProto:
        c0 = int(self.rng.integers(4, 9))
        y = self.cbr("x", self.c_in, c0)
        c, hw = c0, self.hw0
        for kind in blocks:
            y, c, hw = self.block(kind, y, c, hw)
        out = self.head(head, y, c, hw)
        self.nodes[-1].output[0] = "y"
        del out
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.c_in, self.hw0, self.hw0])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def _analysis(model: onnx.ModelProto):
    graph = io.to_graph(model)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return graph, analyse(graph, static_shapes(model, shapes))


def prune_vs_zero(model: onnx.ModelProto, pick, feed: dict) -> tuple[onnx.ModelProto, float, int]:
    """Prune the units chosen by ``pick(cg) -> units`` and compare with zeroing them. Returns (pruned model,
    max abs difference relative to the output scale, number of units removed)."""
    graph, cg = _analysis(model)
    removed = list(pick(cg))
    restore = set(cg.check_removal(removed))
    removed = [u for u in removed if u not in restore]
    base = io.to_model(graph, model)
    zeroed = cg.zeroed_model(base, removed)
    cg.apply(graph, removed)
    graph.cleanup()
    pruned = io.to_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    (yz,), (yp,) = ort_run(zeroed, feed), ort_run(pruned, feed)
    assert yz.shape == yp.shape
    return pruned, float(np.max(np.abs(yz - yp)) / max(1.0, float(np.max(np.abs(yz))))), len(removed)


def _random_pick(seed: int, frac: float):
    def pick(cg):
        rng = np.random.default_rng(seed)
        out = []
        for g in cg.prunable_groups():
            k = min(g.size - 1, int(round(frac * g.size)))
            out += rng.choice(g.units, k, replace=False).tolist() if k > 0 else []
        return out

    return pick


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


# ------------------------------------------------------------------------------------------- property
BLOCKS = ["cbr", "residual", "depthwise", "se", "concat", "split", "maxpool"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
       head=st.sampled_from(["flatten", "gap", "reshape"]),
       seed=st.integers(0, 2**16), frac=st.floats(0.1, 0.9))
def test_pruning_equals_zeroing(blocks, head, seed, frac):
    model = Net(seed).build(blocks, head)
    feed = {"x": np.random.default_rng(seed + 1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    pruned, err, n = prune_vs_zero(model, _random_pick(seed, frac), feed)
    assert err < 1e-4, f"blocks={blocks} head={head}: pruned != zeroed (rel err {err:.2e})"
    if n:
        assert _params(pruned) < _params(model)


# ------------------------------------------------------------------------------------------- rules
def test_digits_groups_residual_and_flatten():
    model = onnx.load(DIGITS)
    groups = describe_groups(model)
    by_producers = {tuple(g["producers"]): g for g in groups}
    res = by_producers[("conv2", "conv3")]  # the residual Add ties conv3's outputs to conv2's
    assert res["prunable"] and res["size"] == 32
    assert {"conv2.weight[0]", "conv3.weight[0]", "conv3.weight[1]", "bn3.running_var[0]", "fc1.weight[1]"} <= set(
        res["members"])
    out = by_producers[("fc2",)]
    assert not out["prunable"] and "graph output" in out["reason"]
    for g in groups:
        assert set(g) >= {"id", "size", "members", "prunable", "reason"}


def test_flatten_maps_channel_to_feature_block():
    model = onnx.load(DIGITS)
    graph, cg = _analysis(model)
    g = next(g for g in cg.groups if g.producers == ["conv2", "conv3"])
    # conv3 output is [N, 32, 4, 4] -> Flatten -> fc1 (512 features): channel c is features c*16 .. c*16+15
    pruned, err, n = prune_vs_zero(model, lambda cg: cg.groups[g.id].units[[0, 5, 31]],
                                   {"image": np.random.default_rng(0).random((1, 1, 8, 8), np.float32)})
    assert err < 1e-5 and n == 3
    fc1 = next(t for t in pruned.graph.initializer if t.name == "fc1.weight")
    assert list(fc1.dims) == [64, 512 - 3 * 16]


def test_connected_components_and_reshape_blocks():
    labels = connected_components(6, np.array([0, 4, 2]), np.array([3, 5, 3]))
    assert labels.tolist() == [0, 1, 0, 0, 2, 2]
    assert reshape_blocks([1, 32, 4, 4], [1, 512]) == [((0,), (0,)), ((1, 2, 3), (1,))]
    assert reshape_blocks([2, 5, 384], [2, 5, 12, 32]) == [((0,), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    assert reshape_blocks([6], [4]) is None


@given(st.integers(0, 12), st.integers(-20, 20), st.integers(-20, 20))
def test_slice_bounds_follow_python_slicing(d, s, e):
    """The clamped [start, end) used for Slice ranges and shape-vector tracing selects what ``x[s:e]`` selects."""
    a, b = clamp_index(s, d), clamp_index(e, d)
    assert 0 <= a <= d and 0 <= b <= d
    assert list(range(d))[s:e] == list(range(a, b))


def test_layout_helpers():
    assert [(int(a), int(b)) for a, b in part_bounds([2, 0, 3])] == [(0, 2), (2, 2), (2, 5)]
    el = np.array([[0, 0, 0], [1, 1, 1]])  # channel per row, repeated along the second axis
    assert not varies_along(el, 1) and varies_along(el, 0)
    lay = simplify(Layout((1, 2), el))
    assert lay.axes == (1,) and lay.el.tolist() == [0, 1]
    wide = expand(np.array([4, 5]), (1,), (0, 1, 2), {0: 2, 1: 2, 2: 3})
    assert wide.shape == (2, 2, 3) and (wide[:, 1, :] == 5).all() and (wide[:, 0, :] == 4).all()


def _model(nodes, inits, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32) / math.sqrt(np.prod(shape[1:]) or 1)


def test_attention_heads_are_units():
    """Q/K/V projections -> [B,T,H,D] -> scores -> context -> [B,T,H*D] -> output projection: a unit is a head."""
    rng = np.random.default_rng(0)
    h, d, e, t = 4, 3, 8, 5
    inits = [numpy_helper.from_array(_w(rng, e, h * d), n) for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(_w(rng, h * d, e), "wo"),
              numpy_helper.from_array(np.array([1, t, h, d], np.int64), "split_heads"),
              numpy_helper.from_array(np.array([1, t, h * d], np.int64), "merge_heads"),
              numpy_helper.from_array(np.array(math.sqrt(d), np.float32), "scale")]
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}p"]),
                  helper.make_node("Reshape", [f"{n}p", "split_heads"], [f"{n}r"])]
    nodes += [helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["s"]),
              helper.make_node("Div", ["s", "scale"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge_heads"], ["cm"]),
              helper.make_node("MatMul", ["cm", "wo"], ["o"]),
              helper.make_node("Add", ["o", "x"], ["y"])]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, e])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, e])])
    _, cg = _analysis(model)
    heads = [g for g in cg.groups if g.prunable]
    assert len(heads) == 1 and heads[0].size == h
    assert {"wq[1]", "wk[1]", "wv[1]", "wo[0]", "split_heads[2]", "merge_heads[2]"} <= set(heads[0].members)
    feed = {"x": rng.standard_normal((1, t, e)).astype(np.float32)}
    pruned, err, n = prune_vs_zero(model, lambda cg: cg.groups[heads[0].id].units[[1, 3]], feed)
    assert err < 1e-5 and n == 2
    shapes = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer}
    assert shapes["split_heads"] == [1, t, h - 2, d] and shapes["merge_heads"] == [1, t, (h - 2) * d]


def test_packed_qkv_heads():
    """One projection for q, k and v: [B,T,3*H*D] -> [B,T,3,H,D] -> [3,B,H,T,D] -> Split -> Squeeze (SVTR, ViT)."""
    rng = np.random.default_rng(9)
    h, d, e, t = 3, 2, 6, 4
    inits = [numpy_helper.from_array(_w(rng, e, 3 * h * d), "wqkv"), numpy_helper.from_array(_w(rng, h * d, e), "wo"),
             numpy_helper.from_array(np.array([1, t, 3, h, d], np.int64), "to5"),
             numpy_helper.from_array(np.array([1, t, h * d], np.int64), "merge"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "to5"], ["r5"]),
             helper.make_node("Transpose", ["r5"], ["t5"], perm=[2, 0, 3, 1, 4]),
             helper.make_node("Split", ["t5"], ["q1", "k1", "v1"], axis=0, num_outputs=3),
             helper.make_node("Squeeze", ["q1", "ax0"], ["q"]),
             helper.make_node("Squeeze", ["k1", "ax0"], ["k"]),
             helper.make_node("Squeeze", ["v1", "ax0"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["c"]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["ct", "merge"], ["cm"]),
             helper.make_node("MatMul", ["cm", "wo"], ["y"])]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, e])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, e])], opset=18)
    _, cg = _analysis(model)
    heads = cg.prunable_groups()
    assert len(heads) == 1 and heads[0].size == h
    feed = {"x": rng.standard_normal((1, t, e)).astype(np.float32)}
    pruned, err, n = prune_vs_zero(model, lambda cg: cg.prunable_groups()[0].units[[1]], feed)
    assert err < 1e-5 and n == 1
    init = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert init["wqkv"].shape == (e, 3 * (h - 1) * d) and init["to5"].tolist() == [1, t, 3, h - 1, d]


def test_ffn_neurons_and_layernorm_block():
    """x -> MatMul -> Add(b) -> Gelu(erf form) -> MatMul -> Add(residual) -> LayerNorm: neurons prunable, the
    hidden size is not (LayerNorm normalises over it)."""
    rng = np.random.default_rng(1)
    e, f = 6, 10
    inits = [numpy_helper.from_array(_w(rng, e, f), "w1"), numpy_helper.from_array(_w(rng, f), "b1"),
             numpy_helper.from_array(_w(rng, f, e), "w2"),
             numpy_helper.from_array(np.ones(e, np.float32), "ln_s"),
             numpy_helper.from_array(np.zeros(e, np.float32), "ln_b"),
             numpy_helper.from_array(np.array(math.sqrt(2), np.float32), "r2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["b1", "h"], ["hb"]),
             helper.make_node("Div", ["hb", "r2"], ["hd"]), helper.make_node("Erf", ["hd"], ["he"]),
             helper.make_node("Add", ["he", "one"], ["h1"]), helper.make_node("Mul", ["hb", "h1"], ["hm"]),
             helper.make_node("Mul", ["hm", "half"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "ln_s", "ln_b"], ["y"], axis=-1)]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, e])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, e])])
    groups = describe_groups(model)
    ffn = next(g for g in groups if "w1[1]" in g["members"])
    assert ffn["prunable"] and ffn["size"] == f and {"b1[0]", "w2[0]"} <= set(ffn["members"])
    hidden = next(g for g in groups if "w2[1]" in g["members"])
    assert not hidden["prunable"]
    feed = {"x": rng.standard_normal((2, 3, e)).astype(np.float32)}
    _, err, n = prune_vs_zero(model, lambda cg: cg.groups[ffn["id"]].units[:4], feed)
    assert err < 1e-5 and n == 4


def _conv_model(extra_nodes, extra_inits, out="y", cout=4, opset=17, extra_inputs=()):
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_w(rng, cout, 3, 3, 3), "w"),
             numpy_helper.from_array(np.zeros(cout, np.float32), "b")] + extra_inits
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv")] + extra_nodes
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])] + list(extra_inputs)
    return _model(nodes, inits, inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, list("nchw"))], opset)


def _conv_group(model):
    groups = describe_groups(model)
    return next(g for g in groups if "w[0]" in g["members"])


def test_unknown_op_blocks_with_reason():
    rng = np.random.default_rng(3)
    model = _conv_model([helper.make_node("LpNormalization", ["c"], ["n"], axis=1),
                         helper.make_node("Conv", ["n", "w2"], ["y"])],
                        [numpy_helper.from_array(_w(rng, 2, 4, 1, 1), "w2")])
    g = _conv_group(model)
    assert not g["prunable"] and "LpNormalization" in g["reason"]


def test_graph_output_and_weight_input_block():
    g = _conv_group(_conv_model([helper.make_node("Relu", ["c"], ["y"])], []))
    assert not g["prunable"] and "graph output" in g["reason"]
    # a Conv whose weight is a graph input: its input channels are fixed, the producer's group says why
    model = _conv_model([helper.make_node("Conv", ["c", "w2"], ["y"])], [],
                        extra_inputs=[helper.make_tensor_value_info("w2", TensorProto.FLOAT, [2, 4, 1, 1])])
    g = _conv_group(model)
    assert not g["prunable"] and "not a constant" in g["reason"]


def test_channel_reductions_block_but_spatial_pass():
    rng = np.random.default_rng(4)
    w2 = numpy_helper.from_array(_w(rng, 2, 4, 1, 1), "w2")
    blocked = _conv_model([helper.make_node("ReduceMean", ["c"], ["m"], axes=[1], keepdims=1),
                           helper.make_node("Mul", ["c", "m"], ["cm"]),
                           helper.make_node("Conv", ["cm", "w2"], ["y"])], [w2], opset=17)
    g = _conv_group(blocked)
    assert not g["prunable"] and "ReduceMean" in g["reason"]
    ok = _conv_model([helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=1),
                      helper.make_node("Mul", ["c", "m"], ["cm"]),
                      helper.make_node("Resize", ["cm", "", "sc"], ["up"], mode="nearest"),
                      helper.make_node("Pad", ["up", "pads"], ["pd"]),
                      helper.make_node("Conv", ["pd", "w2"], ["y"])],
                     [w2, numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
                      numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    assert _conv_group(ok)["prunable"]
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _, err, n = prune_vs_zero(ok, lambda cg: cg.prunable_groups()[0].units[:2], feed)
    assert err < 1e-5 and n == 2


def test_grouped_conv_blocks_depthwise_couples():
    rng = np.random.default_rng(5)
    grouped = _conv_model([helper.make_node("Conv", ["c", "wg"], ["y"], group=2)],
                          [numpy_helper.from_array(_w(rng, 4, 2, 1, 1), "wg")])
    g = _conv_group(grouped)
    assert not g["prunable"] and "group=2" in g["reason"]
    dw = _conv_model([helper.make_node("Conv", ["c", "wd"], ["d"], group=4, pads=[1, 1, 1, 1]),
                      helper.make_node("Conv", ["d", "w2"], ["y"])],
                     [numpy_helper.from_array(_w(rng, 8, 1, 3, 3), "wd"),
                      numpy_helper.from_array(_w(rng, 2, 8, 1, 1), "w2")])
    g = _conv_group(dw)
    assert g["prunable"] and {"w[0]", "wd[0]", "w2[1]"} <= set(g["members"])
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    pruned, err, n = prune_vs_zero(dw, lambda cg: cg.prunable_groups()[0].units[[0, 2]], feed)
    assert err < 1e-5 and n == 2
    dw_node = next(nd for nd in pruned.graph.node if "wd" in nd.input)
    assert helper.get_attribute_value(next(a for a in dw_node.attribute if a.name == "group")) == 2
    wd = next(t for t in pruned.graph.initializer if t.name == "wd")
    assert list(wd.dims) == [4, 1, 3, 3]  # multiplier 2: each removed input channel takes two outputs


def test_concat_slice_offsets():
    """Concat(conv_a, conv_b) -> Slice(channels 3..7) -> Conv: removing channels before the range moves it."""
    rng = np.random.default_rng(6)
    model = _conv_model([helper.make_node("Conv", ["x", "wb"], ["cb"], pads=[1, 1, 1, 1]),
                         helper.make_node("Concat", ["c", "cb"], ["cat"], axis=1),
                         helper.make_node("Slice", ["cat", "st", "en", "ax"], ["sl"]),
                         helper.make_node("Conv", ["sl", "w2"], ["y"])],
                        [numpy_helper.from_array(_w(rng, 4, 3, 3, 3), "wb"),
                         numpy_helper.from_array(np.array([3], np.int64), "st"),
                         numpy_helper.from_array(np.array([7], np.int64), "en"),
                         numpy_helper.from_array(np.array([1], np.int64), "ax"),
                         numpy_helper.from_array(_w(rng, 2, 4, 1, 1), "w2")])
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}

    def pick(cg):
        a = next(g for g in cg.groups if "w[0]" in g.members)
        b = next(g for g in cg.groups if "wb[0]" in g.members)
        return [a.units[0], a.units[3], b.units[1]]

    pruned, err, n = prune_vs_zero(model, pick, feed)
    assert err < 1e-5 and n == 3
    init = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    st_ = next(v for k, v in init.items() if k.startswith("st"))
    en_ = next(v for k, v in init.items() if k.startswith("en"))
    # kept: a1 a2 | b0 b2 b3; the slice was a3 b0 b1 b2 (3..7) and is now b0 b2 (2..4)
    assert st_.tolist() == [2] and en_.tolist() == [4]


def test_reshape_bias_constant_is_folded_and_sliced():
    """paddle2onnx style: Conv without bias + Add(Reshape(bias, [1, C, 1, 1]))."""
    rng = np.random.default_rng(7)
    model = _conv_model([helper.make_node("Reshape", ["bias", "bshape"], ["b4"]),
                         helper.make_node("Add", ["c", "b4"], ["cb"]),
                         helper.make_node("Relu", ["cb"], ["r"]),
                         helper.make_node("Conv", ["r", "w2"], ["y"])],
                        [numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"),
                         numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "bshape"),
                         numpy_helper.from_array(_w(rng, 2, 4, 1, 1), "w2")])
    assert _conv_group(model)["prunable"]
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _, err, n = prune_vs_zero(model, lambda cg: cg.prunable_groups()[0].units[:1], feed)
    assert err < 1e-5 and n == 1


def test_split_sizes_recomputed():
    rng = np.random.default_rng(8)
    model = _conv_model([helper.make_node("Split", ["c", "sp"], ["s0", "s1"], axis=1),
                         helper.make_node("Conv", ["s0", "wa"], ["ya"]),
                         helper.make_node("Conv", ["s1", "wb"], ["yb"]),
                         helper.make_node("Add", ["ya", "yb"], ["y"])],
                        [numpy_helper.from_array(np.array([1, 3], np.int64), "sp"),
                         numpy_helper.from_array(_w(rng, 2, 1, 1, 1), "wa"),
                         numpy_helper.from_array(_w(rng, 2, 3, 1, 1), "wb")])
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    # removing channel 0 would empty the first part: the analysis puts it back
    pruned, err, n = prune_vs_zero(model, lambda cg: cg.prunable_groups()[0].units[[0, 2]], feed)
    assert err < 1e-5 and n == 1
    sizes = [numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer if t.name.startswith("sp")
             or "split" in t.name]
    assert [1, 2] in sizes


@pytest.mark.realmodel
@pytest.mark.parametrize("name,shapes,prunable", [
    ("ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}, 20),
    ("paraphrase-MiniLM-L3-v2.onnx", {"input_ids": (1, 8), "attention_mask": (1, 8)}, 6),
    ("rnet.onnx", {"input_2": (1, 24, 24, 3)}, 4),
])
def test_real_models_have_prunable_groups(name, shapes, prunable):
    path = Path.home() / ".cache" / "onnxcompress" / "files" / name
    if not path.exists():
        pytest.skip(f"{name} is not in the model cache (python -m benchmarks.models fetch)")
    groups = describe_groups(onnx.load(path), shapes)
    assert sum(g["prunable"] for g in groups) >= prunable
    assert all(g["reason"] for g in groups if not g["prunable"])
