"""Does this machine's onnxruntime saturate uint8 x int8 products? Probed once per process.

Dynamic int8 multiplies a uint8 activation code a (0..255) by an int8 weight code b (-128..127). On x86 CPUs with
AVX2 but no VNNI, onnxruntime's kernel multiplies byte pairs with ``vpmaddubsw``, which adds two products
a_k b_k + a_{k+1} b_{k+1} in a signed 16-bit lane and clamps it to [-32768, 32767]: two products of 255 · 127 =
32,385 each overflow it. The sum then loses up to half its value wherever an activation sits near the top of its
range and two neighbouring weights are large with the same sign. Measured on an AVX2-only AMD EPYC with
onnxruntime 1.32: MiniLM-L6 dynamic int8 held out 22.6 dB against the float model, 25.9 dB with the same weights
stored unsigned (below).

An unsigned weight code u = b + 128 (0..255) with zero point 128 dequantizes to exactly the same value,
(u - 128) · s = b · s, and takes the uint8 x uint8 kernel, which widens to 16 bits before multiplying and cannot
saturate. So where the probe finds saturation the weights are stored unsigned: the same model in exact arithmetic,
the arithmetic onnxruntime actually does made exact (the same speed here: MiniLM-L6 0.96-1.00x of the int8-code
model's latency). Where it does not saturate (VNNI: 32-bit accumulation) int8 codes are kept, the kernel ORT favours.

Static QDQ layers take the same kernels once ORT fuses ``DQ(x_q) -> MatMul/Conv <- DQ(W_q)``: a toy with one weight
entry 10x the others (``tests/test_quantize_smoothing``) held 23.3 dB fused against 32.2 dB in float simulation,
32.2 dB fused with its codes unsigned. Whether a static model's codes are stored unsigned is measured on it
(``static_choice``): its all-int8 build run by ORT's fused kernels with int8 and with uint8 codes, each against the
same model's QDQ maths (ORT with graph optimizations off) on a few calibration feeds; uint8 only where it is closer
by ``STATIC_MARGIN_DB`` (MiniLM-L6 15.9 -> 24.0 dB, PP-OCRv4 rec 14.6 -> 34.3 dB: both clamp). The choice then holds
for every build the pass measures (``unsign_weight_dequantizers``).

The probe is the chain the pass emits, DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, on an input whose
codes are all 255 and weights all 127 in one column: exactly 64 in real arithmetic, about half of it when pairs
clamp; run with ORT's default graph optimizations so the fused ``DynamicQuantizeMatMul`` kernel is what is probed.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

log = logging.getLogger(__name__)

#: reduction length of the probe: 32 byte pairs
PROBE_K = 64


def probe_model() -> onnx.ModelProto:
    """x [1, K] float -> dynamic int8 MatMul with W = 127 / 127 (column 0) and -127 / 127 (column 1) -> y [1, 2]."""
    k = PROBE_K
    b = np.zeros((k, 2), np.int8)
    b[:, 0] = 127
    b[:, 1] = -127
    inits = [nh.from_array(b, "b"), nh.from_array(np.zeros(2, np.int8), "bz"),
             nh.from_array(np.full(2, 1.0 / 127.0, np.float32), "bs")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "b", "xz", "bz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "bs"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "u8s8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@functools.lru_cache(maxsize=1)
def saturates() -> bool:
    """True when onnxruntime's dynamic int8 MatMul on this machine clamps pairs of uint8 x int8 products."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe_model().SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, PROBE_K), np.float32)})[0].ravel()
    exact = float(PROBE_K)  # codes 255 at scale 1/255, weights 127 at scale 1/127
    clamped = bool(abs(y[0] - exact) > 1e-3 * exact or abs(y[1] + exact) > 1e-3 * exact)
    log.debug("u8s8 probe: %s (exact +-%g)", y, exact)
    return clamped


def unsigned_weights(weight_type: str, stats: dict) -> bool:
    """Whether weight codes are stored uint8 for ``weight_type`` (auto: the probe); the choice goes in ``stats``."""
    if weight_type == "auto":
        unsigned = saturates()
        stats["weight_type"] = ("uint8: this machine's onnxruntime saturates uint8 x int8 products (probed)"
                                if unsigned else "int8")
        return unsigned
    stats["weight_type"] = weight_type
    return weight_type == "uint8"


