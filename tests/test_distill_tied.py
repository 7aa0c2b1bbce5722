"""distill on tied weights: one constant read by several layers (ALBERT's shared layers) is refit once, from the
summed normal equations of its readers, and stays one initializer read by all of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from onnxcompress.passes.distill import Distill
from onnxcompress.passes.distill.normal_equations import Normal
from onnxcompress.passes.distill.ridge import solve
from onnxcompress.passes.distill.tied_solve import _joint
from onnxcompress.passes.prune_channels import PruneChannels

from onnxcompress import api
from onnxcompress.pass_base import Pass, PassResult, option, register
from tests.conftest import ort_run


@register
@dataclass(frozen=True)
class _TiedNoise(Pass):
    """Test-only lossy pass: seeded noise on every float constant of more than 8 values, each written once (new
    arrays), so a tied weight stays tied."""

    name = "test-tied-noise"
    description = "add seeded noise to float weights"
    scale: float = option(0.3, "noise std relative to the weight's std")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        rng = np.random.default_rng(1)
        for t in sorted(graph.tensors().values(), key=lambda t: t.name):
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.size > 8:
                v = np.asarray(t.values)
                t.values = (v + rng.standard_normal(v.shape) * self.scale * v.std()).astype(np.float32)
        return PassResult(True)


@register
@dataclass(frozen=True)
class _TiedInt8(Pass):
    """Test-only lossy pass: the Conv kernel ``wc`` becomes one DequantizeLinear(int8, per-tensor scale, coarse)
    read by all its Convs."""

    name = "test-tied-int8"
    description = "quantize wc once, coarsely"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        wc = graph.tensors()["wc"]
        v = np.asarray(wc.values)
        scale = np.float32(np.abs(v).max() / 7)  # 4-bit steps stored as int8: a visible error to refit
        q = gs.Constant("wc_q", np.clip(np.round(v / scale), -127, 127).astype(np.int8))
        out = gs.Variable("wc_dq", dtype=np.float32, shape=list(v.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=[q, gs.Constant("wc_s", np.array(scale)),
                                                               gs.Constant("wc_z", np.array(0, np.int8))],
                                   outputs=[out]))
        for node in [n for n in graph.nodes if n.op == "Conv"]:
            node.inputs[1] = out
        graph.cleanup().toposort()
        return PassResult(True)


def _model(nodes, inits, x_shape, outputs) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [nh.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _albert_like(blocks: int = 3, tied: bool = True) -> onnx.ModelProto:
    """``blocks`` residual blocks h + (relu(h W1 + b1) W2); W1, b1, W2 one set for all blocks (``tied``) or one
    per block."""
    rng = np.random.default_rng(0)
    nodes, h, inits = [], "x", {}
    for i in range(blocks):
        s = "" if tied else f"_{i}"
        if not inits or not tied:
            inits[f"w1{s}"] = rng.standard_normal((8, 32)).astype(np.float32) * 0.3
            inits[f"b1{s}"] = rng.standard_normal(32).astype(np.float32) * 0.1
            inits[f"w2{s}"] = rng.standard_normal((32, 8)).astype(np.float32) * 0.3
        nodes += [helper.make_node("MatMul", [h, f"w1{s}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b1{s}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w2{s}"], [f"f{i}"]),
                  helper.make_node("Add", [h, f"f{i}"], [f"h{i}"])]
        h = f"h{i}"
    inits["w3"] = rng.standard_normal((8, 3)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [h, "w3"], ["y"]))
    return _model(nodes, inits, [1, 4, 8], ["y"])


def _tied_convs(extra_reader: bool = False) -> onnx.ModelProto:
    """Three 3x3 Convs reading one kernel ``wc`` (each with its own bias), ReLU between; ``extra_reader``: the
    kernel is also read by a Transpose (a second output), which is no layer."""
    rng = np.random.default_rng(2)
    inits = {"wc": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.25}
    nodes, h = [], "x"
    for i in range(3):
        inits[f"bc{i}"] = rng.standard_normal(4).astype(np.float32) * 0.1
        nodes += [helper.make_node("Conv", [h, "wc", f"bc{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        h = f"r{i}"
    outputs = [h]
    if extra_reader:
        nodes.append(helper.make_node("Transpose", ["wc"], ["wt"], perm=[1, 0, 2, 3]))
        outputs.append("wt")
    return _model(nodes, inits, [1, 4, 6, 6], outputs)


def _feeds(shape, n=64, seed=3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _params(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer)


def _readers(m: onnx.ModelProto, name: str) -> list[str]:
    return [n.name or n.output[0] for n in m.graph.node if name in n.input]


def _error(teacher: onnx.ModelProto, student: onnx.ModelProto, names: list[str], x: np.ndarray) -> float:
    """Summed squared error of ``names`` (tensors both models have) against the teacher, relative to its energy."""
    def exposed(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        del m2.graph.output[:]
        m2.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
        return m2
    t_m, s_m = exposed(teacher), exposed(student)
    err = ref = 0.0
    for f in x:
        for a, b in zip(ort_run(t_m, {"x": f}), ort_run(s_m, {"x": f}), strict=True):
            err += float(np.sum((a - b) ** 2))
            ref += float(np.sum(a ** 2))
    return err / ref


def _without_and_with_distill(model, passes, x):
    """(the model after ``passes``, the result of ``passes`` then ``distill``), both on the calibration ``x``."""
    before = api.compress(model, passes, calibration={"x": x}, validate=False).model
    return before, api.compress(model, [*passes, Distill()], calibration={"x": x}, validate=False)


def _distill_stats(res):
    return next(r.pass_stats for r in res.ledger if r.stage.startswith("distill"))


def test_pruned_tied_weights_stay_tied_and_the_error_falls():
    model, x = _albert_like(), _feeds((1, 4, 8))
    prune = [PruneChannels(ratio=0.5, round_to=1)]
    pruned, res = _without_and_with_distill(model, prune, x)
    out = res.model
    names = [t.name for t in out.graph.initializer]
    assert sorted(names) == ["b1", "w1", "w2", "w3"], names  # no '<name>_distilled_<n>' copies
    assert len(_readers(out, "w1")) == len(_readers(out, "w2")) == len(_readers(out, "b1")) == 3
    assert _params(out) == _params(pruned) < _params(model)
    assert _distill_stats(res)["tied_weights_refit"] >= 2
    sums = ["h0", "h1", "h2", "y"]
    before, after = _error(model, pruned, sums, x), _error(model, out, sums, x)
    assert after < 0.7 * before, (before, after)


def test_perturbed_tied_conv_kernel_is_refit_once_and_its_readers_error_falls():
    model, x = _tied_convs(), _feeds((1, 4, 6, 6))
    noisy, res = _without_and_with_distill(model, [_TiedNoise()], x)
    out = res.model
    assert [t.name for t in out.graph.initializer if t.name.startswith("wc")] == ["wc"]
    assert len(_readers(out, "wc")) == 3
    assert _params(out) == _params(model)
    stats = _distill_stats(res)
    assert stats["tied_weights_refit"] == 1 and stats["layers_refit"] == 3
    readers = ["c0", "c1", "c2"]
    before, after = _error(model, noisy, readers, x), _error(model, out, readers, x)
    assert after < 0.5 * before, (before, after)


def test_a_quantized_tied_kernel_stays_one_dequantize_and_its_readers_error_falls():
    model, x = _tied_convs(), _feeds((1, 4, 6, 6))
    q8, res = _without_and_with_distill(model, [_TiedInt8()], x)
    out = res.model
    assert [t.name for t in out.graph.initializer if t.name.startswith("wc")] == ["wc_q", "wc_s", "wc_z"]
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 1
    assert len(_readers(out, "wc_dq")) == 3
    assert _distill_stats(res)["tied_weights_refit"] == 1
    q_before = next(nh.to_array(t) for t in q8.graph.initializer if t.name == "wc_q")
    q_after = next(nh.to_array(t) for t in out.graph.initializer if t.name == "wc_q")
    assert q_after.dtype == np.int8 and not np.array_equal(q_after, q_before)  # refit on its integer grid
    readers = ["c0", "c1", "c2"]
    before, after = _error(model, q8, readers, x), _error(model, out, readers, x)
    assert after < 0.95 * before, (before, after)  # the integer grid bounds what a refit can do


def test_a_kernel_also_read_by_a_non_layer_keeps_its_values():
    """Refitting it for its Conv readers would change the Transpose's output (or, copied, untie it): kept."""
    model, x = _tied_convs(extra_reader=True), _feeds((1, 4, 6, 6), n=16)
    noisy, res = _without_and_with_distill(model, [_TiedNoise()], x)
    kernel = {t.name: nh.to_array(t) for t in res.model.graph.initializer if t.name.startswith("wc")}
    assert list(kernel) == ["wc"]
    np.testing.assert_array_equal(kernel["wc"], next(nh.to_array(t) for t in noisy.graph.initializer
                                                     if t.name == "wc"))
    assert any("tied weight also read by Transpose" in k for k in _distill_stats(res)["skipped"])


