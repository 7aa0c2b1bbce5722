"""Removable-unit analysis (onnxcompress.analyses.blocks): exact units on hand-built residual, pre-LN and post-LN
transformer graphs, none on a plain chain, stages on a same-shape chain, no-op rules; bypass = the skip path under
ORT. The builders here (seeded) are shared with test_prune_layers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.analyses.blocks import describe_units
from onnxcompress.analyses.blocks_graph import bypass_graph, bypass_model
from tests.conftest import ort_run


class Builder:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def w(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def rand(self, name: str, *shape: int, scale: float = 1.0) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return self.w(name, (self.rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32))

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.k += 1
        out = out or f"{op.lower()}{self.k}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def residual_cnn(scales=(1.0, 1.0), c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> conv0(3->c) relu = h0; per block i: h_{i+1} = relu(h_i + s_i * conv_b(relu(conv_a(h_i))));
    GAP -> Flatten -> Gemm(c->5)."""
    b = Builder(seed)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand("w0", c, 3, 3, 3), b.rand("b0", c)], "c0", pads=[1, 1, 1, 1])],
             "h0")
    for i, s in enumerate(scales):
        a = b.op("Relu", [b.op("Conv", [h, b.rand(f"wa{i}", c, c, 3, 3), b.rand(f"ba{i}", c)], f"ca{i}",
                               pads=[1, 1, 1, 1])], f"ra{i}")
        f = b.op("Conv", [a, b.rand(f"wb{i}", c, c, 3, 3, scale=s), b.w(f"bb{i}", np.zeros(c, np.float32))],
                 f"cb{i}", pads=[1, 1, 1, 1])
        h = b.op("Relu", [b.op("Add", [h, f], f"add{i}")], f"h{i + 1}")
    p = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    b.op("Gemm", [p, b.rand("wfc", 5, c), b.rand("bfc", 5)], "y", transB=1)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])


