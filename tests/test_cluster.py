"""cluster: k-means weight sharing, codebook storage decoded in the graph, refit of the shared values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.kmeans1d import kmeans_1d, snap
from onnxcompress.passes.cluster.storage import pack_bits, unpack_bits

from onnxcompress.codebook_refit import objective, refit_codebook
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


def _run(model, pipeline, calib=None):
    ctx = PassContext(calibration=calib)
    res = PassManager(parse_pipeline(pipeline)).run(model, ctx)
    return res.model, res.ledger[-1].pass_stats


def _model(rng, sparse=False, tied=False):
    """x[1,8,6,6] -> Conv(16) -> Flatten -> MatMul W[576,64] (-> MatMul W again if tied) ; ids -> Gather E[200,32]."""
    conv_w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    mm_w = rng.standard_normal((576, 64)).astype(np.float32) * 0.1
    emb = rng.standard_normal((200, 32)).astype(np.float32)
    if sparse:
        mm_w[np.abs(mm_w) < 0.08] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "mm_w"], ["y"]),
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
               helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, 32])]
    inits = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(mm_w, "mm_w"),
             numpy_helper.from_array(emb, "emb")]
    if tied:  # the same [576, 64] weight read by a second MatMul
        nodes.append(helper.make_node("MatMul", ["f2", "mm_w"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 64]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [3])]
    if tied:
        inputs.append(helper.make_tensor_value_info("f2", TensorProto.FLOAT, [1, 576]))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng, tied=False):
    f = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32), "ids": np.array([0, 7, 199])}
    if tied:
        f["f2"] = rng.standard_normal((1, 576)).astype(np.float32)
    return f


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------------ k-means
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 300), st.sampled_from(["linear", "density", "kmeans++"]),
       st.integers(0, 2**31 - 1))
def test_kmeans_at_most_k_values_each_nearest(bits, rows, n, init, seed):
    rng = np.random.default_rng(seed)
    v = np.round(rng.standard_normal((rows, n)), int(rng.integers(1, 4)))  # ties and repeated values
    k = 1 << bits
    cents, labels = kmeans_1d(v, k, init=init, rng=rng)
    s = snap(cents, labels, np.float64)
    assert all(np.unique(r).size <= k for r in s)
    # a fixed point of Lloyd: every value sits on its nearest centroid
    d = np.abs(v[:, :, None] - cents[:, None, :])
    own = np.take_along_axis(d, labels[:, :, None].astype(np.int64), 2)[..., 0]
    assert np.all(own <= d.min(axis=2) + 1e-9)


def test_kmeans_fixed_zero_keeps_zeros_and_weights_pull_centroids(rng):
    v = rng.standard_normal((2, 500))
    v[:, ::3] = 0.0
    cents, labels = kmeans_1d(v, 8, fixed_zero=True)
    s = snap(cents, labels)
    assert np.all(s[v == 0] == 0) and np.all((cents == 0).sum(axis=1) == 1)
    # heavy weights on the positive values: their error falls, the unweighted error rises
    w = np.where(v > 0, 100.0, 1.0)
    cw, lw = kmeans_1d(v, 4, weights=w)
    c0, l0 = kmeans_1d(v, 4)
    err = lambda c, lab, m: float(np.sum(((v - snap(c, lab, np.float64)) ** 2)[m]))  # noqa: E731
    assert err(cw, lw, v > 0) < err(c0, l0, v > 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 500), st.integers(0, 2**31 - 1))
def test_packed_indices_round_trip(bits, n, seed):
    idx = np.random.default_rng(seed).integers(0, 1 << bits, n)
    streams = pack_bits(idx, bits)
    assert all(s.dtype == np.uint8 for s in streams)
    assert sum(s.size for s in streams) <= -(-n * bits // 8) + len(streams)  # b bits per index (+ byte tails)
    np.testing.assert_array_equal(unpack_bits(streams, bits, n), idx)


# ------------------------------------------------------------------------------------ graph: codebook storage
MODES = {"tensor": "channel_scales=false", "scales": "channel_scales=true", "channel": "per_channel=true"}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codebook_decode_is_bit_exact_under_ort(rng, mode, bits):
    model = _model(rng)
    pipe = f"cluster{{bits={bits} {MODES[mode]} min_size=500"
    coded, st_c = _run(model, pipe + " storage=codebook}")
    snapped, st_s = _run(model, pipe + " storage=snap}")
    assert st_c["storage"] and "snap" not in st_c["storage"] and st_s["storage"] == {"snap": 3}
    w = _inits(snapped)
    k = 1 << bits
    for name in ("conv_w", "mm_w", "emb"):  # <= k values per tensor, per output channel when asked
        axis = {"conv_w": 0, "mm_w": 1, "emb": 0}[name]
        rows = np.moveaxis(w[name], axis, 0).reshape(w[name].shape[axis], -1)
        assert max(np.unique(r).size for r in rows) <= k
        if mode == "tensor" or (mode == "scales" and name == "emb"):  # tables take no channel scales
            assert np.unique(w[name]).size <= k
        elif mode == "scales":  # one shared codebook: every channel is its RMS times values from k shared ones
            scale = next(v.astype(np.float32) for n, v in _inits(coded).items()
                         if n.endswith(("_scale", "_scale16")) and v.size == rows.shape[0]
                         and v.shape[axis] == rows.shape[0])
            u = rows / scale.reshape(-1, 1)
            assert np.unique(np.round(u, 5)).size <= k
    # the decoded tensors, exposed as outputs, are bit-identical to the snapped constants
    dec = onnx.ModelProto()
    dec.CopyFrom(coded)
    names = {n: f"{n}_clustered" for n in ("conv_w", "mm_w", "emb")}
    for n in names.values():
        dec.graph.output.append(onnx.ValueInfoProto(name=n))
    feeds = _feeds(rng)
    got = ort_run(dec, feeds)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(got[2 + i], w[n])
    # same weights; a kernel may pre-pack a constant weight and not a computed one: rounding-level differences only
    ref = ort_run(snapped, feeds)[0]
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert not any(n in _inits(coded) for n in names)  # the float tensors are gone from the file


@pytest.mark.parametrize("opset", [11, 13])
def test_old_opsets_decode_too(rng, opset):
    model = _model(rng)
    model.opset_import[0].version = opset
    coded, st_c = _run(model, "cluster{bits=3 min_size=500 storage=codebook}")
    snapped, _ = _run(model, "cluster{bits=3 min_size=500 storage=snap}")
    onnx.checker.check_model(coded, full_check=True)
    dec = onnx.ModelProto()
    dec.CopyFrom(coded)
    dec.graph.output.append(onnx.ValueInfoProto(name="mm_w_clustered"))
    np.testing.assert_array_equal(ort_run(dec, _feeds(rng))[-1], _inits(snapped)["mm_w"])


def test_default_ort_session_folds_the_decode_to_the_same_outputs(rng):
    import onnxruntime as ort

    model = _model(rng)
    coded, _ = _run(model, "cluster{min_size=500 storage=codebook}")
    snapped, _ = _run(model, "cluster{min_size=500 storage=snap}")
    feeds = _feeds(rng)
    so = ort.SessionOptions()  # default: all graph optimizations, the decode is constant-folded at load
    a = ort.InferenceSession(coded.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(snapped.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_pruned_tensor_keeps_zeros_sparse_codebook_and_file_shrinks_as_planned(rng):
    model = _model(rng, sparse=True)
    zeros = _inits(model)["mm_w"] == 0
    assert zeros.mean() > 0.5
    coded, st_c = _run(model, "cluster{bits=4 min_size=500}")
    snapped, _ = _run(model, "cluster{bits=4 min_size=500 storage=snap}")
    assert st_c["storage"].get("sparse-codebook") == 1
    assert np.all(_inits(snapped)["mm_w"][zeros] == 0)
    dec = onnx.ModelProto()
    dec.CopyFrom(coded)
    dec.graph.output.append(onnx.ValueInfoProto(name="mm_w_clustered"))
    np.testing.assert_array_equal(ort_run(dec, _feeds(rng))[-1], _inits(snapped)["mm_w"])
    planned = st_c["bytes_before"] - st_c["bytes_after"]
    actual = model.ByteSize() - coded.ByteSize()
    assert planned > 0.8 * st_c["bytes_before"]
    assert abs(actual - planned) <= 150 * 3 + 0.01 * planned
    # the file on disk too
    assert len(coded.SerializeToString()) == coded.ByteSize()


def test_tied_weight_clustered_once_and_stays_one_tensor(rng):
    model = _model(rng, tied=True)
    coded, st_c = _run(model, "cluster{min_size=500 storage=codebook}")
    users = [n for n in coded.graph.node if n.op_type == "MatMul"]
    assert len(users) == 2 and users[0].input[1] == users[1].input[1] == "mm_w_clustered"
    assert st_c["tensors_clustered"] == 3
    snapped, _ = _run(model, "cluster{min_size=500 storage=snap}")
    users = [n for n in snapped.graph.node if n.op_type == "MatMul"]
    assert users[0].input[1] == users[1].input[1] == "mm_w" and len(snapped.graph.initializer) == 3


def test_skips_with_reasons_and_leaves_weights_that_are_inputs(rng):
    model = _model(rng)
    model.graph.input.append(helper.make_tensor_value_info("conv_w", TensorProto.FLOAT, [16, 8, 3, 3]))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "conv_w"))
    out, st_c = _run(model, "cluster{min_size=5000 exclude=[emb]}")
    assert st_c["tensors_clustered"] == 1  # mm_w only: conv_w is a graph input, emb excluded
    assert st_c["skipped"] == {"excluded by name": 1}
    assert "conv_w" in [i.name for i in out.graph.input]
    _, st_small = _run(model, "cluster")
    assert st_small["skipped"].get("fewer than 1024 elements") is None and st_small["tensors_clustered"] == 2


# ------------------------------------------------------------------------------------------------ calibration
def _skewed_matmul(rng):
    """y = x W with input channels of very different energy, the loud ones with small weights (as after a
    normalisation): plain k-means spends its values on the large weights, activation-aware ones on what y sees."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[:8] *= 0.05
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    scale = np.where(np.arange(64) < 8, 20.0, 0.2).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((8, 64)) * scale).astype(np.float32)} for _ in range(16)]
    return model, feeds


