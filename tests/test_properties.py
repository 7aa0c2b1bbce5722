"""Property tests over generated valid graphs, for every registered pass (discovered from the registry).

Graphs: an image input [1, C, 6, 6] through a random stack of blocks (Conv, BatchNormalization, activations,
residual Add, Concat of two branches, Split + Concat), then a Flatten -> Gemm head or a ReduceMean -> MatMul head,
optionally the head inside an If whose condition depends on the input (each branch its own weights, one of them
reading an outer-scope weight). Weights are drawn from a seed.

- exact passes: outputs unchanged under onnxruntime (max-abs <= 1e-4 x the output scale, on feeds taking both If
  branches) and idempotent (a second run changes nothing: same ops, same weights);
- lossy passes (with calibration feeds): the result passes onnx.checker's full check, loads and runs in
  onnxruntime, and keeps the output names, element types and ranks.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress
from onnxcompress.pass_base import registered_passes
from tests.conftest import ort_run

BLOCKS = ["conv", "bn", "relu", "sigmoid", "leaky", "residual", "concat", "split"]
HW = 6


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def weight(self, shape, scale=None) -> str:
        name = self.name("w")
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * s).astype(np.float32), name))
        return name

    def node(self, op, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout) -> str:
        return self.node("Conv", [x, self.weight((cout, cin, 3, 3)), self.weight((cout,), 0.1)], pads=[1, 1, 1, 1])


def build_model(blocks: list[str], channels: int, head: str, with_if: bool, seed: int) -> onnx.ModelProto:
    b = _Builder(seed)
    x, c = "image", 3
    x = b.conv(x, c, channels)
    c = channels
    for blk in blocks:
        if blk == "conv":
            x = b.conv(x, c, c)
        elif blk == "bn":
            scale = numpy_helper.from_array((1 + 0.1 * b.rng.standard_normal(c)).astype(np.float32), b.name("g"))
            var = numpy_helper.from_array((0.5 + b.rng.random(c)).astype(np.float32), b.name("v"))
            b.inits += [scale, var]
            x = b.node("BatchNormalization", [x, scale.name, b.weight((c,), 0.1), b.weight((c,), 0.1), var.name])
        elif blk == "relu":
            x = b.node("Relu", [x])
        elif blk == "sigmoid":
            x = b.node("Sigmoid", [x])
        elif blk == "leaky":
            x = b.node("LeakyRelu", [x], alpha=0.1)
        elif blk == "residual":
            x = b.node("Add", [x, b.node("Relu", [b.conv(x, c, c)])])
        elif blk == "concat":
            x = b.node("Concat", [b.node("Relu", [b.conv(x, c, c)]), b.conv(x, c, c)], axis=1)
            x = b.conv(x, 2 * c, c)
        elif blk == "split":
            half = c // 2
            split = b.name("split_sizes")
            b.inits.append(numpy_helper.from_array(np.array([half, c - half], np.int64), split))
            lo, hi = b.name("lo"), b.name("hi")
            b.nodes.append(helper.make_node("Split", [x, split], [lo, hi], axis=1, name=b.name("split")))
            x = b.node("Concat", [b.node("Relu", [lo]), b.node("Sigmoid", [hi])], axis=1)

    def head_nodes(hb: _Builder, x_in: str) -> str:
        if head == "gemm":
            flat = hb.node("Flatten", [x_in])
            return hb.node("Gemm", [flat, hb.weight((10, c * HW * HW)), hb.weight((10,), 0.1)], transB=1)
        pooled = hb.node("ReduceMean", [x_in], axes=[2, 3], keepdims=0)
        return hb.node("MatMul", [pooled, hb.weight((c, 10))])

    if with_if:
        then_b, else_b = _Builder(seed + 1), _Builder(seed + 2)
        then_b.n, else_b.n = 1000, 2000
        t_out = head_nodes(then_b, x)
        e_out = head_nodes(else_b, x)
        # the else branch also reads an outer-scope weight of the main graph
        e_out = else_b.node("Add", [e_out, b.weight((10,), 0.1)])
        then_g = helper.make_graph(then_b.nodes, "then", [], [helper.make_tensor_value_info(t_out, TensorProto.FLOAT,
                                                                                          [1, 10])], then_b.inits)
        else_g = helper.make_graph(else_b.nodes, "else", [], [helper.make_tensor_value_info(e_out, TensorProto.FLOAT,
                                                                                          [1, 10])], else_b.inits)
        zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
        b.inits.append(zero)
        cond = b.node("Greater", [b.node("ReduceSum", ["image"], keepdims=0), "zero"])
        b.nodes.append(helper.make_node("If", [cond], ["logits"], name="head_if", then_branch=then_g,
                                        else_branch=else_g))
    else:
        out = head_nodes(b, x)
        b.nodes[-1].output[0] = "logits"
        del out
    graph = helper.make_graph(b.nodes, "generated", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                   [1, 3, HW, HW])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


models = st.builds(build_model, blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
                   channels=st.sampled_from([4, 8, 16]), head=st.sampled_from(["gemm", "matmul"]),
                   with_if=st.booleans(), seed=st.integers(0, 2**16))


def feeds(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Half the feeds with a positive sum, half negative: both If branches run."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = np.abs(rng.standard_normal((1, 3, HW, HW))).astype(np.float32)
        out.append({"image": x if i % 2 == 0 else -x})
    return out


def fingerprint(model: onnx.ModelProto) -> str:
    """Ops (all graphs, in order) and weight contents: equal fingerprints mean nothing changed that matters."""
    h = hashlib.sha256()

    def visit(g: onnx.GraphProto) -> None:
        for t in sorted(g.initializer, key=lambda t: t.name):
            h.update(numpy_helper.to_array(t).tobytes())
        for node in g.node:
            h.update(node.op_type.encode())
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)

    visit(model.graph)
    return h.hexdigest()


def _signature(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    return [(o.name, o.type.tensor_type.elem_type, len(o.type.tensor_type.shape.dim)) for o in model.graph.output]


EXACT = [n for n, c in registered_passes().items() if c.exact and not n.startswith("test-")]  # product passes only
LOSSY = [n for n, c in registered_passes().items() if not c.exact and not n.startswith("test-")]
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", EXACT)
@SETTINGS
@given(model=models)
def test_exact_pass_keeps_outputs_and_is_idempotent(name, model):
    cls = registered_passes()[name]
    fs = feeds()
    once = compress(model, [cls()], calibration=fs, validation=fs).model
    onnx.checker.check_model(once, full_check=True)
    for f in fs:
        want, got = ort_run(model, f)[0], ort_run(once, f)[0]
        scale = max(float(np.abs(want).max()), 1e-3)
        assert float(np.abs(got - want).max()) <= 1e-4 * scale
    twice = compress(once, [cls()], calibration=fs, validation=fs).model
    assert fingerprint(twice) == fingerprint(once), f"{name} is not idempotent"
    assert _signature(twice) == _signature(model)


@pytest.mark.parametrize("name", LOSSY)
@SETTINGS
@given(model=models)
def test_lossy_pass_result_is_a_valid_model(name, model):
    cls = registered_passes()[name]
    fs = feeds()
    out = compress(model, [cls()], calibration=fs, validation=fs, validate=False).model
    onnx.checker.check_model(out, full_check=True)
    assert _signature(out) == _signature(model)
    for f in fs[:2]:
        y = ort_run(out, f)[0]
        assert y.shape == (1, 10) and y.dtype == np.float32
