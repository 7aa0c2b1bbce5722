"""quantize: the automatic float-layer choice weighs measured latency/size against fidelity (issue 18, item 2).

Latency is measured through ``ctx.latency`` with ``onnxcompress.latency.measure_latency`` replaced by a MAC model
(int8 Convs take 0.35 of their float time): deterministic, and the decisions still go through the profile."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager

INT8_TIME = 0.35
OUTLIER = 3.0


@pytest.fixture(autouse=True)
def _own_latency_cache(tmp_path, monkeypatch):
    """Each test its own per-machine latency cache: stubbed timings never reach the user's cache, and a cached
    value from an earlier run never hides a measurement a test counts."""
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path / "latency-cache"))


def dominant_conv_net(seed: int = 0, noisy: str = "c2") -> onnx.ModelProto:
    """c1 (3->8) -> c2 (8->96, 3x3: ~90% of the MACs; weights with an outlier on an input channel that is always 0, so its
    int8 weights are coarse) -> c3 (96->4, 1x1): the output."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 13]>
    g (float[1,4,24,24] x) => (float[1,4,24,24] y) {
      c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r1 = Relu(c1)
      c2 = Conv<pads=[1,1,1,1]>(r1, w2, b2)
      r2 = Relu(c2)
      y = Conv(r2, w3, b3)
    }""")
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.4
    w2 = rng.standard_normal((96, 8, 3, 3)).astype(np.float32) * 0.1
    if noisy == "c2":
        w1[0] = 0.0  # channel 0 of r1 is always 0 ...
        w2[:, 0, 1, 1] = OUTLIER  # ... and c2's weights on it set c2's per-channel scales: coarse int8 weights
    else:  # the same on c1: input channel 3 is always 0 in the feeds
        w1[:, 3, 1, 1] = OUTLIER * 4
    arrays = {
        "w1": w1,
        "b1": np.r_[0.0 if noisy == "c2" else 0.1, rng.standard_normal(7) * 0.1].astype(np.float32),
        "w2": w2,
        "b2": rng.standard_normal(96).astype(np.float32) * 0.1,
        "w3": rng.standard_normal((4, 96, 1, 1)).astype(np.float32) * 0.2,
        "b3": rng.standard_normal(4).astype(np.float32) * 0.1,
    }
    for name, a in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(a, name))
    onnx.checker.check_model(m)
    return m


def _macs(model: onnx.ModelProto) -> dict[str, float]:
    """MACs of each Conv by weight name (24x24 maps everywhere)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            shape = inits[n.input[1]]
            out[n.input[1]] = float(np.prod(shape)) * 24 * 24
    return out


@pytest.fixture
def mac_latency(monkeypatch):
    """measure_latency -> Σ MACs of every Conv/Gemm, int8 ones (weight read through a DQ) at INT8_TIME."""
    import onnxcompress.latency as latency

    calls = []

    def fake(models, feed, **kw):
        calls.append(list(models))
        times = {}
        for key, m in models.items():
            macs = _macs_of(m)
            times[key] = sum(v * (INT8_TIME if q else 1.0) for v, q in macs)
        return times

    monkeypatch.setattr(latency, "measure_latency", fake)
    return calls


_BASE_MACS: dict[str, float] = {}


def _macs_of(m: onnx.ModelProto) -> list[tuple[float, bool]]:
    out = []
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            w = n.input[1]
            base = w.removesuffix("_dequantized")
            out.append((_BASE_MACS.get(base, 0.0), base != w))
    return out


