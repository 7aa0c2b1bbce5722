"""distill{mode=train} on a QDQ graph: fake quantization with a straight-through estimator (``fake_quant``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.distill import Distill
from onnxcompress.passes.quantize import u8s8_saturation as u8s8

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import PassError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.fake_quant import dequantize_linear, quantize_linear  # noqa: E402
from onnxcompress.passes.distill.torch_interpreter import TorchGraph  # noqa: E402
from onnxcompress.passes.distill.train import Trainer  # noqa: E402

from tests.conftest import loss_around_one_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
QUANTIZE = "cleanup,quantize{latency_guard=false}"
FAST = "steps=12 batch=8 eval_every=4 samples=64 lr=1e-3 augment=none"


def _ort(model: onnx.ModelProto, feeds: dict, optimized: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ctx(model: onnx.ModelProto, seed: int = 0) -> PassContext:
    return PassContext(calibration=load_feeds(str(CALIB), model), seed=seed)


def _run(model: onnx.ModelProto, pipeline: str, seed: int = 0):
    return PassManager(parse_pipeline(pipeline)).run(model, _ctx(model, seed))


@pytest.fixture(scope="module")
def digits() -> onnx.ModelProto:
    return onnx.load(DIGITS)


@pytest.fixture(scope="module")
def quantized(digits) -> onnx.ModelProto:
    q = _run(digits, QUANTIZE).model
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    return q


def _trainer(digits, quantized, learn_scales: bool = True, steps: int = 12) -> tuple:
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    graph = io.to_graph(quantized)
    opts = replace(Distill(), mode="train", steps=steps, lr=1e-3, augment="none", eval_every=4,
                   learn_scales=learn_scales)
    return graph, ctx, Trainer(graph, ctx, quantized, ctx.original_model(), opts)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------------------------- ops
def _qdq_model(act: int, per_channel: bool) -> tuple[onnx.ModelProto, dict]:
    """x -> Q/DQ (act type) -> Conv(DQ(int8 W), DQ(int32 b)) -> Q/DQ -> y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3
    sw = (np.abs(w).reshape(6, -1).max(1) / 127).astype(np.float32) if per_channel else \
        np.float32(np.abs(w).max() / 127)
    wq = np.clip(np.rint(w / (sw[:, None, None, None] if per_channel else sw)), -127, 127).astype(np.int8)
    dt, z = (np.uint8, 128) if act == TensorProto.UINT8 else (np.int8, 0)
    sx, sy = np.float32(4.0 / 255), np.float32(12.0 / 255)
    sb = (sx * sw).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    bq = np.rint(b / sb).astype(np.int32)
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in (
        ("sx", sx), ("zx", np.array(z, dt)), ("sy", sy), ("zy", np.array(z, dt)), ("wq", wq), ("sw", sw),
        ("zw", np.zeros(np.shape(sw), np.int8)), ("bq", bq), ("sb", sb),
        ("zb", np.zeros(np.shape(sb), np.int32)))]
    ax = {"axis": 0} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], **ax),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], **ax),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, {"x": (rng.standard_normal((2, 3, 8, 8)) * 1.5).astype(np.float32)}


