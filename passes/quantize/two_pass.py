"""Two-pass dynamic layers: ~16-bit activations on onnxruntime's 8-bit integer kernels (``quantize{two_pass=[...]}``).

A dynamic layer rounds its input once: ``x̂1 = s1 (q1 - z1)`` with ``(q1, s1, z1) = DynamicQuantizeLinear(x)``, an
error of up to s1 / 2 per value. A two-pass layer quantizes that rounding error again::

    r  = x - x̂1                          |r| <= s1 / 2
    x̂2 = s2 (q2 - z2), (q2, s2, z2) = DynamicQuantizeLinear(r)     s2 ≈ s1 / 255
    y  = x̂1 W + x̂2 W = s1 s_w · MatMulInteger(q1, W_q) + s2 s_w · MatMulInteger(q2, W_q)

so the activation keeps an error of at most s2 / 2 ≈ s1 / 510 (about 16 bits over the tensor's range) while every
product still runs on the integer kernels (ORT fuses the second ``DynamicQuantizeLinear -> MatMulInteger`` into
``DynamicQuantizeMatMul``; the first becomes ``MatMulIntegerToFloat``). The weight is the layer's int8 weight
(rounded like every other dynamic layer): a two-pass layer removes the activation's rounding, not the weight's.
Cost: two integer products instead of one plus an element-wise DequantizeLinear and Sub on the input; where the
integer kernels are several times faster than float (AVX-512 VNNI: MiniLM-L3 at ``min_sqnr_db=30``, held out, one
FFN down-projection two-pass 31.7 / 31.7 dB at 0.46x against float 32.8 / 32.5 dB at 0.49x) that is cheaper than
keeping the layer float. Where they are not (AVX2 without VNNI) it is slower; ``pays`` measures it on this machine.
MiniLM-L6 at the same target needed 12 two-pass layers against 4 float (the weights' rounding stays) and was slower:
the search measures the two and keeps float there.

``pays`` times one layer shaped like the model's largest candidate (its real input shape on the first evaluation
feed) as a float MatMul and as a two-pass chain, 1 thread, interleaved (``onnxcompress.latency``), through the run's
latency profile (cached per machine, replayable like every latency decision).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.data import Feed
from onnxcompress.latency_profile import fingerprint
from onnxcompress.naming import Namer

from .latency_guard import input_shapes
from .u8s8_saturation import unsigned_codes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

#: a two-pass layer is worth offering where it measured below this fraction of its float MatMul's time
PAYS_BELOW = 0.9
#: the micro-benchmark: threads and seconds per model
THREADS = 1
BUDGET_S = 0.5


def integer_product(xq: gs.Variable, xz: gs.Tensor, xs: gs.Tensor, weight: tuple[gs.Constant, gs.Constant, gs.Constant],
                    y: gs.Variable, base: str, namer: Namer, tag: str = "") -> list[gs.Node]:
    """``y = s_x s_w · (x_q - z_x) W_q`` from codes already made (MatMulInteger -> Cast -> Mul(s_x · s_w)), the
    chain onnxruntime fuses into ``MatMulIntegerToFloat`` (``s_x`` must be a scalar there: ``row_ranges``); names
    ``{base}_{tag}...``."""
    w_q, w_zp, w_scale = weight

    def var(suffix: str, dtype) -> gs.Variable:
        return gs.Variable(namer(f"{base}_{tag}{suffix}"), dtype=dtype)

    acc, accf, scale = var("acc", np.int32), var("acc_float", np.float32), var("scale", np.float32)
    return [
        gs.Node("MatMulInteger", namer(f"{base}_{tag}MatMulInteger"), inputs=[xq, w_q, xz, w_zp], outputs=[acc]),
        gs.Node("Cast", namer(f"{base}_{tag}Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[acc], outputs=[accf]),
        gs.Node("Mul", namer(f"{base}_{tag}scale_Mul"), inputs=[xs, w_scale], outputs=[scale]),
        gs.Node("Mul", namer(f"{base}_{tag}Mul"), inputs=[accf, scale], outputs=[y]),
    ]


def product(x: gs.Variable, weight: tuple[gs.Constant, gs.Constant, gs.Constant], y: gs.Variable, base: str,
            namer: Namer, tag: str = "") -> tuple[list[gs.Node], tuple[gs.Variable, gs.Variable, gs.Variable]]:
    """One dynamic integer product ``y = s_x s_w · (x_q - z_x) W_q`` (DynamicQuantizeLinear, then
    ``integer_product``): its nodes and ``(x_q, s_x, z_x)``; names ``{base}_{tag}...``."""
    xq, xs, xz = (gs.Variable(namer(f"{base}_{tag}input_{s}"), dtype=dt) for s, dt in
                  (("quantized", np.uint8), ("scale", np.float32), ("zero_point", np.uint8)))
    quantize = gs.Node("DynamicQuantizeLinear", namer(f"{base}_{tag}DynamicQuantizeLinear"), inputs=[x],
                       outputs=[xq, xs, xz])
    return [quantize, *integer_product(xq, xz, xs, weight, y, base, namer, tag)], (xq, xs, xz)


def chain(x: gs.Variable, weight: tuple[gs.Constant, gs.Constant, gs.Constant], y: gs.Variable, base: str,
          namer: Namer) -> list[gs.Node]:
    """Nodes computing ``y = x̂1 W + x̂2 W`` (module doc) from ``weight = (W_q, zero point, s_w)``."""
    y1, y2 = (gs.Variable(namer(f"{base}_pass{k}_out"), dtype=np.float32) for k in (1, 2))
    first, (q1, s1, z1) = product(x, weight, y1, base, namer, "pass1_")
    x1, r = (gs.Variable(namer(f"{base}_{s}"), dtype=np.float32) for s in ("pass1_dequantized", "residual"))
    second, _ = product(r, weight, y2, base, namer, "pass2_")
    return [*first,  # the first pass's rounding error is the second pass's input
            gs.Node("DequantizeLinear", namer(f"{base}_pass1_DequantizeLinear"), inputs=[q1, s1, z1], outputs=[x1]),
            gs.Node("Sub", namer(f"{base}_residual_Sub"), inputs=[x, x1], outputs=[r]),
            *second,
            gs.Node("Add", namer(f"{base}_passes_Add"), inputs=[y1, y2], outputs=[y])]


def _layer_models(m: int, k: int, n: int, unsigned: bool = False, seed: int = 0
                  ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(float MatMul, two-pass chain) of one [m, k] x [k, n] layer with random weights (``unsigned``: uint8 codes,
    zero point 128, as ``u8s8_saturation`` stores them)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x_in = gs.Variable("x", dtype=np.float32, shape=(m, k))
    graphs = []
    for two in (False, True):
        y = gs.Variable("y", dtype=np.float32, shape=(m, n))
        if two:
            codes = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
            zero = np.zeros(n, np.int8)
            if unsigned:
                codes, zero = unsigned_codes(codes, zero)
            weight = (gs.Constant("w_q", codes), gs.Constant("w_zp", zero), gs.Constant("w_s", np.full(n, 0.01, np.float32)))
            nodes = chain(x_in, weight, y, "layer", Namer(gs.Graph()))
        else:
            nodes = [gs.Node("MatMul", "layer", inputs=[x_in, gs.Constant("w", w)], outputs=[y])]
        graphs.append(gs.Graph(nodes=nodes, inputs=[x_in], outputs=[y], opset=13))
    return tuple(gs.export_onnx(g) for g in graphs)  # type: ignore[return-value]


def pays(ctx: PassContext, m: int, k: int, n: int, unsigned: bool = False) -> dict:
    """{"ratio": two-pass / float time of one [m, k] x [k, n] layer on this machine (weight codes as the run stores
    them), "pays": ratio < PAYS_BELOW}."""
    key = f"quantize/two-pass-ratio/{fingerprint(str((m, k, n)), f'threads={THREADS}', f'unsigned={unsigned}')}"

    def measure() -> float:
        from onnxcompress.latency import measure_latency

        float_model, two_model = _layer_models(m, k, n, unsigned)
        feed: Feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
        lat = measure_latency({"float": float_model, "two_pass": two_model}, feed, threads=THREADS,
                              budget_s=BUDGET_S)
        return float(lat["two_pass"] / lat["float"])

    ratio = float(ctx.latency.measure(key, measure))
    return {"ratio": round(ratio, 3), "shape": [m, k, n], "pays": ratio < PAYS_BELOW}


def pays_for_largest(ctx: PassContext, float_model: onnx.ModelProto, feed: Feed,
                     layers: list[tuple[gs.Node, tuple[int, int]]], unsigned: bool = False) -> dict:
    """``pays`` for the largest of ``layers`` ((node, weight shape [K, N]), by K·N) at its input's shape on
    ``feed``."""
    if not layers:
        return {"pays": False, "reason": "no MatMul/Gemm with a constant weight"}
    n, (k, cols) = max(layers, key=lambda u: u[1][0] * u[1][1])
    shape = input_shapes(float_model, [n.inputs[0].name], feed)[n.inputs[0].name]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return {"layer": n.name, **pays(ctx, max(rows, 1), int(k), int(cols), unsigned)}


def latency_ratios(ctx: PassContext, float_model: onnx.ModelProto, cands: dict[str, onnx.ModelProto],
                   feed: Feed) -> dict[str, float]:
    """Each candidate's latency over the float model's, all timed in one interleaved call (1 thread, 3 s), so
    the candidates compare under the same load; through ``ctx.latency`` (cached per machine, replayable)."""
    names = sorted(cands)
    shapes = sorted((k, tuple(int(d) for d in np.shape(a))) for k, a in feed.items())
    key = "quantize/dynamic-candidates/" + fingerprint(
        float_model.SerializeToString(), *(cands[k].SerializeToString() for k in names), str(shapes), f"threads={THREADS}")

    def measure() -> dict[str, float]:
        from onnxcompress.latency import measure_latency

        lat = measure_latency({" float model": float_model, **cands}, feed, threads=THREADS, budget_s=3.0)
        return {k: float(lat[k] / lat[" float model"]) for k in names}

    return ctx.latency.measure(key, measure)
