"""Per-layer speed of onnxruntime's integer Conv kernel against its float Conv, each measured in isolation.

Why: on small CNNs the all-int8 model can be slower than the float one, and not uniformly. Measured with ORT's
profiler (1 thread, optimized graphs): on MTCNN PNet the first Conv (3 -> 10 channels, 3x3, full resolution) runs
as QLinearConv in 1295 µs vs 376 µs as a float NCHWc Conv, while the 16 -> 32 Conv runs in 326 µs vs 876 µs; on
PP-OCR's direction classifier every depthwise Conv is 2.3-4.6x slower in int8 and the squeeze-excitation 1x1 Convs
(1x1 spatial) 1.3-1.9x, while the wider pointwise Convs are 0.5-0.85x.

How: for each Conv, two one-node models with the layer's real weights and input shape:

* float: ``Conv(x, W, b)``;
* int8: ``uint8 x_q -> DQ -> Conv(DQ(W_q), DQ(b_q)) -> Q -> uint8``, which ORT fuses into one QLinearConv
  (per-channel int8 weights, int32 bias with ``s_b = s_x · s_w``; scale values do not change the kernel's speed);

timed interleaved on one thread (``onnxcompress.latency.measure_latency``, medians). The ratio ``t_int8 / t_float``
ranks the layers; the latency guard keeps float the layers above ``keep_int8_below`` and measures the whole model
again. (Isolated float Convs pay the NCHWc layout reorders that a chain of float Convs shares, so the ratio slightly
favours int8; the whole-model measurement afterwards is what decides.)

Every ratio goes through the run's ``LatencyProfile`` under ``conv_speed_key``: the weight shape, the Conv's
attributes, the input shape and the thread count (what the kernel's speed depends on; weight values do not), so
equal layers are measured once and a replayed profile gives the same ratios. A Conv ORT rejects in isolation is
recorded as ``None`` (no verdict).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.latency_profile import LatencyProfile, fingerprint

from . import qparams_math as qm

log = logging.getLogger(__name__)

#: time budget per layer pair (seconds)
LAYER_BUDGET_S = 0.15
_S_X, _S_Y = 0.02, 0.05  # any positive scales: the kernel's speed does not depend on them


def _attrs(node: gs.Node) -> dict:
    return {k: v for k, v in node.attrs.items() if v is not None}


def conv_pair(node: gs.Node, x_shape: tuple[int, ...], opset: int = 13) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(float, int8 QDQ) one-node models of Conv ``node`` for an input of ``x_shape``."""
    w = np.asarray(node.inputs[1].values, np.float32)
    b = (
        np.asarray(node.inputs[2].values, np.float32)
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)
        else np.zeros(w.shape[0], np.float32)
    )
    attrs = _attrs(node)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    f_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], **attrs)],
        "float_layer",
        [x],
        [y],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    qw = qm.quantize_weight(w, qm.INT8, 0, symmetric=True)
    s_w = np.asarray(qw.scale, np.float32).reshape(-1)
    s_b = (s_w * np.float32(_S_X)).astype(np.float32)
    bq = np.clip(np.rint(b / s_b), -qm.INT32_MAX, qm.INT32_MAX).astype(np.int32)
    xq = helper.make_tensor_value_info("xq", TensorProto.UINT8, list(x_shape))
    yq = helper.make_tensor_value_info("yq", TensorProto.UINT8, None)
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], axis=0),
        helper.make_node("DequantizeLinear", ["Bq", "sb", "zb"], ["Bd"], axis=0),
        helper.make_node("Conv", ["xd", "Wd", "Bd"], ["yf"], **attrs),
        helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["yq"]),
    ]
    inits = [
        numpy_helper.from_array(np.float32(_S_X), "sx"),
        numpy_helper.from_array(np.uint8(128), "zx"),
        numpy_helper.from_array(np.asarray(qw.q, np.int8), "Wq"),
        numpy_helper.from_array(s_w, "sw"),
        numpy_helper.from_array(np.zeros(s_w.shape, np.int8), "zw"),
        numpy_helper.from_array(bq, "Bq"),
        numpy_helper.from_array(s_b, "sb"),
        numpy_helper.from_array(np.zeros(s_b.shape, np.int32), "zb"),
        numpy_helper.from_array(np.float32(_S_Y), "sy"),
        numpy_helper.from_array(np.uint8(128), "zy"),
    ]
    q_graph = helper.make_graph(nodes, "int8_layer", [xq], [yq], inits)
    ops = [helper.make_opsetid("", max(opset, 13))]
    return helper.make_model(f_graph, opset_imports=ops), helper.make_model(q_graph, opset_imports=ops)


#: measurements are single-threaded (the key records it)
LAYER_THREADS = 1


