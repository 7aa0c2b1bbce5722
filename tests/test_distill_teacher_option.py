"""distill{mode=train teacher=FILE}: train against another model than the pipeline's input (e.g. continue QAT on an
int8 model against the float original)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxcompress.passes.distill import Distill

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline

pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
PRUNE = "cleanup,prune-channels{target_macs=0.4}"
FAST = "steps=8 batch=8 eval_every=4 samples=64"


def _run(pipeline: str) -> onnx.ModelProto:
    model = onnx.load(DIGITS)
    ctx = PassContext(calibration=load_feeds(str(MODELS / "digits_calib.npz"), model), seed=0)
    return PassManager(parse_pipeline(pipeline)).run(model, ctx).model


def test_the_input_as_teacher_file_is_the_default(tmp_path):
    """teacher= naming the pipeline's own input trains exactly as the default; another teacher trains differently."""
    default = _run(f"{PRUNE},distill{{mode=train {FAST}}}")
    same = _run(f"{PRUNE},distill{{mode=train {FAST} teacher={DIGITS}}}")
    assert same.SerializeToString() == default.SerializeToString()
    other = onnx.load(DIGITS)
    for t in other.graph.initializer:
        if t.name == "fc2.weight":
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((w * -1.0).astype(w.dtype), t.name))
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    moved = _run(f"{PRUNE},distill{{mode=train {FAST} teacher={path}}}")
    assert moved.SerializeToString() != default.SerializeToString()
    fc2 = {t.name: numpy_helper.to_array(t) for t in moved.graph.initializer}["fc2.weight"]
    fc2_default = {t.name: numpy_helper.to_array(t) for t in default.graph.initializer}["fc2.weight"]
    assert not np.allclose(fc2, fc2_default)


def test_bad_teachers_are_one_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="distill teacher: .*no such file"):
        _run(f"{PRUNE},distill{{mode=train {FAST} teacher={tmp_path / 'missing.onnx'}}}")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="distill teacher"):
        _run(f"{PRUNE},distill{{mode=train {FAST} teacher={garbage}}}")
    renamed = onnx.load(DIGITS)
    renamed.graph.output[0].name = "other"
    for n in renamed.graph.node:
        n.output[:] = ["other" if o == "logits" else o for o in n.output]
    path = tmp_path / "renamed.onnx"
    onnx.save(renamed, path)
    with pytest.raises(BadInputError, match="has no output 'logits'"):
        _run(f"{PRUNE},distill{{mode=train {FAST} teacher={path}}}")


def test_teacher_option_is_checked():
    with pytest.raises(ValueError, match="mode=train"):
        Distill(teacher="t.onnx")
    with pytest.raises(ValueError, match="features must be 0"):
        Distill(mode="train", teacher="t.onnx", features=1.0)
