"""quantize{stream_equalization}: per-channel ranges of linear bottlenecks and their residual sums, folded into the
Convs that write and read them (passes/quantize/stream_equalization.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run
from onnxcompress.passes.quantize import Quantize
from onnxcompress.passes.quantize.static_run import StaticRun
from onnxcompress.passes.quantize.stream_equalization import (
    choose,
    equalize_streams,
    predicted_noise,
    streams,
)
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds

C, E = 8, 32


def bottleneck(spread: float = 100.0, reader: str = "", seed: int = 0) -> onnx.ModelProto:
    """proj1 (3 -> C, channel c scaled by spread^(c/7)) -> t1; t1 -> expand (C -> E) -> Relu -> proj2 (E -> C) -> t2;
    t3 = t1 + t2 -> head (C -> 4). ``reader``: an extra op reading t1 (then t1 is not a linear stream)."""
    rng = np.random.default_rng(seed)
    extra = f"z = {reader}(t1)\n" if reader else ""
    outs = "float[1,4,10,10] y" + (f", float[1,{C},10,10] z" if reader else "")
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,10,10] x) => ({outs}) {{
      t1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
      e = Conv(t1, we, be)
      r = Relu(e)
      t2 = Conv(r, w2, b2)
      t3 = Add(t1, t2)
      y = Conv(t3, wh, bh)
      {extra}
    }}""")
    gains = spread ** (np.arange(C) / (C - 1)) / spread
    arrays = {
        "w1": (rng.standard_normal((C, 3, 3, 3)) * 0.3 * gains[:, None, None, None]).astype(np.float32),
        "b1": (0.05 * gains).astype(np.float32),
        "we": (rng.standard_normal((E, C, 1, 1)) * 0.3 / gains[None, :, None, None] / np.sqrt(C)).astype(np.float32),
        "be": np.zeros(E, np.float32),
        "w2": (rng.standard_normal((C, E, 1, 1)) * 0.2 * gains[:, None, None, None]).astype(np.float32),
        "b2": np.zeros(C, np.float32),
        "wh": (rng.standard_normal((4, C, 1, 1)) * 0.3 / gains[None, :, None, None] / np.sqrt(C)).astype(np.float32),
        "bh": np.zeros(4, np.float32),
    }
    add_initializers(m, arrays)
    onnx.checker.check_model(m)
    return m


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return normal_feeds((1, 3, 10, 10), n, seed)


def quantize(model, **options):
    return quantize_on(model, feeds(16, 1), **{**options})


sqnr = output_sqnr


def test_a_stream_is_the_bottleneck_and_its_residual_sum_with_their_writers_and_readers():
    (s,) = streams(gs.import_onnx(bottleneck()))
    assert set(s.tensors) == {"t1", "t2", "t3"}
    assert sorted(n.outputs[0].name for n in s.producers) == ["t1", "t2"]
    assert sorted(n.outputs[0].name for n in s.consumers) == ["e", "y"]
    assert streams(gs.import_onnx(bottleneck(reader="Relu"))) == []  # a non-linear reader of t1
    assert streams(gs.import_onnx(bottleneck(reader="Identity"))) == []  # t1 also a graph output


def test_factors_trade_activation_against_weight_rounding():
    w = np.ones((4, 4, 1, 1), np.float32)
    w[:, 1] = 10.0  # the narrow channel matters to its reader
    lo, hi = -np.array([1.0, 0.01, 1.0, 1.0]), np.array([1.0, 0.01, 1.0, 1.0])
    ms = np.array([0.3, 3e-5, 0.3, 0.3])
    k, alpha, gain = choose([(lo, hi)], ms, [w])
    assert alpha > 0 and k[1] > 1 and np.all(k[[0, 2, 3]] == 1.0) and gain > 1.0
    assert predicted_noise(k, [(lo, hi)], ms, [w]) < predicted_noise(np.ones(4), [(lo, hi)], ms, [w])
    _, a_even, g_even = choose([(-np.ones(4), np.ones(4))], np.full(4, 0.3), [np.ones((4, 4, 1, 1), np.float32)])
    assert a_even == 0.0 and g_even == pytest.approx(0.0)


def test_rewrite_is_exact_in_float_and_lifts_the_int8_sqnr_on_held_out_feeds():
    model = bottleneck()
    g = gs.import_onnx(model)
    run = StaticRun(Quantize(), g, PassContext(calibration=load_feeds(feeds(16, 1), model)))
    st = equalize_streams(run, g, set())
    assert st["streams"] == 1 and len(st["rewritten"]) == 1, st
    assert run.full_range == {"t1", "t2", "t3"}
    rewritten = gs.export_onnx(g)
    fs = feeds(8, 9)
    for f in fs:
        np.testing.assert_allclose(ort_run(rewritten, f)[0], ort_run(model, f)[0], rtol=1e-4, atol=1e-5)
    q_off, st_off = quantize(model)
    q_on, st_on = quantize(model, stream_equalization=True)
    assert "stream_equalization" not in st_off and st_on["stream_equalization"]["rewritten"]
    assert sqnr(model, q_on, fs) > sqnr(model, q_off, fs) + 3.0


def test_even_channels_are_left_alone():
    model = bottleneck(spread=1.0)
    q_on, st = quantize(model, stream_equalization=True)
    q_off, _ = quantize(model)
    assert st["stream_equalization"]["rewritten"] == {}
    assert q_on.SerializeToString() == q_off.SerializeToString()