def unsign_weight_dequantizers(graph) -> int:
    """Every ``DequantizeLinear`` of an int8 constant in ``graph`` and its subgraphs reads it as uint8 (+128, zero
    point +128; a missing zero point becomes 128): the same dequantized values. Returns how many constants moved;
    a constant read by several dequantizers moves once."""
    import onnx_graphsurgeon as gs

    done: dict[int, gs.Constant] = {}  # int8 codes -> their uint8 copy
    zeros: dict[object, gs.Constant] = {}  # zero point (or, absent, the scale it goes with) -> its uint8 copy
    count = 0

    def walk(g: gs.Graph) -> None:
        nonlocal count
        for n in g.nodes:
            for attr in n.attrs.values():
                if isinstance(attr, gs.Graph):
                    walk(attr)
            if n.op != "DequantizeLinear" or not isinstance(n.inputs[0], gs.Constant):
                continue
            x = n.inputs[0]
            z_in = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None
            if z_in is not None and not isinstance(z_in, gs.Constant):
                continue  # a computed zero point: left as it is
            if id(x) not in done:
                if np.asarray(x.values).dtype != np.int8:
                    continue
                done[id(x)] = gs.Constant(x.name, unsigned_codes(np.asarray(x.values), np.zeros((), np.int8))[0])
                count += 1
            n.inputs[0] = done[id(x)]
            key = id(z_in) if z_in is not None else ("none", n.inputs[1].name)
            if key not in zeros:
                zp = np.asarray(z_in.values) if z_in is not None else np.zeros(np.shape(n.inputs[1].values), np.int8)
                zeros[key] = gs.Constant(z_in.name if z_in is not None else f"{x.name}_zero_point_u8",
                                         unsigned_codes(np.zeros((), np.int8), zp)[1])
            if len(n.inputs) > 2:
                n.inputs[2] = zeros[key]
            else:
                n.inputs.append(zeros[key])

    walk(graph)
    return count


#: uint8 codes are kept for a static model only when its fused kernels come this much closer to its QDQ maths
STATIC_MARGIN_DB = 1.0
#: calibration feeds the static choice runs on
STATIC_FEEDS = 4


def static_choice(graph, export, feeds: list) -> tuple[bool, dict]:
    """(store uint8 codes?, the measurement): the QDQ ``graph`` (int8 weight codes; rewritten in place to uint8
    codes) exported by ``export`` both ways, run fused, each scored against its QDQ maths (ORT without graph
    optimizations) on ``feeds``."""
    from onnxcompress.runtime import Session

    model_int8 = export(graph)
    unsign_weight_dequantizers(graph)
    model_uint8 = export(graph)
    feeds = list(feeds)[:STATIC_FEEDS]

    def outputs(model: onnx.ModelProto, optimize: bool) -> np.ndarray:
        with Session(model, threads=1, optimize=optimize, what="weight-type probe") as s:
            return np.concatenate([np.concatenate([np.asarray(o, np.float64).ravel() for o in s.run(f)])
                                   for f in feeds])

    maths = outputs(model_int8, optimize=False)

    def db(fused: np.ndarray) -> float:
        err = float(np.sum((fused - maths) ** 2))
        return float("inf") if err == 0 else float(10 * np.log10(max(float(np.sum(maths ** 2)), 1e-30) / err))

    scores = {"int8": round(db(outputs(model_int8, True)), 2), "uint8": round(db(outputs(model_uint8, True)), 2)}
    return scores["uint8"] > scores["int8"] + STATIC_MARGIN_DB, scores


def unsigned_codes(q: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and zero points as uint8 (+128): the same dequantized values, (u - (z + 128)) == (q - z)."""
    return (np.asarray(np.asarray(q, np.int16) + 128).astype(np.uint8),
            np.asarray(np.asarray(zero_point, np.int16) + 128).astype(np.uint8))


__all__ = ["PROBE_K", "STATIC_MARGIN_DB", "static_choice", "probe_model", "saturates", "unsign_weight_dequantizers", "unsigned_codes", "unsigned_weights"]