def _quantize(model, feeds, **options):
    options.setdefault("weight_rounding", "nearest")  # optimised rounding removes this noise (test_quantize_rounding)
    ctx = PassContext(calibration=load_feeds(feeds, model))
    result = PassManager([Quantize(**options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats, ctx


def _feeds(n=16, seed=3):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, 1, 4, 24, 24)).astype(np.float32)
    xs[:, :, 3] = 0.0
    return [{"x": x} for x in xs]


def _float_convs(q: onnx.ModelProto) -> set[str]:
    return {n.input[1] for n in q.graph.node if n.op_type == "Conv" and not n.input[1].endswith("_dequantized")}


def test_the_conv_that_holds_most_macs_is_not_kept_float_for_a_few_db(mac_latency):
    model = dominant_conv_net()
    _BASE_MACS.clear()
    _BASE_MACS.update(_macs(model))
    assert _BASE_MACS["w2"] / sum(_BASE_MACS.values()) > 0.85
    q, stats, ctx = _quantize(model, _feeds(), calibration="minmax")
    auto = stats["auto_float"]
    # the old rule (feature-SQNR gain >= 1 dB, best first) kept the dominant Conv float (3.5 dB here)
    top = max(auto["top_gains_db"], key=auto["top_gains_db"].get)
    assert auto["top_gains_db"][top] >= 1.0 and auto["feature_sqnr_db_all_int8"] < 30
    assert "w2" not in _float_convs(q) and _float_convs(q) == set()
    assert auto["kept_float"] == [] and stats["kept_float"] == []
    rej = next(r for r in auto["rejected"] if r["layer"] == top)
    assert rej["macs_share"] > 0.85 and rej["latency_cost"] > 0.5 and rej["reason"].startswith("kept int8")
    conv2 = next(n.name for n in q.graph.node if n.op_type == "Conv" and n.input[1] == "w2_dequantized")
    # the top candidate is the dominant Conv, alone or with its neighbour around one activation rounding
    assert top == conv2 or conv2 in rej.get("layers", []), rej
    # the old rule (no cost weighed, the gain alone decides) keeps the dominant Conv float: 0.99x latency territory
    q_old, s_old, _ = _quantize(model, _feeds(), calibration="minmax", auto_float_cost_per_db=float("inf"))
    assert "w2" in _float_convs(q_old) and s_old["kept_float"][0]["macs_share"] > 0.85
    # latency went through the run's profile: all-int8 and the one-layer-float candidate (+ the guard's replay)
    assert ctx.latency.measured >= 2 and all(k.startswith("quantize/") for k in ctx.latency.entries)


def test_a_cheap_noisy_layer_is_still_kept_float_and_listed_with_its_reason(mac_latency):
    """The same net where the coarse weights are in c1 (~7% of the MACs): float costs little, so it stays float."""
    model = dominant_conv_net(noisy="c1")
    _BASE_MACS.clear()
    _BASE_MACS.update(_macs(model))
    q, stats, _ = _quantize(model, _feeds(), calibration="minmax")
    auto = stats["auto_float"]
    assert len(auto["kept_float"]) == 1, auto
    (layer,) = auto["kept_float"]
    (rec,) = stats["kept_float"]
    assert rec["layer"] == layer and rec["reason"].startswith("kept float automatically")
    assert rec["macs_share"] < 0.1 and rec["fidelity_gain_db"] >= 1.0 and 0 < rec["latency_cost"] <= 0.1
    assert rec["output_sqnr_gain_db"] > 0 and 0 < rec["size_cost"] < 0.1
    assert _float_convs(q) == {"w1"}


def test_layers_join_the_float_set_one_at_a_time_only_while_the_set_improves(monkeypatch):
    """Greedy choice on stubbed measurements: a, b and c each help alone; {a, b} is worse at the outputs than {a}
    (effects are not additive), {a, c} is better: a and c stay float, b's reason names the set."""
    from types import SimpleNamespace

    from onnxcompress.passes.quantize import float_cost as fc

    sqnr = {"all": 12.0, "a": 20.0, "b": 14.0, "c": 13.0, "a+b": 10.0, "a+c": 22.0}
    monkeypatch.setattr(fc, "measure", lambda run, model, ref, feed, against=None: fc.Candidate(
        {"cosine": 0.99, "sqnr_db": sqnr[model]}, 0.40 + 0.01 * model.count("+"), 1000))
    monkeypatch.setattr(fc, "macs_shares", lambda run, feed: {})
    monkeypatch.setattr(fc.io, "weight_bytes", lambda m: 4000)
    run = SimpleNamespace(
        p=SimpleNamespace(auto_float_cost_per_db=0.05), float_model=None, stats={},
        build=lambda names: SimpleNamespace(graph="+".join(sorted(names))), export=lambda g: g,
    )
    chosen, kept, rejected = fc.choose(run, {"a": 3.0, "b": 2.0, "c": 1.5}, {"a": "a", "b": "b", "c": "c"}, "all",
                                       None, {})
    assert chosen == ["a", "c"] and [r["layer"] for r in rejected] == ["b"]
    assert "with a float as well the outputs reach 10.0 dB" in rejected[0]["reason"]
    assert kept[1]["set_latency_cost"] == pytest.approx(0.01)
