"""cluster{matrix_vector=true}: weight matrices in vector codes with error feedback (GPTQ-VQ), decoded exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.matrix_vector import LEVELS, gptq_vq

from onnxcompress.context import PassContext
from onnxcompress.data import FeedSet, InputSpec
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

N_IN, N_OUT = 128, 256


def _model(w, gemm_trans_b=False):
    """x [16, N_IN] (correlated features) -> MatMul W [N_IN, N_OUT] (or Gemm with W^T, transB=1) -> y."""
    if gemm_trans_b:
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        init = numpy_helper.from_array(np.ascontiguousarray(w.T), "w")
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        init = numpy_helper.from_array(w, "w")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, N_OUT])], [init])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng, n=24):
    mix = rng.standard_normal((N_IN, N_IN)).astype(np.float32) / 4 + np.eye(N_IN, dtype=np.float32)
    feeds = [{"x": (rng.standard_normal((16, N_IN)).astype(np.float32) @ mix) * np.linspace(0.2, 3, N_IN,
                                                                                      dtype=np.float32)}
             for _ in range(n)]
    return FeedSet(lambda: iter(feeds), [InputSpec("x", np.dtype(np.float32), (16, N_IN))], "test", len(feeds))


def _run(model, pipeline, calib):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=calib))
    return res.model, res.ledger[-1].pass_stats


def _out_err(model, ref, feeds):
    num = sum(float(np.sum((ort_run(model, f)[0] - ort_run(ref, f)[0]) ** 2)) for f in feeds)
    return num / sum(float(np.sum(ort_run(ref, f)[0] ** 2)) for f in feeds)


def _decoded_weight(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    src = next(n.input[1] for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[0] == "x")
    m.graph.output.append(onnx.ValueInfoProto(name=src))
    return ort_run(m, {"x": np.zeros((16, N_IN), np.float32)})[-1]


def _grouped(rng):
    """Weights whose groups of 4 consecutive inputs move together (one factor per group + noise): joint codes fit
    them, one-dimensional grids do not."""
    f = rng.standard_normal((N_IN // 4, 1, N_OUT))
    shape = np.array([1.0, 0.8, -0.6, 0.4])[None, :, None]
    return (f * shape + 0.1 * rng.standard_normal((N_IN // 4, 4, N_OUT))).reshape(N_IN, N_OUT).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3])
def test_vector_codes_decode_exactly_and_beat_scalar_codes(rng, bits):
    w = _grouped(rng)
    model, calib = _model(w), _feeds(rng)
    base = f"cluster{{bits={bits} activation_aware=true refit=true min_size=100"
    vec, st = _run(model, base + " matrix_vector=true}", calib)
    scalar, _ = _run(model, base + "}", calib)
    assert st["storage"] == {"matrix-vector": 1}
    dw = _decoded_weight(vec)
    d, k = LEVELS[bits]
    inits = {t.name: numpy_helper.to_array(t) for t in vec.graph.initializer}
    book = next(v.astype(np.float32) for n, v in inits.items() if n.endswith(("_codebook", "_codebook16")))
    scale = next(v.astype(np.float32) for n, v in inits.items() if n.endswith(("_scale", "_scale16")))
    assert book.shape == (k, d) and scale.shape == (N_OUT, 1)
    groups = (dw.T / scale).reshape(-1, d)  # every group of d inputs of a row is one code times the row's scale
    assert np.abs(groups[:, None, :] - book[None]).max(-1).min(-1).max() < 1e-5
    held = [{"x": f["x"]} for f in _feeds(np.random.default_rng(5), 8)]
    swapped = _model(dw)
    for f in held[:2]:  # the graph's decode is the weight it claims, bit for bit
        np.testing.assert_array_equal(ort_run(vec, f)[0], ort_run(swapped, f)[0])
    assert _out_err(vec, model, held) < 0.9 * _out_err(scalar, model, held)
    written = len(vec.SerializeToString())
    planned = len(model.SerializeToString()) - st["bytes_before"] + st["bytes_after"]
    assert abs(written - planned) < 0.03 * written and written < 0.5 * len(model.SerializeToString())
    onnx.checker.check_model(vec)


def test_error_feedback_lowers_the_layer_error_at_the_same_codebook(rng):
    m = rng.standard_normal((N_OUT, N_IN))
    x = rng.standard_normal((512, N_IN)) @ (np.eye(N_IN) + rng.standard_normal((N_IN, N_IN)) / 3)
    gram = x.T @ x / len(x)
    scale = np.sqrt(np.mean(m ** 2, 1))
    book = rng.standard_normal((64, 2))
    fed = gptq_vq(m, scale, book, gram)
    pts = (m / scale[:, None]).reshape(N_OUT, -1, 1, 2)
    nearest = np.argmin(np.sum((pts - book[None, None]) ** 2, -1), -1)

    def err(codes):
        dm = m - book[codes].reshape(N_OUT, N_IN) * scale[:, None]
        return float(np.trace(dm @ gram @ dm.T))

    assert err(fed) < 0.8 * err(nearest)


def test_gemm_transposed_unpacked_and_packed_later(rng):
    w = _grouped(rng)
    model, calib = _model(w, gemm_trans_b=True), _feeds(rng)
    pipe = "cluster{bits=2 activation_aware=true refit=true min_size=100 matrix_vector=true storage=unpacked}"
    unpacked, st = _run(model, pipe, calib)
    assert st["storage"] == {"unpacked": 1}
    f = {"x": _feeds(rng, 1).take(1).__iter__().__next__()["x"]}
    packed, st_p = _run(unpacked, "cluster{pack_only=true}", calib)
    assert st_p["decodes_packed"] == 1
    np.testing.assert_array_equal(ort_run(packed, f)[0], ort_run(unpacked, f)[0])
    assert len(packed.SerializeToString()) < len(unpacked.SerializeToString()) - N_OUT * N_IN // 4 * 2
    assert _out_err(packed, model, [f]) < 0.2


def test_scalar_codes_stay_where_the_codebook_does_not_pay(rng):
    """Unstructured weights at 1 bit: 256 codes of 8 floats (8 KB) for 4 KB of codes; the scalar form is kept."""
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    _, st = _run(_model(w), "cluster{bits=1 activation_aware=true refit=true min_size=100 matrix_vector=true}",
                 _feeds(rng))
    assert st["storage"] == {"codebook": 1}


def test_matrix_vector_needs_the_gram():
    with pytest.raises(BadInputError, match="matrix_vector needs refit"):
        parse_pipeline("cluster{bits=2 matrix_vector=true}")


class _MatMulUse:
    def to_matrix(self, w):
        return np.asarray(w).T

    def from_matrix(self, m, shape):
        return np.asarray(m).T.reshape(shape)


def _decaying_inputs(rng, n):
    """Correlated inputs whose energies span 10x in a shuffled order: act-order's case."""
    mix = rng.standard_normal((N_IN, N_IN)) / 2 + np.eye(N_IN)
    return (rng.standard_normal((n, N_IN)) @ mix) * np.geomspace(0.3, 3, N_IN)[rng.permutation(N_IN)][None, :]


