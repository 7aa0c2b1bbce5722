"""cluster{target_error=...}: mixed bit-widths from the measured output error of each tensor (``allocation``)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.cluster.allocation import FLOAT, allocate, ladder

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.output_error import relative_output_error
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run


def _run(model, pipeline, calib=None):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=calib))
    return res.model, res.ledger[-1].pass_stats


def _two_branches(rng, n_in=64, n_out=48):
    """x -> MatMul(easy) -> y1 ; x -> MatMul(hard) -> y2. ``easy`` holds 4 distinct values (2-bit clustering is
    exact), ``hard`` is heavy-tailed Gaussian: only it costs output error."""
    easy = rng.choice(np.array([-1.0, -0.3, 0.3, 1.0], np.float32), size=(n_in, n_out))
    hard = (rng.standard_normal((n_in, n_out)) ** 3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "easy"], ["y1"]), helper.make_node("MatMul", ["x", "hard"], ["y2"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n_in])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [4, n_out]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, n_out])],
        [numpy_helper.from_array(easy, "easy"), numpy_helper.from_array(hard, "hard")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((4, n_in)).astype(np.float32)} for _ in range(8)]
    return model, feeds


def test_ladder():
    assert ladder(4) == [4, 5, 6, 8, FLOAT]
    assert ladder(1) == [1, 2, 3, 4, 8, FLOAT]  # a 1-bit base still has the 4-bit rung before 8
    assert ladder(2) == [2, 3, 4, 8, FLOAT]
    assert ladder(7) == [7, 8, FLOAT]
    assert ladder(8) == [8, FLOAT]


def test_target_error_met_as_measured_and_bits_go_to_the_sensitive_tensor(rng):
    model, feeds = _two_branches(rng)
    calib = load_feeds(feeds, model)
    ref = [ort_run(model, f) for f in feeds]
    plain, _ = _run(model, "cluster{bits=2 min_size=100 channel_scales=false storage=snap}")
    e_plain = relative_output_error(ref, [ort_run(plain, f) for f in feeds])
    target = e_plain / 50
    out, st = _run(model, f"cluster{{bits=2 min_size=100 channel_scales=false storage=snap target_error={target}}}", calib)
    e_out = relative_output_error(ref, [ort_run(out, f) for f in feeds])
    assert e_out <= target
    assert st["output_error"] == pytest.approx(e_out, rel=1e-3)  # the pass reports what ORT measures
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.unique(inits["easy"]).size <= 4  # insensitive: stays at 2 bits
    assert np.unique(inits["hard"]).size > 4  # sensitive: more bits (or float)
    assert st["bits"].get("2") == 1


def test_codebook_storage_with_target_error_decodes_what_was_measured(rng):
    model, feeds = _two_branches(rng)
    calib = load_feeds(feeds, model)
    ref = [ort_run(model, f) for f in feeds]
    out, st = _run(model, "cluster{bits=2 min_size=100 storage=codebook target_error=0.0005}", calib)
    assert st["tensors_clustered"] + st.get("floats_kept", 0) == 2
    e_out = relative_output_error(ref, [ort_run(out, f) for f in feeds])
    assert e_out == pytest.approx(st["output_error"], rel=1e-3, abs=1e-9) and e_out <= 0.0005


def test_size_budget_spends_the_bytes_where_the_error_is(rng):
    model, feeds = _two_branches(rng, 512, 256)
    calib = load_feeds(feeds, model)
    n = 2 * 512 * 256
    out, st = _run(model, "cluster{bits=2 channel_scales=false storage=codebook size_budget=3.2}", calib)
    assert st["bits"] == {"2": 1, "4": 1}  # 8 bits for `hard` would not fit in 3.2 bits per weight
    assert st["bytes_after"] <= 3.2 * n / 8  # planned bytes within the budget
    assert out.ByteSize() < 3.4 * n / 8  # and the file agrees (graph inputs/outputs add a few bytes)
    ref = [ort_run(model, f) for f in feeds]
    plain, _ = _run(model, "cluster{bits=2 channel_scales=false storage=codebook}")
    e = [relative_output_error(ref, [ort_run(m, f) for f in feeds]) for m in (plain, out)]
    assert e[1] < 0.2 * e[0]


def test_size_ratio_makes_the_file_that_much_smaller(rng):
    model, feeds = _two_branches(rng, 512, 256)
    calib = load_feeds(feeds, model)
    size = model.ByteSize()
    out, st = _run(model, "cluster{bits=2 channel_scales=false storage=codebook size_ratio=10}", calib)
    assert out.ByteSize() <= size / 10 * 1.01  # the plan's decode overheads are measured, not exact
    assert st["bits"]["2"] == 1 and len(st["bits"]) == 2 and st["size_ratio_budget_bits"] > 3.0
    tight, st_t = _run(model, "cluster{bits=2 channel_scales=false storage=codebook size_ratio=14}", calib)
    assert st_t["bits"] == {"2": 2} and tight.ByteSize() < out.ByteSize()  # nothing more fits
    with pytest.raises(BadInputError):
        parse_pipeline("cluster{size_ratio=12 size_budget=2}")


def test_size_ratio_counts_against_the_original_model_after_channel_pruning(rng):
    # x -> MatMul w1 [512, 256] -> Relu -> MatMul w2 [256, 64]: prune-channels halves the hidden layer, so the
    # clustered tensors may spend twice the bits per weight for the same ratio to the file the user gave
    w1 = rng.standard_normal((512, 256)).astype(np.float32)
    w2 = rng.standard_normal((256, 64)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = load_feeds([{"x": rng.standard_normal((4, 512)).astype(np.float32)} for _ in range(8)], model)
    out, st = _run(model, "prune-channels{ratio=0.5},cluster{bits=2 storage=codebook size_ratio=10}", calib)
    assert st["size_ratio_of_bytes"] == model.ByteSize()  # the original, not the pruned model
    assert out.ByteSize() <= model.ByteSize() / 10 * 1.01
    assert out.ByteSize() > model.ByteSize() / 2 / 10 * 1.2  # well above a tenth of the pruned model
    # the pruned weights alone at 2 bits would be 2 x 10x smaller: the budget bought more bits
    assert st["size_ratio_budget_bits"] > 5.0 and min(int(b) for b in st["bits"]) > 2


class _Additive:
    """Trials whose error is the sum of known per-tensor errors of the level each tensor is given."""

    def __init__(self, table):
        self.table = table  # name -> {level: error}
        self.runs = 0

    def error(self, over):
        self.runs += 1
        return sum(self.table[n][1] if n not in over else self.table[n][int(over[n][0])] for n in self.table)


def test_allocate_buys_the_most_error_per_byte_first():
    # a: error 10 at 2 bits, 1 at 4; b: error 9 at 2 bits but 10x the bytes per level; c: no error
    table = {"a": {2: 10.0, 3: 4.0, 4: 1.0, 8: 0.01, 1: 0.0}, "b": {2: 9.0, 3: 3.0, 4: 0.5, 8: 0.01, 1: 0.0},
             "c": {2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0, 1: 0.0}}
    size = {"a": 100, "b": 1000, "c": 50}

    def lv(name, bits):
        level = 1 if bits == FLOAT else bits
        return (size[name] * (8 if bits == FLOAT else bits), np.array([level]))

    levels = {n: {2: lv(n, 2)} for n in table}
    pick, st = allocate(_Additive(table), levels, lv, target=11.0)
    assert pick == {"a": 4, "b": 2, "c": 2}  # a's upgrades buy 6 + 3 error per 100 bytes, b's 6 per 1000
    assert st["output_error"] == pytest.approx(10.0)
    pick, st = allocate(_Additive(table), {n: {2: lv(n, 2)} for n in table}, lv, target=0.05)
    assert pick["c"] == 2 and st["output_error"] <= 0.05


def test_target_error_options_are_checked(rng):
    with pytest.raises(BadInputError):
        parse_pipeline("cluster{target_error=0}")
    with pytest.raises(BadInputError):
        parse_pipeline("cluster{size_budget=-1}")
    model, _ = _two_branches(rng)
    with pytest.raises(BadInputError, match="calibration"):
        _run(model, "cluster{target_error=0.01}")


def test_lstm_weights_are_clustered_per_gate_row_and_decode_bit_exactly(rng):
    """LSTM W [1, 4H, I] and R [1, 4H, H] (slots 1 and 2): clustered with a scale per gate row, decoded in the
    graph bit-identically to the snapped weights, and the LSTM runs on them under ORT."""
    hid, inp = 32, 24
    w = (rng.standard_normal((1, 4 * hid, inp)) * rng.uniform(0.1, 2.0, (1, 4 * hid, 1))).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hid, hid)) * 0.3).astype(np.float32)
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hid)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, inp])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, hid])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    coded, st_c = _run(model, "cluster{bits=3 min_size=500 storage=codebook}")
    snapped, st_s = _run(model, "cluster{bits=3 min_size=500 storage=snap}")
    assert st_c["tensors_clustered"] == 2 and "snap" not in st_c["storage"]
    s = {t.name: numpy_helper.to_array(t) for t in snapped.graph.initializer}
    assert max(np.unique(row).size for row in s["W"][0]) <= 8 and not np.array_equal(s["W"], w)
    dec = helper.make_model(coded.graph, opset_imports=coded.opset_import)
    for n in ("W_clustered", "R_clustered"):
        dec.graph.output.append(helper.make_empty_tensor_value_info(n))
    feed = {"x": rng.standard_normal((5, 1, inp)).astype(np.float32)}
    got = ort_run(dec, feed)
    np.testing.assert_array_equal(got[1], s["W"])
    np.testing.assert_array_equal(got[2], s["R"])
    np.testing.assert_allclose(got[0], ort_run(snapped, feed)[0], rtol=1e-5, atol=1e-6)
    assert coded.ByteSize() < 0.5 * model.ByteSize()


def test_allocation_logs_a_size_budget_round_without_a_logging_error(rng, caplog):
    """A size budget has no target error: the round's log line must still format (it raised inside logging)."""
    import logging

    model, feeds = _two_branches(rng)
    with caplog.at_level(logging.INFO, logger="onnxcompress.passes.cluster.allocation"):
        _run(model, "cluster{bits=2 size_budget=4 min_size=100}", load_feeds(feeds, model))
    lines = [r.getMessage() for r in caplog.records if "allocation round" in r.msg]
    assert lines and "target none (a size)" in lines[0]
