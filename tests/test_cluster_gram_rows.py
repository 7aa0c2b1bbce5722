"""cluster{gram_rows}: a layer whose feeds give few rows each (tokens) reads more feeds for its Gram."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.gram_rows import RowNeed, feeds_for_rows

from onnxcompress.context import PassContext
from onnxcompress.data import FeedSet, InputSpec
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

N_IN, N_OUT, TOKENS = 128, 96, 16


def test_only_data_limited_short_grams_ask_for_more_feeds():
    needs = {"tok": RowNeed(n_in=100, per_feed=64), "img": RowNeed(n_in=100, per_feed=64)}
    # tokens: 20 rows a feed (< 64: every row taken), 8 feeds = 160 rows; 32 x 100 wanted -> 160 feeds
    assert feeds_for_rows({"tok": 160}, needs, 8, 1000, 32) == 160
    assert feeds_for_rows({"tok": 160}, needs, 8, 100, 32) == 100  # capped at the calibration set
    # images: the sampling cut every feed to its 64-row share (nothing is short in the data)
    assert feeds_for_rows({"img": 512}, needs, 8, 1000, 32) == 8
    assert feeds_for_rows({"tok": 3200}, needs, 8, 1000, 32) == 8  # already enough rows
    assert feeds_for_rows({"tok": 160}, needs, 8, 1000, 0) == 8  # off
    assert feeds_for_rows({"tok": 160}, needs, 8, 8, 32) == 8  # nothing more to read
    # the largest need wins
    two = {"a": RowNeed(100, 64), "b": RowNeed(400, 64)}
    assert feeds_for_rows({"a": 160, "b": 160}, two, 8, 10_000, 4) == 80


def _model(w):
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, N_OUT])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _token_feeds(rng, n):
    """``n`` feeds of 16 rows each (a short sentence's tokens) of correlated, unevenly scaled features."""
    mix = rng.standard_normal((N_IN, N_IN)).astype(np.float32) / 3 + np.eye(N_IN, dtype=np.float32)
    scale = np.linspace(0.2, 3, N_IN, dtype=np.float32)
    return [{"x": (rng.standard_normal((TOKENS, N_IN)).astype(np.float32) @ mix) * scale} for _ in range(n)]


def _feedset(feeds):
    return FeedSet(lambda: iter(feeds), [InputSpec("x", np.dtype(np.float32), (TOKENS, N_IN))], "test", len(feeds))


def _held_out_error(model, ref, feeds):
    num = sum(float(np.sum((ort_run(model, f)[0] - ort_run(ref, f)[0]) ** 2)) for f in feeds)
    return num / sum(float(np.sum(ort_run(ref, f)[0] ** 2)) for f in feeds)


def test_token_feeds_read_more_calibration_and_generalise_better(rng):
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    model = _model(w)
    feeds = _token_feeds(rng, 48)
    calib, held = feeds[:40], feeds[40:]
    pipe = "cluster{bits=2 activation_aware=true refit=true min_size=100 samples=8 gram_rows=%s}"
    results = {}
    for rows in (0, 4):
        ctx = PassContext(calibration=_feedset(calib))
        res = PassManager(parse_pipeline(pipe % rows)).run(onnx.ModelProto.FromString(model.SerializeToString()),
                                                           ctx)
        results[rows] = (res.model, res.ledger[-1].pass_stats)
    # 8 feeds x 16 rows = 128 rows (1 per input); 4 per input wanted -> 8 x 512 / 128 = 32 feeds
    assert results[0][1]["gram_feeds"] == 8 and results[4][1]["gram_feeds"] == 32
    # a Gram of 128 rows for 128 inputs is nearly singular: the error feedback fits those rows, not new ones
    err_few, err_more = (_held_out_error(results[r][0], model, held) for r in (0, 4))
    assert err_more < 0.9 * err_few  # measured 0.81-0.85 over six seeds
