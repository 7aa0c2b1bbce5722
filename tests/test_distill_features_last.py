"""distill{mode=train features=... features_at=last}: the tensors after the last weighted node (a transformer's
per-token hidden states before its pooling) are the only feature targets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.distill import Distill

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.blocks import last_boundary  # noqa: E402
from onnxcompress.passes.distill.torch_interpreter import TorchGraph  # noqa: E402
from onnxcompress.passes.distill.train import Trainer  # noqa: E402

T, D = 6, 8


def _pooled(w1: np.ndarray, w2: np.ndarray, pool: bool = True) -> onnx.ModelProto:
    """x [n, T, D] -> MatMul w1 -> Relu -> MatMul w2 = h -> (ReduceMean over tokens) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["h" if pool else "y"])]
    if pool:
        nodes.append(helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0))
    out_shape = ["n", D] if pool else ["n", T, D]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", T, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((D, D)).astype(np.float32), rng.standard_normal((D, D)).astype(np.float32))


def test_last_boundary_is_the_hidden_state_before_pooling():
    model = _pooled(*_weights(0))
    tg = TorchGraph(io.to_graph(model), torch)
    names = {o for n in model.graph.node for o in n.output}
    assert last_boundary(tg, names) == ["h"]
    assert last_boundary(tg, names - {"h"}) == []  # the teacher lacks it: nothing to match
    unpooled = _pooled(*_weights(0), pool=False)
    tg2 = TorchGraph(io.to_graph(unpooled), torch)
    assert last_boundary(tg2, {o for n in unpooled.graph.node for o in n.output}) == []  # it is the output


def test_training_matches_the_last_hidden_state_only():
    teacher, student = _pooled(*_weights(0)), _pooled(*_weights(1))
    x = np.random.default_rng(2).standard_normal((64, 1, T, D)).astype(np.float32)
    feeds = [{"x": xi} for xi in x]
    ctx = PassContext(calibration=load_feeds(feeds, student), seed=0)
    ctx.original_bytes = teacher.SerializeToString()
    stats = {}
    for at in ("last", "blocks"):
        graph = io.to_graph(student)
        opts = replace(Distill(), mode="train", steps=30, lr=1e-2, batch=8, eval_every=10, augment="none",
                       features=1.0, features_at=at, blocks=2)
        tr = Trainer(graph, ctx, student, ctx.original_model(), opts)
        stats[at] = (tr.feature_tensors(), tr.run(feeds))
    assert stats["last"][0] == ["h"] and stats["last"][1]["features"] == 1
    assert stats["last"][1]["heldout_loss_best"] < stats["last"][1]["heldout_loss_start"]
    assert "a" in stats["blocks"][0] or "r" in stats["blocks"][0]  # block boundaries cut earlier too


def test_features_at_is_checked():
    with pytest.raises(ValueError, match="features_at"):
        Distill(features_at="first")