def test_untied_control_refits_every_layer_on_its_own():
    model, x = _albert_like(tied=False), _feeds((1, 4, 8))
    res = api.compress(model, [PruneChannels(ratio=0.5, round_to=1), Distill()], calibration={"x": x},
                       validate=False)
    stats = _distill_stats(res)
    assert "tied_weights_refit" not in stats and not any("tied" in k for k in stats["skipped"])
    assert stats["layers_refit"] >= 3  # each on its own (the held-out feeds keep some)
    assert not any("_distilled_" in t.name for t in res.model.graph.initializer)


def test_joint_normal_equations_are_the_stacked_least_squares():
    """sum_r P_r^T [X_r 1]^T [X_r 1] P_r solved = lstsq of the stacked rows, with one bias column per distinct
    bias (readers 0 and 2 share theirs, reader 1 has none)."""
    rng = np.random.default_rng(5)
    k, n, keys = 5, 3, [0, None, 0]
    xs = [rng.standard_normal((40, k)) for _ in keys]
    ys = [rng.standard_normal((40, n)) for _ in keys]
    stats = []
    for x, y, j in zip(xs, ys, keys, strict=True):
        s = Normal()
        s.update(x if j is None else np.concatenate([x, np.ones((40, 1))], axis=1), y)
        stats.append(s)
    joint = _joint(stats, keys, k, 1)
    design = np.concatenate([np.concatenate([x, np.full((40, 1), float(j is not None))], axis=1)
                             for x, j in zip(xs, keys, strict=True)])
    expect = np.linalg.lstsq(design, np.concatenate(ys), rcond=None)[0]
    np.testing.assert_allclose(solve(joint, 0.0, 1), expect, rtol=1e-8, atol=1e-10)
    assert joint.rows == 120


def test_training_keeps_a_tied_weight_one_parameter():
    pytest.importorskip("torch")
    model, x = _albert_like(), _feeds((1, 4, 8), n=16)
    res = api.compress(model, [PruneChannels(ratio=0.5, round_to=1),
                               Distill(mode="train", steps=20, max_minutes=1.0)],
                       calibration={"x": x}, validate=False)
    assert sorted(t.name for t in res.model.graph.initializer) == ["b1", "w1", "w2", "w3"]
