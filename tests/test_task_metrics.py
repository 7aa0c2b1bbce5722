"""Task metrics (onnxcompress.task_metrics) and their use in validation: checked against hand-worked cases, against
the benchmark harness's reference implementations (benchmarks/vision.py) on synthetic arrays, and (realmodel) on the
real PP-OCRv4 rec / nudenet outputs against the harness's own task metrics on the same feeds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import vision
from onnxcompress import task_metrics as tm
from onnxcompress.data import load_feeds
from onnxcompress.validate import compare_models, task_outputs


def _py_levenshtein(a, b) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_ctc_decode_collapses_repeats_and_drops_blank():
    idx = np.array([[0, 1, 1, 0, 1, 2, 2, 3], [2, 2, 2, 0, 0, 2, 0, 0]])
    scores = np.eye(4)[idx]
    out = tm.ctc_decode(scores)
    assert [o.tolist() for o in out] == [[1, 1, 2, 3], [2, 2]]
    assert tm.ctc_decode(np.eye(4)[[0, 0, 0]])[0].size == 0


def test_edit_distance_matches_the_textbook_dp():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 4, rng.integers(0, 9)), rng.integers(0, 4, rng.integers(0, 9))
        assert tm.edit_distance(a, b) == _py_levenshtein(a.tolist(), b.tolist())


def test_ctc_agreement_equals_the_harness_on_synthetic_scores():
    rng = np.random.default_rng(1)
    charset = [chr(ord("a") + i) for i in range(12)]
    ref = [(np.eye(12)[rng.integers(0, 12, (1, 10))] * 0.6 + rng.random((1, 10, 12)) * 0.5).astype(np.float32)
           for _ in range(40)]
    cand = [r + rng.normal(0, 0.05, r.shape).astype(np.float32) for r in ref]
    acc = tm.CtcAgreement()
    for r, c in zip(ref, cand, strict=True):
        acc.update(r, c)
    rs = [vision.ctc_greedy(r[0], charset) for r in ref]
    cs = [vision.ctc_greedy(c[0], charset) for c in cand]
    s = acc.summary()
    assert s["string_agreement"] == pytest.approx(np.mean([a == b for a, b in zip(rs, cs, strict=True)]))
    assert s["char_error_rate"] == pytest.approx(vision._cer(rs, cs))
    assert 0 < s["string_agreement"] < 1  # the noise flips some strings, not all


def test_nms_equals_the_greedy_reference():
    rng = np.random.default_rng(2)
    for _ in range(30):
        xy = rng.uniform(0, 100, (60, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (60, 2))], 1)
        scores = rng.random(60)
        assert tm.nms(boxes, scores, 0.45).tolist() == vision.nms(boxes, scores, 0.45).tolist()


def _yolo_output(rng, anchors=300, classes=3):
    xy = rng.uniform(20, 300, (anchors, 2))
    wh = rng.uniform(10, 60, (anchors, 2))
    scores = rng.random((anchors, classes)) ** 3
    return np.concatenate([xy, wh, scores], 1).T[None].astype(np.float32)  # [1, 4+K, A]


def test_box_f1_class_agnostic_equals_the_harness_and_class_wise_keeps_more():
    rng = np.random.default_rng(3)
    ref = [_yolo_output(rng) for _ in range(6)]
    cand = [r + rng.normal(0, 0.02, r.shape).astype(np.float32) * np.abs(r) for r in ref]
    agnostic, classwise = tm.BoxF1(True, class_agnostic=True), tm.BoxF1(True)
    for r, c in zip(ref, cand, strict=True):
        agnostic.update(r, c)
        classwise.update(r, c)
    bench = vision.nude_evaluate([{}] * 6, [[r] for r in ref], [[c] for c in cand])
    assert agnostic.summary()["box_f1"] == pytest.approx(bench["box_f1"])
    assert agnostic.summary()["boxes_ref"] == bench["boxes_fp32"]
    assert classwise.summary()["boxes_ref"] > agnostic.summary()["boxes_ref"]  # overlaps of other classes survive
    assert 0 < classwise.summary()["box_f1"] < 1
    same = tm.BoxF1(False)  # [N, A, 4+K] layout, FP32 vs itself
    for r in ref:
        same.update(r.transpose(0, 2, 1), r.transpose(0, 2, 1))
    assert same.summary()["box_f1"] == 1.0


def test_sample_cosine_per_sample_mean():
    r = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    c = np.array([[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    acc = tm.SampleCosine()
    acc.update(r, c)
    assert acc.summary()["cosine_mean"] == pytest.approx((np.sqrt(0.5) + 1 + 1) / 3)
    assert acc.summary()["sample_cosine_min"] == pytest.approx(np.sqrt(0.5))


# ------------------------------------------------------------------------------------------- in the validation
def _ctc_model(w: np.ndarray) -> onnx.ModelProto:
    """x [N, T, F] -> Softmax(x @ W) over C: a recogniser's head."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=2)], "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _det_model(scale: float) -> onnx.ModelProto:
    """x [N, 7, A] -> Concat(x[:, :4] * scale, Sigmoid(x[:, 4:])) over axis 1: a YOLOv8 head."""
    nodes = [
        helper.make_node("Split", ["x", "split"], ["box", "cls"], axis=1),
        helper.make_node("Mul", ["box", "s"], ["box_s"]),
        helper.make_node("Sigmoid", ["cls"], ["prob"]),
        helper.make_node("Concat", ["box_s", "prob"], ["y"], axis=1),
    ]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, 50])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 50])],
                          [numpy_helper.from_array(np.array([4, 3], np.int64), "split"),
                           numpy_helper.from_array(np.array(scale, np.float32), "s")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_validation_detects_ctc_and_measures_string_agreement():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 5))
    a, b = _ctc_model(w), _ctc_model(w + rng.normal(0, 0.4, w.shape))
    assert task_outputs(a) == {"y": ("ctc", None)}
    feeds = [{"x": rng.standard_normal((2, 8, 4)).astype(np.float32)} for _ in range(10)]
    fs = load_feeds(feeds, a)
    same = compare_models(a, a, fs)
    assert same.task_metric()["value"] == 1.0 and same.task_metric()["metric"] == "string_agreement"
    rep = compare_models(a, b, fs)
    y = rep.outputs["y"]
    assert y["metric_kind"] == "ctc" and "top1_agreement" not in y
    acc = tm.CtcAgreement()
    from conftest import ort_run

    for f in feeds:
        acc.update(ort_run(a, f)[0], ort_run(b, f)[0])
    assert y["string_agreement"] == pytest.approx(acc.summary()["string_agreement"])
    assert acc.summary()["strings"] == 20 and y["string_agreement"] < 1.0
    assert rep.task_metric()["value"] == y["string_agreement"]
    forced = compare_models(a, b, fs, task="classify")  # per-frame top-1 when the user says so
    assert "top1_agreement" in forced.outputs["y"] and forced.task_metric()["metric"] == "top1_agreement"


