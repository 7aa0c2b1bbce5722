"""Shared by the quantize technique tests: quantize a small model on given calibration feeds, score its outputs."""

from __future__ import annotations

import numpy as np
from conftest import ort_run
from onnx import numpy_helper
from onnxcompress.passes.quantize import Quantize

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager

#: what the technique tests hold fixed: no latency guard, no automatic float layers, min/max ranges
FIXED = {"latency_guard": False, "auto_float_db": 0, "calibration": "minmax"}


def add_initializers(model, arrays: dict[str, np.ndarray]) -> None:
    """Append ``arrays`` to the model's initializers under their names."""
    for name, a in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(a, name))


def normal_feeds(shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of one input ``x`` of standard normal float32 values of ``shape``."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def quantize_on(model, calib_feeds: list[dict], /, **options):
    """(quantized model, the pass's stats) with ``FIXED`` options overridden by ``options`` (which may name the
    pass's own ``calibration`` range rule)."""
    ctx = PassContext(calibration=load_feeds(calib_feeds, model))
    result = PassManager([Quantize(**{**FIXED, **options})], measure=False).run(model, ctx)
    return result.model, result.ledger[-1].pass_stats


def output_sqnr(ref, cand, fs) -> float:
    """SQNR (dB) of ``cand``'s first output against ``ref``'s under ORT, pooled over the feeds ``fs``."""
    r = np.concatenate([ort_run(ref, f)[0].ravel() for f in fs]).astype(np.float64)
    c = np.concatenate([ort_run(cand, f)[0].ravel() for f in fs]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - c) ** 2)))
