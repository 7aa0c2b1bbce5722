"""onnx's own backend node cases through onnxcompress's exact transforms: every case ORT passes must still pass.

The cases are regenerated from the generators in the installed onnx wheel into the conformance cache
(``$ONNXCOMPRESS_CACHE/conformance/<onnx version>``) on first use; the tests skip when that is impossible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from benchmarks import conformance as conf
except ModuleNotFoundError:
    # plain `pytest` does not put the repository root on sys.path (`python -m pytest` does)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import conformance as conf

SAMPLE = 150
SEED = 0


@pytest.fixture(scope="module")
def root():
    try:
        r = conf.default_root()
        conf.generate_cases(r)
    except ImportError as exc:
        pytest.skip(f"onnx backend test generators not importable: {exc}")
    except OSError as exc:
        pytest.skip(f"cannot write the conformance cache: {exc}")
    return r


@pytest.fixture(scope="module")
def sample(root):
    names = conf.sample_passing(root, SAMPLE, SEED)
    assert len(names) == SAMPLE
    return names


def _report(res: dict) -> str:
    bad = {**res["failures"], **{k: f"transform raised {v}" for k, v in res["error_cases"].items()}}
    lines = [f"{res['passed']} of {res['total']} unchanged; failing:"]
    lines += [f"  {name}: {why}" for name, why in sorted(bad.items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the harness itself
def test_generation_is_complete(root):
    names = conf.case_names(root)
    assert len(names) > 1500
    assert "test_add" in names and "test_castlike_FLOAT_to_FLOAT8E4M3FN" in names
    assert (root / "node" / "test_add" / "test_data_set_0" / "output_0.pb").is_file()


def test_collecting_cases_restores_numpy_global_rng():
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    conf._collect_node_testcases()
    assert np.array_equal(np.random.get_state()[1], before)


def test_load_case_keys_inputs_by_graph_input_names(root):
    model, inputs, expected = conf.load_case(root / "node" / "test_add")
    assert list(inputs) == [i.name for i in model.graph.input] == ["x", "y"]
    assert len(expected) == 1
    np.testing.assert_allclose(expected[0], inputs["x"] + inputs["y"], rtol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "test_add",
        "test_cast_FLOAT_to_FLOAT8E4M3FN",
        "test_cast_INT4_to_FLOAT",
        "test_sequence_insert_at_back",
    ],
)
def test_run_case_passes_and_detects_a_wrong_output(root, name):
    model, inputs, expected = conf.load_case(root / "node" / name)
    assert conf.run_case(model, inputs, expected), conf.check_case(model, inputs, expected)
    if isinstance(expected[0], list):
        wrong = [expected[0][:-1]]
    else:
        e = expected[0]
        wrong = [(e.astype(np.float32) + 1).astype(e.dtype)]
    assert not conf.run_case(model, inputs, wrong)


def test_compare_rules():
    f = np.array([1.0, np.nan, np.inf], dtype=np.float32)
    assert conf.compare(f, f.copy()) is None
    assert conf.compare(f * (1 + 5e-4), f) is None  # inside rtol
    assert conf.compare(f * (1 + 5e-3), f) is not None
    assert conf.compare(f.astype(np.float64), f) is not None  # dtype must match
    assert conf.compare(np.array([7], np.int64), np.array([7000], np.int64)) is not None  # integers are exact
    assert conf.compare(np.array([7001], np.int64), np.array([7000], np.int64)) is not None
    assert conf.compare(np.array(["a"], object), np.array(["b"], object)) is not None
    assert conf.compare(None, None) is None
    assert conf.compare(f, None) is not None


def test_sweep_counts_failures_and_errors(root):
    import onnx

    names = ["test_add", "test_relu", "test_abs"]

    def broken(model: onnx.ModelProto) -> onnx.ModelProto:
        if model.graph.node[0].op_type == "Abs":
            raise RuntimeError("boom")
        m = onnx.ModelProto()
        m.CopyFrom(model)
        if m.graph.node[0].op_type == "Relu":
            m.graph.node[0].op_type = "Neg"
        return m

    res = conf.sweep(broken, names, root=root)
    assert (res["total"], res["passed"], res["failed"], res["errors"]) == (3, 1, 1, 1)
    assert "test_relu" in res["failures"] and "boom" in res["error_cases"]["test_abs"]


# ---------------------------------------------------------------------------------------- transforms, sampled
def test_roundtrip_keeps_sampled_cases(root, sample):
    res = conf.sweep(conf.roundtrip, sample, root=root)
    assert res["passed"] == res["total"] == SAMPLE, _report(res)


def test_cleanup_keeps_sampled_cases(root, sample):
    why = conf.transform_unavailable("cleanup")
    if why:
        pytest.skip(why)
    res = conf.sweep(conf.cleanup, sample, root=root)
    assert res["passed"] == res["total"] == SAMPLE, _report(res)


# ------------------------------------------------------------------------------------------ transforms, full
@pytest.mark.slow
@pytest.mark.parametrize("transform", ["roundtrip", "cleanup"])
def test_full_sweep(root, transform):
    why = conf.transform_unavailable(transform)
    if why:
        pytest.skip(why)
    passing = conf.ort_passing_cases(root)
    assert len(passing) > 1500
    res = conf.sweep(conf.TRANSFORMS[transform], passing, root=root)
    assert res["passed"] == res["total"], _report(res)
