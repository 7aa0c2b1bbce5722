"""The pooled worst-output cosine shared by prune-layers and prune-channels (``onnxcompress.output_cosine``): checked
against a hand computation, a NaN / inf student counts as 0 (the worst), and prune-layers{min_fidelity} no longer lets
a removal whose student emits -inf through (its cosine is NaN, and Python's min(1.0, nan) kept 1.0 before)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxcompress.passes.prune_channels import fidelity_floor
from onnxcompress.passes.prune_layers import trials

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.output_cosine import cosine_terms, worst_cosine, worst_of
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run
from tests.test_blocks import Builder

C = 8


def _outs(rng, n=4):
    return [[rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((3,)).astype(np.float32)]
            for _ in range(n)]


def test_worst_cosine_is_the_pooled_cosine_of_the_worst_output():
    rng = np.random.default_rng(0)
    base = _outs(rng)
    cand = [[b[0] + 0.1 * rng.standard_normal(b[0].shape).astype(np.float32),
             b[1] + 1.0 * rng.standard_normal(b[1].shape).astype(np.float32)] for b in base]
    want = []
    for o in range(2):
        r = np.concatenate([b[o].ravel() for b in base]).astype(np.float64)
        c = np.concatenate([x[o].ravel() for x in cand]).astype(np.float64)
        want.append(r @ c / np.linalg.norm(r) / np.linalg.norm(c))
    assert abs(worst_cosine(base, cand) - min(want)) < 1e-12
    assert min(want) < 0.99  # the noisier second output decides
    assert worst_cosine(base, base) == 1.0
    zero = [[np.zeros_like(b[0]), np.zeros_like(b[1])] for b in base]
    assert worst_cosine(zero, zero) == 1.0 and worst_cosine(base, zero) == 0.0


def test_a_student_emitting_nan_or_inf_counts_as_zero():
    rng = np.random.default_rng(1)
    base = _outs(rng)
    for bad in (np.nan, np.inf, -np.inf):
        cand = [[b[0].copy(), b[1].copy()] for b in base]
        cand[2][0][1, 3] = bad  # one element of one output on one feed
        assert worst_cosine(base, cand) == 0.0
        terms = cosine_terms(base, cand)
        # every bootstrap resample is 0, even one that draws the bad feed 0 times (0 * nan is nan): a student that
        # can emit NaN never holds a floor
        w = np.ones((2, len(base)))
        w[1, 2] = 0.0
        np.testing.assert_array_equal(worst_of(terms, w), [0.0, 0.0])
        assert worst_of(cosine_terms(base, [[b[0].copy(), b[1].copy()] for b in base]), w).min() > 1 - 1e-9
    assert fidelity_floor.worst_cosine is worst_cosine  # prune-channels' floor measures with the shared function
    assert not hasattr(trials, "output_cosine")  # the second copy (NaN let through) is gone


def inf_after_bypass() -> onnx.ModelProto:
    """h0 = relu(conv0(x)); unit "small": h1 = h0 + 0.05 * conv(h0); unit "kept" (excluded by the test, so both
    others may go): h2 = h1 + 0.05 * conv(h1); unit "shift": h3 = h2 + conv_s(h2) whose bias is 10;
    y = log(relu(GAP(h3) - 5)): finite, but with "shift" bypassed GAP(h2) - 5 < 0 and y = -inf, so <y, y0> / (||y||
    ||y0||) = -inf / inf = NaN, which Python's min(1.0, nan) used to read as 1.0."""
    b = Builder(4)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand("w0", C, 3, 3, 3)], "c0", pads=[1, 1, 1, 1])], "h0")
    for name in ("small", "kept"):
        f = b.op("Conv", [h, b.rand(f"w_{name}", C, C, 3, 3, scale=0.05)], f"c{name}", pads=[1, 1, 1, 1])
        h = b.op("Add", [h, f], f"add_{name}")
    shift = b.op("Conv", [h, b.rand("ws", C, C, 1, 1, scale=0.01), b.w("bs", np.full(C, 10.0, np.float32))], "cs")
    h = b.op("Add", [h, shift], "add_shift")
    p = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    b.op("Log", [b.op("Relu", [b.op("Sub", [p, b.w("five", np.float32(5.0))], "sub")], "pos")], "y")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C])])


def test_prune_layers_min_fidelity_stops_at_a_removal_whose_student_emits_inf():
    model = inf_after_bypass()
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert np.all(np.isfinite(ort_run(model, x)[0]))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    pipeline = parse_pipeline("prune-layers{min_fidelity=0.5 kinds=[residual] trials=0 exclude=[n_ckept]}")
    res = PassManager(pipeline).run(model, PassContext(calibration=load_feeds(feeds, model)))
    st = next(r.pass_stats for r in res.ledger if r.stage.startswith("prune-layers"))
    # before the shared measure this student measured cosine 1.0 (min(1.0, nan)) and the unit went too
    assert next(u for u in st["units"] if u["exit"] == "add_shift")["cosine_alone"] == 0.0
    assert [s["exit"] for s in st["steps"]] == ["add_small"]  # the non-finite unit never wins a step
    assert "add_shift" in st["stopped"] and "min_fidelity" in st["stopped"] and "0.0000" in st["stopped"]
    assert np.all(np.isfinite(ort_run(res.model, x)[0]))
