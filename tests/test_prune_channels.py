"""prune-channels: structure, options, MAC budgets, importance, and real models (skipped when absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analyses.macs import count_macs
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
CACHE = Path.home() / ".cache" / "onnxcompress" / "files"


def _run(model, pipeline, calib=True, ctx=None):
    ctx = ctx or PassContext(calibration=load_feeds(str(CALIB), model) if calib else None)
    return PassManager(parse_pipeline(pipeline)).run(model, ctx), ctx


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _macs(model, n=1):
    return count_macs(model, {"image": (n, 1, 8, 8)}).total


def _prune_stats(result):
    return next(r.pass_stats for r in result.ledger if r.stage.startswith("prune-channels"))


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


def test_uniform_ratio_shrinks_every_coupled_tensor(digits):
    res, _ = _run(digits, "cleanup,prune-channels{ratio=0.5 round_to=1}", calib=False)
    m = res.model
    onnx.checker.check_model(m, full_check=True)
    assert _init(m, "conv1.weight").shape == (8, 1, 3, 3)
    assert _init(m, "conv2.weight").shape == (16, 8, 3, 3)
    assert _init(m, "conv3.weight").shape == (16, 16, 3, 3)  # residual: conv2 and conv3 cut together
    assert _init(m, "fc1.weight").shape == (32, 16 * 16)  # Flatten: 16 features per channel
    assert _init(m, "fc2.weight").shape == (10, 32)  # the output layer keeps its 10 logits
    st = _prune_stats(res)
    assert st["importance"] == "l2" and st["allocation"] == "uniform"
    assert st["pruned_groups"] == 3 and st["units_removed"] == 8 + 16 + 32
    assert 0.2 < st["macs_ratio_estimate"] < 0.3
    x = np.load(CALIB)["image"][:4]
    (y,) = ort_run(m, {"image": x})
    assert y.shape == (4, 10)


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_target_macs_is_met(digits, allocation):
    res, _ = _run(digits, f"cleanup,prune-channels{{target_macs=0.5 allocation={allocation}}}")
    ratio = _macs(res.model) / _macs(digits)
    assert 0.35 < ratio <= 0.5 + 1e-6
    assert _prune_stats(res)["allocation"] == allocation
    assert abs(_prune_stats(res)["macs_ratio_estimate"] - ratio) < 0.01


def test_round_to_and_floor(digits):
    res, _ = _run(digits, "cleanup,prune-channels{ratio=0.7 round_to=4 min_keep=0.25}", calib=False)
    m = res.model
    for name in ("conv1.weight", "conv2.weight", "fc1.weight"):
        assert _init(m, name).shape[0] % 4 == 0
    assert _init(m, "conv1.weight").shape[0] >= 4  # 25% of 16
    assert _init(m, "conv2.weight").shape[0] == 12  # 32 * 0.3 = 9.6 -> rounded up to 12


def test_exclude_leaves_group_alone(digits):
    res, _ = _run(digits, 'cleanup,prune-channels{ratio=0.5 exclude=["conv1"]}', calib=False)
    assert _init(res.model, "conv1.weight").shape[0] == 16
    assert _init(res.model, "conv2.weight").shape == (16, 16, 3, 3)
    assert _prune_stats(res)["excluded_groups"] == 1


def test_channel_map_left_for_distill(digits):
    _, ctx = _run(digits, "prune-channels{ratio=0.25 round_to=1}", calib=False)
    cmap = ctx.channel_map.positions
    conv1_out = next(n.output[0] for n in digits.graph.node if n.name == "conv1")
    kept = cmap[conv1_out][1]
    assert len(kept) == 12 and np.all(np.diff(kept) > 0) and kept.max() < 16


def test_bn_importance_drops_small_gammas(digits):
    m = onnx.ModelProto()
    m.CopyFrom(digits)
    gamma = next(t for t in m.graph.initializer if t.name == "bn1.weight")
    g = numpy_helper.to_array(gamma).copy()
    g[[2, 7, 11, 13]] = 1e-4
    gamma.CopyFrom(numpy_helper.from_array(g, "bn1.weight"))
    _, ctx = _run(m, "prune-channels{ratio=0.25 importance=bn round_to=1}", calib=False)
    conv1_out = next(n.output[0] for n in m.graph.node if n.name == "conv1")
    kept = set(ctx.channel_map.positions[conv1_out][1].tolist())
    assert kept == set(range(16)) - {2, 7, 11, 13}


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "act", "recon", "obs", "ablation"])
def test_every_importance_runs(digits, importance):
    res, _ = _run(digits, f"cleanup,prune-channels{{ratio=0.25 importance={importance}}}")
    assert _prune_stats(res)["importance"] == importance
    x = np.load(CALIB)["image"][:2]
    assert ort_run(res.model, {"image": x})[0].shape == (2, 10)


def _two_branch_model() -> onnx.ModelProto:
    """Two equally expensive branches; branch a's channels barely reach the output (tiny consumer weights)."""
    rng = np.random.default_rng(0)

    def w(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(w(8, 3, 3, 3), "wa"), numpy_helper.from_array(w(8, 3, 3, 3), "wb"),
             numpy_helper.from_array(w(4, 8, 3, 3, scale=1e-3), "wa2"), numpy_helper.from_array(w(4, 8, 3, 3), "wb2")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1] * 4, name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1] * 4, name="conv_b"),
             helper.make_node("Relu", ["a"], ["ar"]), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["ar", "wa2"], ["a2"], pads=[1] * 4),
             helper.make_node("Conv", ["br", "wb2"], ["b2"], pads=[1] * 4),
             helper.make_node("Add", ["a2", "b2"], ["y"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_sensitivity_spends_pruning_where_the_model_cares_least():
    m = _two_branch_model()
    rng = np.random.default_rng(1)
    feeds = load_feeds([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)], m)
    # importance l2 ranks channels inside a group only; the split between the groups is the sensitivity's
    res, _ = _run(m, "prune-channels{target_macs=0.7 allocation=sensitivity importance=l2 round_to=1}",
                  ctx=PassContext(calibration=feeds))
    wa, wb = _init(res.model, "wa"), _init(res.model, "wb")
    # removing 5 of branch a's 8 channels saves 5/8 of half the MACs (>= 30%) at almost no error
    assert wb.shape[0] == 8 and wa.shape[0] == 3


def test_ablation_importance_measures_each_unit():
    m = _two_branch_model()
    wb2 = next(t for t in m.graph.initializer if t.name == "wb2")
    w = numpy_helper.to_array(wb2).copy()
    w[:, [3, 5]] = 0.0  # channels 3 and 5 of branch b reach nothing
    wb2.CopyFrom(numpy_helper.from_array(w, "wb2"))
    rng = np.random.default_rng(2)
    feeds = load_feeds([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)], m)
    res, ctx = _run(m, "prune-channels{ratio=0.25 importance=ablation exclude=[conv_a] round_to=1}",
                    ctx=PassContext(calibration=feeds))
    assert _prune_stats(res)["importance"] == "ablation"
    kept = ctx.channel_map.positions["b"][1].tolist()
    assert kept == [0, 1, 2, 4, 6, 7]


