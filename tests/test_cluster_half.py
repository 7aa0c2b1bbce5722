"""cluster{half_codebooks}: codebooks and channel scales stored as float16 where the measured rounding is cheap."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.half_books import MAX_SHARE, OVERHEAD_CAST, rounded

from onnxcompress.context import PassContext
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

N_IN, N_OUT = 96, 128


def _model(w):
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N_OUT])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, pipeline):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext())
    return res.model, res.ledger[-1].pass_stats


def _decoded(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name="w_clustered"))
    return ort_run(m, {"x": np.zeros((4, N_IN), np.float32)})[-1]


def test_half_tables_decode_exactly_and_shrink_the_file(rng):
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    model = _model(w)
    pipe = "cluster{bits=4 min_size=100 storage=codebook%s}"
    half, st = _run(model, pipe % "")
    full, st_f = _run(model, pipe % " half_codebooks=false")
    assert st["half_codebooks"] == 1 and st_f["half_codebooks"] == 0
    dtypes = {t.name: t.data_type for t in half.graph.initializer}
    assert dtypes["cl1_codebook16"] == TensorProto.FLOAT16 and dtypes["cl1_scale16"] == TensorProto.FLOAT16
    dw, dw_full = _decoded(half), _decoded(full)
    # <= 16 values per channel; the float16 rounding moved the weights by <= 1% of the clustering error
    assert max(np.unique(r).size for r in dw.T) <= 16
    moved = float(np.sum((dw.astype(np.float64) - dw_full) ** 2))
    assert moved <= MAX_SHARE * float(np.sum((w.astype(np.float64) - dw_full) ** 2))
    saved = len(full.SerializeToString()) - len(half.SerializeToString())
    planned = st_f["bytes_after"] - st["bytes_after"]
    assert saved > 0 and abs(saved - planned) < OVERHEAD_CAST
    x = {"x": rng.standard_normal((4, N_IN)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(half, x)[0], x["x"] @ dw, rtol=1e-5, atol=1e-4)


def test_values_outside_float16_and_cheap_errors_stay_float32(rng):
    tiny = (rng.standard_normal((N_IN, N_OUT)) * 1e-6).astype(np.float32)  # below float16's normal range
    _, st = _run(_model(tiny), "cluster{bits=4 min_size=100 storage=codebook}")
    assert st["half_codebooks"] == 0  # subnormal steps (2^-24) are ~6% of these values: the measured share refuses
    # 8 bits on values that sit on 200 levels: the clustering is nearly exact, float16 rounding would dominate it
    levels = np.linspace(-1, 1, 200).astype(np.float32)
    exact = levels[rng.integers(0, 200, (N_IN, N_OUT))]
    _, st = _run(_model(exact), "cluster{bits=8 min_size=100 storage=codebook channel_scales=false}")
    assert st["half_codebooks"] == 0
    assert rounded(np.array([70000.0], np.float32)) is None and rounded(np.zeros(3, np.float32)) is not None


def test_a_few_subnormal_codebook_values_do_not_keep_the_table_float32(rng):
    # a table of normal values with a few below 2^-14 (MiniLM-L6's word-table codebook: 99 of 98,304) rounds to
    # float16 subnormals, within 2^-25 absolute: the codebook is halved when the measured share allows it
    book = rng.standard_normal(4096).astype(np.float32)
    book[:5] = np.array([3e-5, -1e-6, 7e-8, 2e-7, -5e-5], np.float32)
    half = rounded(book)
    assert half is not None and half.dtype == np.float32
    assert np.max(np.abs(half[:5] - book[:5])) <= 2.0 ** -25
    assert np.all(np.abs(half[5:] - book[5:]) <= 2.0 ** -11 * np.abs(book[5:]))
