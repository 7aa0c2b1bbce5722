"""distill after cluster's packed storage: shared values and scales refit (refit mode) or trained (train mode) in
place, the packed indices untouched, so the file keeps its size and every tensor its k values; checked under ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analyses.shared_values import read_decode
from onnxcompress.constant_eval import integer_constant_values
from onnxcompress.context import PassContext
from onnxcompress.data import FeedSet, InputSpec
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

N_IN, N_HID, N_OUT = 64, 48, 16


def _mlp(rng, opset=17):
    """x [B, 64] -> MatMul W1 -> + b1 -> Relu -> Gemm(W2, transB) -> y: two weights with structure to lose."""
    w1 = (rng.standard_normal((N_IN, N_HID)) / 8).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(N_HID)).astype(np.float32)
    w2 = (rng.standard_normal((N_OUT, N_HID)) / 7).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(N_OUT)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N_OUT])],
                          [numpy_helper.from_array(v, n) for v, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(rng, n, batch=8):
    mix = rng.standard_normal((N_IN, N_IN)) / np.sqrt(N_IN)  # correlated inputs: the Gram is not diagonal
    feeds = [{"x": (rng.standard_normal((batch, N_IN)) @ mix).astype(np.float32)} for _ in range(n)]
    return FeedSet(lambda: iter(feeds), [InputSpec("x", np.dtype(np.float32), ("b", N_IN))], "test", n)


def _run(model, pipeline, calib):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=calib))
    return res.model, res.ledger[-1].pass_stats


def _error(model, ref, feeds):
    return float(np.mean([np.mean((ort_run(model, f)[0] - ort_run(ref, f)[0]) ** 2) for f in feeds]))


def _decoded(model, name):
    """The value of tensor ``name`` under ORT (a decoded weight)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort_run(m, {"x": np.zeros((1, N_IN), np.float32)})[-1]


def _ints(model):
    """The integer initializers (the packed index streams and shapes), by name."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type != TensorProto.FLOAT
            and t.data_type != TensorProto.FLOAT16}


def _storage(model):
    """Every initializer's name, type and shape: what the file stores."""
    return {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}


def _held(rng):
    return list(_feeds(rng, 12))


def test_refit_mode_refits_the_shared_values_and_keeps_the_indices(rng):
    model = _mlp(rng)
    calib = _feeds(rng, 64)
    clustered, _ = _run(model, "cluster{bits=2 min_size=100}", calib)
    distilled, st = _run(model, "cluster{bits=2 min_size=100},distill", calib)
    assert st["layers_refit_shared"] == 2 and st["layers_refit"] == 2
    assert _storage(distilled) == _storage(clustered)  # same storage, new values
    a, b = _ints(clustered), _ints(distilled)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the packed indices: unchanged
    for name in ("w1_clustered", "w2_clustered"):
        before, after = _decoded(clustered, name), _decoded(distilled, name)
        assert not np.allclose(before, after)
        axis = 0 if name == "w1_clustered" else 1  # values shared along the input axis; scales per output
        per_channel = np.moveaxis(after, 1 - axis, 0)
        assert max(len(np.unique(r)) for r in per_channel) <= 4
    held = _held(np.random.default_rng(7))
    assert _error(distilled, model, held) < 0.9 * _error(clustered, model, held)