def test_ablation_trial_removes_the_unit_the_way_the_pass_does():
    """A channel whose activation is a constant costs nothing once its mean moves into the consumer's bias: the
    compensated ablation trial sees that and removes it first, however large its consumer weights."""
    m = _two_branch_model()
    inits = {t.name: t for t in m.graph.initializer}
    wb = numpy_helper.to_array(inits["wb"]).copy()
    wb[2] = 0.0  # channel 2 of branch b: relu(0 * x + 3) = 3 everywhere
    inits["wb"].CopyFrom(numpy_helper.from_array(wb, "wb"))
    wb2 = numpy_helper.to_array(inits["wb2"]).copy()
    wb2[:, 2] = 0.0
    wb2[:, 2, 1, 1] = 5.0  # ... read with large weights (centre tap: no padding zeros at the borders)
    inits["wb2"].CopyFrom(numpy_helper.from_array(wb2, "wb2"))
    bias = np.zeros(8, np.float32)
    bias[2] = 3.0
    m.graph.initializer.append(numpy_helper.from_array(bias, "bb"))
    next(n for n in m.graph.node if n.name == "conv_b").input.append("bb")
    rng = np.random.default_rng(3)
    raw = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res, ctx = _run(m, "prune-channels{ratio=0.125 importance=ablation exclude=[conv_a] round_to=1}",
                    ctx=PassContext(calibration=load_feeds(raw, m)))
    kept = ctx.channel_map.positions["b"][1].tolist()
    assert 2 not in kept and len(kept) == 7
    (ref,), (got,) = ort_run(m, raw[0]), ort_run(res.model, raw[0])
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)  # the constant channel was free to remove