def _decaying_feeds(rng, n=32):
    x = _decaying_inputs(rng, 16 * n).astype(np.float32)
    feeds = [{"x": x[16 * i:16 * (i + 1)]} for i in range(n)]
    return FeedSet(lambda: iter(feeds), [InputSpec("x", np.dtype(np.float32), (16, N_IN))], "test", len(feeds))


def test_act_order_is_measured_per_tensor(rng):
    """Correlated inputs of unequal energy, unstructured weights: act-order (largest H_jj first) codes them with
    less output error and is kept; weights whose neighbouring inputs move together keep their natural groups. The
    choice is the measured one: act-order iff its error beats the natural order's after the order's bytes."""
    from onnxcompress.passes.cluster.matrix_vector import OVERHEAD_ORDER, _coded, cluster_matrix

    x = _decaying_inputs(np.random.default_rng(1), 4096)
    gram = x.T @ x / len(x)
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    res = cluster_matrix(w, 3, _MatMulUse(), gram, "matrix-vector", np.random.default_rng(0))
    m = w.T.astype(np.float64)
    scale = np.sqrt(np.mean(m ** 2, 1))
    d, k = LEVELS[3]
    natural = _coded(m, scale, gram, d, k, None, np.float32, np.random.default_rng(0))[3]
    dm = m - res.snapped.T
    err = float(np.einsum("oi,oi->", dm @ gram, dm))
    assert res.inputs_order is not None
    assert err < natural * 2.0 ** (-16.0 * (2 * N_IN + OVERHEAD_ORDER) / w.size)
    assert res.bytes_planned["matrix-vector"] > 2 * N_IN  # the order is paid for
    grouped = cluster_matrix(_grouped(rng), 2, _MatMulUse(), np.eye(N_IN), "matrix-vector",
                             np.random.default_rng(0))
    assert grouped.inputs_order is None


