"""Feeds (npz / folder / iterable, checks) and the ORT oracle's metrics."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress.data import bind_dims, load_feeds, model_inputs, random_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.validate import OutputFidelity, compare_models


def two_input_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_npz_same_rank_feeds_batches_of_one(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, a=np.arange(12, dtype=np.float32).reshape(4, 3), b=np.ones((4, 3), np.float32))
    fs = load_feeds(p, two_input_model())
    items = list(fs)
    assert len(fs) == 4 and len(items) == 4
    assert items[1]["a"].shape == (1, 3) and items[1]["a"][0, 0] == 3


def test_npz_extra_axis_is_the_sample_axis(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, a=np.zeros((5, 2, 3), np.float32), b=np.zeros((5, 2, 3), np.float32))
    assert [f["a"].shape for f in load_feeds(p, two_input_model())] == [(2, 3)] * 5


def test_missing_input_is_one_clear_error(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, a=np.zeros((2, 3), np.float32))
    with pytest.raises(BadInputError, match="no array for model input 'b'"):
        load_feeds(p, two_input_model())


def test_wrong_static_shape_and_dtype(tmp_path):
    model = two_input_model()
    with pytest.raises(BadInputError, match="expects"):
        list(load_feeds([{"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 4), np.float32)}], model))
    with pytest.raises(BadInputError, match="dtype"):
        list(load_feeds([{"a": np.zeros((1, 3), np.complex64), "b": np.zeros((1, 3), np.float32)}], model))
    cast = list(load_feeds([{"a": np.zeros((1, 3), np.float64), "b": np.zeros((1, 3), np.float32)}], model))
    assert cast[0]["a"].dtype == np.float32


def test_folder_of_npz(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", a=np.full((2, 3), i, np.float32), b=np.zeros((2, 3), np.float32))
    fs = load_feeds(tmp_path, two_input_model())
    assert [float(f["a"][0, 0]) for f in fs] == [0.0, 1.0, 2.0]


def test_unreadable_and_missing_sources(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="not a readable"):
        load_feeds(bad, two_input_model())
    with pytest.raises(BadInputError, match="no such file"):
        load_feeds(tmp_path / "nope.npz", two_input_model())


def test_bind_dims_and_random_feeds_warn(caplog):
    model = two_input_model()
    assert bind_dims(model_inputs(model), {"N": 7}) == {"a": (7, 3), "b": (7, 3)}
    assert bind_dims(model_inputs(model), {}, {"a": (2, 3)})["a"] == (2, 3)
    with pytest.raises(BadInputError, match="does not fit"):
        bind_dims(model_inputs(model), {}, {"a": (2, 4)})
    with caplog.at_level("WARNING"):
        fs = random_feeds(model, {"N": 2}, n=3)
    assert "random" in caplog.text and fs.synthetic and len(list(fs)) == 3


def test_output_fidelity_metrics_match_hand_computation():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((4, 10)).astype(np.float32)
    c = r + 0.1 * rng.standard_normal((4, 10)).astype(np.float32)
    c[0] = r[0]
    c[1, r[1].argmax()] -= 100  # destroys row 1's argmax
    acc = OutputFidelity("y", class_scores=True)
    acc.update(r[:2], c[:2])
    acc.update(r[2:], c[2:])
    s = acc.summary()
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    assert s["max_abs"] == pytest.approx(np.abs(r64 - c64).max())
    assert s["cosine"] == pytest.approx((r64 * c64).sum() / np.sqrt((r64**2).sum() * (c64**2).sum()))
    assert s["sqnr_db"] == pytest.approx(10 * np.log10((r64**2).sum() / ((r64 - c64) ** 2).sum()))
    assert s["top1_agreement"] == pytest.approx(np.mean(r.argmax(1) == c.argmax(1)))
    assert s["top1_agreement"] <= 0.75


def test_identical_outputs_are_perfect():
    acc = OutputFidelity("y")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    acc.update(x, x.copy())
    s = acc.summary()
    assert s["max_abs"] == 0 and s["cosine"] == pytest.approx(1.0) and math.isinf(s["sqnr_db"])


def test_compare_models_runs_both_on_the_same_feeds():
    a = two_input_model()
    b = onnx.ModelProto()
    b.CopyFrom(a)
    b.graph.node[0].op_type = "Sub"
    fs = load_feeds([{"a": np.ones((1, 3), np.float32), "b": np.full((1, 3), 0.5, np.float32)}], a)
    rep = compare_models(a, b, fs)
    assert rep.feeds == 1
    assert rep.outputs["y"]["max_abs"] == pytest.approx(1.0)  # 1.5 vs 0.5
