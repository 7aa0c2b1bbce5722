"""prune-layers: greedy removal vs exhaustive search, budgets and bad input, weights gone from the file, exact no-op
removal, the latency budget through ctx.latency, composition with distill / prune-channels / quantize."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from onnxcompress import io
from onnxcompress.analyses.blocks_graph import bypass_model
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.manager import PassManager
from onnxcompress.output_error import relative_output_error as output_error
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run
from tests.test_blocks import noop_model, plain_chain, residual_cnn, transformer


def _feeds(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _run(model, pipeline, feeds=None, latency=None):
    ctx = PassContext(calibration=load_feeds(feeds or _feeds(model), model))
    if latency is not None:
        ctx.latency = latency
    res = PassManager(parse_pipeline(pipeline)).run(model, ctx)
    return res, ctx


def _stats(res, name="prune-layers"):
    return next(r.pass_stats for r in res.ledger if r.stage.startswith(name))


def _model(res):
    return res.model if hasattr(res, "model") else res.compressed


def test_greedy_order_equals_exhaustive_search():
    model = residual_cnn(scales=(0.3, 0.05, 0.6, 0.15, 0.02)[:4])
    feeds = _feeds(model, 8)
    base = [ort_run(model, f) for f in feeds]
    pairs = [(f"h{i}", f"add{i}") for i in range(4)]
    for k in (1, 2, 3):
        best = min(itertools.combinations(range(4), k),
                   key=lambda c: output_error(base, [ort_run(bypass_model(model, [pairs[i] for i in c]), f)
                                                     for f in feeds]))
        res, _ = _run(model, f"prune-layers{{layers={k} kinds=[residual] trials=0 samples=8}}", feeds)
        chosen = {s["exit"] for s in _stats(res)["steps"]}
        assert chosen == {pairs[i][1] for i in best}, k


def test_removed_unit_weights_are_gone_from_the_file(tmp_path):
    model = residual_cnn(scales=(1.0, 0.01))
    res, _ = _run(model, "prune-layers{layers=1 kinds=[residual]}")
    st = _stats(res)
    assert st["steps"][0]["exit"] == "add1" and st["params_removed"] == 2 * (8 * 8 * 9 + 8)
    path = tmp_path / "small.onnx"
    res.save(path)
    saved = onnx.load(path)
    names = {t.name for t in saved.graph.initializer}
    assert not names & {"wa1", "ba1", "wb1", "bb1"} and {"wa0", "wb0"} <= names
    assert path.stat().st_size < len(model.SerializeToString()) - 4 * 2 * 8 * 8 * 9
    # the written model is the skip path of block 1
    f = _feeds(model, 1, seed=5)[0]
    np.testing.assert_allclose(ort_run(saved, f)[0], ort_run(bypass_model(model, [("h1", "add1")]), f)[0],
                               rtol=1e-5, atol=1e-6)


def test_noop_layers_removed_exactly():
    model = noop_model()
    res, _ = _run(model, "prune-layers")
    st = _stats(res)
    assert len(st["noops_removed"]) == 9 and st["skipped"].startswith("no budget")
    out = _model(res)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Conv", "Relu", "GlobalAveragePool", "Flatten"]
    for f in _feeds(model, 4, seed=1):
        np.testing.assert_allclose(ort_run(out, f)[0], ort_run(model, f)[0], rtol=1e-6, atol=1e-7)


def test_transformer_layers_removed_whole():
    model = transformer(post_ln=True, layers=3)
    res, _ = _run(model, "prune-layers{layers=2 kinds=[transformer]}")
    st = _stats(res)
    assert [s["kind"] for s in st["steps"]] == ["transformer", "transformer"]
    out = _model(res)
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == 1
    assert sum(n.op_type == "LayerNormalization" for n in out.graph.node) == 2
    units = {(u["kind"], u["exit"]): u for u in st["units"]}
    assert all("error_alone" in u for (k, _), u in units.items() if k == "transformer")


@pytest.mark.parametrize("opts, maximum", [("layers=2", 1), ("layers=5", 1), ("ratio=0.9", 1)])
def test_budget_removing_every_unit_is_bad_input(opts, maximum):
    model = residual_cnn()
    with pytest.raises(BadInputError, match=f"at most {maximum}") as err:
        _run(model, f"prune-layers{{{opts} kinds=[residual]}}")
    assert "2 removable units (2 residual;" in str(err.value)  # the kinds found, not the option's list


def test_no_removable_unit_leaves_model_unchanged():
    model = plain_chain()
    res, _ = _run(model, "prune-layers{layers=1}")
    st = _stats(res)
    assert st["candidates"] == 0 and "no removable unit" in st["skipped"]
    assert not res.ledger[-1].modified
    f = _feeds(model, 1)[0]
    np.testing.assert_array_equal(ort_run(_model(res), f)[0], ort_run(model, f)[0])


class _Stub(LatencyProfile):
    """Latency ratios in call order: the first call is the all-units-removed floor, then one per step."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)
        self.keys = []

    def measure(self, key, fn):
        self.keys.append(key)
        return self.values.pop(0)


