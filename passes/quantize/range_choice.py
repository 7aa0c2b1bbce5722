"""Range choice of static quantization: which ``[lo, hi]`` of its calibration statistics each activation is
quantized over.

Per tensor, ``onnxcompress.analyses.calibration.choose_range`` applies the rule (``minmax``, ``percentile``,
``entropy``, ``mse``) for the activation type's ``qmax − qmin + 1`` levels, symmetric or not; a tensor that never
held a finite value gets ``(0, 0)``.

``calibration=auto`` builds the all-int8 model with each of ``AUTO_METHODS`` (minmax, mse, percentile), scores them
on the first ``AUTO_METHOD_FEEDS`` evaluation feeds (``fidelity.rank_key``: feature SQNR, agreement, output SQNR)
and keeps the best; its all-int8 build is kept for the float-layer search, which starts from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxcompress.analyses.calibration import TensorStats, choose_range

from . import fidelity as fid

if TYPE_CHECKING:  # pragma: no cover
    from .options import QuantizeOptions
    from .qparams_math import QType
    from .run_view import QuantizeRun

#: range rules tried by calibration=auto, scored on this many evaluation feeds
AUTO_METHODS = ("minmax", "mse", "percentile")
AUTO_METHOD_FEEDS = 16


def activation_range(s: TensorStats, method: str, qt: QType, p: QuantizeOptions) -> tuple[float, float]:
    """The range of one tensor with statistics ``s`` by ``method`` for activations of type ``qt``."""
    if not np.isfinite(s.min):
        return 0.0, 0.0
    levels = qt.qmax - qt.qmin + 1
    return choose_range(s, method, levels=levels, symmetric=p.symmetric_activations, percentile=p.percentile)


def choose_method(run: QuantizeRun, ref: fid.Reference) -> None:
    """calibration=auto: score the ranges of every rule of ``AUTO_METHODS`` on the first ``AUTO_METHOD_FEEDS``
    evaluation feeds and keep the best (``run.method``, ``run.ranges``, ``run.all_int8``)."""
    results, built = {}, {}
    sub = ref.head(AUTO_METHOD_FEEDS)
    for method in AUTO_METHODS:
        run.method = method
        run.ranges = {n: activation_range(s, method, run.qt, run.p) for n, s in run.tstats.items()}
        b = run.build()
        built[method] = (b.plan, run.export(b.graph))
        results[method] = fid.score_model(sub, built[method][1])
    best = min(results, key=lambda m: fid.rank_key(results[m]))
    run.all_int8 = (best, *built[best])  # the float-layer search starts from it
    run.method = best
    run.ranges = {n: activation_range(s, best, run.qt, run.p) for n, s in run.tstats.items()}
    run.stats["calibration_auto"] = {m: {k: round(v, 5) for k, v in r.items()} for m, r in results.items()}