def test_shared_solve_is_the_least_squares_optimum_over_the_codebook(rng):
    """Given the scales it ends with, the refit codebook (and bias) solve min ||X M + b - Y||^2 exactly: the same
    as lstsq over the k values and the biases, the design built by hand from the labels."""
    model = _mlp(rng)
    calib = _feeds(rng, 64)
    distilled, _ = _run(model, "cluster{bits=2 min_size=100 exclude=[w1]},distill{select_ridge=false}", calib)
    g = gs.import_onnx(distilled)
    dec = read_decode(g, g.tensors()["w2_clustered"])
    assert dec is not None
    labels, s = dec.labels, dec.scales()[:, 0]  # w2 [out, in] (transB): a scale per output row
    h = [ort_run(_expose(model, "h"), f)[-1] for f in calib]  # the layer's input (w1 is not clustered)
    y = [ort_run(model, f)[0] for f in calib]
    x, t = np.concatenate(h).astype(np.float64), np.concatenate(y).astype(np.float64)
    k = 4
    cols = [np.stack([s[o] * (x * (labels[o] == c)).sum(1) for c in range(k)], 1) for o in range(N_OUT)]
    design = np.zeros((x.shape[0] * N_OUT, k + N_OUT))
    for o in range(N_OUT):
        design[o::N_OUT, :k] = cols[o]
        design[o::N_OUT, k + o] = 1.0
    sol = np.linalg.lstsq(design, t.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(dec.codebook(), sol[:k], rtol=2e-3, atol=2e-4)
    b2 = numpy_helper.to_array(next(i for i in distilled.graph.initializer if i.name.startswith("b2")))
    np.testing.assert_allclose(b2, sol[k:], rtol=2e-3, atol=2e-4)


def _expose(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def _halve_scales(model):
    """Every channel-scale constant of a decode stored as float16 + Cast (as ``half_books`` stores large ones)."""
    g = gs.import_onnx(model)
    for node in [n for n in g.nodes if n.op == "Mul" and n.outputs[0].name.endswith("_clustered")]:
        slot = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
        half = gs.Constant(node.inputs[slot].name + "_h", np.asarray(node.inputs[slot].values).astype(np.float16))
        out = gs.Variable(half.name + "_f", dtype=np.float32)
        g.nodes.append(gs.Node("Cast", inputs=[half], outputs=[out], attrs={"to": TensorProto.FLOAT}))
        node.inputs[slot] = out
    g.cleanup().toposort()
    return gs.export_onnx(g)


def test_train_mode_trains_packed_codebooks_and_float16_tables(rng, tmp_path):
    pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")
    model = _mlp(rng)
    calib = _feeds(rng, 64)
    clustered = _halve_scales(_run(model, "cluster{bits=2 min_size=100}", calib)[0])
    halves = {t.name: numpy_helper.to_array(t) for t in clustered.graph.initializer
              if t.data_type == TensorProto.FLOAT16}
    assert len(halves) == 2
    onnx.save(model, tmp_path / "teacher.onnx")  # the float model teaches the clustered one it is not run from
    trained, st = _run(clustered, f"distill{{mode=train steps=120 batch=8 eval_every=20 lr=0.003 "
                                  f"teacher={tmp_path / 'teacher.onnx'}}}", calib)
    assert st["train"]["steps"] > 0
    assert _storage(trained) == _storage(clustered)
    a, b = _ints(clustered), _ints(trained)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the packed indices: unchanged
    now = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert now.keys() == halves.keys() and any(not np.array_equal(now[k], halves[k]) for k in now)  # trained, fp16
    w2 = _decoded(trained, "w2_clustered")
    assert max(len(np.unique(r)) for r in w2) <= 4
    held = _held(np.random.default_rng(7))
    assert _error(trained, model, held) < 0.9 * _error(clustered, model, held)


def test_integer_constant_values_unpacks_the_streams_to_the_labels(rng):
    """The bit streams of a packed decode evaluate to the indices the unpacked storage holds."""
    model = _mlp(rng)
    calib = _feeds(rng, 16)
    packed, _ = _run(model, "cluster{bits=3 min_size=100}", calib)
    unpacked, _ = _run(model, "cluster{bits=3 min_size=100 storage=unpacked}", calib)
    for m in (packed, unpacked):
        g = gs.import_onnx(m)
        folded = integer_constant_values(g)
        dec = read_decode(g, g.tensors()["w1_clustered"], folded)
        assert dec is not None and dec.labels.shape == (N_IN, N_HID)
        np.testing.assert_allclose(dec.weight(), _decoded(m, "w1_clustered"), rtol=1e-6, atol=1e-7)
        if m is packed:
            assert any(n.op == "BitShift" for n in g.nodes) and all(v.dtype.kind in "biu" or v.dtype.kind == "f"
                                                                     for v in folded.values())
            labels_packed = dec.labels
        else:
            np.testing.assert_array_equal(dec.labels, labels_packed)


def _vector_coded(model, rng, k=16, d=4):
    """``model`` with w1 [64, 48] (MatMul: matrix view W^T [48, 64]) replaced by a packed vector-code decode with an
    act-order column permutation and float16 scales: Gather(C [k, d]) -> Reshape -> Gather(axis 1) -> Mul ->
    Transpose, written by the cluster pass's own builder."""
    from onnxcompress.passes.cluster.storage import DecodeBuilder

    from onnxcompress.naming import Namer

    g = gs.import_onnx(model)
    w1 = np.asarray(g.tensors()["w1"].values)
    m = w1.T  # [out, in]
    order = rng.permutation(N_IN)
    scale = np.sqrt(np.mean(m ** 2, axis=1)).astype(np.float32)
    groups = (m[:, order] / scale[:, None]).reshape(N_HID, N_IN // d, d)
    book = groups.reshape(-1, d)[rng.choice(N_HID * N_IN // d, k, replace=False)].astype(np.float32)
    codes = np.argmin(((groups[:, :, None, :] - book[None, None]) ** 2).sum(-1), axis=-1)
    # the builder's act-order: matrix column j reads coded column order[j]; ours coded column c is input order[c]
    cols = np.argsort(order)
    out = DecodeBuilder(g, Namer(g)).build_matrix_vector("v1", w1.shape, True, book, codes, scale,
                                                         inputs_order=cols, out_name="w1_clustered", half=True)
    node = next(n for n in g.nodes if n.op == "MatMul")
    node.inputs[1] = out
    g.cleanup().toposort()
    return gs.export_onnx(g), codes


def test_vector_codes_with_act_order_refit_in_their_code_vectors(rng):
    model = _mlp(rng)
    coded, codes = _vector_coded(model, rng)
    g = gs.import_onnx(coded)
    dec = read_decode(g, g.tensors()["w1_clustered"])
    assert dec is not None and dec.codebook().size == 16 * 4
    np.testing.assert_allclose(dec.weight(), _decoded(coded, "w1_clustered"), rtol=1e-6, atol=1e-7)
    calib = _feeds(rng, 64)
    # the float model teaches the coded one (as if a cluster pass had coded it): the pass run on the coded graph
    ctx = PassContext(calibration=calib, original_bytes=model.SerializeToString(), model_template=coded)
    graph = gs.import_onnx(coded)
    st = parse_pipeline("distill{select_ridge=false}")[0].run(graph, ctx).stats
    distilled = ctx.export(graph)
    assert st["layers_refit_shared"] == 1
    assert _storage(distilled) == _storage(coded)
    a, b = _ints(coded), _ints(distilled)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # codes and column order stay
    g2 = gs.import_onnx(distilled)
    dec2 = read_decode(g2, g2.tensors()["w1_clustered"])
    np.testing.assert_array_equal(dec2.labels, dec.labels)
    assert not np.allclose(dec2.codebook(), dec.codebook())  # the 16 shared 4-vectors moved
    np.testing.assert_allclose(dec2.weight(), _decoded(distilled, "w1_clustered"), rtol=1e-6, atol=1e-7)
    held = _held(np.random.default_rng(7))
    assert _error(distilled, model, held) < 0.9 * _error(coded, model, held)


def _depthwise(rng):
    """x [B, 8, 12, 12] -> depthwise 3x3 Conv (group 8, bias) -> Relu -> 1x1 Conv (8 -> 4) -> y."""
    dw = (rng.standard_normal((8, 1, 3, 3)) / 3).astype(np.float32)
    pw = (rng.standard_normal((4, 8, 1, 1)) / 3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "dw", "dwb"], ["h0"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["h"]), helper.make_node("Conv", ["h", "pw"], ["y"])]
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 12, 12])],
                          [numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(np.zeros(8, np.float32), "dwb"),
                           numpy_helper.from_array(pw, "pw")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_clustered_depthwise_kernels_refit_with_a_gram_per_channel(rng):
    model = _depthwise(rng)
    base = rng.standard_normal((12, 12))  # spatially correlated images: each channel's 3x3 Gram differs
    feeds = [{"x": (np.stack([np.roll(base, (i, j), (0, 1)) for j in range(8)])[None]
                    + 0.3 * rng.standard_normal((1, 8, 12, 12))).astype(np.float32)} for i in range(40)]
    calib = FeedSet(lambda: iter(feeds[:32]), [InputSpec("x", np.dtype(np.float32), ("b", 8, 12, 12))], "t", 32)
    pipe = "cluster{bits=2 min_size=16 skip_depthwise=false storage=codebook exclude=[pw]}"
    clustered, _ = _run(model, pipe, calib)
    distilled, st = _run(model, pipe + ",distill", calib)
    assert st["layers_refit_shared"] == 1
    decode = {k: v for k, v in _storage(clustered).items() if k.startswith("cl")}  # the decode's stored tensors
    assert decode and all(_storage(distilled).get(k) == v for k, v in decode.items())  # (pw gains a bias)
    a, b = _ints(clustered), _ints(distilled)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    err = [float(np.mean([np.mean((ort_run(m, f)[0] - ort_run(model, f)[0]) ** 2) for f in feeds[32:]]))
           for m in (clustered, distilled)]
    assert err[1] < 0.9 * err[0]


@pytest.mark.parametrize("scales", ["true", "false"])
def test_snapped_weights_keep_their_values_per_channel(rng, scales):
    """storage=snap leaves few distinct values per output channel (per tensor without channel scales); the refit
    moves those values, not the weights one by one, so the counts stay."""
    model = _mlp(rng)
    calib = _feeds(rng, 64)
    pipe = f"cluster{{bits=2 min_size=100 storage=snap channel_scales={scales}}}"
    snapped, _ = _run(model, pipe, calib)
    distilled, st = _run(model, pipe + ",distill", calib)
    assert st["layers_refit_shared"] >= 1  # a layer whose held-out feeds prefer its current values keeps them
    w = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (snapped, distilled)]
    assert any(not np.array_equal(w[0][n], w[1][n]) for n in ("w1", "w2"))
    for name, axis in (("w1", 1), ("w2", 0)):  # MatMul [in, out]; Gemm transB [out, in]
        after = w[1][name]
        rows = np.moveaxis(after, axis, 0)
        assert max(len(np.unique(r)) for r in rows) <= 4
        if scales == "false":
            assert len(np.unique(after)) <= 4
    held = _held(np.random.default_rng(7))
    assert _error(distilled, model, held) < 0.9 * _error(snapped, model, held)


def test_train_mode_keeps_snapped_values_per_channel(rng):
    """storage=snap with channel scales leaves <= k values per output row: training moves each row's set."""
    pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")
    model = _mlp(rng)
    calib = _feeds(rng, 64)
    pipe = "cluster{bits=2 min_size=100 storage=snap}"
    snapped, _ = _run(model, pipe, calib)
    trained, st = _run(model, pipe + ",distill{mode=train steps=120 batch=8 eval_every=20 lr=0.003}", calib)
    assert st["train"]["steps"] > 0
    w = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (snapped, trained)]
    for name, axis in (("w1", 1), ("w2", 0)):
        assert not np.array_equal(w[0][name], w[1][name])
        assert max(len(np.unique(r)) for r in np.moveaxis(w[1][name], axis, 0)) <= 4
    held = _held(np.random.default_rng(7))
    assert _error(trained, model, held) < 0.9 * _error(snapped, model, held)
