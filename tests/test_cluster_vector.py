"""cluster{embedding_vector=d}: product quantization of Gather tables, its decode, token-count weights, allocation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.vector_codebook import decode, product_kmeans, row_weights

from onnxcompress.context import PassContext
from onnxcompress.data import FeedSet, InputSpec
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

V, D = 8192, 32  # 8192 rows: the codebooks of 256 codes of 8 values weigh no more than the codes


def _table(rng, v=V, d=D):
    """Rows drawn from 40 prototypes + noise: product quantization has real structure to find."""
    protos = rng.standard_normal((40, d)).astype(np.float32)
    return protos[rng.integers(0, 40, v)] + 0.05 * rng.standard_normal((v, d)).astype(np.float32)


def _model(table, opset=17):
    """ids [4] -> Gather E -> MatMul W [D, 8] -> y; the decoded table is exposed as output "e_all" by ``_expose``."""
    w = np.random.default_rng(1).standard_normal((table.shape[1], 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(table, "emb"), numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(ids_list):
    feeds = [{"ids": np.asarray(i, np.int64)} for i in ids_list]
    return FeedSet(lambda: iter(feeds), [InputSpec("ids", np.dtype(np.int64), (4,))], "test", len(feeds))


def _run(model, pipeline, calib=None):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=calib))
    return res.model, res.ledger[-1].pass_stats


def _decoded(model):
    """The table the graph feeds to its consumer (the clustered decode's output) under ORT."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    src = next(n.input[0] for n in m.graph.node if n.output[0] == "e")  # the model's own Gather reads it
    m.graph.output.append(onnx.ValueInfoProto(name=src))
    return ort_run(m, {"ids": np.zeros(4, np.int64)})[-1]


def test_product_kmeans_finds_the_structure_and_decodes(rng):
    table = _table(rng)
    books, labels = product_kmeans(table, 8, 64, np.ones(V), rng)
    assert books.shape == (4, 64, 8) and labels.shape == (V, 4) and labels.max() < 64
    approx = decode(books, labels)
    rel = np.sum((table - approx) ** 2) / np.sum(table ** 2)
    assert rel < 0.01  # 40 prototypes per block, 64 codes: only the noise is left
    for s in range(4):  # every block's d-vectors are codebook rows: <= k distinct
        assert len(np.unique(approx[:, 8 * s:8 * s + 8], axis=0)) <= 64
    # a code is the nearest of its block's codebook for every row
    x = table[:, :8]
    d2 = ((x[:, None, :] - books[0][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels[:, 0], d2.argmin(1))


def test_row_weights_favour_counted_rows(rng):
    table = rng.standard_normal((V, 16)).astype(np.float32)  # no structure: codes must be spent somewhere
    counts = np.zeros(V)
    counts[:50] = 100.0
    w = row_weights(counts, V)
    assert w.min() > 0 and w[0] > 100 * w[-1]
    err = {}
    for name, ww in (("uniform", np.ones(V)), ("counts", w)):
        books, labels = product_kmeans(table, 8, 32, ww, np.random.default_rng(0))
        err[name] = float(np.mean((table[:50] - decode(books, labels)[:50]) ** 2))
    assert err["counts"] < 0.5 * err["uniform"]


def test_pass_decodes_exactly_and_shrinks_the_file(rng):
    table = _table(rng)
    model = _model(table)
    out, st = _run(model, "cluster{embedding_vector=8 min_size=100}")
    unpacked, st_u = _run(model, "cluster{embedding_vector=8 storage=unpacked min_size=100}")
    assert st["bits"] == {"4": 1, "v8": 1} and st["storage"]["vector-codebook"] == 1
    got = _decoded(out)
    assert got.shape == (V, D)
    np.testing.assert_array_equal(got, _decoded(unpacked))  # packed indices + offsets == the int32 indices
    for s in range(D // 8):  # <= 256 distinct d-vectors per block
        assert len(np.unique(got[:, 8 * s:8 * s + 8], axis=0)) <= 256
    assert np.sum((got - table) ** 2) / np.sum(table ** 2) < 0.01
    ids = np.array([0, 5, V - 1, 17])
    only_table, st_t = _run(model, "cluster{embedding_vector=8 min_size=100 exclude=[w]}")
    np.testing.assert_array_equal(ort_run(only_table, {"ids": ids})[0], ort_run(_swap(model, got), {"ids": ids})[0])
    written = len(only_table.SerializeToString())
    planned = len(model.SerializeToString()) - st_t["bytes_before"] + st_t["bytes_after"]
    assert written < 0.5 * len(model.SerializeToString()) and abs(written - planned) < 0.01 * written
    onnx.checker.check_model(out)


def _swap(model, table):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == "emb":
            t.CopyFrom(numpy_helper.from_array(table.astype(np.float32), "emb"))
    return m


def test_unpacked_vector_table_packs_exactly_later(rng):
    table = _table(rng)
    unpacked, _ = _run(_model(table), "cluster{embedding_vector=4 storage=unpacked min_size=100 exclude=[w]}")
    books = [numpy_helper.to_array(t) for t in unpacked.graph.initializer if t.name.endswith("_codebook")]
    assert len(books) == 1 and books[0].shape == (8 * 256, 4)
    before = _decoded(unpacked)
    for t in unpacked.graph.initializer:  # "training" moves the code vectors; the indices stay
        if t.name.endswith("_codebook"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5 + 0.1, t.name))
    trained = _decoded(unpacked)
    packed, st = _run(unpacked, "cluster{pack_only=true half_codebooks=false}")
    assert st["decodes_packed"] == 1 and st["bytes_saved_packing"] > 0.5 * V * 8 * 4
    np.testing.assert_array_equal(_decoded(packed), trained)
    half, st_h = _run(unpacked, "cluster{pack_only=true}")  # the trained code vectors rounded to float16
    assert st_h["bytes_saved_packing"] == st["bytes_saved_packing"] + 8 * 256 * 4 * 2
    np.testing.assert_allclose(_decoded(half), trained, rtol=2.0 ** -10, atol=0)
    assert not np.array_equal(trained, before)
    assert len(packed.SerializeToString()) < len(unpacked.SerializeToString()) - V * 8 * 2
    onnx.checker.check_model(packed)


def test_activation_aware_counts_tokens_of_calibration(rng):
    table = rng.standard_normal((V, 16)).astype(np.float32)
    frequent = [[1, 2, 3, 4], [2, 3, 4, 5], [1, 1, 2, 6]] * 4
    calib = _feeds(frequent)
    model = _model(table)
    out_w, st_w = _run(model, "cluster{embedding_vector=8 embedding_bits=5 activation_aware=true min_size=100 "
                              "exclude=[w]}", calib)
    out_u, _ = _run(model, "cluster{embedding_vector=8 embedding_bits=5 min_size=100 exclude=[w]}")
    assert st_w["weighted"] == 1
    rows = [1, 2, 3, 4, 5, 6]
    err_w = np.sum((_decoded(out_w)[rows] - table[rows]) ** 2)
    err_u = np.sum((_decoded(out_u)[rows] - table[rows]) ** 2)
    assert err_w < 0.2 * err_u


def test_allocation_ladder_shortens_the_block_length(rng):
    table = _table(rng)
    model = _model(table)
    calib = _feeds([rng.integers(0, V, 4) for _ in range(8)])
    out, st = _run(model, "cluster{embedding_vector=16 embedding_bits=6 target_error=0.00001 min_size=100 "
                          "exclude=[w]}", calib)
    level = next(iter(st["bits"]))
    assert level in ("v8", "v4", "v2", "8", "float")  # it had to climb from v16 (32 = 16 * 2: v16, v8, v4, v2)
    assert st["output_error"] <= 0.00001


@pytest.mark.parametrize("text", ["cluster{embedding_vector=1}", "cluster{embedding_vector=-2}"])
def test_bad_block_length_is_rejected(text):
    with pytest.raises(BadInputError, match="embedding_vector"):
        parse_pipeline(text)


def test_distill_trains_the_code_vectors_and_keeps_the_codes(rng):
    pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")
    table = rng.standard_normal((V, 16)).astype(np.float32)  # no structure: 2 bits per weight loses a lot
    model = _model(table)
    calib = _feeds([rng.integers(0, 100, 4) for _ in range(64)])  # text reads a part of the vocabulary
    pipe = "cluster{embedding_vector=4 storage=unpacked min_size=100 exclude=[w]}"
    student, _ = _run(model, pipe, calib)
    res = PassManager(parse_pipeline(pipe + ",distill{mode=train steps=60 batch=8 eval_every=10 lr=0.01}")).run(
        model, PassContext(calibration=calib))
    trained = res.model
    idx = [next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_idx"))
           for m in (student, trained)]
    np.testing.assert_array_equal(idx[0], idx[1])  # the codes stay, the code vectors move
    held_out = [{"ids": rng.integers(0, 100, 4)} for _ in range(16)]
    err = [sum(float(np.mean((ort_run(m, f)[0] - ort_run(model, f)[0]) ** 2)) for f in held_out)
           for m in (student, trained)]
    assert err[1] < 0.8 * err[0]
    ids = held_out[0]["ids"]
    packed, st = _run(trained, "cluster{pack_only=true half_codebooks=false}")
    assert st["decodes_packed"] == 1
    np.testing.assert_array_equal(ort_run(packed, {"ids": ids})[0], ort_run(trained, {"ids": ids})[0])


def test_token_counts_read_computed_and_constant_indices(rng):
    """Indices that are a graph input, computed in the graph (fetched in the one statistics run) or a constant."""
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.cluster.vector_codebook import token_counts

    from onnxcompress.analyses.activation_stats import ActivationStatistics, StatsRequest

    model = _model(rng.standard_normal((V, 16)).astype(np.float32))
    model.graph.node.insert(0, helper.make_node("Add", ["ids", "one"], ["ids1"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    model.graph.node[1].input[1] = "ids1"
    graph = gs.import_onnx(model)
    calib = _feeds([[1, 2, 3, -1], [2, 2, 5, 7]])
    ctx = PassContext(calibration=calib)
    gather = next(n for n in graph.nodes if n.op == "Gather")
    const = gs.Constant("c", np.array([[0, 0, 9]], np.int64))
    req = StatsRequest(samples=2)
    got = token_counts(graph, ctx, {"computed": (gather.inputs[1], V), "input": (graph.inputs[0], V),
                                    "const": (const, V)}, req)
    ctx.analysis(ActivationStatistics, graph).get(req)  # the caller's one run counts the computed indices
    want_in = np.bincount([1, 2, 3, V - 1, 2, 2, 5, 7], minlength=V)
    np.testing.assert_array_equal(got["input"], want_in)
    np.testing.assert_array_equal(got["computed"], np.bincount([2, 3, 4, 0, 3, 3, 6, 8], minlength=V))
    np.testing.assert_array_equal(got["const"], np.bincount([0, 0, 9], minlength=V))
    assert ctx.counters["calibration_runs"] == 1


def test_large_tables_fit_on_a_weighted_sample_as_well(rng, monkeypatch):
    import onnxcompress.passes.cluster.vector_codebook as vc

    table = _table(rng, v=3000, d=16)
    w = row_weights(rng.poisson(0.5, 3000).astype(np.float64), 3000)
    full = vc.product_kmeans(table, 4, 32, w, np.random.default_rng(0))
    monkeypatch.setattr(vc, "SAMPLE_ROWS", 400)
    sampled = vc.product_kmeans(table, 4, 32, w, np.random.default_rng(0))

    def err(res):
        return float(np.sum(w[:, None] * (table - decode(*res)) ** 2))

    assert err(sampled) < 1.15 * err(full)
    assert sampled[1].shape == (3000, 4)


def test_counts_of_computed_indices_share_the_one_statistics_run(rng):
    model = _model(rng.standard_normal((V, 16)).astype(np.float32))
    model.graph.node.insert(0, helper.make_node("Add", ["ids", "one"], ["ids1"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    model.graph.node[1].input[1] = "ids1"
    ctx = PassContext(calibration=_feeds([[1, 2, 3, 4], [2, 2, 5, 7]]))
    res = PassManager(parse_pipeline("cluster{embedding_vector=8 embedding_bits=4 activation_aware=true "
                                     "min_size=100}")).run(model, ctx)
    st = res.ledger[-1].pass_stats
    assert st["weighted"] == 2  # the table (token counts) and the MatMul weight (input norms)
    assert ctx.counters["calibration_runs"] == 1


def test_half_tables_decode_exactly_odd_and_small_tables_fall_back_to_scalar(rng):
    half = _model(_table(rng).astype(np.float16))
    half.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(half.graph.initializer[1]).astype(np.float16), "w"))
    half.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    out, st = _run(half, "cluster{embedding_vector=8 min_size=100 exclude=[w]}")
    assert st["tables"] == {"emb": "v8"}
    got = _decoded(out)
    assert got.dtype == np.float16 and len(np.unique(got[:, :8], axis=0)) <= 256
    ids = np.array([1, 2, 3, 4])
    np.testing.assert_array_equal(ort_run(out, {"ids": ids})[0], ort_run(_swap16(half, got), {"ids": ids})[0])
    odd = _model(rng.standard_normal((V, 30)).astype(np.float32))  # 30 values per row: no blocks of 8
    _, st = _run(odd, "cluster{embedding_vector=8 min_size=100 exclude=[w]}")
    assert st["tables"] == {"emb": "4"} and "vector-codebook" not in st["storage"]
    small = _model(rng.standard_normal((512, 32)).astype(np.float32))  # 512 positions: codebooks > codes
    _, st = _run(small, "cluster{embedding_vector=8 min_size=100 exclude=[w]}")
    assert st["tables"] == {"emb": "4"}
    medium = _model(_table(rng, v=3000))  # too few rows for 256 codes of 8 values, enough for 64
    out, st = _run(medium, "cluster{embedding_vector=8 min_size=100 exclude=[w]}")
    assert st["tables"] == {"emb": "v8"}
    books = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith(("_codebook",
                                                                                             "_codebook16")))
    assert books.shape == (4 * 64, 8)


def _swap16(model, table):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == "emb":
            t.CopyFrom(numpy_helper.from_array(table, "emb"))
    return m