def conv_speed_key(node: gs.Node, x_shape: tuple[int, ...], threads: int = LAYER_THREADS) -> str:
    """The latency-profile key of Conv ``node``'s int8/float ratio for an input of ``x_shape``."""
    w_shape = tuple(int(d) for d in np.shape(node.inputs[1].values))
    attrs = sorted((k, str(v)) for k, v in _attrs(node).items())
    digest = fingerprint(str(w_shape), str(attrs), str(tuple(int(d) for d in x_shape)), f"threads={threads}")
    return f"quantize/conv-int8-ratio/{digest}"


def _measure_pair(node: gs.Node, shape: tuple[int, ...], budget_s: float, seed: int) -> dict | None:
    """Median latencies {"float", "int8"} of the layer pair, or None when ORT does not run it in isolation."""
    from onnxcompress.latency import measure_latency

    rng = np.random.default_rng(seed)
    try:
        f, q = conv_pair(node, shape)
        feed = {"x": rng.standard_normal(shape).astype(np.float32),
                "xq": rng.integers(0, 256, size=shape, dtype=np.uint8)}
        return measure_latency({"float": f, "int8": q}, feed, threads=LAYER_THREADS, min_rounds=5, budget_s=budget_s)
    except Exception as exc:  # an unusual Conv (attrs ORT rejects in isolation): no verdict for it
        log.debug("layer speed of %s not measured: %s", node.name, exc)
        return None


def _measure_ratio(node: gs.Node, shape: tuple[int, ...], budget_s: float, seed: int) -> float | None:
    """``t_int8 / t_float`` of the layer pair, or None when ORT does not run it (or the float time is 0)."""
    lat = _measure_pair(node, shape, budget_s, seed)
    return float(lat["int8"] / lat["float"]) if lat and lat["float"] > 0 else None


def _measure_saving(node: gs.Node, shape: tuple[int, ...], budget_s: float, seed: int) -> float | None:
    """``t_float − t_int8`` (ms, medians) of the layer pair, or None when ORT does not run it."""
    lat = _measure_pair(node, shape, budget_s, seed)
    return float(lat["float"] - lat["int8"]) if lat else None


def _per_conv(nodes: list[gs.Node], shapes: dict[str, tuple[int, ...]], profile: LatencyProfile | None,
              key: Any, measure: Any) -> dict[str, float]:
    """``measure(node, shape)`` per Conv node with a constant weight whose input shape is in ``shapes``, through
    ``profile`` (a fresh one when None) under ``key(node, shape)``; Convs ORT cannot run alone are left out."""
    profile = profile if profile is not None else LatencyProfile()
    out: dict[str, float] = {}
    for n in nodes:
        shape = shapes.get(n.inputs[0].name)
        if n.op != "Conv" or shape is None or not isinstance(n.inputs[1], gs.Constant):
            continue
        shape = tuple(int(d) for d in shape)
        value = profile.measure(key(n, shape), lambda n=n, shape=shape: measure(n, shape))
        if value is not None:
            out[n.name] = float(value)
    return out


def int8_speed_ratios(
    nodes: list[gs.Node],
    shapes: dict[str, tuple[int, ...]],
    budget_s: float = LAYER_BUDGET_S,
    seed: int = 0,
    profile: LatencyProfile | None = None,
) -> dict[str, float]:
    """``t_int8 / t_float`` per Conv node (by name) whose input shape is in ``shapes`` (keyed by input name), each
    measured through ``profile`` (a fresh one when None) under ``conv_speed_key``."""
    return _per_conv(nodes, shapes, profile, conv_speed_key,
                     lambda n, shape: _measure_ratio(n, shape, budget_s, seed))


def conv_saving_key(node: gs.Node, x_shape: tuple[int, ...], threads: int = LAYER_THREADS) -> str:
    """The latency-profile key of Conv ``node``'s ``t_float − t_int8`` (ms) for an input of ``x_shape``."""
    return conv_speed_key(node, x_shape, threads).replace("conv-int8-ratio", "conv-int8-saving-ms")


def int8_savings_ms(
    nodes: list[gs.Node],
    shapes: dict[str, tuple[int, ...]],
    budget_s: float = LAYER_BUDGET_S,
    seed: int = 0,
    profile: LatencyProfile | None = None,
) -> dict[str, float]:
    """``t_float − t_int8`` in ms per Conv node (by name) whose input shape is in ``shapes``: what keeping the layer
    float costs in isolation (negative where the integer kernel is the slower one), through ``profile`` under
    ``conv_saving_key``."""
    return _per_conv(nodes, shapes, profile, conv_saving_key,
                     lambda n, shape: _measure_saving(n, shape, budget_s, seed))


__all__ = ["conv_pair", "conv_saving_key", "conv_speed_key", "int8_savings_ms", "int8_speed_ratios"]