def test_activation_aware_lowers_output_error(rng):
    model, feeds = _skewed_matmul(rng)
    calib = load_feeds(feeds, model)
    ref = [ort_run(model, f)[0] for f in feeds]

    def err(m):
        return float(np.mean([np.mean((ort_run(m, f)[0] - r) ** 2) for f, r in zip(feeds, ref, strict=True)]))

    plain, _ = _run(model, "cluster{bits=2 min_size=100}")
    aware, st_a = _run(model, "cluster{bits=2 min_size=100 activation_aware=true}", calib)
    assert st_a["weighted"] == 1
    assert err(aware) < 0.7 * err(plain)


def test_refit_keeps_k_values_and_lowers_calibration_error():
    model = onnx.load(DIGITS)
    calib = load_feeds(str(CALIB), model).take(32)
    km, _ = _run(model, "cluster{bits=3 storage=snap}")
    rf, st_r = _run(model, "cluster{bits=3 storage=snap refit=true samples=32}", calib)
    assert st_r["refit_layers"] == 3 and st_r["refit_objective_after"] < st_r["refit_objective_before"]
    for name, w in _inits(rf).items():
        if w.size >= 1024:  # conv [O, I, k, k] and Gemm transB [O, I]: <= k values in every output channel
            assert max(np.unique(r).size for r in w.reshape(w.shape[0], -1)) <= 8, name
    feeds = list(calib)
    ref = [ort_run(model, f)[0] for f in feeds]
    err = lambda m: float(np.mean([np.mean((ort_run(m, f)[0] - r) ** 2) for f, r in zip(feeds, ref, strict=True)]))  # noqa: E731
    assert err(rf) < err(km)


