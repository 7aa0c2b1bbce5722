"""quantize{empirical_bias=true}: each int8 layer's per-channel output mean matched to the float layer's, stage by
depth, through its bias (passes/quantize/empirical_bias.py)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from conftest import ort_run
from onnx import TensorProto, helper
from onnxcompress.passes.quantize.empirical_bias import depth_stages
from quantize_helpers import add_initializers, normal_feeds, output_sqnr, quantize_on


def _conv_chain(seed: int = 0):
    """x[1,4,8,8] -> Conv 3x3 -> Relu -> Conv 1x1 -> Relu -> Conv 1x1 -> y: ReLU outputs with long tails, whose
    clipped ranges (calibration=percentile) shift the next layer's mean."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    add_initializers(model, {
        "w1": (rng.standard_normal((16, 4, 3, 3)) * 0.4).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (np.abs(rng.standard_normal((16, 16, 1, 1))) * 0.3).astype(np.float32),
        "b2": (rng.standard_normal(16) * 0.1 - 0.5).astype(np.float32),
        "w3": (rng.standard_normal((8, 16, 1, 1)) * 0.5 + 0.3).astype(np.float32),
        "b3": np.zeros(8, np.float32),
    })
    return model


def _bias_integers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == TensorProto.INT32 and i.name.endswith("_quantized")}


def test_empirical_bias_raises_held_out_sqnr_and_changes_only_bias_integers():
    model = _conv_chain()
    calib, held = normal_feeds((1, 4, 8, 8), 24, seed=1), normal_feeds((1, 4, 8, 8), 16, seed=2)
    # ranges clipped at the 90th percentile: every ReLU output loses its tail, each layer's mean moves
    opts = {"calibration": "percentile", "percentile": 90.0}
    plain, _ = quantize_on(model, calib, **opts)
    fixed, stats = quantize_on(model, calib, empirical_bias=True, **opts)
    eb = stats["empirical_bias"]
    assert eb["kept"] and eb["layers"] == 3 and eb["stages"] == 3, eb
    # on the measured feeds the output's channel means are the float model's (up to the int32 bias rounding)
    def means(m, fs):
        return np.mean([ort_run(m, f)[0].mean(axis=(0, 2, 3)) for f in fs], axis=0)

    ref = means(model, calib)
    shift_plain, shift_fixed = np.abs(means(plain, calib) - ref), np.abs(means(fixed, calib) - ref)
    assert shift_fixed.max() < 0.1 * shift_plain.max(), (shift_plain, shift_fixed)
    # held out (other feeds): less noise at the output
    gain = output_sqnr(model, fixed, held) - output_sqnr(model, plain, held)
    assert gain > 0.5, gain
    # same graph: the same nodes in the same order, the same weights; only int32 bias values differ
    assert [n.op_type for n in fixed.graph.node] == [n.op_type for n in plain.graph.node]
    before, after = _bias_integers(plain), _bias_integers(fixed)
    assert len(before) == len(after) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(before.values(), after.values(), strict=True))
    ints = {i.name for i in plain.graph.initializer if i.data_type == TensorProto.INT8}
    same = {i.name: i.raw_data for i in fixed.graph.initializer if i.data_type == TensorProto.INT8}
    assert ints == set(same)
    assert all(same[i.name] == i.raw_data for i in plain.graph.initializer if i.data_type == TensorProto.INT8)


