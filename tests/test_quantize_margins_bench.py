"""benchmarks.int8_margins: the hard inputs are deterministic, split-disjoint and shaped for the models."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")


def test_hard_lines_are_deterministic_disjoint_and_rec_shaped():
    from benchmarks.int8_margins import HARD_CHARS, hard_lines

    try:
        a, ta = hard_lines(3, "calib")
    except OSError as exc:  # no DejaVu fonts on this machine
        pytest.skip(f"fonts missing: {exc}")
    b, tb = hard_lines(3, "calib")
    c, tc = hard_lines(3, "eval")
    assert ta == tb and all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b, strict=True))
    assert not set(ta) & set(tc)
    assert all(f["x"].shape == (1, 3, 48, 320) and f["x"].dtype == np.float32 for f in a + c)
    assert all(-1.0 <= f["x"].min() and f["x"].max() <= 1.0 for f in a)
    assert all(8 <= len(t) <= 18 and set(t) <= set(HARD_CHARS) for t in ta + tc)


def test_hard_line_metrics_compare_strings_with_fp32_and_truth():
    from benchmarks.int8_margins import cer

    assert cer(["abcd", "xy"], ["abcd", "xz"]) == pytest.approx(1 / 6)


def _softmax_head(tmp_path, scale: float):
    """x -> MatMul(W * scale) -> Softmax: the logits scale with ``scale``; saved to a file."""
    import onnx
    from onnx import helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((8, 50)) * scale).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["p"])],
        "head", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [1, 50])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / f"head{scale}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_logits_sqnr_is_measured_on_the_softmax_inputs(tmp_path):
    from benchmarks.int8_margins import logits_sqnr, softmax_logits

    ref, cand = _softmax_head(tmp_path, 1.0), _softmax_head(tmp_path, 1.1)
    assert softmax_logits(ref) == ["logits"]
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32)} for i in range(3)]
    # logits c = 1.1 r: SQNR = 10 log10(1 / 0.1^2) = 20 dB exactly
    assert logits_sqnr(ref, cand, feeds, ["logits"]) == pytest.approx(20.0, abs=1e-3)
    assert logits_sqnr(ref, cand, feeds, ["absent"]) is None


def test_explain_record_renders_its_numbers():
    from benchmarks.int8_margins import _explain_lines

    es = {"set": "hard", "feeds": 8, "activation_tensors": 3, "seconds": 1.0, "scored_by": "feature_sqnr_db",
          "int8": {"feature_sqnr_db": 9.0, "sqnr_db": 10.0}, "weights_only_int8": {"feature_sqnr_db": 22.0,
                                                                                    "sqnr_db": 18.0},
          "sum_of_gains_db": 2.5, "top": [{"tensor": "t1", "producer": "Conv", "gain_db": 1.25,
                                           "output_gain_db": 1.5}]}
    text = "\n".join(_explain_lines("default", es))
    assert "9.0 dB int8, 22.0 dB with only the weights int8" in text and "| `t1` (Conv) | +1.25 | +1.50 |" in text


def test_frontier_record_renders_each_point_and_pick():
    from benchmarks.int8_margins import _frontier_lines

    point = {"sets": {"easy": {"sqnr_db": 24.7, "cosine": 0.9948, "top1_agreement": 0.922}}, "weight_bytes": 27,
             "latency_ratio": 0.47, "est_cost": 0.004}
    fr = {"model": "efficientnet_lite2", "unit": "rounding", "options": "", "sets": {"easy": 64}, "n_calib": 32,
          "commit": "abc", "fp32_ms": 25.0, "auto_float": [], "latency_load": [3.0, 3.1], "load": [2.0],
          "search_seconds": 70.0, "evaluations": 178, "scored_by": "sqnr_db", "fp32_weight_bytes": 100,
          "max_steps": 40, "costs": {"stem": 0.002, "dw0": 0.002},
          "unit_costs": {"/Clip_output_0": 0.004}, "first_gains_db": {"/Clip_output_0": 5.28},
          "greedy_steps": [{"layer": None}, {"layer": "/Clip_output_0", "gain_db": 8.0, "cost": 0.004}],
          "points": [{"label": "greedy-1r", "order": "greedy", "float_layers": ["stem", "dw0"], **point}]}
    text = "\n".join(_frontier_lines(fr))
    assert "--frontier 40" in text and "--frontier-unit rounding" in text
    assert "| greedy-1r | 2 | 0.47x | +0.004 | 0.27x | 24.7 | 0.9948 | 0.922 |" in text
    assert "1. `/Clip_output_0`: +8.00 dB for +0.004" in text and "`/Clip_output_0` +5.28 (+0.004)" in text


def test_train_pool_is_distinct_from_calibration_alternates_kinds_and_reads_back(tmp_path):
    import onnx
    from onnx import helper

    from benchmarks.int8_margins import hard_lines, train_pool, write_pool
    from benchmarks.run import load_specs
    from onnxcompress.data import load_feeds

    spec = load_specs()["ppocrv4_rec"]
    try:
        pool = train_pool(spec, 4, 6)
        hard_calib, _ = hard_lines(2, "calib")
    except OSError as exc:  # no DejaVu fonts on this machine
        pytest.skip(f"fonts missing: {exc}")
    easy_calib = spec.make_inputs(2, "calib")
    assert len(pool) == 6 and all(f["x"].shape == (1, 3, 48, 320) for f in pool)
    seen = [f["x"].tobytes() for f in easy_calib + hard_calib]
    assert not {f["x"].tobytes() for f in pool} & set(seen)
    # easy, hard, easy, ...: the next hard lines of the calibration seed after the 2 calibration ones
    assert np.array_equal(pool[1]["x"], hard_lines(3, "calib")[0][2]["x"])
    assert np.array_equal(pool[0]["x"], spec.make_inputs(3, "calib")[2]["x"])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 48, "w"])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, 48, "w"])])
    back = list(load_feeds(write_pool(pool, tmp_path / "pool.npz"), helper.make_model(g)))
    assert len(back) == 6 and all(np.array_equal(a["x"], b["x"]) for a, b in zip(back, pool, strict=True))


def test_a_pool_of_sentences_of_different_lengths_is_padded_with_mask_zero(tmp_path):
    """MiniLM's pool holds sentences of every length: stacked as they are they raised (every QAT row of a MiniLM
    failed before training); padded with id 0 / mask 0, every feed reads back with its tokens and mask in place."""
    from benchmarks.int8_margins import write_pool

    feeds = [{"input_ids": np.array([[101, 7, 8, 102]]), "attention_mask": np.ones((1, 4), np.int64)},
             {"input_ids": np.array([[101, 102]]), "attention_mask": np.ones((1, 2), np.int64)}]
    z = np.load(write_pool(feeds, tmp_path / "pool.npz"))
    assert z["input_ids"].shape == (2, 1, 4)
    assert z["input_ids"][1].tolist() == [[101, 102, 0, 0]] and z["attention_mask"][1].tolist() == [[1, 1, 0, 0]]
    assert z["input_ids"][0].tolist() == [[101, 7, 8, 102]] and z["attention_mask"][0].sum() == 4


def test_rec_regions_split_the_graph_at_pool_norms_and_last_conv():
    import onnx
    from onnx import helper

    from benchmarks.int8_margins import rec_regions

    ops = [("Conv", "c0"), ("AveragePool", "p"), ("Conv", "c1"), ("Transpose", "t"), ("ReduceMean", "m0"),
           ("MatMul", "a"), ("ReduceMean", "m1"), ("Div", "ln"), ("Conv", "c2"), ("Conv", "c3"), ("Mul", "act"),
           ("MatMul", "fc")]
    nodes = [helper.make_node(op, ["x" if i == 0 else ops[i - 1][1]], [out]) for i, (op, out) in enumerate(ops)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("fc", onnx.TensorProto.FLOAT, None)])
    r = rec_regions(helper.make_model(g))
    assert [r[o] for _, o in ops] == ["backbone", "neck-in", "neck-in", "svtr", "svtr", "svtr", "svtr", "svtr",
                                      "neck-out", "neck-out", "head", "head"]


def test_attribution_record_renders_its_points():
    from benchmarks.int8_margins import _attribution_lines

    at = {"model": "ppocrv4_rec", "pipeline": "cleanup,quantize", "commit": "abc", "roundings": 3,
          "regions": {"backbone": 2, "head": 1}, "n_rank": 64, "n_held": 64, "seconds": 100.0,
          "latency_load": [2.0, 2.1, 2.2],
          "base": {"rank": {"agreement": 0.25, "cer_vs_fp32": 0.2}, "held": {"agreement": 0.27, "cer_vs_fp32": 0.24}},
          "points": [{"name": "top-1", "taken_out": 1, "latency_ratio": 0.42, "agreement": 0.5, "cer_vs_fp32": 0.1}],
          "order": ["t1"], "loo": {"t1": {"region": "head", "agreement_gain": 0.125, "cer_gain": 0.05}}}
    text = "\n".join(_attribution_lines(at))
    assert "| top-1 | 1 | 0.42x | 0.500 | 0.100 |" in text
    assert "`t1` (head) +0.125 / +0.050" in text and "backbone 2, head 1" in text