def test_refit_math_least_squares_over_shared_values(rng):
    g = rng.standard_normal((200, 12))
    gram = g.T @ g
    target = rng.standard_normal((6, 12))
    cents, labels = kmeans_1d(target.reshape(1, -1), 4)
    lab = labels.reshape(6, 12)
    scale = rng.uniform(0.5, 2.0, 6)
    new, before, after = refit_codebook(cents, lab, gram, target=target, row_scale=scale)
    # the exact optimum: normal equations in the 4 shared values (times each output's scale)
    a = np.stack([(lab == c).astype(float) for c in range(4)], axis=-1) * scale[:, None, None]  # [6, 12, 4]
    h = np.einsum("oic,ij,ojd->cd", a, gram, a)
    b = np.einsum("oic,ij,oj->c", a, gram, target)
    np.testing.assert_allclose(new[0], np.linalg.solve(h, b), rtol=1e-6, atol=1e-9)
    assert after < before and np.isclose(after, objective(scale[:, None] * new[0][lab], gram, target))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text", ["cluster{bits=0}", "cluster{bits=9}", "cluster{init=random}",
                                  "cluster{storage=zip}"])
def test_bad_options_are_bad_input(text):
    with pytest.raises(BadInputError):
        parse_pipeline(text)


def test_per_channel_on_single_channel_tensor_and_missing_calibration_are_bad_input(rng):
    w = rng.standard_normal((2048, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError, match="single output channel"):
        _run(model, "cluster{per_channel=true}")
    for opt in ("activation_aware=true", "refit=true"):
        with pytest.raises(BadInputError, match="calibration"):
            _run(model, f"cluster{{{opt}}}")


def test_embedding_bits_apply_to_gather_tables_only(rng):
    out, st_c = _run(_model(rng), "cluster{bits=4 embedding_bits=2 channel_scales=false min_size=500 storage=snap}")
    w = _inits(out)
    assert st_c["bits"] == {"2": 1, "4": 2}
    assert np.unique(w["emb"]).size <= 4 and 4 < np.unique(w["mm_w"]).size <= 16
