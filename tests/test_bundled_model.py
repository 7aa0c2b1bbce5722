"""The bundled digits CNN in models/: loads under onnxruntime, is accurate, and its data splits are sound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"
ONNX_PATH = MODELS / "digits_cnn.onnx"
CALIB_PATH = MODELS / "digits_calib.npz"
VAL_PATH = MODELS / "digits_val.npz"
LABELS_PATH = MODELS / "digits_val_labels.npy"


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(ONNX_PATH))


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(ONNX_PATH), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    with np.load(CALIB_PATH) as z:
        assert list(z.keys()) == ["image"]
        return z["image"]


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    with np.load(VAL_PATH) as z:
        assert list(z.keys()) == ["image"]
        x = z["image"]
    return x, np.load(LABELS_PATH)


def test_model_is_valid(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert _dims(inferred.graph.output[0]) == ["N", 10]


def test_model_has_work_for_every_pass(model):
    ops = [n.op_type for n in model.graph.node]
    for op in ("Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Flatten", "Gemm", "Dropout"):
        assert op in ops, op
    assert ops.count("BatchNormalization") == 3  # not folded: cleanup has to do it


def test_io_names_and_shapes(model, session):
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "image" and _dims(inp) == ["N", 1, 8, 8]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.name == "logits" and _dims(out) == ["N", 10]
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (logits,) = session.run(None, {"image": np.zeros((3, 1, 8, 8), np.float32)})
    assert logits.shape == (3, 10) and logits.dtype == np.float32


def test_data_arrays(calib, val):
    x, y = val
    assert calib.shape == (200, 1, 8, 8) and calib.dtype == np.float32
    assert x.shape == (397, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (397,) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))
    for arr in (calib, x):
        assert arr.min() >= 0.0 and arr.max() <= 1.0  # pixels scaled /16


def test_calib_and_val_disjoint(calib, val):
    x, _ = val
    calib_rows = {r.tobytes() for r in calib.reshape(len(calib), -1)}
    val_rows = {r.tobytes() for r in x.reshape(len(x), -1)}
    assert len(calib_rows) == len(calib) and len(val_rows) == len(x)
    assert not calib_rows & val_rows


def test_validation_accuracy(session, val):
    x, y = val
    (logits,) = session.run(["logits"], {"image": x})
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.95, acc


def test_artefacts_small():
    total = sum(p.stat().st_size for p in (ONNX_PATH, CALIB_PATH, VAL_PATH, LABELS_PATH))
    assert total < 1_000_000, total
