"""Two-pass dynamic layers (``quantize{mode=dynamic two_pass=[...]}``, ``lift_to``): the input quantized twice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from quantize_helpers import output_sqnr, signed_codes

K, N = 64, 48


def chain_model(seed: int = 0, layers: int = 3) -> onnx.ModelProto:
    """x [1, 16, K] -> (MatMul K x K -> Gelu-free Relu) x (layers - 1) -> MatMul K x N: named MatMuls ``mm0..``."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        cols = N if i == layers - 1 else K
        w = (rng.standard_normal((K, cols)) / np.sqrt(K)).astype(np.float32)
        w[:, 0] *= 8.0  # one wide column: a per-tensor activation range would hide the rest
        inits.append(nh.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out], name=f"mm{i}"))
        cur = out
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # heavy-tailed inputs: a few large values set the range, the rest round coarsely
    return [{"x": (rng.standard_t(3, size=(1, 16, K)) * 2.0).astype(np.float32)} for _ in range(n)]


def dynamic(model, calib=None, **options):
    from onnxcompress.passes.quantize import Quantize

    from onnxcompress.context import PassContext
    from onnxcompress.data import load_feeds
    from onnxcompress.manager import PassManager

    ctx = PassContext(calibration=load_feeds(calib, model) if calib is not None else None)
    result = PassManager([Quantize(mode="dynamic", smooth="none", **options)], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def dequantized_weight(q: onnx.ModelProto) -> np.ndarray:
    """The single quantized weight of ``q`` as float: codes x per-column scale."""
    inits = {i.name: nh.to_array(i) for i in q.graph.initializer}
    codes = next(v for k, v in inits.items() if k.endswith("_quantized"))
    zp = next(v for k, v in inits.items() if k.endswith("_zero_point"))
    scale = next(v for k, v in inits.items() if k.endswith("_scale"))
    return signed_codes(codes, zp).astype(np.float64) * scale.astype(np.float64)


def test_two_pass_layer_computes_the_int8_weight_on_a_16_bit_activation():
    model = chain_model(layers=1)
    one, _ = dynamic(model)
    two, st = dynamic(model, two_pass=["mm0"])
    assert st["two_pass_layers"] == ["mm0"] and st["nodes_quantized"]["MatMul"] == 1
    w_hat = dequantized_weight(two)
    np.testing.assert_array_equal(w_hat, dequantized_weight(one))  # the same int8 weight
    ops = [n.op_type for n in two.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    errs_one, errs_two = [], []
    for f in feeds(8, 3):
        exact = f["x"].astype(np.float64) @ w_hat  # the int8 weight on the unrounded input
        errs_one.append(np.abs(ort_run(one, f)[0] - exact).max())
        errs_two.append(np.abs(ort_run(two, f)[0] - exact).max())
        scale = (f["x"].max() - min(f["x"].min(), 0)) / 255  # the first pass's step
        # the input's rounding error after the second pass: <= its step / 2 ~ scale / 510 per value
        bound = np.abs(w_hat).sum(axis=0).max() * (scale / 255) * 1.01 + 1e-4
        assert errs_two[-1] <= bound
    assert max(errs_two) < max(errs_one) / 50


def test_two_pass_names_are_checked():
    from onnxcompress.errors import PassError

    model = chain_model(layers=2)
    with pytest.raises(PassError, match="no dynamically quantized MatMul/Gemm named nope"):
        dynamic(model, two_pass=["nope"])
    with pytest.raises(ValueError, match="both excluded"):
        dynamic(model, two_pass=["mm0"], exclude=["mm0"])
    from onnxcompress.passes.quantize import Quantize

    with pytest.raises(ValueError, match="need mode=dynamic"):
        Quantize(mode="static", two_pass=["mm0"])
    with pytest.raises(ValueError, match="lift_to"):
        Quantize(mode="dynamic", lift_to="int16")


def test_cli_refuses_two_pass_outside_dynamic_mode_in_one_line(tmp_path, capsys):
    from onnxcompress.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(chain_model(layers=2), src)
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "quantize{two_pass=[mm0]}",
                 "--no-latency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mode=dynamic" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_mixed_precision_lifts_layers_to_two_pass_and_meets_the_target():
    model = chain_model(layers=3)
    calib, held_out = feeds(16, 1), feeds(16, 5)
    q0, _ = dynamic(model, calib)
    base = output_sqnr(model, q0, calib)
    all_two, _ = dynamic(model, calib, two_pass=["mm0", "mm1", "mm2"])
    ceiling = output_sqnr(model, all_two, calib)
    assert ceiling > base + 6.0  # the model's error is mostly its activations' rounding
    target = base + (ceiling - base) / 2
    q, st = dynamic(model, calib, min_sqnr_db=target, lift_to="two_pass")
    mp = st["mixed_precision"]
    assert mp["met"] and mp["float_layers"] == [] and 1 <= len(mp["two_pass_layers"]) <= 3
    assert mp["score"]["sqnr_db"] >= target and list(mp["ladders"]) == ["two_pass"]
    assert mp["two_pass_layers"][0] == max(mp["gains_db"], key=mp["gains_db"].get)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 3 + len(mp["two_pass_layers"]) and "MatMul" not in ops
    assert output_sqnr(model, q, held_out) > output_sqnr(model, q0, held_out) + 3.0
    # the report says why each lifted layer was lifted
    assert set(st["layers_lifted"]) == set(mp["two_pass_layers"])
    assert all(r.startswith("two-pass") and "met" in r for r in st["layers_lifted"].values())
    # float only: the same target met by float layers
    qf, sf = dynamic(model, calib, min_sqnr_db=target, lift_to="float")
    assert sf["mixed_precision"]["met"] and sf["mixed_precision"]["two_pass_layers"] == []
    assert [n.op_type for n in qf.graph.node].count("MatMul") == len(sf["mixed_precision"]["float_layers"]) >= 1


def test_lift_to_auto_measures_the_layer_and_keeps_the_faster_model_that_meets_the_target():
    model = chain_model(layers=3)
    calib = feeds(16, 1)
    q0, _ = dynamic(model, calib)
    base = output_sqnr(model, q0, calib)
    q, st = dynamic(model, calib, min_sqnr_db=base + 3.0, latency_cache="off")
    mp = st["mixed_precision"]
    speed = mp["two_pass_speed"]
    assert speed["layer"] in ("mm0", "mm1", "mm2") and speed["shape"][1:] in ([K, K], [K, N]) and speed["ratio"] > 0
    assert speed["pays"] == (speed["ratio"] < 0.9)
    assert list(mp["ladders"]) == (["float", "two_pass"] if speed["pays"] else ["float"])
    met = [lv for lv, r in mp["ladders"].items() if r["met"]]
    assert mp["met"] and met
    if len(met) == 2:  # both meet the target: the faster one, timed in one call, is kept
        ratios = mp["latency_ratio"]
        faster = min(ratios, key=ratios.get)
        lifted = mp["two_pass_layers"] if faster == "two_pass" else mp["float_layers"]
        assert len(lifted) == mp["ladders"][faster]["two_pass_layers" if faster == "two_pass" else "float_layers"]


def gemm_model() -> onnx.ModelProto:
    """One Gemm named ``gemm``: x [16, K], W [N, K] with transB, alpha 0.5, beta 2 on a bias C."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)  # [N, K]: transB
    c = rng.standard_normal(N).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, N])], [nh.from_array(w, "w"), nh.from_array(c, "c")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_two_pass_gemm_keeps_alpha_transb_and_the_scaled_bias():
    model = gemm_model()
    one, _ = dynamic(model)
    two, st = dynamic(model, two_pass=["gemm"])
    assert st["two_pass_layers"] == ["gemm"]
    fs = [{"x": f["x"][0]} for f in feeds(8, 2)]
    err_one = max(np.abs(ort_run(one, f)[0] - ort_run(model, f)[0]).max() for f in fs)
    err_two = max(np.abs(ort_run(two, f)[0] - ort_run(model, f)[0]).max() for f in fs)
    assert err_two < err_one / 2  # what is left is the int8 weight's error
    assert output_sqnr(model, two, fs) > output_sqnr(model, one, fs) + 3.0


def test_a_float16_weight_is_named_in_the_skip_reason():
    model = chain_model(layers=1)
    w = model.graph.initializer[0]
    model.graph.initializer[0].CopyFrom(nh.from_array(nh.to_array(w).astype(np.float16), w.name))
    cast = helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16)
    model.graph.node[0].input[0] = "x16"
    model.graph.node.insert(0, cast)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    _, st = dynamic(model)
    assert "float16" in st["layers_kept_float"]["mm0"] and "float32" in st["layers_kept_float"]["mm0"]