def plain_chain(same: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu layers; channels 3->8->16 (``same``: 8->8->8 after the first)."""
    b = Builder(seed)
    h = "x"
    chans = [3, 8, 8, 8] if same else [3, 8, 16]
    for i in range(len(chans) - 1):
        ci, co = chans[i], chans[i + 1]
        conv = b.op("Conv", [h, b.rand(f"w{i}", co, ci, 3, 3)], f"c{i}", pads=[1, 1, 1, 1])
        bn = b.op("BatchNormalization", [conv, b.w(f"g{i}", np.ones(co, np.float32)),
                                         b.w(f"be{i}", np.zeros(co, np.float32)),
                                         b.w(f"m{i}", np.zeros(co, np.float32)),
                                         b.w(f"v{i}", np.ones(co, np.float32))], f"bn{i}")
        h = b.op("Relu", [bn], f"r{i}")
    b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "y")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, chans[-1]])])


def _attention(b: Builder, x: str, d: int, i: int) -> str:
    q = b.op("MatMul", [x, b.rand(f"wq{i}", d, d)], f"q{i}")
    k = b.op("MatMul", [x, b.rand(f"wk{i}", d, d)], f"k{i}")
    v = b.op("MatMul", [x, b.rand(f"wv{i}", d, d)], f"v{i}")
    s = b.op("MatMul", [q, b.op("Transpose", [k], f"kt{i}", perm=[0, 2, 1])], f"s{i}")
    p = b.op("Softmax", [b.op("Mul", [s, b.w(f"scale{i}", np.float32(1 / np.sqrt(d)))], f"ss{i}")], f"p{i}",
             axis=-1)
    ctx = b.op("MatMul", [p, v], f"ctx{i}")
    return b.op("MatMul", [ctx, b.rand(f"wo{i}", d, d)], f"o{i}")


def _ffn(b: Builder, x: str, d: int, i: int) -> str:
    h = b.op("Add", [b.op("MatMul", [x, b.rand(f"w1_{i}", d, 4 * d)], f"f1{i}"), b.rand(f"b1_{i}", 4 * d)],
             f"f1b{i}")
    h = b.op("Relu", [h], f"fr{i}")
    return b.op("Add", [b.op("MatMul", [h, b.rand(f"w2_{i}", 4 * d, d)], f"f2{i}"), b.rand(f"b2_{i}", d)],
                f"f2b{i}")


def _ln(b: Builder, x: str, d: int, name: str, decomposed: bool = False) -> str:
    if decomposed:  # ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, as older exporters write it
        dev = b.op("Sub", [x, b.op("ReduceMean", [x], f"{name}_mu", axes=[-1])], f"{name}_d")
        var = b.op("ReduceMean", [b.op("Pow", [dev, b.w(f"{name}_two", np.float32(2))], f"{name}_sq")],
                   f"{name}_var", axes=[-1])
        std = b.op("Sqrt", [b.op("Add", [var, b.w(f"{name}_eps", np.float32(1e-5))], f"{name}_ve")], f"{name}_sd")
        scaled = b.op("Mul", [b.op("Div", [dev, std], f"{name}_n"), b.rand(f"{name}_g", d)], f"{name}_ng")
        return b.op("Add", [scaled, b.rand(f"{name}_b", d)], name)
    return b.op("LayerNormalization", [x, b.w(f"{name}_g", np.ones(d, np.float32)),
                                       b.w(f"{name}_b", np.zeros(d, np.float32))], name, axis=-1)


def transformer(post_ln: bool, layers: int = 2, d: int = 16, t: int = 6, seed: int = 0,
                decomposed: bool = False) -> onnx.ModelProto:
    """Encoder layers over x[1,t,d]. pre-LN: h = x + Attn(LN(x)); y = h + FFN(LN(h)) (final LN at the end).
    post-LN (BERT): h = LN(x + Attn(x)); y = LN(h + FFN(h))."""
    b = Builder(seed)
    x = "x"
    for i in range(layers):
        if post_ln:
            h = _ln(b, b.op("Add", [x, _attention(b, x, d, i)], f"ares{i}"), d, f"ln_a{i}", decomposed)
            x = _ln(b, b.op("Add", [h, _ffn(b, h, d, i)], f"fres{i}"), d, f"ln_f{i}", decomposed)
        else:
            h = b.op("Add", [x, _attention(b, _ln(b, x, d, f"ln_a{i}"), d, i)], f"ares{i}")
            x = b.op("Add", [h, _ffn(b, _ln(b, h, d, f"ln_f{i}"), d, i)], f"fres{i}")
    if not post_ln:
        x = _ln(b, x, d, "ln_final")
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, d])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, d])])


def noop_model(seed: int = 0) -> onnx.ModelProto:
    """conv -> every no-op rule in a row -> Flatten -> identity Gemm -> Add 0 -> y."""
    b = Builder(seed)
    c = 4
    h = b.op("Conv", ["x", b.rand("w0", c, 3, 3, 3)], "c0", pads=[1, 1, 1, 1])
    eye1 = np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)
    h = b.op("Conv", [h, b.w("id1", eye1)], "idconv1")
    eye3 = np.zeros((c, c, 3, 3), np.float32)
    eye3[:, :, 1, 1] = np.eye(c)
    h = b.op("Conv", [h, b.w("id3", eye3), b.w("id3b", np.zeros(c, np.float32))], "idconv3", pads=[1, 1, 1, 1])
    h = b.op("Transpose", [b.op("Transpose", [h], "t1", perm=[0, 2, 3, 1])], "t2", perm=[0, 3, 1, 2])
    h = b.op("Cast", [h], "cast", to=TensorProto.FLOAT)
    h = b.op("Mul", [h, b.w("one", np.ones((1, c, 1, 1), np.float32))], "mul1")
    h = b.op("Pad", [h, b.w("pads0", np.zeros(8, np.int64))], "pad0")
    h = b.op("Reshape", [b.op("Reshape", [h, b.w("s1", np.array([1, c, 64], np.int64))], "rs1"),
                         b.w("s2", np.array([1, c, 8, 8], np.int64))], "rs2")
    h = b.op("Relu", [h], "relu")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    h = b.op("Gemm", [h, b.w("eye", np.eye(c, dtype=np.float32))], "idgemm", transB=1)
    b.op("Add", [h, b.w("zero", np.zeros(c, np.float32))], "y")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c])])


# ------------------------------------------------------------------------------------------------------ tests
def _units(model, shapes=None):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return [u for u in describe_units(m, shapes) if u["removable"]]


def _keys(units):
    return {(u["kind"], u["entry"], u["exit"]) for u in units}


def test_residual_cnn_units_exact():
    units = _units(residual_cnn())
    assert _keys(units) == {
        ("residual", "h0", "add0"), ("stage", "h0", "ra0"),
        ("residual", "h1", "add1"), ("stage", "h1", "ra1"),
    }
    res = {u["exit"]: u for u in units if u["kind"] == "residual"}
    assert sorted(res["add0"]["nodes"]) == ["n_add0", "n_ca0", "n_cb0", "n_ra0"]
    assert res["add0"]["params"] == 2 * (8 * 8 * 9 + 8) and res["add0"]["role"] == "block"


def test_plain_chain_has_no_unit():
    assert _units(plain_chain()) == []


def test_same_shape_chain_gives_stages():
    units = _units(plain_chain(same=True))
    # the first layer changes 3 -> 8 channels; each later Conv-BN-Relu maps 8 -> 8
    assert _keys(units) == {("stage", "r0", "r1"), ("stage", "r1", "r2")}
    assert all(u["ops"] == {"Conv": 1, "BatchNormalization": 1, "Relu": 1} for u in units)


def test_pre_ln_transformer_units_exact():
    units = _units(transformer(post_ln=False))
    assert _keys(units) == {
        ("transformer", "x", "fres0"), ("attention", "x", "ares0"), ("ffn", "ares0", "fres0"),
        ("transformer", "fres0", "fres1"), ("attention", "fres0", "ares1"), ("ffn", "ares1", "fres1"),
    }
    by = {(u["kind"], u["exit"]): u for u in units}
    layer = by[("transformer", "fres0")]
    assert layer["role"] == "pre-LN"
    assert by[("attention", "ares0")]["parent"] == layer["id"] == by[("ffn", "fres0")]["parent"]
    assert layer["params"] == 4 * 16 * 16 + 2 * 16 * 64 + 64 + 16 + 2 * 2 * 16 + 1  # + LN g/b + the scale


def test_post_ln_transformer_units_exact():
    units = _units(transformer(post_ln=True))
    assert _keys(units) == {
        ("transformer", "x", "ln_f0"), ("attention", "x", "ares0"), ("ffn", "ln_a0", "fres0"),
        ("transformer", "ln_f0", "y"), ("attention", "ln_f0", "ares1"), ("ffn", "ln_a1", "fres1"),
    }
    assert {u["role"] for u in units if u["kind"] == "transformer"} == {"post-LN"}


def test_post_ln_with_decomposed_layernorm():
    """The normalisation tail is found by where the paths meet again, not by the op name."""
    units = _units(transformer(post_ln=True, decomposed=True))
    assert _keys(units) == {
        ("transformer", "x", "ln_f0"), ("attention", "x", "ares0"), ("ffn", "ln_a0", "fres0"),
        ("transformer", "ln_f0", "y"), ("attention", "ln_f0", "ares1"), ("ffn", "ln_a1", "fres1"),
    }


def test_noop_rules_found_by_value():
    units = _units(noop_model())
    rules = sorted(u["role"] for u in units if u["kind"] == "noop")
    assert rules == sorted(["identity_conv", "identity_conv", "transpose_pair", "same_cast", "mul_one", "zero_pad",
                            "reshape_round_trip", "identity_gemm", "add_zero"])
    assert all(u["exact"] for u in units if u["kind"] == "noop")


def test_noop_view_rule_needs_static_inputs():
    m = noop_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    rules = [u["role"] for u in _units(m, {"x": (1, 3, 8, 8)}) if u["kind"] == "noop"]
    assert "reshape_round_trip" not in rules and "transpose_pair" in rules


def test_rejected_candidates_carry_reasons():
    b = Builder(1)
    a = b.op("Conv", ["x", b.rand("wa", 4, 3, 1, 1)], "a")
    c = b.op("Conv", ["x", b.rand("wc", 4, 3, 1, 1)], "c")
    d = b.op("Conv", ["x", b.rand("wd", 8, 3, 1, 1)], "d")
    s = b.op("Add", [a, c], "parallel")
    b.op("Concat", [b.op("Add", [b.op("Concat", [s, s], "cc", axis=1), d], "broadcastless")], "y", axis=1)
    m = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])])
    info = describe_units(m)
    assert not [u for u in info if u["removable"] and u["kind"] == "residual"]
    reasons = {u["where"]: u["reason"] for u in info if not u["removable"]}
    assert "parallel branches" in reasons["parallel"]


@pytest.mark.parametrize("which", ["residual", "pre", "post"])
def test_bypass_is_the_skip_path(which):
    """Bypassing a residual unit gives exactly the model whose branch output is zero (last weight zeroed)."""
    if which == "residual":
        model, pair, zero = residual_cnn(), ("h0", "add0"), ["wb0"]
        feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    else:
        model = transformer(post_ln=which == "post")
        pair, zero = ("x", "ares0") if which == "pre" else ("ln_f0", "ares1"), ["wo0" if which == "pre" else "wo1"]
        feed = {"x": np.random.default_rng(3).standard_normal((1, 6, 16)).astype(np.float32)}
    g = io.to_graph(model)
    assert bypass_graph(g, [pair]) == 1
    bypassed = io.to_model(g, model)
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name in zero:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    out_b, out_z = ort_run(bypassed, feed), ort_run(zeroed, feed)
    np.testing.assert_allclose(out_b[0], out_z[0], rtol=1e-5, atol=1e-6)
    assert len(bypassed.graph.node) < len(model.graph.node)
    assert not {n.name for n in bypassed.graph.initializer} & set(zero)
    # the proto-level bypass of the trials agrees
    np.testing.assert_allclose(ort_run(bypass_model(model, [pair]), feed)[0], out_b[0], rtol=1e-6, atol=1e-7)


def test_dead_set_is_local_and_linear():
    """A 40-block residual chain: every block found, each unit holds only its own 4 nodes."""
    model = residual_cnn(scales=(0.5,) * 40, c=4)
    units = [u for u in _units(model) if u["kind"] == "residual"]
    assert len(units) == 40 and all(len(u["nodes"]) == 4 for u in units)


CACHE = __import__("pathlib").Path.home() / ".cache" / "onnxcompress" / "files"


@pytest.mark.realmodel
@pytest.mark.parametrize("file, shapes, expect", [
    ("paraphrase-MiniLM-L3-v2.onnx", {"input_ids": (1, 16), "attention_mask": (1, 16)},
     {"transformer": 3, "attention": 3, "ffn": 3}),
    ("ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 320)}, {"transformer": 2, "attention": 2, "ffn": 2}),
    ("320n.onnx", {"images": (1, 3, 320, 320)}, {"residual": 6}),
])
def test_real_models_units(file, shapes, expect):
    """BERT (post-LN), SVTR (pre-LN, decomposed LayerNorm) and YOLOv8 C2f bottlenecks are found as units."""
    path = CACHE / file
    if not path.exists():
        pytest.skip(f"{file} not in the model cache (python -m benchmarks.models fetch)")
    units = _units(onnx.load(path), shapes)
    for kind, n in expect.items():
        assert sum(u["kind"] == kind for u in units) == n, kind
    assert {u["role"] for u in units if u["kind"] == "transformer"} <= {"pre-LN", "post-LN"}
