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


#: 8-bit weight codes: int8, or uint8 where this machine's onnxruntime saturates u8 x s8 (``u8s8_saturation``)
WEIGHT_CODES = (np.int8, np.uint8)


def signed_codes(codes: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
    """Weight codes on the signed grid, q - z (uint8 codes carry z + 128): the same integers whichever type."""
    z = np.zeros((), np.int64) if zero_point is None else np.asarray(zero_point, np.int64)
    if codes.dtype == np.uint8 and zero_point is None:
        z = np.asarray(128, np.int64)
    return codes.astype(np.int64) - z