def test_a_model_without_a_movable_bias_is_quantized_byte_for_byte_as_without_the_option():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "m",
                                                [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    add_initializers(model, {"w": np.random.default_rng(3).standard_normal((8, 5)).astype(np.float32)})
    calib = normal_feeds((2, 6, 8), 8, seed=4)
    plain, _ = quantize_on(model, calib)
    got, stats = quantize_on(model, calib, empirical_bias=True)
    assert stats["empirical_bias"]["layers"] == 0
    assert got.SerializeToString() == plain.SerializeToString()


def test_depth_stages_put_a_layer_after_every_layer_that_feeds_it():
    g = gs.import_onnx(_conv_chain())
    convs = [n for n in g.nodes if n.op == "Conv"]
    stages = depth_stages(g, convs)
    assert [[n.name for n in s] for s in stages] == [["conv1"], ["conv2"], ["conv3"]]
    # two parallel layers reading the same tensor share a stage
    extra = gs.Node("Conv", "side", inputs=[convs[0].outputs[0], convs[1].inputs[1]], outputs=[gs.Variable("s")])
    g.nodes.append(extra)
    g.toposort()
    stages = depth_stages(g, [*convs, extra])
    assert sorted(n.name for n in stages[1]) == ["conv2", "side"]


def test_bad_sample_count_is_refused():
    import pytest
    from onnxcompress.passes.quantize import Quantize

    with pytest.raises(ValueError, match="empirical_bias_samples"):
        Quantize(empirical_bias_samples=-1)
    with pytest.raises(ValueError, match="empirical_gain needs empirical_bias"):
        Quantize(empirical_gain=True)


def test_empirical_gain_fits_the_float_output_better_than_the_means_alone():
    model = _conv_chain()
    calib, held = normal_feeds((1, 4, 8, 8), 24, seed=1), normal_feeds((1, 4, 8, 8), 16, seed=2)
    opts = {"calibration": "percentile", "percentile": 90.0, "empirical_bias": True}
    means, _ = quantize_on(model, calib, **opts)
    fitted, stats = quantize_on(model, calib, empirical_gain=True, **opts)
    eb = stats["empirical_bias"]
    assert eb["kept"] and eb["layers"] == 3 and eb["median_abs_gain_change"] > 0.01, eb
    # clipped ranges shrink each channel's spread: the gains restore part of it, held out (+0.12 dB on this toy)
    gain = output_sqnr(model, fitted, held) - output_sqnr(model, means, held)
    assert gain > 0.05, gain
    # the integer weights are the same; their per-channel scales moved
    ints = lambda m: [i.raw_data for i in m.graph.initializer if i.data_type == TensorProto.INT8]  # noqa: E731
    assert ints(fitted) == ints(means)


def test_affine_fit_recovers_gain_and_offset():
    from onnxcompress.passes.quantize.empirical_bias import affine_fit

    rng = np.random.default_rng(5)
    yq = rng.standard_normal((3, 4000)) * np.array([[1.0], [2.0], [0.5]]) + 0.3
    y = np.array([[0.8], [1.2], [1.0]]) * yq + np.array([[0.1], [-0.2], [0.0]])
    a, c = affine_fit(y.mean(1), yq.mean(1), (y * yq).mean(1), (yq * yq).mean(1))
    np.testing.assert_allclose(a, [0.8, 1.2, 1.0], rtol=1e-9)
    np.testing.assert_allclose(c, [0.1, -0.2, 0.0], atol=1e-9)


def test_a_classifier_over_pooled_features_is_not_corrected():
    """Gemm over [batch, features]: one row per feed, so its per-class means would be fitted to the feeds."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "cls", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    add_initializers(model, {"w1": rng.standard_normal((8, 4, 1, 1)).astype(np.float32),
                             "b1": np.zeros(8, np.float32),
                             "w2": rng.standard_normal((5, 8)).astype(np.float32),
                             "b2": np.zeros(5, np.float32)})
    _, stats = quantize_on(model, normal_feeds((1, 4, 8, 8), 8, seed=7), empirical_bias=True,
                           calibration="percentile", percentile=90.0)
    eb = stats["empirical_bias"]
    assert list(eb["not_corrected"]) == ["fc"] and eb["layers"] == 1, eb


def test_upstream_keeps_only_what_the_tensors_need():
    from onnxcompress.passes.quantize.empirical_bias import upstream

    m = upstream(_conv_chain(), ["r1"])
    assert [n.name for n in m.graph.node] == ["conv1", "relu1"]
    assert sorted(i.name for i in m.graph.initializer) == ["b1", "w1"] and not m.graph.output
