"""Activation equalization into depthwise Convs: per-channel activation ranges where ORT allows only per-tensor ones.

QLinearConv reads its input with one scale. When that input's channels span very different ranges (a stem Conv's
output: one channel ±9, another ±0.2), the per-tensor step is set by the widest channel and the narrow ones keep a
few levels — measured on PP-OCRv4 rec (``quantize{explain}``): the stem Conv's output alone costs its outputs 3 dB.

For ``P -> f -> D`` with ``P`` a Conv with a constant weight, ``f`` positively homogeneous or absent (Relu,
LeakyRelu, Identity: ``f(k x) = k f(x)`` for ``k > 0``), ``D`` a depthwise Conv reading ``t = f(P(x))`` and nothing
else reading ``P``'s output or ``t``, per channel ``c``::

    W_P[c] *= k_c;   b_P[c] *= k_c;   W_D[c] /= k_c          (exact in float: D(t) is unchanged)

with ``k_c = R / (H · r_c)`` (``r_c = max(|lo_c|, |hi_c|)`` of ``t``'s channel on the calibration feeds, ``R =
max_c r_c``, ``H = HEADROOM``; ``k_c`` within ``[1, K_LIMIT]``; 1 for a channel that never left 0): every channel
of ``t`` then spans at least ``1/H`` of the widest one's range. The headroom is measured, not a nicety: on
PP-OCRv4 rec's stem, unseen easy lines exceeded the calibration maximum of single channels by up to 1.2x; without
headroom (``H = 1``) those values were clipped and the easy lines' agreement fell from 0.969 to 0.891. For the
same reason a rewritten ``t`` is quantized over its whole calibrated range (``StaticRun.full_range``), whatever
range rule the other tensors use: a rule that clips the tensor's tail would clip the amplified channels first. Both weights are quantized per output channel, so their integer values do not change
(``P``'s rows and ``D``'s channels are scaled as a whole); only ``t``'s rounding does.

Applied where it pays, from the same statistics: ``t``'s rounding noise reaches ``D``'s output as
``Δ²/12 · Σ_c ‖W_D[c]‖²`` (``Δ``: the step of the per-tensor range, including 0); the pair is rewritten when the
rewrite lowers this by at least ``MIN_GAIN_DB``. Values of a narrow channel beyond its calibration range are
clipped at ``R / k_c`` afterwards (before: at the tensor's range), so the calibration feeds must cover the inputs.
New constants are named ``<name>_dweq``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.naming import unique_name

from .ort_int8_kernels import const_value, is_depthwise
from .stream_equalization import channel_moments

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun

log = logging.getLogger(__name__)

#: f between P and D: f(k x) = k f(x) for k > 0
HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu", "Identity"})
#: a channel is amplified at most this much
K_LIMIT = 256.0
#: an amplified channel spans at most 1/HEADROOM of the tensor's range (values beyond its calibration range fit)
HEADROOM = 1.5
#: the rewrite must lower the depthwise Conv's output noise from t's rounding by this much
MIN_GAIN_DB = 3.0


def pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node | None, gs.Node]]:
    """(P, f or None, D) triples of the module docstring, in graph order."""
    outputs = {id(t) for t in graph.outputs}
    found = []
    for d in graph.nodes:
        if d.op != "Conv" or len(d.inputs) < 2 or not is_depthwise(d):
            continue
        w_d = const_value(d.inputs[1])
        t = d.inputs[0]
        if w_d is None or w_d.dtype != np.float32 or id(t) in outputs or len(t.outputs) != 1 or not t.inputs:
            continue
        f, y = None, t
        if t.inputs[0].op in HOMOGENEOUS_OPS:
            f = t.inputs[0]
            y = f.inputs[0]
            if id(y) in outputs or len(y.outputs) != 1 or not y.inputs:
                continue
        p = y.inputs[0]
        if p.op != "Conv" or len(p.inputs) < 2 or len(p.outputs) != 1:
            continue
        w_p = const_value(p.inputs[1])
        b_p = const_value(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2].name else None
        if w_p is None or w_p.dtype != np.float32 or w_p.shape[0] != w_d.shape[0]:
            continue
        if len(p.inputs) > 2 and p.inputs[2].name and b_p is None:
            continue
        found.append((p, f, d))
    return found


def factors(lo: np.ndarray, hi: np.ndarray, w_d: np.ndarray) -> tuple[np.ndarray, float]:
    """``k`` per channel and the module docstring's noise gain (dB) for channel ranges ``[lo, hi]`` of ``t``."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    r = np.maximum(-lo, hi)
    big = float(r.max()) if r.size else 0.0
    k = np.ones_like(r)
    live = r > 0
    if big <= 0:
        return k, 0.0
    k[live] = np.clip(big / (HEADROOM * r[live]), 1.0, K_LIMIT)
    energy = np.sum(w_d.reshape(w_d.shape[0], -1).astype(np.float64) ** 2, axis=1)
    before = (hi.max() - lo.min()) ** 2 * energy.sum()
    after = ((k * hi).max() - (k * lo).min()) ** 2 * np.sum(energy / k**2)
    if before <= 0 or after <= 0:
        return k, 0.0
    return k, float(10 * np.log10(before / after))


def channel_ranges(run: QuantizeRun, graph: gs.Graph, tensors: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (axis 1) min and max of ``tensors`` over the calibration feeds (``channel_moments``: one pass,
    shared collector)."""
    return {n: (lo, hi) for n, (lo, hi, _) in channel_moments(run, graph, tensors).items()}


def equalize_depthwise(run: QuantizeRun, graph: gs.Graph, names: set[str]) -> dict:
    """Rewrite the pairs that pay (module docstring); returns the stats record."""
    found = pairs(graph)
    if not found:
        return {"pairs": 0}
    ranges = channel_ranges(run, graph, [d.inputs[0].name for _, _, d in found])
    done: dict[str, float] = {}
    skipped: dict[str, float] = {}
    for p, _, d in found:
        t = d.inputs[0].name
        if t not in ranges:
            continue
        w_d = const_value(d.inputs[1])
        lo, hi = ranges[t]
        if lo.shape != (w_d.shape[0],):
            continue
        k, gain = factors(lo, hi, w_d)
        if gain < MIN_GAIN_DB:
            skipped[d.name] = round(gain, 2)
            continue
        w_p = const_value(p.inputs[1])
        shape = (-1,) + (1,) * (w_p.ndim - 1)
        p.inputs[1] = gs.Constant(unique_name(f"{p.inputs[1].name}_dweq", names),
                                  (w_p * k.reshape(shape)).astype(np.float32))
        if len(p.inputs) > 2 and p.inputs[2].name:
            p.inputs[2] = gs.Constant(unique_name(f"{p.inputs[2].name}_dweq", names),
                                      (const_value(p.inputs[2]) * k).astype(np.float32))
        d.inputs[1] = gs.Constant(unique_name(f"{d.inputs[1].name}_dweq", names),
                                  (w_d / k.reshape((-1,) + (1,) * (w_d.ndim - 1))).astype(np.float32))
        done[d.name] = round(gain, 2)
        run.full_range.add(t)
    log.info("depthwise equalization: %d of %d pairs rewritten %s", len(done), len(found), done)
    return {"pairs": len(found), "rewritten": done, "skipped_gain_db": skipped}
