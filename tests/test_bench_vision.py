"""The vision benchmark specs: real inputs are sane, FP32 reads them, and each metric can fail.

Tests that run a model need it in the real-model cache (``python -m benchmarks.models fetch``) and skip otherwise;
nothing here downloads. The input tests need Pillow, scikit-image and the DejaVu fonts (the benchmarks extra).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("PIL", reason="the vision benchmarks need Pillow (benchmarks extra)")
pytest.importorskip("skimage", reason="the vision benchmarks need scikit-image (benchmarks extra)")

from benchmarks import vision  # noqa: E402

SPECS = {s.name: s for s in vision.SPECS}
N = 24

#: FP32 sanity: (metric, lowest acceptable value) measured on N eval inputs
FP32_FLOORS = {
    "ppocrv4_rec": ("fp32_exact_match", 0.8),
    "ppocr_cls": ("fp32_accuracy", 0.9),
    "ppocrv4_det": ("fp32_line_recall", 0.8),
    "ddddocr_common": ("fp32_exact_match", 0.7),
    "ddddocr_old": ("fp32_exact_match", 0.7),
    "ddddocr_det": ("fp32_glyph_recall", 0.8),
    "nudenet_320n": ("boxes_fp32", 1.0),
    "mtcnn_pnet": ("positive_fraction_fp32", 1e-4),
    "mtcnn_rnet": ("fp32_accuracy", 0.9),
    "mtcnn_onet": ("fp32_accuracy", 0.9),
}

#: the output axis a corruption rolls by a quarter of its length (classes, width, channels); default the last
CORRUPT_AXIS = {"nudenet_320n": 1}


@pytest.fixture(scope="module", autouse=True)
def _fonts():
    try:
        vision._font_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _needs_model(name: str) -> None:
    if not vision.is_cached(name):
        pytest.skip(f"{name} is not in the real-model cache (python -m benchmarks.models fetch {name})")


_RUNS: dict[str, tuple] = {}


def _run(name: str):
    """(feeds, FP32 outputs) on N eval inputs, computed once per module."""
    if name not in _RUNS:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(vision.cached_file(name)), so, providers=["CPUExecutionProvider"])
        feeds = SPECS[name].make_inputs(N, "eval")
        _RUNS[name] = feeds, [sess.run(None, f) for f in feeds]
    return _RUNS[name]


def test_every_corpus_vision_model_has_a_spec():
    assert set(SPECS) == set(FP32_FLOORS) == set(vision.SOURCES)
    quick = {s.name for s in vision.SPECS if s.quick}
    assert quick == {"ppocrv4_rec", "ppocr_cls", "nudenet_320n"}
    for spec in vision.SPECS:
        assert spec.sha256 and len(spec.sha256) == 64


@pytest.mark.parametrize("name", sorted(SPECS))
def test_inputs_deterministic_prefix_and_splits_disjoint(name):
    spec = SPECS[name]
    calib, eval_ = spec.make_inputs(6, "calib"), spec.make_inputs(6, "eval")
    again = spec.make_inputs(4, "calib")
    for a, b in zip(calib[:4], again, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    prints = [{vision._fingerprint(v) for f in fs for v in f.values()} for fs in (calib, eval_)]
    assert len(prints[0]) == 6 and len(prints[1]) == 6
    assert not prints[0] & prints[1]
    for f in calib + eval_:
        for v in f.values():
            assert v.dtype == np.float32 and np.isfinite(v).all()


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        vision.rec_inputs(1, "test")


def test_levenshtein_and_ctc():
    assert vision.levenshtein("kitten", "sitting") == 3
    assert vision.levenshtein("", "abc") == 3
    assert vision.levenshtein("flaw", "lawn") == 2
    probs = np.eye(4)[[0, 1, 1, 0, 1, 2, 2, 3]]
    assert vision.ctc_greedy(probs, ["-", "a", "b", "c"]) == "aabc"


def test_nms_and_box_iou():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
    keep = vision.nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    assert vision.box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 100)


@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fp32_task_metric_is_sane(name):
    _needs_model(name)
    feeds, ref = _run(name)
    metrics = SPECS[name].evaluate(feeds, ref, ref)
    assert metrics[SPECS[name].primary_metric] == pytest.approx(1.0)
    key, floor = FP32_FLOORS[name]
    assert metrics[key] >= floor, metrics


@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(SPECS))
def test_corrupted_outputs_lower_the_primary_metric(name):
    _needs_model(name)
    feeds, ref = _run(name)
    axis = CORRUPT_AXIS.get(name, -1)
    bad = [[np.roll(o, max(1, o.shape[axis] // 4), axis=axis) for o in outs] for outs in ref]
    spec = SPECS[name]
    assert spec.evaluate(feeds, ref, bad)[spec.primary_metric] < 0.9


@pytest.mark.realmodel
def test_ground_truth_survives_a_fresh_process(monkeypatch):
    """evaluate() rebuilds the inputs when it has not seen them (feeds loaded from disk, another process)."""
    _needs_model("ppocr_cls")
    feeds, ref = _run("ppocr_cls")
    monkeypatch.setattr(vision, "_TRUTH", {})
    assert "fp32_accuracy" in SPECS["ppocr_cls"].evaluate(feeds, ref, ref)
    foreign = [{"x": f["x"] + 0.01} for f in feeds]
    assert "fp32_accuracy" not in SPECS["ppocr_cls"].evaluate(foreign, ref, ref)