def test_target_latency_goes_through_the_profile():
    model = residual_cnn(scales=(0.5, 0.5, 0.5))
    stub = _Stub([0.4, 0.85, 0.66, 0.5])
    res, _ = _run(model, "prune-layers{target_latency=0.7 kinds=[residual]}", latency=stub)
    st = _stats(res)
    assert [s["latency_ratio"] for s in st["steps"]] == [0.85, 0.66] and st["latency_all_removed"] == 0.4
    assert all(k.startswith("prune-layers/latency/") for k in stub.keys) and len(stub.keys) == 3


def test_target_latency_below_reachable_is_bad_input():
    model = residual_cnn(scales=(0.5, 0.5))
    with pytest.raises(BadInputError, match="0.550"):
        _run(model, "prune-layers{target_latency=0.3 kinds=[residual]}", latency=_Stub([0.55]))


def test_min_fidelity_stops_before_the_floor():
    model = residual_cnn(scales=(0.02, 1.0, 1.0))
    res, _ = _run(model, "prune-layers{min_fidelity=0.99 kinds=[residual] trials=0}")
    st = _stats(res)
    assert [s["exit"] for s in st["steps"]] == ["add0"] and "min_fidelity" in st["stopped"]
    assert st["steps"][0]["cosine"] >= 0.99


def test_exclude_keeps_a_unit():
    model = residual_cnn(scales=(1.0, 0.01))
    res, _ = _run(model, "prune-layers{layers=1 kinds=[residual] exclude=[n_cb1]}")
    assert _stats(res)["steps"][0]["exit"] == "add0"


def test_distill_after_prune_layers_refits_and_recovers():
    model = residual_cnn(scales=(0.6, 0.6, 0.6), seed=2)
    feeds = _feeds(model, 48, seed=3)
    alone, _ = _run(model, "prune-layers{layers=1 kinds=[residual]}", feeds)
    both, _ = _run(model, "prune-layers{layers=1 kinds=[residual]},distill{samples=48}", feeds)
    assert _stats(both, "distill")["layers_refit"] >= 1
    ev = _feeds(model, 16, seed=9)
    base = [ort_run(model, f) for f in ev]
    err_alone = output_error(base, [ort_run(_model(alone), f) for f in ev])
    err_both = output_error(base, [ort_run(_model(both), f) for f in ev])
    assert err_both < 0.8 * err_alone


def test_composes_with_prune_channels_and_quantize():
    model = residual_cnn(scales=(0.3, 0.3), c=16)
    res, _ = _run(model, "prune-channels{ratio=0.25 round_to=1},prune-layers{layers=1 kinds=[residual]},"
                         "distill{samples=8},quantize{mode=dynamic}")
    out = _model(res)
    assert _stats(res)["steps"][0]["kind"] == "residual"
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear")
               for n in out.graph.node) or len(out.graph.node) < len(model.graph.node)
    y = ort_run(out, _feeds(model, 1)[0])[0]
    assert y.shape == (1, 5) and np.all(np.isfinite(y))
    assert io.to_graph(out) is not None
