"""distill{mode=train}: the ONNX->torch interpreter against onnxruntime, and training on the ONNX graph."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.distill import Distill

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import PassError
from onnxcompress.manager import PassManager
from onnxcompress.pass_base import Pass, PassResult, option, register
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import loss_around_one_step, ort_run

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.torch_interpreter import TorchGraph  # noqa: E402
from onnxcompress.passes.distill.train import Trainer  # noqa: E402
from onnxcompress.passes.distill.train_losses import loss_kinds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
F = TensorProto.FLOAT
I64 = TensorProto.INT64


# ----------------------------------------------------------------------------------------------- interpreter
def _node_model(op: str, inputs: list[np.ndarray | None], attrs: dict | None = None, opset: int = 17,
                n_out: int = 1, consts: tuple[int, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """One ``op`` node; inputs at positions in ``consts`` are initializers, the others graph inputs."""
    names, graph_inputs, inits, feed = [], [], [], {}
    for i, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in consts:
            inits.append(numpy_helper.from_array(a, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                              a.shape))
            feed[name] = a
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    graph = helper.make_graph([node], "g", graph_inputs, [onnx.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feed


R = np.random.default_rng(0)


def _f(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _i(*values):
    return np.array(values, dtype=np.int64)


CASES = {
    "conv_asym_pads_group": ("Conv", [_f(1, 4, 9, 8), _f(6, 2, 3, 3), _f(6)],
                             {"pads": [0, 1, 2, 1], "strides": [2, 1], "group": 2}, 17, (1, 2)),
    "conv_same_upper_dilated": ("Conv", [_f(1, 3, 10, 10), _f(4, 3, 3, 3)],
                                {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 17, (1,)),
    "conv_dilation": ("Conv", [_f(1, 3, 10, 10), _f(4, 3, 3, 3)], {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
                      17, (1,)),
    "conv_1d": ("Conv", [_f(1, 3, 12), _f(4, 3, 3)], {"pads": [1, 1]}, 17, (1,)),
    "conv_transpose": ("ConvTranspose", [_f(1, 4, 5, 5), _f(4, 3, 3, 3), _f(3)],
                       {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, 17, (1, 2)),
    "gemm": ("Gemm", [_f(3, 5), _f(4, 5), _f(4)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 17, (1, 2)),
    "matmul": ("MatMul", [_f(2, 3, 5), _f(5, 4)], {}, 17, (1,)),
    "add": ("Add", [_f(2, 3, 4), _f(4)], {}, 17, (1,)),
    "sub": ("Sub", [_f(2, 3), _f(2, 3)], {}, 17, ()),
    "mul": ("Mul", [_f(2, 3, 4), _f(3, 1)], {}, 17, (1,)),
    "div": ("Div", [_f(2, 3), np.abs(_f(2, 3)) + 1], {}, 17, ()),
    "pow": ("Pow", [np.abs(_f(2, 3)), np.array(2.0, np.float32)], {}, 17, (1,)),
    "relu": ("Relu", [_f(2, 5)], {}, 17, ()),
    "sigmoid": ("Sigmoid", [_f(2, 5)], {}, 17, ()),
    "tanh": ("Tanh", [_f(2, 5)], {}, 17, ()),
    "hardsigmoid": ("HardSigmoid", [_f(2, 5) * 4], {"alpha": 0.1667, "beta": 0.5}, 17, ()),
    "hardswish": ("HardSwish", [_f(2, 5) * 4], {}, 17, ()),
    "leakyrelu": ("LeakyRelu", [_f(2, 5)], {"alpha": 0.1}, 17, ()),
    "prelu": ("PRelu", [_f(1, 3, 4, 4), _f(3, 1, 1)], {}, 17, (1,)),
    "gelu": ("Gelu", [_f(2, 5)], {}, 20, ()),
    "erf": ("Erf", [_f(2, 5)], {}, 17, ()),
    "sqrt_exp_log": ("Sqrt", [np.abs(_f(2, 5))], {}, 17, ()),
    "exp": ("Exp", [_f(2, 5)], {}, 17, ()),
    "log": ("Log", [np.abs(_f(2, 5)) + 0.1], {}, 17, ()),
    "reciprocal": ("Reciprocal", [np.abs(_f(2, 5)) + 0.1], {}, 17, ()),
    "clip_inputs": ("Clip", [_f(2, 5) * 8, np.array(0, np.float32), np.array(6, np.float32)], {}, 17, (1, 2)),
    "batchnorm": ("BatchNormalization", [_f(2, 3, 4, 4), _f(3), _f(3), _f(3), np.abs(_f(3)) + 0.5],
                  {"epsilon": 1e-3}, 17, (1, 2, 3, 4)),
    "layernorm": ("LayerNormalization", [_f(2, 5, 8), _f(8), _f(8)], {"axis": -1}, 17, (1, 2)),
    "softmax": ("Softmax", [_f(2, 3, 7)], {"axis": 1}, 17, ()),
    "logsoftmax": ("LogSoftmax", [_f(2, 7)], {}, 17, ()),
    "reducemean_attr": ("ReduceMean", [_f(2, 3, 4)], {"axes": [-1], "keepdims": 1}, 13, ()),
    "reducemean_input": ("ReduceMean", [_f(2, 3, 4), _i(1)], {"keepdims": 0}, 18, (1,)),
    "reducesum": ("ReduceSum", [_f(2, 3, 4), _i(0, 2)], {}, 13, (1,)),
    "reducemax": ("ReduceMax", [_f(2, 3, 4)], {"axes": [1]}, 13, ()),
    "reshape": ("Reshape", [_f(2, 3, 4), _i(0, -1)], {}, 17, (1,)),
    "transpose": ("Transpose", [_f(2, 3, 4)], {"perm": [2, 0, 1]}, 17, ()),
    "flatten": ("Flatten", [_f(2, 3, 4)], {"axis": 2}, 17, ()),
    "slice_neg_step": ("Slice", [_f(5, 6), _i(-1, 4), _i(-100, 1), _i(0, 1), _i(-2, -1)], {}, 17, (1, 2, 3, 4)),
    "slice": ("Slice", [_f(5, 6), _i(1), _i(1000), _i(1)], {}, 17, (1, 2, 3)),
    "gather": ("Gather", [_f(4, 5), _i(-1, 0, 2)], {"axis": 1}, 17, (1,)),
    "gather_scalar": ("Gather", [_f(4, 5), np.array(2, np.int64)], {"axis": 0}, 17, (1,)),
    "gathernd": ("GatherND", [_f(4, 5, 3), np.array([[0, 1], [3, -1], [2, 2]], np.int64)], {}, 17, (1,)),
    "gathernd_batch": ("GatherND", [_f(2, 5, 3), np.array([[[4], [0]], [[1], [-2]]], np.int64)],
                       {"batch_dims": 1}, 17, (1,)),
    "squeeze": ("Squeeze", [_f(2, 1, 3, 1), _i(1, 3)], {}, 17, (1,)),
    "unsqueeze": ("Unsqueeze", [_f(2, 3), _i(0, -1)], {}, 17, (1,)),
    "unsqueeze_attr": ("Unsqueeze", [_f(2, 3)], {"axes": [1]}, 11, ()),
    "resize_nearest": ("Resize", [_f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)],
                       {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                       17, (2,)),
    "resize_linear": ("Resize", [_f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)],
                      {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, 17, (2,)),
    "resize_align": ("Resize", [_f(1, 2, 3, 4), None, None, _i(1, 2, 7, 5)],
                     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 17, (3,)),
    "pad_constant": ("Pad", [_f(1, 2, 3, 4), _i(0, 0, 1, 2, 0, 0, 2, 0), np.array(0.5, np.float32)], {}, 17,
                     (1, 2)),
    "pad_reflect": ("Pad", [_f(1, 2, 4, 5), _i(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}, 17, (1,)),
    "pad_edge": ("Pad", [_f(1, 2, 4, 5), _i(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}, 17, (1,)),
    "maxpool_ceil": ("MaxPool", [_f(1, 2, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 17,
                     ()),
    "maxpool_same": ("MaxPool", [_f(1, 2, 8, 8)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                                   "auto_pad": "SAME_UPPER"}, 17, ()),
    "maxpool_pads": ("MaxPool", [_f(1, 2, 8, 8)], {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]}, 17, ()),
    "avgpool": ("AveragePool", [_f(1, 2, 7, 7)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                  "count_include_pad": 0}, 17, ()),
    "avgpool_incl": ("AveragePool", [_f(1, 2, 7, 7)], {"kernel_shape": [2, 2], "strides": [2, 2]}, 17, ()),
    "globalavgpool": ("GlobalAveragePool", [_f(1, 3, 5, 4)], {}, 17, ()),
    "expand": ("Expand", [_f(3, 1), _i(2, 3, 4)], {}, 17, (1,)),
    "where": ("Where", [R.random((2, 3)) > 0.5, _f(2, 3), _f(2, 3)], {}, 17, ()),
    "tile": ("Tile", [_f(2, 3), _i(2, 1)], {}, 17, (1,)),
    "max": ("Max", [_f(2, 3), _f(2, 3)], {}, 17, ()),
    "min": ("Min", [_f(2, 3), _f(3)], {}, 17, ()),
    "neg_abs": ("Abs", [_f(2, 3)], {}, 17, ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreter_matches_ort_per_op(case):
    op, inputs, attrs, opset, consts = CASES[case]
    model, feed = _node_model(op, inputs, attrs, opset, consts=consts)
    (ref,) = ort_run(model, feed)
    tg = TorchGraph(io.to_graph(model), torch)
    with torch.no_grad():
        out = tg.forward(feed)["out0"].numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_interpreter_isnan():
    x = np.array([[1.0, np.nan, -np.inf], [np.nan, 0.0, 2.0]], np.float32)
    model, feed = _node_model("IsNaN", [x])
    (ref,) = ort_run(model, feed)
    with torch.no_grad():
        out = TorchGraph(io.to_graph(model), torch).forward(feed)["out0"].numpy()
    np.testing.assert_array_equal(out, ref)


def _shape_arith_model() -> onnx.ModelProto:
    """Shape -> Gather -> Concat -> Reshape, Split (opset 18 num_outputs), Cast, Equal, ConstantOfShape, Range."""
    return onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 6, 4] x) => (float[2, 3, 8] y, float[2, 3, 4] a, float[2, 3, 4] b, int64[3] r, float[2,6] z) {
            s = Shape(x)
            i0 = Constant<value = int64[1] {0}>()
            d0 = Gather<axis = 0>(s, i0)
            c = Constant<value = int64[2] {3, 8}>()
            shp = Concat<axis = 0>(d0, c)
            y = Reshape(x, shp)
            a, b = Split<axis = 1, num_outputs = 2>(x)
            st = Constant<value = int64 {1}>()
            lim = Constant<value = int64 {7}>()
            dl = Constant<value = int64 {2}>()
            r = Range(st, lim, dl)
            two = Constant<value = int64[2] {2, 6}>()
            z0 = ConstantOfShape<value = float[1] {1.5}>(two)
            m = ReduceMean<keepdims = 0>(x, i1)
            i1 = Constant<value = int64[1] {2}>()
            eq = Equal(d0, i0)
            f = Cast<to = 1>(eq)
            z = Add(z0, f)
        }""")