def test_obs_removes_a_redundant_channel_first():
    """Two identical, strong channels: after a refit one can stand in for the other, so OBS removes one of them
    first; the diagonal ``recon`` score ranks both as the most important."""
    m = _two_branch_model()
    wb = next(t for t in m.graph.initializer if t.name == "wb")
    w = numpy_helper.to_array(wb).copy()
    w[1] = w[0] = 3.0 * w[0]
    wb.CopyFrom(numpy_helper.from_array(w, "wb"))
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    kept = {}
    for imp in ("recon", "obs"):
        res, ctx = _run(m, f"prune-channels{{ratio=0.125 importance={imp} exclude=[conv_a] round_to=1}}",
                        ctx=PassContext(calibration=load_feeds(feeds, m)))
        assert _prune_stats(res)["importance"] == imp
        kept[imp] = set(ctx.channel_map.positions["b"][1].tolist())
    assert {0, 1} <= kept["recon"]
    assert len({0, 1} & kept["obs"]) == 1


def test_nothing_to_prune_is_a_no_op():
    m = _two_branch_model()
    res, _ = _run(m, "prune-channels{ratio=0.5 exclude=[conv_a, conv_b]}", calib=False)
    assert not res.ledger[-1].modified
    assert _init(res.model, "wa").shape == (8, 3, 3, 3)


@pytest.mark.parametrize("bad", ["ratio=1.5", "target_macs=0", "importance=foo", "allocation=best",
                                 "round_to=-1", "min_keep=0", "sensitivity_ratios=[1.5]",
                                 "target_latency=0", "target_latency=1.5"])
def test_bad_options(bad):
    with pytest.raises(BadInputError):
        parse_pipeline(f"prune-channels{{{bad}}}")


# ------------------------------------------------------------------------------------------- real models
def _real(name: str) -> onnx.ModelProto:
    path = CACHE / name
    if not path.exists():
        pytest.skip(f"{name} is not in the model cache (python -m benchmarks.models fetch)")
    return onnx.load(path)


@pytest.mark.realmodel
def test_ppocr_cls_half_macs():
    m = _real("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    rng = np.random.default_rng(0)
    feeds = load_feeds([{"x": rng.random((1, 3, 48, 192), np.float32)} for _ in range(4)], m)
    res = PassManager(parse_pipeline("cleanup,prune-channels{target_macs=0.5 round_to=8}")).run(
        m, PassContext(calibration=feeds))
    onnx.checker.check_model(res.model, full_check=True)
    ratio = count_macs(res.model, {"x": (1, 3, 48, 192)}).total / count_macs(m, {"x": (1, 3, 48, 192)}).total
    assert ratio <= 0.51


@pytest.mark.realmodel
def test_minilm_ffn_neurons_and_heads():
    m = _real("paraphrase-MiniLM-L3-v2.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(1000, 5000, (1, 12)).astype(np.int64),
              "attention_mask": np.ones((1, 12), np.int64)} for _ in range(2)]
    res = PassManager(parse_pipeline("prune-channels{ratio=0.3}")).run(m, PassContext(calibration=load_feeds(feeds,
                                                                                                              m)))
    st = _prune_stats(res)
    assert st["pruned_groups"] == 6  # 3 FFN + 3 attention (heads) groups
    shapes = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert shapes["onnx::MatMul_481"] == [384, 1536 - 460]  # FFN: floor(0.3 * 1536) neurons removed
    assert shapes["onnx::MatMul_470"] == [384, 9 * 32]  # queries: 3 of 12 heads removed
    out = ort_run(res.model, feeds[0])
    assert out[3].shape == (1, 384)


def test_sensitivity_error_weighs_output_features_alike():
    from onnxcompress.passes.prune_channels.sensitivity import relative_error as _relative_error

    rng = np.random.default_rng(0)
    y = np.stack([100.0 * rng.standard_normal(50), rng.random(50)])[None]  # [1, 2 features, 50]: boxes, scores
    broken_scores = y.copy()
    broken_scores[0, 1] = 0.0
    # the flat relative error barely sees the scores vanish; per feature it is half the damage
    flat = float(np.sum((y - broken_scores) ** 2) / np.sum(y ** 2))
    assert flat < 1e-3
    assert _relative_error([[y]], [[broken_scores]]) == pytest.approx(0.5)
    assert _relative_error([[y[0]]], [[broken_scores[0]]]) == pytest.approx(flat)  # rank 2: flat