def test_validation_detects_a_yolo_head_and_measures_box_f1():
    rng = np.random.default_rng(5)
    a, b = _det_model(1.0), _det_model(1.03)
    assert task_outputs(a) == {"y": ("detect", True)}
    x = np.concatenate([rng.uniform(10, 200, (1, 2, 50)), rng.uniform(5, 30, (1, 2, 50)),
                        rng.normal(-1, 2, (1, 3, 50))], 1).astype(np.float32)
    fs = load_feeds([{"x": x}, {"x": x[:, :, ::-1].copy()}], a)
    assert compare_models(a, a, fs).task_metric()["value"] == 1.0
    rep = compare_models(a, b, fs)
    assert rep.outputs["y"]["metric_kind"] == "detection"
    assert rep.task_metric()["metric"] == "box_f1" and 0 < rep.task_metric()["value"] < 1
    assert compare_models(a, b, fs, task="none").task_metric() is None
    assert compare_models(a, b, fs, task="embed").task_metric()["metric"] == "cosine_mean"


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        compare_models(_det_model(1.0), _det_model(1.0), None, task="segment")


# ------------------------------------------------------------------------------------------- real models
def _noisy(path, shape, scale: float, seed: int = 0) -> onnx.ModelProto:
    """The model with a fixed random tensor added to its first output (a stand-in for compression error)."""
    m = onnx.load(str(path))
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o + "_pre" if o == out else o for o in n.output]
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    m.graph.initializer.append(numpy_helper.from_array(noise, "task_metric_noise"))
    m.graph.node.append(helper.make_node("Add", [out + "_pre", "task_metric_noise"], [out]))
    return m


@pytest.mark.realmodel
@pytest.mark.parametrize("name,shape,scale", [("ppocrv4_rec", (1, 1, 6625), 0.2),
                                              ("nudenet_320n", (1, 22, 2100), 0.05)])
def test_task_metric_equals_the_harness_on_real_outputs(name, shape, scale):
    pytest.importorskip("PIL", reason="the vision inputs need Pillow")
    if not vision.is_cached(name):
        pytest.skip(f"{name} is not in the real-model cache (python -m benchmarks.models fetch {name})")
    from benchmarks.run import load_specs
    from onnxcompress.runtime import Session

    spec = load_specs()[name]
    path = vision.cached_file(name)
    feeds = spec.make_inputs(12, "eval")
    cand = _noisy(path, shape, scale)
    model = onnx.load(str(path), load_external_data=False)
    rep = compare_models(str(path), cand, load_feeds(feeds, model))
    with Session(str(path)) as s_ref, Session(cand) as s_cand:
        ref = [s_ref.run(f) for f in feeds]
        out = [s_cand.run(f) for f in feeds]
    bench = spec.evaluate(feeds, ref, out)
    tmv = rep.task_metric()
    if name == "ppocrv4_rec":
        assert tmv["metric"] == "string_agreement"
        assert tmv["value"] == pytest.approx(bench["agreement"])
        assert rep.outputs[tmv["output"]]["char_error_rate"] == pytest.approx(bench["cer_vs_fp32"])
        assert bench["agreement"] < 1.0  # the check is not vacuous
    else:
        assert tmv["metric"] == "box_f1"
        agnostic = tm.BoxF1(True, class_agnostic=True)  # the harness suppresses across classes
        for r, c in zip(ref, out, strict=True):
            agnostic.update(r[0], c[0])
        assert agnostic.summary()["box_f1"] == pytest.approx(bench["box_f1"])
        assert agnostic.summary()["boxes_ref"] == bench["boxes_fp32"]
        assert 0 < tmv["value"] < 1 and bench["box_f1"] < 1.0
    assert compare_models(str(path), str(path), load_feeds(feeds[:3], model)).task_metric()["value"] == 1.0
