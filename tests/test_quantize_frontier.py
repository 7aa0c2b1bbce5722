"""quantize{sensitivity=greedy_cost}: mixed precision one activation rounding at a time (``float_frontier``).

The net's stem output has one narrow channel that a depthwise Conv amplifies: its per-tensor int8 rounding is the
model's largest error, and it goes away only when *both* Convs next to it run float (ORT needs integer input and
output for an integer Conv), which a per-layer search cannot see."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize import fidelity as fid
from onnxcompress.passes.quantize.float_frontier import noise, rounding_units
from onnxcompress.passes.quantize.static_run import StaticRun

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.runtime import Session


@pytest.fixture(autouse=True)
def _own_latency_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path / "latency-cache"))


def stem_net(seed: int = 0) -> onnx.ModelProto:
    """stem (4->8, 3x3) -> Clip(0, 6) -> Pad -> dw (8 channels, 3x3, no pads) -> proj (8->128) -> Relu -> head
    (128->4; with proj 81% of the weight bytes): channel 0 of the stem output is 200x narrower than the others and dw amplifies it 200x."""
    rng = np.random.default_rng(seed)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4,20,20] x) => (float[1,4,20,20] y) {
      s = Conv<pads=[1,1,1,1]>(x, ws, bs)
      c = Clip(s, lo, hi)
      p = Pad(c, pads)
      d = Conv<group=8>(p, wd, bd)
      q = Conv(d, wp, bp)
      r = Relu(q)
      y = Conv(r, wh, bh)
    }""")
    ws = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.5
    ws[0] *= 1 / 200
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3
    wd[0] *= 200
    arrays = {
        "ws": ws, "bs": np.full(8, 0.5, np.float32) * np.r_[1 / 200, np.ones(7)].astype(np.float32),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "wd": wd, "bd": np.zeros(8, np.float32),
        "wp": rng.standard_normal((128, 8, 1, 1)).astype(np.float32) * 0.4, "bp": np.zeros(128, np.float32),
        "wh": rng.standard_normal((4, 128, 1, 1)).astype(np.float32) * 0.1, "bh": np.zeros(4, np.float32),
    }
    for name, a in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(a, name))
    for i, n in enumerate(m.graph.node):
        n.name = f"n{i}_{n.op_type}_{n.output[0]}"
    onnx.checker.check_model(m)
    return m


def _feeds(n: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 20, 20)).astype(np.float32)} for _ in range(n)]


def _quantize(model, feeds, **options):
    options.setdefault("weight_rounding", "nearest")
    options.setdefault("auto_float_db", 0.0)
    options.setdefault("latency_guard", False)  # a 20x20 toy net is not faster in int8
    ctx = PassContext(calibration=load_feeds(feeds, model))
    result = PassManager([Quantize(**options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def _sqnr(model: onnx.ModelProto, q: onnx.ModelProto, feeds) -> float:
    with Session(model, threads=1) as a, Session(q, threads=1) as b:
        r = np.concatenate([a.run(f, ["y"])[0].ravel() for f in feeds]).astype(np.float64)
        c = np.concatenate([b.run(f, ["y"])[0].ravel() for f in feeds]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - c) ** 2)))


def _float_convs(q: onnx.ModelProto) -> set[str]:
    return {n.input[1] for n in q.graph.node if n.op_type == "Conv" and not n.input[1].endswith("_dequantized")}


def test_rounding_units_group_the_layers_around_each_rounding():
    model = stem_net()
    ctx = PassContext(calibration=load_feeds(_feeds(), model))
    ctx.original_bytes = model.SerializeToString()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    io.prepare_for_import(work)
    ctx.model_template = work
    run = StaticRun(Quantize(weight_rounding="nearest", auto_float_db=0.0), io.to_graph(work), ctx)
    assert run.setup() is not None
    b = run.build()
    layers = b.plan.int8_anchor_names()
    units = rounding_units(run, run.export(b.graph), layers)
    stem, dw = layers[0], layers[1]
    assert "Conv_s" in stem and "Conv_d" in dw
    # the Clip output and the Pad output are rounded alike: both units are {stem, dw}
    around_stem = {t: u for t, u in units.items() if t in ("c", "p")}
    assert around_stem and all(u == [stem, dw] for u in around_stem.values()), units
    # the model input's rounding: only the stem reads it
    assert units.get("x") == [stem]


def test_greedy_cost_keeps_both_layers_around_the_costly_rounding_float():
    model, feeds = stem_net(), _feeds()
    q0, _ = _quantize(model, feeds)
    base = _sqnr(model, q0, feeds)
    target = base + 6.0
    q, stats = _quantize(model, feeds, sensitivity="greedy_cost", min_sqnr_db=target)
    mp = stats["mixed_precision"]
    assert mp["search"] == "greedy_cost" and mp["met"] is True, mp
    # the first pick is the stem-output rounding: both Convs around it float, the others int8
    assert {"ws", "wd"} <= _float_convs(q) and "wh" not in _float_convs(q)
    assert mp["path"][0]["pick"] == "" and mp["path"][1]["pick"] in ("c", "p")
    assert _sqnr(model, q, feeds) >= target  # checked under ORT against the float model
    reasons = {r["layer"]: r["reason"] for r in stats["kept_float"]}
    assert any("greedy_cost" in r for r in reasons.values())
    # per layer, neither Conv alone removes that rounding: the leave-one-out search needs more float layers to
    # meet the same target, or misses it
    q_loo, s_loo = _quantize(model, feeds, min_sqnr_db=target)
    assert not s_loo["mixed_precision"]["met"] or len(_float_convs(q_loo)) > len(_float_convs(q))


