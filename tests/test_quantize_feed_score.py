"""quantize{auto_float_score}: the automatic float-layer search scored feed by feed (``fidelity.FEED_SCORES``).

The toy: a chain of 1x1 Convs over two channels. Three "easy" feeds carry their signal in channel 1, one "hard" feed
in channel 0 at a tenth of their energy at the last layer's input. The stem scales channel 0 by 1e-3, so at the stem's
output the hard feed's signal sits far below one step of the (easy-feed-sized) activation grid: that rounding ruins
the hard feed and nothing else. Further on, channel 0 is amplified (10x) while channel 1 is shrunk (0.3x), so the
rounding of that tensor is coarse for the easy feeds (~10 dB) and fine for the hard one; the next Conv brings both
back. Pooled over the feeds, the coarse rounding holds almost all the error energy and the stem rounding almost none;
per feed, the stem rounding is the hard feed's whole error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize import fidelity as fid

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.runtime import Session

H = W = 24


@pytest.fixture(autouse=True)
def _own_latency_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path / "latency-cache"))


def chain_net() -> onnx.ModelProto:
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,2,{H},{W}] x) => (float[1,2,{H},{W}] y) {{
      a = Conv(x, w0, b0)
      b = Conv(a, w1, b1)
      c = Conv(b, w2, b2)
      d = Conv(c, w3, b3)
      y = Conv(d, wh, bh)
    }}""")

    def diag(g0: float, g1: float) -> np.ndarray:
        return np.diag([g0, g1]).astype(np.float32).reshape(2, 2, 1, 1)

    arrays = {"w0": diag(1e-3, 1.0), "w1": diag(1e3, 1.0), "w2": diag(10.0, 0.3), "w3": diag(0.03, 1 / 0.3),
              "wh": np.array([[1.0, 0.5], [-0.5, 1.0]], np.float32).reshape(2, 2, 1, 1)}
    for i in range(4):
        arrays[f"b{i}"] = np.zeros(2, np.float32)
    arrays["bh"] = np.zeros(2, np.float32)
    for name, a in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(a, name))
    for n in m.graph.node:
        n.name = f"conv_{n.output[0]}"
    onnx.checker.check_model(m)
    return m