def test_mean_compensation_keeps_outputs_calibrated(digits):
    val = np.load(ROOT / "models" / "digits_val.npz")["image"]
    (ref,) = ort_run(digits, {"image": val})
    errs = {}
    for comp in ("true", "false"):
        res, _ = _run(digits, f"cleanup,prune-channels{{ratio=0.5 compensate={comp}}}")
        (y,) = ort_run(res.model, {"image": val})
        errs[comp] = float(np.mean((y - ref) ** 2))
        if comp == "true":
            assert _prune_stats(res)["biases_compensated"] >= 3
    assert errs["true"] < 0.9 * errs["false"]


def test_bias_less_consumer_gets_a_bias():
    m = _two_branch_model()
    rng = np.random.default_rng(4)
    feeds = load_feeds([{"x": np.abs(rng.standard_normal((1, 3, 8, 8))).astype(np.float32)} for _ in range(4)], m)
    res, _ = _run(m, "prune-channels{ratio=0.5 round_to=1}", ctx=PassContext(calibration=feeds))
    consumers = [n for n in res.model.graph.node if n.op_type == "Conv" and n.input[0] in ("ar", "br")]
    assert len(consumers) == 2 and all(len(n.input) == 3 for n in consumers)
    assert _prune_stats(res)["biases_added"] == 2