def test_max_latency_is_decided_by_the_measured_build(monkeypatch):
    """Stubbed timings: in a whole model every float Conv costs 1, an int8 one 0.3 (by weight name), while the
    isolated layer pairs (``layer_speed``: weights ``W`` / ``Wd``) time alike: the estimates say float is free, the
    measured build says it is not, and the measurement decides."""
    import onnxcompress.latency as latency

    def fake(models, feed, **kw):
        out = {}
        for k, m in models.items():
            convs = [n for n in m.graph.node if n.op_type == "Conv"]
            out[k] = sum(0.3 if n.input[1].endswith("_dequantized") or n.input[1] in ("W", "Wd") else 1.0 for n in convs)
            out[k] = max(out[k], 1e-3)
        return out

    monkeypatch.setattr(latency, "measure_latency", fake)
    model, feeds = stem_net(), _feeds()
    q, stats = _quantize(model, feeds, sensitivity="greedy_cost", max_latency=0.31)
    mp = stats["mixed_precision"]
    assert mp["layers_float"] == 0 and _float_convs(q) == set(), mp
    measured = [s["latency_measured"] for s in mp["path"] if "latency_measured" in s]
    assert measured and all(r > 0.31 for r in measured)


def test_targets_and_options():
    s = {"cosine": 0.999, "sqnr_db": 24.0, "agreement": 1.0}
    assert fid.meets(s, 0.99, None) and not fid.meets(s, 0.99, None, 25.0) and fid.meets(s, None, None, 24.0)
    assert noise({"sqnr_db": 20.0}, "sqnr_db") == pytest.approx(0.01)
    assert noise({"sqnr_db": 10.0, "feature_sqnr_db": 30.0}, "feature_sqnr_db") == pytest.approx(0.001)
    with pytest.raises(ValueError, match="greedy_cost"):
        Quantize(max_latency=0.5)
    with pytest.raises(ValueError, match="max_latency"):
        Quantize(sensitivity="greedy_cost", max_latency=0.0)
    with pytest.raises(ValueError, match="sensitivity"):
        Quantize(sensitivity="greedy")


def _whole_model_times(free: frozenset[str]):
    """A stub for ``measure_latency``: each Conv of a whole model costs 1 float, 0.3 int8 (weight read through a DQ),
    and 0.3 either way for the Convs whose weight is in ``free``; layer pairs (``W``/``Wd``) cost 1 and 0.3."""

    def fake(models, feed, **kw):
        out = {}
        for k, m in models.items():
            t = 0.0
            for n in m.graph.node:
                if n.op_type != "Conv":
                    continue
                w = n.input[1].removesuffix("_dequantized")
                t += 0.3 if n.input[1] != w or w in free or w == "Wd" else 1.0
            out[k] = max(t, 1e-3)
        return out

    return fake


@pytest.mark.parametrize("free", [frozenset(), frozenset({"ws", "wd"})])
def test_the_default_search_keeps_a_group_float_only_when_it_costs_no_latency(monkeypatch, free):
    import onnxcompress.latency as latency

    monkeypatch.setattr(latency, "measure_latency", _whole_model_times(free))
    model, feeds = stem_net(), _feeds()
    q, stats = _quantize(model, feeds, auto_float_db=1.0)
    auto = stats["auto_float"]
    group = [r for r in auto["rejected"] + [k for k in stats["kept_float"]] if r.get("layers")]
    assert group, auto  # the stem-output group was a candidate (ranked, built, measured)
    if free:  # float stem + dw measured as fast as int8: kept, both layers, with the group's reason
        assert {"ws", "wd"} <= _float_convs(q)
        assert all("rounding of" in r["reason"] for r in stats["kept_float"] if r["layer"] in group[0]["layers"])
        assert _sqnr(model, q, feeds) > _sqnr(model, _quantize(model, feeds)[0], feeds) + 3.0
    else:  # +35% latency: within the per-dB allowance it would pass; a group is held to 2%
        assert not ({"ws", "wd"} <= _float_convs(q))
        assert any("layers around a rounding" in r["reason"] for r in auto["rejected"])


def test_greedy_cost_without_a_target_is_refused_at_validation(tmp_path, capsys):
    """Without max_latency or a fidelity target the greedy search has nothing to stop at or to fit in: it used to
    run no search and say nothing; now the option check refuses it (exit 2 from the CLI, nothing written)."""
    from pathlib import Path

    from onnxcompress.cli import main

    for sens in ("greedy_cost", "one_at_a_time"):
        with pytest.raises(ValueError, match=f"sensitivity={sens} .*target"):
            Quantize(sensitivity=sens)
    Quantize(sensitivity="greedy_cost", max_latency=0.5)
    Quantize(sensitivity="greedy_cost", min_sqnr_db=25.0)
    Quantize(sensitivity="one_at_a_time", min_cosine=0.99)
    root = Path(__file__).resolve().parents[1] / "models"
    out = tmp_path / "q.onnx"
    code = main(["compress", str(root / "digits_cnn.onnx"), "-o", str(out), "--passes",
                 "quantize{sensitivity=greedy_cost}", "--calib", str(root / "digits_calib.npz"), "--no-latency"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and not out.exists(), err
    assert len(lines) == 1 and "greedy_cost" in lines[0] and "max_latency" in lines[0], err