def test_interpreter_shape_arithmetic_and_multi_output():
    model = _shape_arith_model()
    feed = {"x": _f(2, 6, 4)}
    ref = ort_run(model, feed)
    tg = TorchGraph(io.to_graph(model), torch)
    with torch.no_grad():
        out = tg.forward(feed)
    for name, r in zip(tg.outputs, ref, strict=True):
        np.testing.assert_allclose(out[name].numpy(), r, rtol=1e-6, atol=1e-6)


def test_interpreter_reproduces_the_bundled_model():
    model = onnx.load(DIGITS)
    x = np.load(VAL)["image"][:16]
    (ref,) = ort_run(model, {"image": x})
    tg = TorchGraph(io.to_graph(model), torch)
    assert not tg.unsupported and len(tg.weights) >= 6
    with torch.no_grad():
        out = tg.forward({"image": x})[tg.outputs[0]].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


CORPUS = ["ppocr_cls", "mtcnn_onet", "ppocrv4_rec", "ppocrv4_det", "nudenet_320n", "ddddocr_det", "minilm_l3",
          "minilm_l6", "efficientnet_lite2"]


@pytest.mark.realmodel
@pytest.mark.parametrize("name", CORPUS)
def test_interpreter_reproduces_corpus_models(name):
    from benchmarks.fetch import cache_dir
    from benchmarks.models import MODELS

    spec = MODELS[name]
    path = cache_dir() / "files" / {"ppocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "mtcnn_onet": "onet.onnx",
                                    "ppocrv4_rec": "ch_PP-OCRv4_rec_infer.onnx",
                                    "ppocrv4_det": "ch_PP-OCRv4_det_infer.onnx", "nudenet_320n": "320n.onnx",
                                    "ddddocr_det": "common_det.onnx", "minilm_l3": "paraphrase-MiniLM-L3-v2.onnx",
                                    "minilm_l6": "all-MiniLM-L6-v2.onnx",
                                    "efficientnet_lite2": "efficientnet_lite2.onnx"}[name]
    if not path.exists():
        pytest.skip(f"{name} not cached; run: python -m benchmarks.models fetch {name}")
    model = onnx.load(str(path))  # as the file is (ppocr_cls declares [-1, 3] dims, which io refuses)
    feed = spec.make_inputs(1, "calib")[0]
    ref = ort_run(model, feed)
    tg = TorchGraph(io.to_graph(model), torch)
    assert not tg.unsupported
    with torch.no_grad():
        out = tg.forward(feed)
    for o, r in zip(tg.outputs, ref, strict=True):
        got = out[o].numpy()
        assert got.shape == r.shape
        assert np.abs(got - r).max() <= 1e-3 * max(1.0, np.abs(r).max())


