"""distill: layer-wise refitting of a compressed student against the original teacher."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pass_base import Pass, PassResult, get_pass_class, option, register
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"


@register
@dataclass(frozen=True)
class _Sparsify(Pass):
    """Test-only stand-in for prune-weights: zero the smaller half of every Conv/Gemm weight."""

    name = "test-sparsify"
    description = "zero the smallest half of each Conv/Gemm weight"
    fraction: float = option(0.5, "share of each weight set to zero")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        for node in graph.nodes:
            if node.op in ("Conv", "Gemm") and isinstance(node.inputs[1], gs.Constant):
                w = np.asarray(node.inputs[1].values)
                cut = np.quantile(np.abs(w), self.fraction)
                node.inputs[1].values = np.where(np.abs(w) <= cut, 0, w).astype(w.dtype)
        return PassResult(True)


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


@pytest.fixture(scope="module")
def val():
    return np.load(VAL)["image"]


def _compress(model, pipeline, calib=True):
    ctx = PassContext(calibration=load_feeds(str(CALIB), model) if calib else None)
    return PassManager(parse_pipeline(pipeline)).run(model, ctx)


def _agreement(ref_model, model, x):
    (a,), (b,) = ort_run(ref_model, {"image": x}), ort_run(model, {"image": x})
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.mean((a - b) ** 2) / np.mean(a ** 2))


def _distill_stats(result):
    return next(r.pass_stats for r in result.ledger if r.stage.startswith("distill"))


def test_distill_recovers_pruned_fidelity(digits, val):
    pruned = _compress(digits, "cleanup,prune-channels{target_macs=0.4}").model
    res = _compress(digits, "cleanup,prune-channels{target_macs=0.4},distill")
    agree_p, err_p = _agreement(digits, pruned, val)
    agree_d, err_d = _agreement(digits, res.model, val)
    st = _distill_stats(res)
    assert st["layers_refit"] >= 2 and st["stages"] >= 2
    assert st["fit_residual_after"] < st["fit_residual_before"]
    assert err_d < 0.5 * err_p  # output error on held-out data at least halved
    assert agree_d >= max(agree_p, 0.95)
    # the pruned shapes are untouched
    shapes = lambda m: {t.name: list(t.dims) for t in m.graph.initializer}  # noqa: E731
    assert all(shapes(res.model)[k] == v for k, v in shapes(pruned).items() if k in shapes(res.model))


def test_distill_needs_calibration(digits):
    # checked by the manager before any pass runs: a missing --calib is bad input (exit 2), not a pass failure
    with pytest.raises(BadInputError, match="calibration"):
        _compress(digits, "distill", calib=False)


def test_distill_leaves_an_unchanged_model_alone(digits, val):
    res = _compress(digits, "cleanup,distill")
    st = _distill_stats(res)
    assert st["layers_refit"] == 0 and st["layers_bias_corrected"] == 0
    assert _agreement(digits, res.model, val)[1] < 1e-10


def test_distill_after_sparsity_keeps_zeros(digits, val):
    sparse = _compress(digits, "test-sparsify").model
    res = _compress(digits, "test-sparsify,distill")
    for t_s, t_d in zip(sparse.graph.initializer, res.model.graph.initializer, strict=True):
        a, b = numpy_helper.to_array(t_s), numpy_helper.to_array(t_d)
        if t_s.name.endswith("weight") and a.ndim >= 2:
            assert np.array_equal(a == 0, b == 0), t_s.name  # the support is kept
    assert _distill_stats(res)["layers_refit"] >= 3
    assert _agreement(digits, res.model, val)[1] < _agreement(digits, sparse, val)[1]


def test_distill_keeps_zeros_of_lightly_pruned_layers_too(digits):
    # 10% zeros per layer: the support is kept all the same (it used to be refilled below 20% zeros)
    res = _compress(digits, "test-sparsify{fraction=0.1},distill")
    sparse = _compress(digits, "test-sparsify{fraction=0.1}").model
    kept = 0
    for t_s, t_d in zip(sparse.graph.initializer, res.model.graph.initializer, strict=True):
        a, b = numpy_helper.to_array(t_s), numpy_helper.to_array(t_d)
        if t_s.name.endswith("weight") and a.ndim >= 2:
            assert np.array_equal(a == 0, b == 0), t_s.name
            kept += int((a == 0).sum())
    assert kept > 0 and _distill_stats(res)["layers_refit"] >= 1


def _quantize_available() -> bool:
    try:
        get_pass_class("quantize")
        return True
    except BadInputError:
        return False


@pytest.mark.skipif(not _quantize_available(), reason="the quantize pass is not available")
def test_distill_after_quantize_refits_on_the_integer_grid(digits, val):
    base = "cleanup,prune-channels{target_macs=0.5},quantize{latency_guard=false}"
    q = _compress(digits, base).model
    res = _compress(digits, base + ",distill")
    codes = (TensorProto.INT8, TensorProto.UINT8)  # uint8 where this machine's ORT saturates u8 x s8 (u8s8_saturation)
    q_ints = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type in codes}
    d_ints = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer if t.data_type in codes}
    assert q_ints and set(q_ints) == set(d_ints)  # weights stay 8-bit integers on the same grid
    assert any(not np.array_equal(q_ints[k], d_ints[k]) for k in q_ints)
    assert _distill_stats(res)["layers_refit"] >= 2
    assert _agreement(digits, res.model, val)[1] < _agreement(digits, q, val)[1]


def _convtranspose_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(w(8, 3, 3, 3), "w0"), numpy_helper.from_array(w(8, 8, 3, 3), "w1"),
             numpy_helper.from_array(w(8, 4, 2, 2), "wt"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(w(8, 1, 3, 3), "wd"), numpy_helper.from_array(np.zeros(8, np.float32), "bd")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "wd", "bd"], ["d"], pads=[1] * 4, group=8),
             helper.make_node("Relu", ["d"], ["dr"]),
             helper.make_node("ConvTranspose", ["dr", "wt"], ["y"], strides=[2, 2])]
    g = helper.make_graph(nodes, "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_convtranspose_gets_bias_correction_depthwise_is_refit():
    m = _convtranspose_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    ctx = PassContext(calibration=load_feeds(feeds, m))
    res = PassManager(parse_pipeline("prune-channels{ratio=0.5 round_to=1},distill")).run(m, ctx)
    st = _distill_stats(res)
    assert st["layers_bias_corrected"] == 1 and st["layers_refit"] == 2  # ConvTranspose; conv1, depthwise
    ct = next(n for n in res.model.graph.node if n.op_type == "ConvTranspose")
    assert len(ct.input) == 3  # a bias was added to carry the correction
    pruned = PassManager(parse_pipeline("prune-channels{ratio=0.5 round_to=1}")).run(m, PassContext(
        calibration=load_feeds(feeds, m))).model
    x = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    ref, a, b = ort_run(m, x)[0], ort_run(pruned, x)[0], ort_run(res.model, x)[0]
    assert np.mean((b - ref) ** 2) < np.mean((a - ref) ** 2)


@pytest.mark.parametrize("bad", ["ridge=-1", "samples=0", "layers=some", "max_inputs=0"])
def test_bad_options(bad):
    with pytest.raises(BadInputError):
        parse_pipeline(f"distill{{{bad}}}")


# ------------------------------------------------------------------------------- residual sum into LayerNorm
def _ffn_ln_model(d: int = 16, hidden: int = 48, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul W1 -> Relu -> MatMul W2 (+ b2) -> Add(x) -> LayerNormalization: a transformer's FFN block."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((d, hidden)) / math.sqrt(d)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((hidden, d)) / math.sqrt(hidden)).astype(np.float32), "w2"),
        numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "b2"),
        numpy_helper.from_array(np.ones(d, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(d, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
        helper.make_node("Add", ["y", "b2"], ["yb"], name="down_bias"),
        helper.make_node("Add", ["yb", "x"], ["s"], name="residual"),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["out"], name="ln", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "ffn_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", d])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "T", d])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tokens(rng: np.random.Generator, n_feeds: int, t: int = 24, d: int = 16) -> list[dict]:
    """Token rows of unit scale, but the first token of every sequence 30x larger (BERT's [CLS] residual)."""
    feeds = []
    for _ in range(n_feeds):
        x = rng.standard_normal((1, t, d)).astype(np.float32)
        x[:, 0] *= 30.0
        feeds.append({"x": x})
    return feeds


def test_ln_weight_fits_what_layernorm_passes_on():
    """With a LayerNorm after the residual sum, the error that matters is e / std(sum) per token: weighting rows by
    1 / std keeps the few huge tokens from dominating the fit, and the post-LN error on held-out tokens drops."""
    model = _ffn_ln_model()
    rng = np.random.default_rng(1)
    calib, evals = _tokens(rng, 48), _tokens(rng, 32)
    pipeline = "prune-channels{ratio=0.5 importance=l2 compensate=false},distill{select_ridge=false ridge=1e-4 "
    errors = {}
    for flag in ("true", "false"):
        ctx = PassContext(calibration=load_feeds(calib, model))
        res = PassManager(parse_pipeline(pipeline + f"ln_weight={flag}}}")).run(model, ctx)
        err = []
        for f in evals:
            (ref,), (got,) = ort_run(model, f), ort_run(res.model, f)
            err.append(np.mean((ref[0, 1:] - got[0, 1:]) ** 2))  # the ordinary tokens
        errors[flag] = float(np.mean(err))
    assert errors["true"] < 0.8 * errors["false"], errors
