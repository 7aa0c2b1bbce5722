"""prune-channels{min_fidelity=X}: the deepest cut whose worst output cosine on held-out calibration feeds holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.prune_channels import PruneChannels

from onnxcompress.analyses.macs import count_macs
from onnxcompress.cli import main
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.io import to_graph
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


def _run(model, pipeline, calib=CALIB):
    ctx = PassContext(calibration=load_feeds(calib, model) if calib is not None else None)
    res = PassManager(parse_pipeline(pipeline)).run(model, ctx)
    return res, next(r.pass_stats for r in res.ledger if r.stage.startswith("prune-channels"))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _macs(model):
    return count_macs(model, {"image": (1, 1, 8, 8)}).total


def _held_out(stats):
    """The calibration indices the pass says it measured on ("calibration feeds 32..39 of 200")."""
    lo, hi = stats["fidelity_feeds"].split("feeds ")[1].split(" of")[0].split("..")
    return slice(int(lo), int(hi) + 1)


def test_the_floor_holds_on_the_held_out_feeds_under_ort(digits):
    res, st = _run(digits, "cleanup,prune-channels{min_fidelity=0.97 round_to=1}")
    assert st["min_fidelity"] == 0.97 and st["stopped_by"] == "min_fidelity"
    assert _macs(res.model) < 0.9 * _macs(digits)  # it did cut
    idx = _held_out(st)
    assert idx.start >= 32  # after the feeds that scored the channels (samples=32, sensitivity_samples=8)
    x = np.load(CALIB)["image"][idx]
    (ref,) = ort_run(digits, {"image": x})
    (got,) = ort_run(res.model, {"image": x})
    cos = _cosine(ref, got)
    assert cos >= 0.97 - 1e-6
    assert abs(cos - st["fidelity"]) < 1e-5  # the stats report the cut model's own measurement
    trials = st["fidelity_trials"]
    assert len(trials) >= 2 and any(not t["holds"] for t in trials)  # the curve: deeper cuts that broke the floor
    chosen = min((t for t in trials if t["holds"]), key=lambda t: t["macs"])
    assert abs(chosen["macs"] - st["macs_ratio_estimate"]) < 1e-3  # the deepest measured cut that held
    assert all(t["fidelity"] < 0.97 for t in trials if t["macs"] < chosen["macs"] - 1e-9 and not t["holds"])
    # unseen data: the validation set is not what the floor was measured on, but it stays close
    xv = np.load(VAL)["image"][:64]
    assert _cosine(ort_run(digits, {"image": xv})[0], ort_run(res.model, {"image": xv})[0]) > 0.9


def test_a_looser_floor_cuts_at_least_as_many_macs(digits):
    macs = []
    for floor in (0.995, 0.97, 0.9, 0.6):
        res, st = _run(digits, f"cleanup,prune-channels{{min_fidelity={floor} round_to=1}}")
        macs.append(_macs(res.model))
        assert st.get("fidelity", 1.0) >= floor - 1e-6
    assert macs == sorted(macs, reverse=True)
    assert macs[-1] < macs[0]  # and the floors matter


def _tanh_mlp(seed=0):
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
             helper.make_node("Tanh", ["h1"], ["h"], name="act"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(24)]
    return m, feeds


def test_a_floor_of_one_keeps_a_model_without_dead_units_unchanged():
    m, feeds = _tanh_mlp()
    res, st = _run(m, "prune-channels{min_fidelity=1.0 samples=8}", calib=feeds)
    assert "model unchanged" in st["skipped"] and st["pruned_groups"] == 0
    assert st["fidelity_trials"] and all(not t["holds"] for t in st["fidelity_trials"] if t["macs"] < 1.0)
    assert [numpy_helper.to_array(t).shape for t in res.model.graph.initializer] == [(8, 16), (16,), (16, 4)]
    # a floor the smallest cut reaches does cut the same model
    res2, st2 = _run(m, "prune-channels{min_fidelity=0.5 samples=8}", calib=feeds)
    assert st2["pruned_groups"] == 1 and st2["fidelity"] >= 0.5
    assert numpy_helper.to_array(res2.model.graph.initializer[0]).shape[1] < 16


def test_a_floor_of_one_removes_only_units_that_leave_the_outputs_identical(digits):
    """digits has ReLU neurons that are dead on the calibration data: removing them keeps cosine exactly 1."""
    res, st = _run(digits, "cleanup,prune-channels{min_fidelity=1.0}")
    x = np.load(CALIB)["image"][_held_out(st)]
    if st["pruned_groups"]:
        np.testing.assert_allclose(ort_run(res.model, {"image": x})[0], ort_run(digits, {"image": x})[0],
                                   rtol=0, atol=1e-5)
    assert st["fidelity"] == 1.0


def test_with_target_macs_the_budget_or_the_floor_stops_the_cut(digits):
    _, loose = _run(digits, "cleanup,prune-channels{min_fidelity=0.3 target_macs=0.8 round_to=1}")
    assert loose["stopped_by"] == "target_macs" and loose["macs_ratio_estimate"] <= 0.8 + 1e-6
    res, tight = _run(digits, "cleanup,prune-channels{min_fidelity=0.99 target_macs=0.3 round_to=1}")
    assert tight["stopped_by"] == "min_fidelity" and tight["macs_ratio_estimate"] > 0.3
    assert tight["fidelity"] >= 0.99 - 1e-6


def test_too_few_calibration_feeds_are_said_to_overlap(digits):
    x = np.load(CALIB)["image"][:12]
    feeds = [{"image": x[i:i + 1]} for i in range(12)]
    _, st = _run(digits, "cleanup,prune-channels{min_fidelity=0.95 round_to=1}", calib=feeds)
    assert "overlapping" in st["fidelity_feeds"] and "0..11 of 12" in st["fidelity_feeds"]


@pytest.mark.parametrize("opts", ["min_fidelity=0", "min_fidelity=1.5", "min_fidelity=-0.2",
                                  "min_fidelity=0.9 ratio=0.3", "min_fidelity=0.9 allocation=uniform",
                                  "min_fidelity=0.9 fidelity_steps=0"])
def test_bad_values_exit_2_and_write_nothing(tmp_path, capsys, opts):
    out = tmp_path / "small.onnx"
    code = main(["compress", str(DIGITS), "-o", str(out), "--passes", f"prune-channels{{{opts}}}", "--calib",
                 str(CALIB)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "min_fidelity" in err or "fidelity_steps" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_no_calibration_data_is_one_clear_error(tmp_path, capsys, digits):
    out = tmp_path / "small.onnx"
    code = main(["compress", str(DIGITS), "-o", str(out), "--passes", "prune-channels{min_fidelity=0.9}"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "calibration" in err and "Traceback" not in err
    with pytest.raises(BadInputError, match="calibration"):  # the API, past the manager's check
        PruneChannels(min_fidelity=0.9).run(to_graph(digits), PassContext())


def test_a_confidence_lower_bound_is_a_margin_below_the_measured_cosine(digits):
    _, plain = _run(digits, "cleanup,prune-channels{min_fidelity=0.97 round_to=1}")
    _, conf = _run(digits, "cleanup,prune-channels{min_fidelity=0.97 round_to=1 fidelity_confidence=0.95}")
    assert conf["fidelity_confidence"] == 0.95 and plain["fidelity_confidence"] is None
    trials = [t for t in conf["fidelity_trials"] if t["macs"] < 1.0]
    assert trials and all(t["lower_bound"] <= t["fidelity"] + 1e-12 for t in trials)
    assert all(t["holds"] == (t["lower_bound"] >= 0.97) for t in conf["fidelity_trials"])
    assert conf["macs_ratio_estimate"] >= plain["macs_ratio_estimate"]  # the margin never cuts deeper


def test_the_bootstrap_bound_of_identical_feeds_is_the_cosine_itself():
    from onnxcompress.passes.prune_channels.fidelity_floor import lower_bound

    from onnxcompress.output_cosine import worst_of

    rng = np.random.default_rng(0)
    same = np.tile(np.array([[[0.9, 1.0, 1.0]]]), (2, 16, 1))  # 2 outputs, 16 feeds with cosine 0.9 each
    assert lower_bound(same, 0.95, rng) == pytest.approx(0.9)
    spread = same.copy()
    spread[1, :, 0] = np.linspace(0.5, 1.0, 16)  # output 1 varies from feed to feed
    point = float(worst_of(spread)[0])
    assert point == pytest.approx(0.75) and lower_bound(spread, 0.95, rng) < point - 0.02