def test_unsupported_op_is_named():
    model, feed = _node_model("TopK", [_f(2, 5), _i(2)], {}, 17, n_out=2, consts=(1,))
    tg = TorchGraph(io.to_graph(model), torch)
    assert tg.unsupported == [("TopK", tg.nodes[0].name)]


# ----------------------------------------------------------------------------------------------- training
@register
@dataclass(frozen=True)
class _TrainSparsify(Pass):
    """Test-only: zero the smaller half of every weight matrix/kernel (a stand-in for prune-weights)."""

    name = "test-train-sparsify"
    description = "zero the smaller half of each weight with >= 2 dims"
    levels: int = option(0, "0: zero half of each weight; k > 0: snap each weight to k values instead")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or np.asarray(t.values).ndim < 2:
                continue
            w = np.asarray(t.values)
            if self.levels:
                if w.size < 16 * self.levels:
                    continue
                lv = np.quantile(w, np.linspace(0.05, 0.95, self.levels)).astype(w.dtype)
                t.values = lv[np.abs(w.reshape(-1, 1) - lv).argmin(1)].reshape(w.shape)
            else:
                t.values = np.where(np.abs(w) <= np.quantile(np.abs(w), 0.5), 0, w).astype(w.dtype)
        return PassResult(True)


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


def _ctx(model, seed=0):
    return PassContext(calibration=load_feeds(str(CALIB), model), seed=seed)