def _conv_gemm_model() -> onnx.ModelProto:
    """Conv (48 channels) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (40 neurons) -> Relu -> Gemm (4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((48, 3, 3, 3)).astype(np.float32), "wc"),
             numpy_helper.from_array(rng.standard_normal((48, 40)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((40, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", ["c"], ["cr"]), helper.make_node("GlobalAveragePool", ["cr"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("Gemm", ["hr", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "cg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize(("round_to", "conv_kept", "fc_kept"), [(0, 32, 24), (1, 29, 24), (16, 32, 32)])
def test_round_to_auto_blocks_conv_channels_only(round_to, conv_kept, fc_kept):
    # ratio 0.4: 19 of the 48 conv channels and 16 of the 40 neurons go (29 and 24 kept), rounded up to the next
    # allowed count; auto (0) rounds Conv channels to the NCHWc block (16) and leaves neurons free
    res, _ = _run(_conv_gemm_model(), f"prune-channels{{ratio=0.4 importance=l2 round_to={round_to}}}",
                  calib=False)
    assert _init(res.model, "wc").shape[0] == conv_kept
    assert _init(res.model, "w1").shape == (conv_kept, fc_kept)
    assert _init(res.model, "w2").shape == (fc_kept, 4)


def test_sensitivity_error_on_maps_whose_size_varies():
    from onnxcompress.passes.prune_channels.sensitivity import relative_error as _relative_error

    rng = np.random.default_rng(0)
    base = [[rng.random((1, 1, h, 32))] for h in (16, 24)]  # a segmentation map: H varies with the input
    cand = [[b[0] * 0.5] for b in base]
    # no fixed feature axis: the flat relative error, (0.5)^2 of the energy
    assert _relative_error(base, cand) == pytest.approx(0.25)


def test_latency_model_counts_memory_bound_ops_by_kept_channels():
    from onnxcompress.passes.prune_channels.latency_model import LatencyModel

    class _CG:  # macs_after: MACs scale with the kept share of elements 0..3
        total_macs = 100.0

        def macs_after(self, keep_el):
            return 100.0 * keep_el[:4].mean()

    # two memory-bound nodes: one over channel elements 0..3 (1000 elements), one over 4..5 (500); 200 fixed
    lm = LatencyModel(a=1.0, b=0.1, mac_total=100.0, cg_macs=100.0, elems=np.array([1000.0, 500.0]),
                      owner=np.array([0, 0, 0, 0, 1, 1]), chan_el=np.arange(6), counts=np.array([4.0, 2.0]),
                      fixed=200.0, t_fixed=10.0)
    full = lm.estimate(_CG(), np.ones(6, bool))
    assert full == pytest.approx(10 + 100 + 0.1 * (200 + 1500))
    half = np.array([1, 0, 1, 0, 1, 1], bool)  # half of the first group's channels
    assert lm.estimate(_CG(), half) == pytest.approx(10 + 50 + 0.1 * (200 + 500 + 500))
    assert 0 < lm.share_of_macs < 1


TARGET_LATENCY = "cleanup,prune-channels{target_latency=0.7 round_to=1}"
#: a hand-made ORT profile of the cleaned digits_cnn (``profile_op_times``: ORT kernel -> one median time per node, in
#: seconds), shaped like one measured on an idle machine: the latency model is fitted to it instead of to a timing
STUB_OP_TIMES = {"Conv": [1.7e-05, 2.0e-05, 1.4e-05], "MaxPool": [9.0e-06], "Add": [9.0e-06],
                 "ReorderOutput": [7.5e-06], "Flatten": [7.0e-06], "FusedGemm": [1.4e-05], "Gemm": [9.5e-06]}


@pytest.fixture(scope="module")
def recorded_latency(digits):
    """One run of the target_latency pipeline that profiles for real: its result and the latency profile it
    recorded (the key the pass asks for, with the measured op times)."""
    ctx = PassContext(calibration=load_feeds(str(CALIB), digits))
    res = PassManager(parse_pipeline(TARGET_LATENCY)).run(digits, ctx)
    return res, ctx.latency


def test_target_latency_meets_its_estimate(digits, recorded_latency):
    # the same key, answered by the stub: the cut does not depend on how loaded the machine is
    stub = LatencyProfile(dict.fromkeys(recorded_latency[1].entries, STUB_OP_TIMES), replay_only=True)
    res, ctx = _run(digits, TARGET_LATENCY, ctx=PassContext(calibration=load_feeds(str(CALIB), digits),
                                                            latency=stub))
    assert ctx.latency.measured == 0 and ctx.latency.replayed == 1
    st = _prune_stats(res)
    assert st["pruned_groups"] >= 1
    assert st["latency_ratio_estimate"] <= 0.7
    assert 0 < st["latency_model_mac_share"] < 1
    val = np.load(ROOT / "models" / "digits_val.npz")["image"]
    assert ort_run(res.model, {"image": val})[0].shape[0] == val.shape[0]


def test_target_latency_replays_a_recorded_profile(digits, recorded_latency):
    """The profile a run recorded (as its report holds it, through JSON), fed back: nothing is measured and the
    pruned model is the same, byte for byte."""
    first, recorded = recorded_latency
    assert recorded.measured == 1 and all(k.startswith("prune-channels/op-times/") for k in recorded.entries)
    replay = LatencyProfile(json.loads(json.dumps(first.latency_profile)), replay_only=True)
    res, _ = _run(digits, TARGET_LATENCY, ctx=PassContext(calibration=load_feeds(str(CALIB), digits),
                                                          latency=replay))
    assert replay.measured == 0 and replay.replayed == 1
    assert res.model.SerializeToString() == first.model.SerializeToString()
    assert _prune_stats(res)["latency_ratio_estimate"] == _prune_stats(first)["latency_ratio_estimate"]


def test_target_latency_needs_data(digits):
    with pytest.raises(Exception, match="calibration"):
        _run(digits, "cleanup,prune-channels{target_latency=0.7}", calib=False)


# --------------------------------------------------------------------------------------------- head_ratio
def _attention_ffn_model(layers: int = 2, h: int = 4, d: int = 3, e: int = 8, f: int = 10, t: int = 5,
                         seed: int = 0) -> onnx.ModelProto:
    """``layers`` x (attention with h heads of width d + residual, ReLU FFN of f neurons + residual)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([1, t, h, d], np.int64), "split"),
             numpy_helper.from_array(np.array([1, t, h * d], np.int64), "merge"),
             numpy_helper.from_array(np.array(math.sqrt(d), np.float32), "scale")]
    nodes, x = [], "x"
    for i in range(layers):
        def w(name, *shape, i=i):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(shape[0])).astype(
                np.float32), f"{name}{i}"))
            return f"{name}{i}"
        for n in ("q", "k", "v"):
            nodes += [helper.make_node("MatMul", [x, w(f"w{n}", e, h * d)], [f"{n}p{i}"]),
                      helper.make_node("Reshape", [f"{n}p{i}", "split"], [f"{n}r{i}"])]
        nodes += [helper.make_node("Transpose", [f"qr{i}"], [f"qt{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [f"kr{i}"], [f"kt{i}"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", [f"vr{i}"], [f"vt{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("MatMul", [f"qt{i}", f"kt{i}"], [f"s{i}"]),
                  helper.make_node("Div", [f"s{i}", "scale"], [f"s2{i}"]),
                  helper.make_node("Softmax", [f"s2{i}"], [f"p{i}"], axis=-1),
                  helper.make_node("MatMul", [f"p{i}", f"vt{i}"], [f"c{i}"]),
                  helper.make_node("Transpose", [f"c{i}"], [f"ct{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"ct{i}", "merge"], [f"cm{i}"]),
                  helper.make_node("MatMul", [f"cm{i}", w("wo", h * d, e)], [f"o{i}"]),
                  helper.make_node("Add", [f"o{i}", x], [f"a{i}"]),
                  helper.make_node("MatMul", [f"a{i}", w("w1_", e, f)], [f"f{i}"]),
                  helper.make_node("Relu", [f"f{i}"], [f"fr{i}"]),
                  helper.make_node("MatMul", [f"fr{i}", w("w2_", f, e)], [f"g{i}"]),
                  helper.make_node("Add", [f"g{i}", f"a{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "attn_ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, e])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, t, e])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _attn_feeds(model, n=8, seed=1):
    rng = np.random.default_rng(seed)
    return load_feeds([{"x": rng.standard_normal((1, 5, 8)).astype(np.float32)} for _ in range(n)], model)


def _kept_shapes(model, layers=2):
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [shapes[f"wq{i}"][1] // 3 for i in range(layers)], [shapes[f"w1_{i}"][1] for i in range(layers)]


def test_head_ratio_budgets_heads_apart_from_ffn_neurons():
    m = _attention_ffn_model()
    res = PassManager(parse_pipeline("prune-channels{ratio=0.5 head_ratio=0.25 allocation=uniform}")).run(
        m, PassContext(calibration=_attn_feeds(m)))
    heads, ffn = _kept_shapes(res.model)
    assert heads == [3, 3] and ffn == [5, 5]
    # without head_ratio the one ratio counts heads too
    res2 = PassManager(parse_pipeline("prune-channels{ratio=0.5 allocation=uniform}")).run(
        m, PassContext(calibration=_attn_feeds(m)))
    assert _kept_shapes(res2.model) == ([2, 2], [5, 5])
    # head_ratio=0 keeps every head
    res3 = PassManager(parse_pipeline("prune-channels{ratio=0.5 head_ratio=0}")).run(
        m, PassContext(calibration=_attn_feeds(m)))
    assert _kept_shapes(res3.model) == ([4, 4], [5, 5])


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_head_ratio_counts_heads_across_layers(allocation):
    """3 of 8 heads over two layers (not a uniform 1 or 2 per layer), 8 of 20 FFN neurons over both layers; with
    measured sensitivity the layer whose heads carry least loses more of them (global normalises scores per group,
    so it cannot see that)."""
    m = _attention_ffn_model()
    wv = next(t for t in m.graph.initializer if t.name == "wv1")
    arr = numpy_helper.to_array(wv).copy()
    arr *= 0.01  # layer 1's values are tiny: its heads barely matter
    wv.CopyFrom(numpy_helper.from_array(arr, "wv1"))
    res = PassManager(parse_pipeline(
        f"prune-channels{{ratio=0.4 head_ratio=0.375 allocation={allocation} min_keep=0.25}}")).run(
        m, PassContext(calibration=_attn_feeds(m)))
    heads, ffn = _kept_shapes(res.model)
    assert sum(heads) == 8 - 3 and sum(ffn) == 20 - 8
    if allocation == "sensitivity":
        assert heads[1] < heads[0]
    st = _prune_stats(res)
    assert st["units_removed"] == 3 + 8


@pytest.mark.parametrize("bad", ["head_ratio=1.0", "head_ratio=-0.1", "head_ratio=0.3 target_macs=0.5"])
def test_head_ratio_bad_options(bad):
    with pytest.raises(BadInputError):
        parse_pipeline(f"prune-channels{{{bad}}}")
