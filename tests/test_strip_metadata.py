"""strip-metadata: the exemplar small exact pass (copy this test with the pass)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxcompress.passes.strip_metadata import StripMetadata

from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        agraph (float[2, 3] x) => (float[2, 3] y) {
            y = Relu(x)
        }"""
    )
    model.doc_string = "exported by a tool"
    model.graph.doc_string = "the main graph"
    model.producer_name, model.producer_version = "exporter", "9.9"
    helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    return model


def _run(model: onnx.ModelProto, pipeline: str):
    feeds = load_feeds([{"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}], model)
    return PassManager(parse_pipeline(pipeline), validation=feeds, measure=False).run(model)


def test_strips_doc_strings_and_metadata_keeps_outputs():
    model = _model()
    res = _run(model, "strip-metadata")
    out = res.model
    assert out.doc_string == "" and out.graph.doc_string == "" and len(out.metadata_props) == 0
    assert out.producer_name != ""  # producer kept unless asked
    stats = res.ledger[-1].pass_stats
    assert stats == {"doc_strings_removed": 2, "metadata_props_removed": 2, "producer_fields_cleared": 0}
    x = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(ort_run(model, x)[0], ort_run(out, x)[0])
    assert model.doc_string == "exported by a tool"  # the caller's model is not modified


def test_options_keep_metadata_and_clear_producer():
    res = _run(_model(), "strip-metadata{keep_metadata=true producer=true}")
    assert {p.key for p in res.model.metadata_props} == {"author", "license"}
    assert res.ledger[-1].pass_stats["producer_fields_cleared"] == 2


def test_nothing_to_strip_is_unmodified():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        agraph (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }"""
    )
    res = _run(model, "strip-metadata")
    assert res.ledger[-1].pass_stats == {"doc_strings_removed": 0, "metadata_props_removed": 0,
                                         "producer_fields_cleared": 0}


def test_bad_option_is_a_clear_error():
    with pytest.raises(BadInputError, match="producer"):
        parse_pipeline("strip-metadata{producer=3}")
    with pytest.raises(ValueError, match="true or false"):
        StripMetadata(producer=3)