def _run(model, pipeline, seed=0):
    return PassManager(parse_pipeline(pipeline)).run(model, _ctx(model, seed))


def _train_stats(result):
    return next(r.pass_stats for r in result.ledger if r.stage.startswith("distill"))["train"]


PRUNE = "cleanup,prune-channels{target_macs=0.4}"
FAST = "steps=12 batch=8 eval_every=4 samples=64"


def _pruned_setup(digits):
    """The pruned student's graph, its context and a Trainer on it."""
    pruned = _run(digits, PRUNE).model
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    graph = io.to_graph(pruned)
    opts = replace(Distill(), mode="train", steps=5, lr=1e-3, augment="none")
    teacher = ctx.original_model()
    return graph, ctx, Trainer(graph, ctx, pruned, teacher, opts)


def test_one_training_step_lowers_the_loss(digits):
    graph, ctx, tr = _pruned_setup(digits)
    before, after = loss_around_one_step(tr, ctx, [{"params": tr.tg.parameters(), "lr": 1e-3}])
    assert after < before


def test_written_back_weights_give_ort_the_torch_forward(digits):
    graph, ctx, tr = _pruned_setup(digits)
    stats = tr.run([dict(f) for f in ctx.calibration.take(64)])
    assert stats["improved"] and stats["weights_written"] == len(tr.tg.weights)
    assert stats["heldout_loss_best"] < stats["heldout_loss_start"]
    x = np.load(VAL)["image"][:32]
    (ort_out,) = ort_run(ctx.export(graph), {"image": x})
    with torch.no_grad():
        torch_out = tr.tg.forward({"image": x})[tr.tg.outputs[0]].numpy()
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-4, atol=1e-4)
    # and the graph changed: the pruned model's output differs from the trained one
    (pruned_out,) = ort_run(_run(digits, PRUNE).model, {"image": x})
    assert np.abs(pruned_out - ort_out).max() > 1e-3