def test_act_order_decodes_exactly_packed_and_unpacked(rng):
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    model, calib = _model(w), _decaying_feeds(np.random.default_rng(1))
    pipe = "cluster{bits=3 activation_aware=true refit=true min_size=100 matrix_vector=true%s}"
    packed, st = _run(model, pipe % "", calib)
    assert st["storage"] == {"matrix-vector": 1}
    assert any(n.op_type == "Gather" and n.attribute and n.attribute[0].i == 1 for n in packed.graph.node)
    unpacked, _ = _run(model, pipe % " storage=unpacked", calib)
    repacked, _ = _run(unpacked, "cluster{pack_only=true}", calib)
    f = {"x": _decaying_inputs(np.random.default_rng(3), 16).astype(np.float32)}
    dw = _decoded_weight(packed)
    np.testing.assert_array_equal(ort_run(packed, f)[0], ort_run(_model(dw), f)[0])
    np.testing.assert_array_equal(ort_run(repacked, f)[0], ort_run(packed, f)[0])
    written = len(packed.SerializeToString())
    planned = len(model.SerializeToString()) - st["bytes_before"] + st["bytes_after"]
    assert abs(written - planned) < 0.03 * written


def test_conv_kernels_take_vector_codes_decoded_exactly(rng):
    """A Conv kernel's matrix view is [out, in·kh·kw] with the im2col Gram: pairs of neighbouring taps that move
    together take vector codes, decoded back to [out, in, kh, kw] by a Reshape, bit for bit."""
    f = rng.standard_normal((64, 32 * 9 // 4, 1))
    shape = np.array([1.0, 0.8, -0.6, 0.4])[None, None, :]
    w = (f * shape + 0.1 * rng.standard_normal((64, 72, 4))).reshape(64, 32, 3, 3).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((1, 32, 8, 8)).astype(np.float32)} for _ in range(8)]
    calib = FeedSet(lambda: iter(feeds), [InputSpec("x", np.dtype(np.float32), (1, 32, 8, 8))], "test", 8)
    pipe = "cluster{bits=3 activation_aware=true refit=true min_size=100 matrix_vector=%s}"
    vec, st = _run(model, pipe % "true", calib)
    scalar, _ = _run(model, pipe % "false", calib)
    assert st["storage"] == {"matrix-vector": 1}
    m = onnx.ModelProto()
    m.CopyFrom(vec)
    m.graph.output.append(onnx.ValueInfoProto(name="w_clustered"))
    x = {"x": rng.standard_normal((1, 32, 8, 8)).astype(np.float32)}
    y, dw = ort_run(m, x)
    assert dw.shape == w.shape
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    swapped.graph.initializer[0].CopyFrom(numpy_helper.from_array(dw, "w"))
    np.testing.assert_array_equal(y, ort_run(swapped, x)[0])
    ref = ort_run(model, x)[0]
    err = [float(np.sum((ort_run(q, x)[0] - ref) ** 2)) for q in (vec, scalar)]
    assert err[0] < 0.9 * err[1]
    written = len(vec.SerializeToString())  # the plan (what size_ratio spends) is the file: never under by > 0.5%
    planned = len(model.SerializeToString()) - st["bytes_before"] + st["bytes_after"]
    assert -0.005 * written < planned - written < 0.02 * written