@pytest.mark.parametrize("act", [TensorProto.UINT8, TensorProto.INT8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_forward_matches_ort(act, per_channel):
    """Per-tensor / per-channel int8 weights, int32 bias, uint8 / int8 activations: the interpreter (trainable
    or not) computes what ORT computes, to one output step on a rounding tie."""
    model, feed = _qdq_model(act, per_channel)
    (ref,) = _ort(model, feed, optimized=False)
    (fused,) = _ort(model, feed)
    step = 12.0 / 255
    for learn in (False, True):
        tg = TorchGraph(io.to_graph(model), torch, learn_scales=learn)
        assert tg.quant_stats["weights"] == 1 and tg.quant_stats["biases"] == 1
        assert tg.quant_stats["scales_learned"] == (2 if learn else 0)
        with torch.no_grad():
            got = tg.forward(feed)["y"].numpy()
        diff = np.abs(got - ref)
        assert diff.max() <= step * 1.01 and np.mean(diff > 1e-6) < 0.01
        if not u8s8.saturates():  # where ORT clamps u8 x s8 product pairs its fused kernel is not the QDQ maths
            assert np.abs(got - fused).max() <= step * 1.01


def test_straight_through_and_lsq_gradients():
    s, z = torch.tensor(0.1, requires_grad=True), torch.tensor(128, dtype=torch.uint8)
    x = torch.tensor([-20.0, -1.234, 0.0, 0.456, 3.0, 20.0], requires_grad=True)
    (q,) = quantize_linear(torch, [x, s, z], {})
    (y,) = dequantize_linear(torch, [q, s, z], {})
    assert q.tolist() == [0.0, 116.0, 128.0, 133.0, 158.0, 255.0]
    y.sum().backward()
    # straight through inside the range [-12.8, 12.7], nothing outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    u = np.array([-1.234, 0.0, 0.456, 3.0]) / 0.1
    lsq = float(np.sum(np.round(u) - u)) + (0 - 128) + (255 - 128)
    assert float(s.grad) == pytest.approx(lsq, abs=1e-4)


def test_integer_range_from_zero_point_type():
    x = torch.linspace(-500, 500, 11)
    for zp, lo, hi in ((np.uint8, 0, 255), (np.int8, -128, 127), (np.int16, -32768, 32767)):
        (q,) = quantize_linear(torch, [x, torch.tensor(1.0), torch.from_numpy(np.array(0, zp))], {})
        assert float(q.min()) == max(lo, -500) and float(q.max()) == min(hi, 500)


# ----------------------------------------------------------------------------------------------- training
def test_one_training_step_lowers_the_loss(digits, quantized):
    graph, ctx, tr = _trainer(digits, quantized)
    assert tr.tg.quant_stats["weights"] >= 4 and tr.tg.quant_stats["biases"] >= 4
    # the Trainer's relative step: lr x each tensor's RMS (an absolute 1e-3 is 10% of an activation scale)
    groups = [{"params": [p], "lr": 1e-3 * float(p.detach().pow(2).mean().sqrt())} for p in tr.tg.parameters()]
    before, after = loss_around_one_step(tr, ctx, groups)
    assert after < before


@pytest.mark.parametrize("learn_scales", [True, False])
def test_written_back_qdq_graph_gives_ort_the_torch_forward(digits, quantized, learn_scales):
    graph, ctx, tr = _trainer(digits, quantized, learn_scales, steps=16)
    stats = tr.run([dict(f) for f in ctx.calibration.take(64)])
    assert stats["improved"] and stats["fake_quant"]["integers_changed"] > 0
    model = ctx.export(graph)
    # the same nodes: a plain QDQ graph, same ops in the same order, same initializer names and types
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == \
        [(n.op_type, list(n.input)) for n in quantized.graph.node]
    before, after = _inits(quantized), _inits(model)
    assert {k: v.dtype for k, v in before.items()} == {k: v.dtype for k, v in after.items()}
    for name, v in after.items():
        if v.dtype == np.int8:
            assert v.min() >= -127 and v.max() <= 127, name  # symmetric int8 weights stay in range
    scales = [i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:2]]
    assert all(np.all(after[s] > 0) for s in scales)
    moved = [s for s in set(scales) if not np.array_equal(before[s], after[s])]
    assert bool(moved) == learn_scales
    if learn_scales:  # every int32 bias scale is s_x * s_w again
        for n in model.graph.node:
            if n.op_type == "Conv" or n.op_type == "Gemm":
                prod = {o: p for p in model.graph.node for o in p.output}
                x_dq, w_dq, b_dq = (prod[n.input[i]] for i in range(3))
                np.testing.assert_allclose(after[b_dq.input[1]], after[x_dq.input[1]] * after[w_dq.input[1]],
                                           rtol=1e-6)
    x = np.load(VAL)["image"][:32]
    with torch.no_grad():
        got = tr.tg.forward({"image": x})[tr.tg.outputs[0]].numpy()
    scale = float(np.abs(got).max())
    for optimized in (False, True):  # DQ -> float op -> Q, and ORT's fused integer kernels
        (out,) = _ort(model, {"image": x}, optimized)
        diff = np.abs(out - got)
        # fake-quant precision: where the float accumulation order tips one activation rounding, that image's
        # logits move by about one step; every other image's logits agree to float precision
        assert diff.max() < 0.02 * scale
        assert np.sum((diff > 1e-4 * scale).any(axis=1)) <= 3


def test_qat_improves_fidelity_same_seed_same_bytes(digits, quantized):
    x = np.load(VAL)["image"]
    (ref,) = _ort(digits, {"image": x})
    a = _run(digits, f"{QUANTIZE},distill{{mode=train {FAST}}}")
    b = _run(digits, f"{QUANTIZE},distill{{mode=train {FAST}}}")
    assert a.model.SerializeToString() == b.model.SerializeToString()

    def err(m):
        (o,) = _ort(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    assert err(a.model) < err(quantized)
    st = next(r.pass_stats for r in a.ledger if r.stage.startswith("distill"))["train"]
    assert st["fake_quant"]["weights"] >= 4 and st["heldout_loss_best"] < st["heldout_loss_start"]


def test_blockwise_trains_a_qdq_graph(digits, quantized):
    res = _run(digits, f"{QUANTIZE},distill{{mode=train blockwise=true blocks=2 {FAST}}}")
    st = next(r.pass_stats for r in res.ledger if r.stage.startswith("distill"))["train"]
    assert st["blocks_trained"] >= 1 and not st["blocks_untrained"]
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in quantized.graph.node]


def test_integer_kernel_graph_is_refused(digits):
    dyn = _run(digits, "cleanup,quantize{mode=dynamic}").model
    ops = {n.op_type for n in dyn.graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    with pytest.raises(PassError, match="QDQ graphs"):
        Distill(mode="train", steps=2).run(io.to_graph(dyn), ctx)


def _clip_pool_model() -> tuple[onnx.ModelProto, dict]:
    """x -> Q/DQ -> Conv -> Clip(0, 6) -> Q/DQ (s1) -> MaxPool -> Q/DQ (s2, a separate constant equal to s1) ->
    Conv -> y: what ``quantize`` writes for ReLU6 and a pooled tensor."""
    rng = np.random.default_rng(1)
    s1 = np.float32(6.0 * (1 - 1e-6) / 255)
    consts = {"sx": np.float32(4.0 / 255), "zx": np.array(128, np.uint8), "s1": s1, "z1": np.array(0, np.uint8),
              "s2": s1.copy(), "z2": np.array(0, np.uint8), "sw": np.full(4, 0.01, np.float32),
              "zw": np.zeros(4, np.int8), "w1": rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
              "w2": rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8), "sw2": np.full(4, 0.01, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w1", "sw", "zw"], ["w1d"], axis=0),
             helper.make_node("Conv", ["xd", "w1d"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("QuantizeLinear", ["r1", "s1", "z1"], ["r1q"]),
             helper.make_node("DequantizeLinear", ["r1q", "s1", "z1"], ["r1d"]),
             helper.make_node("MaxPool", ["r1d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["p", "s2", "z2"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s2", "z2"], ["pd"]),
             helper.make_node("DequantizeLinear", ["w2", "sw2", "zw"], ["w2d"], axis=0),
             helper.make_node("Conv", ["pd", "w2d"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    g = helper.make_graph(nodes, "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}


def _fused_ops(model: onnx.ModelProto, tmp_path: Path, name: str) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_learned_scales_keep_ort_integer_kernels(tmp_path):
    """Scales shared across MaxPool train as one, and a scale after Clip(0, 6) cannot grow past 6 / 255: however
    the parameters move, ORT still folds the Clip and runs MaxPool on integers (the same fused graph)."""
    model, feed = _clip_pool_model()
    graph = io.to_graph(model)
    tg = TorchGraph(graph, torch, learn_scales=True)
    st = tg.quant_stats
    assert st["scales_learned"] == 2 and st["scales_tied"] == 1 and st["scales_capped_by_clip"] == 1
    with torch.no_grad():
        for w in tg.weights.values():
            if w.param is not None and w.name in ("sx", "s1", "s2"):
                w.param.mul_(1.5)
    tg.write_back()
    trained = io.to_model(graph, model)
    got = _inits(trained)
    assert got["s1"] == got["s2"] and 255 * float(got["s1"]) <= 6.0 and float(got["sx"]) == pytest.approx(6.0 / 255)
    assert _fused_ops(trained, tmp_path, "trained") == _fused_ops(model, tmp_path, "start")
    with torch.no_grad():
        out = tg.forward(feed)["y"].numpy()
    (ref,) = _ort(trained, feed, optimized=False)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