def test_train_improves_fidelity_end_to_end_and_same_seed_same_bytes(digits):
    x = np.load(VAL)["image"]
    (ref,) = ort_run(digits, {"image": x})
    pruned = _run(digits, PRUNE).model
    a = _run(digits, f"{PRUNE},distill{{mode=train {FAST}}}")
    b = _run(digits, f"{PRUNE},distill{{mode=train {FAST}}}")
    assert a.model.SerializeToString() == b.model.SerializeToString()

    def err(m):
        (o,) = ort_run(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    assert err(a.model) < err(pruned)
    st = _train_stats(a)
    assert st["losses"] == {"logits": "mse"} and st["steps"] >= 4  # 10 logits: narrower than WIDE_LOGITS
    c = _run(digits, f"{PRUNE},distill{{mode=train {FAST}}}", seed=1)
    assert c.model.SerializeToString() != a.model.SerializeToString()


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2}


def test_masks_keep_pruned_zeros(digits):
    sparse = _run(digits, "cleanup,test-train-sparsify").model
    res = _run(digits, f"cleanup,test-train-sparsify,distill{{mode=train {FAST}}}")
    assert _train_stats(res)["improved"]
    before, after = _weights(sparse), _weights(res.model)
    changed = 0
    for name, w in before.items():
        assert (w == 0).mean() >= 0.45
        assert np.all(after[name][w == 0] == 0), name
        changed += int(not np.array_equal(after[name], w))
    assert changed >= 2


def test_codebook_weights_keep_their_values_count(digits):
    """A weight with few distinct values (snapped clustering) trains its codebook: still <= k values."""
    k = 8
    snapped = _run(digits, f"cleanup,test-train-sparsify{{levels={k}}}").model
    res = _run(digits, f"cleanup,test-train-sparsify{{levels={k}}},distill{{mode=train {FAST}}}")
    assert _train_stats(res)["improved"]
    before, after = _weights(snapped), _weights(res.model)
    moved = 0
    for name, w0 in before.items():
        if len(np.unique(w0)) <= k:
            w1 = after[name]
            assert len(np.unique(w1)) <= k
            # the same positions share a value before and after (only the codebook moved)
            _, inv0 = np.unique(w0, return_inverse=True)
            _, inv1 = np.unique(w1, return_inverse=True)
            assert len(set(zip(inv0.ravel().tolist(), inv1.ravel().tolist(), strict=True))) <= k
            moved += int(not np.array_equal(np.unique(w0), np.unique(w1)))
    assert moved >= 1


