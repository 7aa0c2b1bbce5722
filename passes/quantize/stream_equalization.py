"""Activation equalization of linear streams (``quantize{stream_equalization}``): per-channel activation ranges
for the tensors between Convs where ORT reads only per-tensor ones, folded exactly into the Convs around them.

A **stream** is a set of tensors with C channels that Convs write and Convs read with nothing non-linear between
them: a Conv's output read only by group-1 Convs and by Adds whose other input and output are in the stream too —
an inverted-residual network's linear bottlenecks and their residual sums (EfficientNet/MobileNetV2: the project
Conv of each block writes it, the residual Adds sum it, the next blocks' expand Convs read it). Per channel ``c``::

    producers (Conv writing a stream tensor):   W_P[c] *= k_c;   b_P[c] *= k_c
    consumers (group-1 Conv reading one):      W_C[:, c] /= k_c

is the same function in float (an Add of two scaled tensors is the scaled sum). Every tensor of the stream is then
``k_c``-times its old channel ``c``; a per-tensor int8 step set by the widest channel now also serves the narrow
ones. The producers are quantized per output channel, so their integers do not change; the consumers' columns
shrink, which coarsens their weight rounding relative to an amplified channel, so ``k`` is a trade:

    k_c = clip((R / (HEADROOM · r_c))^α, 1, K_LIMIT)        (r_c: the channel's largest |value| over the stream's
                                                             tensors on the calibration feeds, R = max_c r_c)

with α from ``ALPHAS`` chosen by the predicted noise at the consumers' outputs (uniform rounding noise, Δ²/12):
the activation term ``Σ_t Δ_t(k)²/12 · Σ_c e_c / k_c²`` (``Δ_t``: the step of tensor t's per-tensor range after
scaling, ``e_c``: the consumers' column energy ``Σ ‖W_C[:, c, ...]‖²``) plus the weight term
``Σ_C Σ_o s_o(k)²/12 · Σ_c k_c² · m_c · |kernel|`` (``s_o``: consumer row o's int8 step after scaling, ``m_c``: the
channel's mean square on the calibration feeds). A stream is rewritten when that total drops by at least
``MIN_GAIN_DB`` (α = 0 is the unchanged stream). Like ``depthwise_equalization``, a rewritten tensor is quantized
over its whole calibrated range (``StaticRun.full_range``) and the headroom keeps the amplified channels' unseen
values inside it.

New constants are named ``<name>_steq``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.calibration import collect_statistics
from onnxcompress.naming import unique_name

from .ort_int8_kernels import const_value

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
K_LIMIT = 64.0
HEADROOM = 1.5
MIN_GAIN_DB = 1.0


class Stream:
    """Tensors (by name), the Convs writing them and the group-1 Convs reading them."""

    def __init__(self) -> None:
        self.tensors: dict[str, gs.Variable] = {}
        self.producers: list[gs.Node] = []
        self.consumers: list[gs.Node] = []


def _float_weight(n: gs.Node) -> np.ndarray | None:
    w = const_value(n.inputs[1]) if n.op == "Conv" and len(n.inputs) > 1 else None
    return w if w is not None and w.dtype == np.float32 and w.ndim >= 3 else None


def _bias_ok(n: gs.Node) -> bool:
    return not (len(n.inputs) > 2 and n.inputs[2].name and const_value(n.inputs[2]) is None)


def grow(start: gs.Variable, outputs: set[int]) -> Stream | None:
    """The stream containing ``start`` (module docstring), or None when a tensor of it has a reader or writer that
    cannot be scaled per channel."""
    s = Stream()
    todo = [start]
    channels = None
    while todo:
        t = todo.pop()
        if t.name in s.tensors:
            continue
        if id(t) in outputs or len(t.inputs) != 1:
            return None
        s.tensors[t.name] = t
        p = t.inputs[0]
        if p.op == "Conv":
            w = _float_weight(p)
            if w is None or not _bias_ok(p) or len(p.outputs) != 1:
                return None
            if channels is None:
                channels = w.shape[0]
            if w.shape[0] != channels:
                return None
            s.producers.append(p)
        elif p.op == "Add":
            if len(p.inputs) != 2 or any(isinstance(x, gs.Constant) for x in p.inputs):
                return None
            todo.extend(p.inputs)
        else:
            return None
        for c in t.outputs:
            if c.op == "Add":
                if len(c.inputs) != 2 or any(isinstance(x, gs.Constant) for x in c.inputs):
                    return None
                todo.extend([*c.inputs, *c.outputs])
            elif c.op == "Conv" and c.inputs[0] is t and int(c.attrs.get("group", 1)) == 1:
                w = _float_weight(c)
                if w is None:
                    return None
                if all(c is not x for x in s.consumers):
                    s.consumers.append(c)
            else:
                return None
    if channels is None or not s.consumers or any(_float_weight(c).shape[1] != channels for c in s.consumers):
        return None
    s.producers = list({id(p): p for p in s.producers}.values())
    return s


def streams(graph: gs.Graph) -> list[Stream]:
    """Every stream of the graph (module docstring), each once, in graph order of its first producer."""
    outputs = {id(t) for t in graph.outputs}
    seen: set[str] = set()
    found = []
    for n in graph.nodes:
        if n.op != "Conv" or len(n.outputs) != 1 or n.outputs[0].name in seen:
            continue
        st = grow(n.outputs[0], outputs)
        if st is None:
            continue
        seen.update(st.tensors)
        found.append(st)
    return found


def channel_moments(run: QuantizeRun, graph: gs.Graph, tensors: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """Per-channel (axis 1) min, max and mean square of ``tensors`` on the calibration feeds (one pass)."""
    acc: dict[str, list] = {}

    def on_feed(_: int, arrays: dict[str, np.ndarray]) -> None:
        for n in tensors:
            a = np.asarray(arrays[n], dtype=np.float64)
            axes = tuple(i for i in range(a.ndim) if i != 1)
            mn, mx, sq = a.min(axis=axes), a.max(axis=axes), np.mean(a * a, axis=axes)
            if n not in acc:
                acc[n] = [mn, mx, sq, 1]
            else:
                r = acc[n]
                r[0], r[1], r[2], r[3] = np.minimum(r[0], mn), np.maximum(r[1], mx), r[2] + sq, r[3] + 1

    collect_statistics(run.ctx.export(graph), tensors, run.feeds(run.p.calibration_samples), histograms=False,
                       on_feed=on_feed)
    return {n: (r[0], r[1], r[2] / r[3]) for n, r in acc.items()}


def predicted_noise(k: np.ndarray, ranges: list[tuple[np.ndarray, np.ndarray]], ms: np.ndarray,
                    consumers: list[np.ndarray]) -> float:
    """The module docstring's activation + weight noise at the consumers' outputs for factors ``k``."""
    cols = [w.reshape(w.shape[0], w.shape[1], -1) for w in consumers]  # [N, C, kernel]
    energy = sum(np.sum(c.astype(np.float64) ** 2, axis=(0, 2)) for c in cols)
    act = 0.0
    for lo, hi in ranges:
        step = ((k * hi).max() - (k * lo).min()) / 255.0
        act += step**2 / 12.0 * float(np.sum(energy / k**2))
    wt = 0.0
    for c in cols:
        scaled = np.abs(c / k[None, :, None])
        step_o = scaled.reshape(scaled.shape[0], -1).max(axis=1) / 127.0
        wt += float(np.sum(step_o**2) / 12.0 * np.sum(k**2 * ms) * c.shape[2])
    return act + wt


def choose(ranges: list[tuple[np.ndarray, np.ndarray]], ms: np.ndarray, consumers: list[np.ndarray]
           ) -> tuple[np.ndarray, float, float]:
    """(k, α, predicted gain in dB over the unchanged stream) of the best α of ``ALPHAS``."""
    r = np.zeros_like(ms)
    for lo, hi in ranges:
        r = np.maximum(r, np.maximum(-np.minimum(lo, 0.0), np.maximum(hi, 0.0)))
    big = float(r.max()) if r.size else 0.0
    ones = np.ones_like(r)
    base = predicted_noise(ones, ranges, ms, consumers)
    if big <= 0 or base <= 0:
        return ones, 0.0, 0.0
    best = (ones, 0.0, base)
    live = r > 0
    for a in ALPHAS[1:]:
        k = ones.copy()
        k[live] = np.clip((big / (HEADROOM * r[live])) ** a, 1.0, K_LIMIT)
        noise = predicted_noise(k, ranges, ms, consumers)
        if noise < best[2]:
            best = (k, a, noise)
    return best[0], best[1], float(10 * np.log10(base / best[2]))


def equalize_streams(run: QuantizeRun, graph: gs.Graph, names: set[str]) -> dict:
    """Rewrite the streams that pay (module docstring); returns the stats record."""
    found = streams(graph)
    if not found:
        return {"streams": 0}
    mom = channel_moments(run, graph, [t for s in found for t in s.tensors])
    done: dict[str, dict] = {}
    skipped: dict[str, float] = {}
    for s in found:
        label = s.producers[0].name
        if any(t not in mom for t in s.tensors):
            continue
        ranges = [(mom[t][0], mom[t][1]) for t in s.tensors]
        ms = np.mean([mom[t][2] for t in s.tensors], axis=0)
        consumers = [_float_weight(c) for c in s.consumers]
        k, alpha, gain = choose(ranges, ms, consumers)
        if gain < MIN_GAIN_DB:
            skipped[label] = round(gain, 2)
            continue
        for p in s.producers:
            w = const_value(p.inputs[1])
            p.inputs[1] = gs.Constant(unique_name(f"{p.inputs[1].name}_steq", names),
                                      (w * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32))
            if len(p.inputs) > 2 and p.inputs[2].name:
                p.inputs[2] = gs.Constant(unique_name(f"{p.inputs[2].name}_steq", names),
                                          (const_value(p.inputs[2]) * k).astype(np.float32))
        for c in s.consumers:
            w = const_value(c.inputs[1])
            c.inputs[1] = gs.Constant(unique_name(f"{c.inputs[1].name}_steq", names),
                                      (w / k.reshape((1, -1) + (1,) * (w.ndim - 2))).astype(np.float32))
        run.full_range.update(s.tensors)
        done[label] = {"tensors": len(s.tensors), "alpha": alpha, "predicted_gain_db": round(gain, 2),
                       "k_max": round(float(k.max()), 2)}
    log.info("stream equalization: %d of %d streams rewritten %s", len(done), len(found), done)
    return {"streams": len(found), "rewritten": done, "skipped_gain_db": skipped}


__all__ = ["choose", "equalize_streams", "predicted_noise", "streams"]