def feeds(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """easy, easy, easy, hard (the search scores the first 4 evaluation feeds)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(4):
        x = np.zeros((1, 2, H, W), np.float32)
        x[0, 0 if k == 3 else 1] = rng.standard_normal((H, W))
        out.append({"x": x})
    return out


def _quantize(model, fs, **options):
    options.setdefault("weight_rounding", "nearest")
    options.setdefault("calibration", "minmax")
    options.setdefault("bias_correction", False)
    options.setdefault("latency_guard", False)  # a 2-channel toy is not faster in int8
    options.setdefault("auto_float_cost_per_db", float("inf"))  # the ranking decides; no timing of a toy
    ctx = PassContext(calibration=load_feeds(fs, model))
    result = PassManager([Quantize(**options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def _per_feed_sqnr(model, q, fs) -> list[float]:
    with Session(model, threads=1) as a, Session(q, threads=1) as b:
        out = []
        for f in fs:
            r, c = (np.asarray(s.run(f, ["y"])[0], np.float64) for s in (a, b))
            out.append(float(10 * np.log10(np.sum(r * r) / np.sum((r - c) ** 2))))
    return out


def _float_weights(q: onnx.ModelProto) -> set[str]:
    return {n.input[1] for n in q.graph.node if n.op_type == "Conv" and not n.input[1].endswith("_dequantized")}


def test_combine_feeds_weighs_every_feed_alike():
    sig, err = [100.0, 100.0, 1.0], [1.0, 1.0, 1.0]  # two feeds at 20 dB, a low-energy one at 0 dB
    assert fid.combine_feeds(sig, err, "pooled") == pytest.approx(10 * np.log10(201 / 3))
    assert fid.combine_feeds(sig, err, "worst_feed") == pytest.approx(0.0)
    assert fid.combine_feeds(sig, err, "mean_feed_db") == pytest.approx(40 / 3)
    assert fid.combine_feeds(sig, err, "mean_feed_nsr") == pytest.approx(-10 * np.log10((0.01 + 0.01 + 1) / 3))
    # an exact feed or an empty one is clipped, not inf / -inf
    assert fid.combine_feeds([1.0, 1.0], [0.0, 1.0], "mean_feed_db") == pytest.approx(fid.FEED_DB_CLIP / 2)
    assert fid.combine_feeds([0.0, 0.0], [1.0, 0.01], "worst_feed") == -fid.FEED_DB_CLIP
    # a near-empty feed is measured against FEED_ENERGY_FLOOR of the mean feed's energy, not its own
    near_empty = fid.combine_feeds([1e-9, 2.0], [1e-4, 0.02], "worst_feed")
    assert near_empty == pytest.approx(10 * np.log10(fid.FEED_ENERGY_FLOOR * (1e-9 + 2.0) / 2 / 1e-4))
    with pytest.raises(ValueError):
        fid.combine_feeds(sig, err, "median")


def test_toy_the_stem_rounding_ruins_only_the_hard_feed():
    """The premise, under ORT: the pooled-default int8 model leaves the hard feed's output at about 0 dB while the
    easy ones sit near 10 dB, and the pooled SQNR hardly sees it."""
    model, fs = chain_net(), feeds()
    q, _ = _quantize(model, fs, auto_float_db=0.0)
    per_feed = _per_feed_sqnr(model, q, fs)
    assert per_feed[3] < 3.0 and min(per_feed[:3]) > 6.0, per_feed


def test_pooled_search_misses_the_rounding_that_ruins_the_low_energy_feed():
    model, fs = chain_net(), feeds()
    q, stats = _quantize(model, fs)  # auto_float_score=pooled (the default)
    af = stats["auto_float"]
    assert af["feed_score"] == "pooled"
    assert not {"w0", "w1"} <= _float_weights(q), af  # the stem rounding stays
    assert _per_feed_sqnr(model, q, fs)[3] < 3.0


def test_worst_feed_search_keeps_the_stem_rounding_out():
    model, fs = chain_net(), feeds()
    q, stats = _quantize(model, fs, auto_float_score="worst_feed")
    af = stats["auto_float"]
    assert af["feed_score"] == "worst_feed"
    assert {"w0", "w1"} <= _float_weights(q), af  # both Convs around the stem rounding float
    per_feed = _per_feed_sqnr(model, q, fs)
    q_pooled, _ = _quantize(model, fs)
    assert per_feed[3] > _per_feed_sqnr(model, q_pooled, fs)[3] + 10.0, per_feed  # checked under ORT


def test_auto_float_score_is_validated():
    with pytest.raises(ValueError, match="auto_float_score"):
        Quantize(auto_float_score="median")


def test_least_sure_half_pools_the_feeds_with_the_smallest_float_margins():
    """Three feeds of 4 class positions: the float model is sure on feeds 0 and 2 (margin 0.8), unsure on 1 and 3
    (margins 0.1 and 0.05); a candidate's error sits on the unsure feeds."""
    logits = [np.array([[0.9, 0.1]] * 4), np.array([[0.55, 0.45]] * 4), np.array([[0.9, 0.1]] * 4),
              np.array([[0.525, 0.475]] * 4)]
    ref = fid.Reference([{} for _ in logits], [[x] for x in logits], ["p"], class_outputs=frozenset({"p"}))
    assert fid.feed_weights(ref) is None  # pooled: every feed
    ls = ref.scored_by("least_sure_half")
    assert fid.feed_weights(ls).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert fid.feed_weights(ls, 2).tolist() == [0.0, 1.0]
    noise = [[np.zeros_like(x) if i % 2 == 0 else x + 0.05] for i, x in enumerate(logits)]
    pooled, least = fid.score(ref, (noise, [])), fid.score(ls, (noise, []))
    sig_unsure = sum(float(np.sum(logits[i] ** 2)) for i in (1, 3))
    assert least["sqnr_db"] == pytest.approx(10 * np.log10(sig_unsure / (2 * 8 * 0.05**2)))
    # the sure feeds' zero outputs (error = their whole signal) are what pooled sees
    assert pooled["sqnr_db"] < 3.0 < least["sqnr_db"]
    # without class outputs the half cannot be told: every feed
    assert fid.feed_weights(fid.Reference([{}], [[logits[0]]], ["p"], class_outputs=frozenset(),
                                          feed_score="least_sure_half")) is None