def test_blockwise_trains_blocks_and_keeps_outputs_close(digits):
    x = np.load(VAL)["image"]
    (ref,) = ort_run(digits, {"image": x})
    pruned = _run(digits, PRUNE).model
    res = _run(digits, f"{PRUNE},distill{{mode=train blockwise=true blocks=3 {FAST}}}")
    st = _train_stats(res)
    assert st["blockwise"] and st["blocks"] >= 2 and st["blocks_trained"] >= 1
    assert any(b["improved"] for b in st["block_stats"])

    def err(m):
        (o,) = ort_run(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    assert err(res.model) < err(pruned)


def test_loss_kinds_follow_the_outputs():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 4] logits, float[2, 8] emb, float[2, 3, 8] seq, float[2, 8] p) {
            w = Constant<value = float[8, 4] {0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}>()
            b = Constant<value = float[4] {0, 0, 0, 0}>()
            logits = Gemm(x, w, b)
            emb = Relu(x)
            s3 = Constant<value = int64[3] {2, 1, 8}>()
            r = Reshape(x, s3)
            t3 = Constant<value = int64[3] {1, 3, 1}>()
            seq = Tile(r, t3)
            p = Softmax(x)
        }""")
    # 4 logits: narrower than WIDE_LOGITS (a box/landmark regression head looks the same) -> mse
    assert loss_kinds(model, "auto") == {"logits": ("mse", -1), "emb": ("cosine", -1), "seq": ("mse", -1),
                                         "p": ("kl", -1)}
    assert loss_kinds(model, "logits:kl")["logits"] == ("kl", -1)
    assert loss_kinds(model, "emb:mse")["emb"] == ("mse", -1)
    assert set(v[0] for v in loss_kinds(model, "mse").values()) == {"mse"}
    with pytest.raises(ValueError):
        Distill(mode="train", loss="emb:huber")


def test_end_to_end_names_an_unsupported_op_blockwise_leaves_its_block(digits):
    base = _run(digits, "cleanup").model
    graph = io.to_graph(base)
    out = graph.outputs[0]
    # an op the interpreter lacks (a custom-domain Identity) on the output
    mid = gs.Variable("pre_custom", dtype=np.float32)
    producer = out.inputs[0]
    producer.outputs = [mid]
    graph.nodes.append(gs.Node("CustomIdentity", "custom_node", inputs=[mid], outputs=[out], domain="test.domain"))
    model = io.to_model(graph, base)
    model.opset_import.append(helper.make_opsetid("test.domain", 1))
    graph = io.to_graph(model)
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    with pytest.raises(PassError, match="CustomIdentity"):
        Distill(mode="train", steps=2).run(graph, ctx)


def test_integer_op_graph_is_refused_before_training(digits):
    """QDQ graphs train (tests/test_distill_qat.py); a graph of integer-only ops (dynamic quantization) is refused."""
    base = _run(digits, "cleanup").model
    graph = io.to_graph(base)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    x = conv.inputs[0]
    xq, xs, xz = (gs.Variable(n, dtype=d) for n, d in (("xq", np.uint8), ("xs", np.float32), ("xz", np.uint8)))
    graph.nodes.append(gs.Node("DynamicQuantizeLinear", inputs=[x], outputs=[xq, xs, xz]))
    back = gs.Variable("xdq", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", inputs=[xq, xs, xz], outputs=[back]))
    conv.inputs[0] = back
    graph.toposort()
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    with pytest.raises(PassError, match="DynamicQuantizeLinear"):
        Distill(mode="train", steps=2).run(graph, ctx)


def test_without_torch_train_mode_names_the_extra(digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    ctx = _ctx(digits)
    ctx.original_bytes = digits.SerializeToString()
    with pytest.raises(PassError, match=r"pip install onnxcompress\[train\]") as info:
        Distill(mode="train").run(io.to_graph(digits), ctx)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [{"mode": "sgd"}, {"steps": 0}, {"lr": 0}, {"augment": "rotate"},
                                 {"temperature": 0}, {"max_minutes": 0}, {"loss": "huber"}])
def test_bad_train_options(bad):
    with pytest.raises(ValueError):
        Distill(**bad)


def test_bytes_do_not_depend_on_the_clock_far_from_the_budget(digits, monkeypatch):
    """Two runs of one seed on clocks of very different speeds (both far inside max_minutes) give the same bytes:
    the lr reads the time budget only in 1/64 steps (unrounded, step 1 carried the start evaluation's seconds)."""
    import onnxcompress.passes.distill.train as train_module
    from onnxcompress.passes.distill.train import time_fraction

    assert time_fraction(0.05, 900.0) == 0.0 and time_fraction(450.0, 900.0) == 0.5
    assert time_fraction(900.0 * 63.9 / 64, 900.0) == 63 / 64

    class Clock:
        def __init__(self, tick: float) -> None:
            self.now, self.tick = 0.0, tick

        def perf_counter(self) -> float:
            self.now += self.tick
            return self.now

        def process_time(self) -> float:
            return self.now

    def trained(tick: float) -> bytes:
        monkeypatch.setattr(train_module, "time", Clock(tick))
        return _run(digits, f"{PRUNE},distill{{mode=train {FAST}}}").model.SerializeToString()

    assert trained(1e-4) == trained(0.37)


def test_channels_last_convs_compute_the_same_values_and_gradients(digits, monkeypatch):
    """2-D Conv inputs are made channels-last for speed (torch_ops.CHANNELS_LAST): outputs and gradients equal
    the NCHW run's to float rounding."""
    from onnxcompress.passes.distill import torch_ops

    assert torch_ops.CHANNELS_LAST
    x = np.load(VAL)["image"][:8]
    runs = {}
    for layout in (False, True):
        monkeypatch.setattr(torch_ops, "CHANNELS_LAST", layout)
        tg = TorchGraph(io.to_graph(digits), torch)
        out = tg.forward({"image": x})[tg.outputs[0]]
        out.pow(2).mean().backward()
        runs[layout] = (out.detach().numpy(), {n: w.param.grad.numpy().copy() for n, w in tg.weights.items()})
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) >= 4
    for name, g in runs[False][1].items():
        np.testing.assert_allclose(runs[True][1][name], g, rtol=1e-4, atol=1e-5)
