"""The shared activation-statistics store: one streaming run per need, results kept, numerics against ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run

from onnxcompress import io
from onnxcompress.analyses.activation_stats import ActivationStatistics, StatsRequest, teacher_statistics
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3])], [w1, w2])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _ctx(model: onnx.ModelProto, n: int = 5) -> tuple[PassContext, gs.Graph, list[dict]]:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(n)]
    ctx = PassContext(calibration=load_feeds(feeds, model), original_bytes=model.SerializeToString(),
                      model_template=model)
    return ctx, io.to_graph(model), feeds


def _exposed(model, feeds, name):
    from onnxcompress.analyses.activations import expose_outputs

    m = expose_outputs(model, [name])
    return [ort_run(m, f)[-1] for f in feeds]


def test_one_run_serves_every_request_already_collected():
    model = _mlp()
    ctx, graph, feeds = _ctx(model)
    store = ctx.analysis(ActivationStatistics, graph)
    store.get(StatsRequest(ranges=["h", "r"], histograms=True, channel_means={"h": -1}))
    assert ctx.counters["calibration_runs"] == 1
    # a second pass asking for a subset of the same statistics: no new run
    ctx.analysis(ActivationStatistics, graph).get(StatsRequest(ranges=["r"], channel_means={"h": -1}))
    assert ctx.counters["calibration_runs"] == 1
    # something new: one more run, for it alone
    store.get(StatsRequest(ranges=["y"]))
    assert ctx.counters["calibration_runs"] == 2
    hs = np.concatenate(_exposed(model, feeds, "h"))
    st = store.range_of("h")
    assert st.min == pytest.approx(float(hs.min())) and st.max == pytest.approx(float(hs.max()))
    np.testing.assert_allclose(store.channel_mean("h", -1), hs.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_gram_matrix_equals_numpy_reference_from_exposed_activations():
    model = _mlp()
    ctx, graph, feeds = _ctx(model)
    store = ctx.analysis(ActivationStatistics, graph)
    store.get(StatsRequest(second_moments={"r:rows": ("r", lambda a: a.reshape(-1, a.shape[-1]))}))
    rs = np.concatenate([a.reshape(-1, 8) for a in _exposed(model, feeds, "r")]).astype(np.float64)
    gram = store.gram("r:rows")
    np.testing.assert_allclose(gram.xtx, rs.T @ rs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gram.channel_sq_norms, (rs**2).sum(axis=0), rtol=1e-6)
    assert gram.rows == rs.shape[0]


def test_statistics_over_fewer_feeds_are_kept_apart():
    model = _mlp()
    ctx, graph, feeds = _ctx(model)
    store = ctx.analysis(ActivationStatistics, graph)
    store.get(StatsRequest(ranges=["h"], samples=2))
    store.get(StatsRequest(ranges=["h"]))
    assert ctx.counters["calibration_runs"] == 2
    two = np.concatenate(_exposed(model, feeds[:2], "h"))
    assert store.range_of("h", samples=2).max == pytest.approx(float(two.max()))


def test_dropped_grams_free_their_bytes_and_only_their_feed_count():
    model = _mlp()
    ctx, graph, feeds = _ctx(model)
    store = ctx.analysis(ActivationStatistics, graph)
    req = {"r:rows": ("r", lambda a: a.reshape(-1, a.shape[-1]))}
    store.get(StatsRequest(second_moments=req, samples=2))
    store.get(StatsRequest(second_moments=req, samples=4))
    two = store.gram("r:rows", samples=2)
    assert store.drop_grams(["r:rows", "absent"], samples=2) == two.xtx.nbytes + two.row_sum.nbytes == 8 * 8 * 8 + 8 * 8
    assert store.gram("r:rows", samples=2) is None and store.drop_grams(["r:rows"], samples=2) == 0
    rs = np.concatenate([a.reshape(-1, 8) for a in _exposed(model, feeds[:4], "r")]).astype(np.float64)
    np.testing.assert_allclose(store.gram("r:rows", samples=4).xtx, rs.T @ rs, rtol=1e-6, atol=1e-6)
    store.get(StatsRequest(second_moments=req, samples=2))  # asked again: collected again
    assert ctx.counters["calibration_runs"] == 3 and store.gram("r:rows", samples=2).rows == 2 * 4


def test_current_graph_statistics_are_dropped_when_a_pass_changes_the_graph_teacher_ones_are_not():
    model = _mlp()
    ctx, graph, _ = _ctx(model)
    ctx.analysis(ActivationStatistics, graph).get(StatsRequest(ranges=["h"]))
    teacher_statistics(ctx).get(StatsRequest(ranges=["h"]))
    assert ctx.counters["calibration_runs"] == 2
    ctx.invalidate(frozenset())  # what the manager does after a pass that modified the graph
    assert "activation_statistics" not in ctx.cached_analyses()
    teacher_statistics(ctx).get(StatsRequest(ranges=["h"]))  # the original did not change: still cached
    assert ctx.counters["calibration_runs"] == 2


def test_no_calibration_data_is_a_clear_error():
    from onnxcompress.errors import PassError

    model = _mlp()
    ctx = PassContext(model_template=model)
    with pytest.raises(PassError, match="calibration"):
        ctx.analysis(ActivationStatistics, io.to_graph(model))
