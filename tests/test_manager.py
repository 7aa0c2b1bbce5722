"""PassManager: contracts, error wrapping, analyses invalidation, ledger, exactness gate, original untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tests.passes_for_tests  # noqa: F401
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import PassError, ValidationError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run


def conv_gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g_w = rng.standard_normal((256, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(g_w, "G")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def feeds(n=4):
    rng = np.random.default_rng(5)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("phase,fragment", [("requires", "graph has no Conv"), ("run", "RuntimeError: boom"),
                                            ("ensures", "postcondition broken")])
def test_failures_name_the_pass_and_the_ones_before(phase, fragment):
    passes = parse_pipeline(f"test-options{{count=1}},test-scale,test-fail{{phase={phase}}}")
    with pytest.raises(PassError) as info:
        PassManager(passes, gate=False).run(conv_gemm_model())
    msg = str(info.value)
    label = "test-fail" if phase == "run" else f"test-fail{{phase={phase}}}"  # defaults are not printed
    assert f"pass {label} (after" in msg
    assert "after test-options{count=1}, test-scale" in msg
    assert fragment in msg


def test_first_pass_failure_says_so():
    with pytest.raises(PassError, match=r"\(first pass\)"):
        PassManager(parse_pipeline("test-fail"), gate=False).run(conv_gemm_model())


def test_ledger_rows_and_macs():
    model = conv_gemm_model()
    calib = load_feeds(feeds(), model)
    result = PassManager(parse_pipeline("test-options,test-scale{factor=2.0}"), validation=calib).run(
        model, PassContext(calibration=calib))
    stages = [r.stage for r in result.ledger]
    assert stages == ["original", "test-options", "test-scale{factor=2.0}"]
    orig = result.ledger[0].model
    # Conv: 1*4*8*8 outputs * 3*3*3 ; Gemm: 1*10 outputs * 256
    assert orig["macs"] == 4 * 64 * 27 + 10 * 256
    assert orig["params"] == 4 * 27 + 2560
    assert orig["ops"] == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert result.ledger[1].modified is False and result.ledger[2].modified is True
    assert result.ledger[2].pass_stats == {"scaled": 2}
    assert result.ledger[2].options == {"factor": 2.0, "claim_exact": False, "preserve": ()}
    # the lossy pass doubled every weight: output scales by 4 (Conv then Gemm), measured by the oracle
    assert result.fidelity is not None
    worst = result.fidelity.worst()
    assert worst["cosine"] > 0.999  # a positive scale does not change direction
    assert worst["sqnr_db"] < 0  # the error is larger than the signal (|4y - y| = 3|y|)


def test_exact_pipeline_that_changes_outputs_is_rejected():
    model = conv_gemm_model()
    calib = load_feeds(feeds(), model)
    with pytest.raises(ValidationError, match="changed output"):
        PassManager(parse_pipeline("test-scale{claim_exact=true}"), validation=calib).run(model)


def test_original_model_is_not_modified():
    model = conv_gemm_model()
    before = model.SerializeToString()
    result = PassManager(parse_pipeline("test-scale{factor=3.0}"), gate=True).run(model)
    assert model.SerializeToString() == before
    x = feeds(1)[0]
    np.testing.assert_allclose(ort_run(result.model, x)[0], 9 * ort_run(model, x)[0], rtol=1e-4, atol=1e-4)


_CALLS = {"n": 0}


class _Counter:
    name = "test-counter"

    @classmethod
    def compute(cls, graph, ctx):
        _CALLS["n"] += 1
        return _CALLS["n"]


def test_analyses_are_cached_and_invalidated_unless_preserved():
    ctx = PassContext()
    graph = None
    first = ctx.analysis(_Counter, graph)
    assert ctx.analysis(_Counter, graph) == first  # cached
    ctx.invalidate(frozenset({"test-counter"}))
    assert ctx.analysis(_Counter, graph) == first  # preserved
    ctx.invalidate(frozenset())
    assert ctx.analysis(_Counter, graph) == first + 1  # recomputed
    ctx.invalidate(frozenset({"all"}))
    assert "test-counter" in ctx.cached_analyses()


def test_manager_drops_analyses_a_pass_does_not_preserve():
    ctx = PassContext()
    ctx.analysis(_Counter, None)
    PassManager(parse_pipeline("test-scale{preserve=[test-counter]}"), gate=False).run(conv_gemm_model(), ctx)
    assert "test-counter" in ctx.cached_analyses()
    PassManager(parse_pipeline("test-scale"), gate=False).run(conv_gemm_model(), ctx)
    assert "test-counter" not in ctx.cached_analyses()


def test_structural_gate_rejects_an_invalid_result():
    """A pass that leaves a dangling input makes a model ORT cannot load: the gate must stop it."""
    from dataclasses import dataclass

    from onnxcompress.pass_base import Pass, PassResult

    @dataclass(frozen=True)
    class BreakPass(Pass):  # not registered: the manager runs pass objects; the registry is for pipelines
        name = "test-break"
        description = "leaves a dangling input"

        def run(self, graph, ctx):
            import onnx_graphsurgeon as gs

            relu = next(n for n in graph.nodes if n.op == "Relu")
            relu.inputs = [gs.Variable("dangling", dtype=np.float32)]
            return PassResult(True)

    with pytest.raises(ValidationError):
        PassManager([BreakPass()]).run(conv_gemm_model())
